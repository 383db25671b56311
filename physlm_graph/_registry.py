"""The component registry: one object mapping names to builders.

A component file holds three things: the ``nn.Module`` (keyword-only constructor, takes
tensors and sub-modules, never blueprint dicts), a frozen pydantic ``Params`` model whose
field names are the YAML keys, and a builder registered here::

    class MLPParams(ComponentParams):
        hidden_dim: int = Field(gt=0, description="width of the hidden layer")

    @register("ffn.mlp", params=MLPParams, examples=[Example({"hidden_dim": 64}, {"x": (2, 8, 32)})])
    def build_mlp(p: MLPParams, ins: Inputs) -> MLP:
        return MLP(embed_dim=ins["x"].dim, hidden_dim=p.hidden_dim)

The builder receives the checked parameters and the input specs (shapes from the meta run),
and returns a module whose ``forward`` takes the input ports positionally, in declared order,
and returns a tensor (one output port) or a tuple in the order of ``outputs``.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import ConfigDict, field_validator

from physlm_graph._strict import StrictScalars

__all__ = [
    "ComponentParams",
    "MAX_INT_PARAM",
    "TensorSpec",
    "Inputs",
    "Example",
    "ComponentInfo",
    "Registry",
    "REGISTRY",
    "register",
    "register_function",
    "HFName",
]

DecodeKind = Literal["stateless", "cached", "recurrent", "none"]  # recurrent: a fixed-size carried state


MAX_INT_PARAM = 2**31 - 1  # no width, vocabulary or count of a model comes near it


class ComponentParams(StrictScalars):
    """Base of every component's parameter model: unknown keys are errors, values are frozen,
    numbers and booleans take their type strictly (``num_heads: yes`` is an error, not 1), and
    a whole number beyond ``MAX_INT_PARAM`` is refused before anything is allocated."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="after")
    @classmethod
    def _sane_size(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INT_PARAM:
            raise ValueError(f"far larger than any model's size (at most {MAX_INT_PARAM:,}; no weights were allocated)")
        return value


class NoParams(ComponentParams):
    """A component with no parameters."""


@dataclass(frozen=True)
class TensorSpec:
    """What a builder knows of one input: its shape (a sample, concrete) and dtype.

    ``symbols`` names the symbolic dimensions of the shape (``("batch", "seq", None)``), so a
    builder can tell the sequence axis from a feature axis.
    """

    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32
    symbols: tuple[str | None, ...] = ()

    @property
    def dim(self) -> int:
        """The last (feature) dimension."""
        return int(self.shape[-1])

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def pretty(self) -> str:
        syms = self.symbols or (None,) * len(self.shape)
        parts = [s if s else str(n) for n, s in zip(self.shape, syms)]
        return "[" + ", ".join(parts) + "]"


Inputs = dict[str, TensorSpec]


@dataclass(frozen=True)
class Example:
    """A small configuration the conformance suite builds and probes.

    ``inputs`` maps each port to a shape (float32), to ``(shape, dtype)`` or to a tensor given as
    it is (an input with a structure random numbers lack, such as a rope table); integer inputs
    are drawn from ``[0, int_high)``. ``no_grad`` lists parameter-name globs that legitimately get
    no gradient in this configuration (an untrainable gate in a ``faithful`` mode, say), each
    with the reason in ``no_grad_why``. ``probe_training`` runs the causality probe in training
    mode, for a leak that only training has (a halting step decided from the whole batch).
    """

    params: dict[str, Any]
    inputs: dict[str, Any]
    int_high: int = 50
    no_grad: tuple[str, ...] = ()
    no_grad_why: str = ""
    seq_dim: int = 1
    atol: float = 1e-5
    probe_training: bool = False


@dataclass(frozen=True)
class HFName:
    """One of a component's parameters in transformers' terms (the weight mapping of issue 24).

    ``ours`` is the parameter's name inside the component (``qkv.weight``); ``theirs`` the name(s)
    transformers uses, relative to the module that holds it (``q_proj.weight``, ...). Several
    names: ours is their concatenation along dim 0, in that order, and ``sizes`` gives each
    part's rows as expressions over the module's integer attributes (``num_heads * head_dim``).
    ``transposed``: theirs is stored (in, out), as GPT-2's ``Conv1D``. A parameter the module
    does not have (a bias turned off) is skipped on both sides.

    ``stack``: ours holds one slice per expert along a new dim 0, as many as this expression
    over the module's attributes (``num_experts``), and each of theirs names one tensor per
    slice with ``{e}`` in its name (``experts.{e}.w1.weight``); slice e is made of theirs with
    ``{e}`` = e, as above (concatenated, transposed). ``layout``: how theirs orders the rows of
    ours (dim 0), when it is not the same order: ``heads3`` is GPT-NeoX's fused
    ``query_key_value``, rows per head ``[q_h | k_h | v_h]`` where ours is ``[q | k | v]`` with
    heads contiguous inside each; it reads the module's ``num_heads``. ``rows``: ours is only
    rows ``start:stop`` (two expressions, which may also read ``rows``: ours' own row count) of
    its one tensor of theirs, the other rows belonging to
    another parameter (Phi-3's fused ``gate_up_proj`` holds SwiGLU's ``w1`` then ``w3``); export
    joins the pieces, which must cover theirs.
    """

    ours: str
    theirs: tuple[str, ...]
    sizes: tuple[str, ...] = ()
    transposed: bool = False
    stack: str = ""
    layout: str = ""
    rows: tuple[str, str] = ()


@dataclass(frozen=True)
class ComponentInfo:
    """Everything the compiler knows about one registered component."""

    name: str
    params: type[ComponentParams]
    builder: Callable[..., Any] | None
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    doc: str
    causal: bool | Callable[[Any], bool] = True
    decode: DecodeKind | Callable[[Any], DecodeKind] = "none"
    examples: tuple[Example, ...] = ()
    function: Callable[..., Any] | None = None  # plain op: becomes call_function in fx
    variadic: bool = False  # takes any number of inputs (add, concat)
    optional_inputs: tuple[str, ...] = ()
    tie_param: str | None = None  # parameter that ``tie:`` shares
    flags: tuple[str, ...] = ()  # e.g. "leaks-future" notes shown by `physlm-graph components`
    source: str = ""  # module that registered it, for duplicate errors
    family: str = ""
    hf: tuple[tuple[str, tuple[HFName, ...]], ...] = ()  # (layout, names): how transformers names the weights

    def hf_names(self, layout: str) -> tuple[HFName, ...] | None:
        """The declared transformers names of this component's parameters in ``layout``, or None."""
        return dict(self.hf).get(layout)

    def is_causal(self, params: Any) -> bool:
        return self.causal(params) if callable(self.causal) else bool(self.causal)

    def decode_kind(self, params: Any) -> DecodeKind:
        return self.decode(params) if callable(self.decode) else self.decode


class Registry:
    """Name -> ComponentInfo. A duplicate name is an error naming the first registration."""

    def __init__(self) -> None:
        self._items: dict[str, ComponentInfo] = {}
        self._loaded = False

    # -- registration -------------------------------------------------------------
    def add(self, info: ComponentInfo) -> None:
        if info.name in self._items:
            first = self._items[info.name]
            raise ValueError(
                f"component {info.name!r} is registered twice: first in {first.source}, "
                f"again in {info.source}"
            )
        self._items[info.name] = info

    # -- lookup -------------------------------------------------------------------
    def _ensure_loaded(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        import physlm_graph.components  # noqa: F401  (registers the built-in library)

        from physlm_graph._plugins import load_entry_points

        load_entry_points(self)

    def get(self, name: str) -> ComponentInfo | None:
        self._ensure_loaded()
        return self._items.get(name)

    def suggest(self, name: str, extra: Sequence[str] = ()) -> list[str]:
        self._ensure_loaded()
        return difflib.get_close_matches(name, list(self._items) + list(extra), n=3, cutoff=0.6)

    def names(self) -> list[str]:
        self._ensure_loaded()
        return sorted(self._items)

    def __iter__(self) -> Iterator[ComponentInfo]:
        self._ensure_loaded()
        return iter([self._items[n] for n in sorted(self._items)])

    def __contains__(self, name: str) -> bool:
        self._ensure_loaded()
        return name in self._items


REGISTRY = Registry()


def _first_doc_line(obj: Any) -> str:
    return inspect.cleandoc(obj.__doc__ or "").strip()


def register(
    name: str,
    *,
    params: type[ComponentParams] = NoParams,
    inputs: Sequence[str] = ("x",),
    outputs: Sequence[str] = ("out",),
    optional_inputs: Sequence[str] = (),
    causal: bool | Callable[[Any], bool] = True,
    decode: DecodeKind | Callable[[Any], DecodeKind] = "none",
    examples: Sequence[Example] = (),
    tie_param: str | None = None,
    flags: Sequence[str] = (),
    doc: str | None = None,
    hf: dict[str, Sequence[HFName]] | None = None,
    registry: Registry | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a builder ``fn(params, inputs) -> nn.Module`` under ``name``.

    ``hf`` declares the parameters' names in transformers' terms, per layout (``default``, or
    ``conv1d`` for GPT-2's transposed linears): see ``HFName``.

    The component's documentation is the docstring of the module class the builder returns
    (its return annotation) unless ``doc`` is given.
    """

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        text = doc
        if text is None:
            ret = inspect.signature(fn).return_annotation
            ret_obj = fn.__globals__.get(ret) if isinstance(ret, str) else ret
            text = _first_doc_line(ret_obj) if ret_obj not in (None, inspect.Signature.empty) else ""
            text = text or _first_doc_line(fn)
        info = ComponentInfo(
            name=name,
            params=params,
            builder=fn,
            inputs=tuple(inputs),
            outputs=tuple(outputs),
            optional_inputs=tuple(optional_inputs),
            doc=text,
            causal=causal,
            decode=decode,
            examples=tuple(examples),
            tie_param=tie_param,
            flags=tuple(flags),
            source=f"{fn.__module__}.{fn.__qualname__}",
            family=name.split(".")[0],
            hf=tuple((k, tuple(v)) for k, v in (hf or {}).items()),
        )
        (registry or REGISTRY).add(info)
        return fn

    return deco


def register_function(
    name: str,
    fn: Callable[..., Any],
    *,
    params: type[ComponentParams] = NoParams,
    variadic: bool = True,
    inputs: Sequence[str] = ("x",),
    examples: Sequence[Example] = (),
    doc: str = "",
    registry: Registry | None = None,
) -> None:
    """Register a plain tensor op (``add``, ``mul``, ``concat``) that becomes ``call_function``.

    ``fn(*tensors, **params)`` must be a module-level function so generated code can name it.
    """
    info = ComponentInfo(
        name=name,
        params=params,
        builder=None,
        inputs=tuple(inputs),
        outputs=("out",),
        doc=doc or _first_doc_line(fn),
        decode="stateless",
        examples=tuple(examples),
        function=fn,
        variadic=variadic,
        source=f"{fn.__module__}.{fn.__qualname__}",
        family="op",
    )
    (registry or REGISTRY).add(info)
