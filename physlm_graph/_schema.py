"""Pydantic models of the blueprint document (format v1).

These check the document's structure; each component's parameters are checked by that
component's own model, and the wiring by the graph checks in ``_validate``.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from physlm_graph._strict import StrictScalars

__all__ = [
    "BlueprintDoc",
    "BlockDoc",
    "LossDoc",
    "GrowthStage",
    "ExitsDoc",
    "ExtensionDoc",
    "TrainConfig",
    "OptimizerGroupDoc",
    "InitRuleDoc",
    "NODE_KEYS",
    "BLOCK_USE_KEYS",
    "unknown_key_fix",
]

# Keys of a node that are not component parameters.
NODE_KEYS = frozenset({"use", "in", "tie", "allow_leak", "about"})
BLOCK_USE_KEYS = frozenset({"use", "in", "repeat", "pattern", "select", "about"})


class _Strict(StrictScalars):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BlockDoc(_Strict):
    """A reusable sub-graph. ``inputs`` names what it takes (``x`` by default); ``out`` is one
    node (an output named like the first input) or a map of named outputs."""

    about: str = ""
    params: dict[str, Any] = Field(default_factory=dict)
    inputs: list[str] = Field(default_factory=lambda: ["x"])
    nodes: dict[str, dict[str, Any]]
    out: Union[str, dict[str, str]]

    @field_validator("nodes")
    @classmethod
    def _nodes_have_use(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        if not v:
            raise ValueError("a block needs at least one node")
        return v


class LossDoc(_Strict):
    """A named auxiliary loss: the port(s) it gathers (a glob over ``node.port`` paths, e.g.
    ``trunk.*.attn.repulsion``), its weight, and how matches combine."""

    from_: Union[str, list[str]] = Field(alias="from")
    weight: float = 1.0
    reduce: Literal["mean", "sum"] = "mean"

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


def _growth_op_names() -> list[str]:
    """The registered growth operators (``physlm_graph/_growth_ops.py``; imported late: that
    module reads the IR, which reads this schema)."""
    from physlm_graph._growth_ops import growth_op_names

    return list(growth_op_names())


def _enum_of_growth_ops(schema: dict[str, Any]) -> None:
    schema["enum"] = _growth_op_names()


def blueprint_json_schema_stage_enum() -> list[str]:
    """The growth operators the JSON Schema offers editors for ``growth[].grow``."""
    return GrowthStage.model_json_schema()["properties"]["grow"]["enum"]


class GrowthStage(_Strict):
    """One developmental stage: the params it sets, and how the model grows into it."""

    until: int | None = Field(None, ge=1, description="the stage lasts until this training step")
    until_tokens: int | None = Field(None, ge=1, description="or until this many training tokens")
    params: dict[str, Any] = Field(default_factory=dict)
    grow: str = Field("zero_init", json_schema_extra=_enum_of_growth_ops,
                      description="the growth operator (a registered name: zero_init, mask, stack, interpolate)")
    where: Union[Literal["end", "start", "interleave"], list[int]] = "end"
    ramp_steps: int = Field(100, ge=1, description="mask operator: steps to ramp new structure in")
    rewarmup: int = Field(0, ge=0, description="learning-rate re-warmup steps after growing")

    @field_validator("grow", mode="after")
    @classmethod
    def _registered(cls, v: str) -> str:
        names = _growth_op_names()
        if v not in names:
            raise ValueError("Input should be " + ", ".join(repr(n) for n in names[:-1]) + f" or {names[-1]!r}")
        return v

    @model_validator(mode="after")
    def _one_bound(self) -> "GrowthStage":
        if self.until is not None and self.until_tokens is not None:
            raise ValueError("give `until` (steps) or `until_tokens`, not both")
        return self


ExitRule = Literal["top1", "margin", "entropy", "saturation"]


class ExitsDoc(_Strict):
    """Early exits: after which nodes (or every k block instances), their head and norm, the
    loss weighting in training, and the rule that decides to exit at inference."""

    after: list[str] = Field(default_factory=list)
    every: int | None = Field(None, ge=1)
    block: str | None = Field(None, description="the repeated block node `every` counts in")
    head: Union[Literal["tie", "own"], str] = "tie"
    norm: bool = True
    weighting: Union[Literal["uniform", "depth"], list[float]] = "depth"
    weight: float = Field(1.0, ge=0.0, description="overall weight of the exit losses")
    rule: ExitRule = "margin"
    threshold: float = Field(0.9, allow_inf_nan=False, description="the rule's threshold (a finite number)")

    @model_validator(mode="after")
    def _where(self) -> "ExitsDoc":
        if self.every is not None and not self.block:
            raise ValueError("`every` needs `block`: the name of the repeated block node (e.g. trunk)")
        return self


class ExtensionDoc(BaseModel):
    """A component inserted after every node matching ``at`` (a glob over node paths); its
    other keys are the component's parameters."""

    model_config = ConfigDict(extra="allow", frozen=True)

    use: str
    at: Union[str, list[str]]


_EXPONENT = re.compile(r"[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+")


def _yaml12_float(v: Any) -> Any:
    """``3e-4`` as a number: YAML 1.2 reads it so, PyYAML (YAML 1.1) leaves it a string."""
    return float(v) if isinstance(v, str) and _EXPONENT.fullmatch(v.strip()) else v


CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
COMPILE_MODES: tuple[str, ...] = CompileMode.__args__


ParamShape = Literal["any", "matrix", "vector"]

# a random seed, as torch.manual_seed takes it and the command line's --seed allows
Seed = Annotated[int, Field(ge=0, lt=1 << 63)]
# an Adam moment decay: torch.optim.AdamW refuses one outside [0, 1)
Beta = Annotated[float, Field(ge=0.0, lt=1.0)]
_MUON_KEYS = ("momentum", "nesterov", "ns_coefficients", "ns_steps", "split")
_ADAMW_KEYS = ("betas", "eps")


class OptimizerGroupDoc(StrictScalars):
    """One parameter group of ``train.optimizers``: the parameters whose names match one of
    ``params`` (the blueprint's globs over ``named_parameters()`` names: ``*`` one segment, ``**``
    any, ``{a,b}``), of the ``shape`` asked (matrix: 2 or more dimensions, vector: fewer), trained
    by ``optimizer`` at ``lr`` (scaled by the schedule) with decoupled ``weight_decay``. Each
    trainable parameter must fall in exactly one group."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    name: str = Field(min_length=1, description="the group's name, in the run summary and the optimizer state")
    params: list[str] = Field(min_length=1, description="name patterns; a pattern that matches no parameter is an error")
    shape: ParamShape = "any"
    optimizer: Literal["muon", "adamw"]
    lr: float = Field(gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    betas: tuple[Beta, Beta] | None = Field(None, description="adamw: default (0.9, 0.95)")
    eps: float | None = Field(None, gt=0.0, description="adamw: default 1e-8")
    momentum: float | None = Field(None, ge=0.0, lt=1.0, description="muon: default 0.95")
    nesterov: bool | None = Field(None, description="muon: default true")
    ns_coefficients: tuple[float, float, float] | None = Field(
        None, description="muon: the Newton-Schulz step X <- a X + (b A + c A^2) X, A = X X^T; default (2, -1.5, 0.5)")
    ns_steps: int | None = Field(None, ge=1, le=99, description="muon: Newton-Schulz steps; default 12")
    split: int | None = Field(None, ge=1, description="muon: orthogonalise each matrix as this many equal row blocks "
                              "(a fused q, k, v projection is 3); default 1")

    @field_validator("lr", "weight_decay", "eps", mode="before")
    @classmethod
    def _exponent_float(cls, v: Any) -> Any:
        return _yaml12_float(v)

    @field_validator("betas", "ns_coefficients", mode="before")
    @classmethod
    def _tuple_from_list(cls, v: Any) -> Any:
        return tuple(_yaml12_float(x) for x in v) if isinstance(v, list) else v

    @model_validator(mode="after")
    def _settings_of_its_optimizer(self) -> "OptimizerGroupDoc":
        other = _ADAMW_KEYS if self.optimizer == "muon" else _MUON_KEYS
        given = [k for k in other if getattr(self, k) is not None]
        if given:
            mine = _MUON_KEYS if self.optimizer == "muon" else _ADAMW_KEYS
            raise ValueError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} not a setting of {self.optimizer} "
                             f"(its settings: lr, weight_decay, {', '.join(mine)})")
        return self


class InitRuleDoc(StrictScalars):
    """One rule of ``train.init_rules``: parameters matching ``params`` (and ``shape``) start as
    ``init``: zeros, ones, normal (N(0, std^2)) or fan_in (N(0, scale / fan_in), fan_in the last
    dimension). The first rule matching a parameter takes it; a rule that takes none is an error."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    params: list[str] = Field(min_length=1)
    shape: ParamShape = "any"
    init: Literal["zeros", "ones", "normal", "fan_in"]
    std: float | None = Field(None, gt=0.0, description="normal: the standard deviation (default 1)")
    scale: float | None = Field(None, gt=0.0, description="fan_in: the variance times fan_in (default 1)")

    @field_validator("std", "scale", mode="before")
    @classmethod
    def _exponent_float(cls, v: Any) -> Any:
        return _yaml12_float(v)

    @model_validator(mode="after")
    def _settings_of_its_init(self) -> "InitRuleDoc":
        if self.std is not None and self.init != "normal":
            raise ValueError(f"std is a setting of init: normal, not {self.init}")
        if self.scale is not None and self.init != "fan_in":
            raise ValueError(f"scale is a setting of init: fan_in, not {self.init}")
        return self


class TrainConfig(_Strict):
    """Defaults for ``physlm-graph train``; the command line overrides them. Strict types: a
    string is not a number (``steps: "10"``), a float not an int (``steps: 10.0``), and only
    true/false are booleans (``compile: "yes"`` is refused)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    data: str | None = None
    tokenizer: str = "bytes"
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    steps: int = Field(1000, ge=1)
    batch_size: int = Field(12, ge=1)
    seq_len: int | None = Field(None, ge=1, description="training window; default: the model's context")
    accumulate: int = Field(1, ge=1)
    lr: float = Field(1e-3, gt=0.0)
    min_lr: float | None = Field(None, ge=0.0, description="default lr / 10")
    warmup: int = Field(100, ge=0)
    schedule: Literal["cosine", "constant", "linear", "wsd"] = Field(
        "cosine", description="after warmup: cosine or linear down to min_lr, constant, or wsd (stable, then a "
        "linear decay to min_lr over the last decay_frac of the steps)")
    decay_frac: float | None = Field(None, ge=0.0, le=1.0, description="wsd: the decaying share of the steps "
                                     "(default 0.7)")
    weight_decay: float = Field(0.1, ge=0.0)
    betas: tuple[Beta, Beta] = (0.9, 0.99)
    grad_clip: float = Field(1.0, ge=0.0)
    eval_every: int = Field(250, ge=1)
    eval_iters: int = Field(50, ge=1)
    save_every: int | None = Field(None, ge=1, description="default: eval_every")
    checkpoint_format: Literal["full", "sharded"] = Field(
        "full", description="full: rank 0 writes the whole model and optimizer state (gathered first under FSDP2); "
        "sharded: every rank writes its own shards through torch.distributed.checkpoint, nothing is gathered, "
        "and the run resumes on any number of processes (generate, eval and export read it as well)")
    log_every: int = Field(10, ge=1)
    seed: Seed = 1337
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    compile: Union[bool, CompileMode] = Field(
        False, description="torch.compile the model and loss: false, or the mode (default, reduce-overhead: each "
        "step replayed as CUDA graphs, max-autotune, max-autotune-no-cudagraphs); true means default")

    @model_validator(mode="before")
    @classmethod
    def _compile_mode_is_compile(cls, data: Any) -> Any:
        if isinstance(data, dict) and "compile_mode" in data:
            raise ValueError(f"`compile_mode` is now the value of `compile`: write `compile: {data['compile_mode']}` "
                             "instead of compile_mode (a mode turns compiling on)")
        return data

    @field_validator("compile", mode="before")
    @classmethod
    def _compile_is_false_or_a_mode(cls, v: Any) -> Any:
        if isinstance(v, bool) or v in COMPILE_MODES:
            return v
        raise ValueError("expected false or a mode: " + ", ".join(COMPILE_MODES) + " (true means default)")

    @field_validator("compile", mode="after")
    @classmethod
    def _compile_true_is_default(cls, v: Any) -> Any:
        return "default" if v is True else v

    @field_validator("fused_loss", mode="before")
    @classmethod
    def _fused_loss_is_a_bool_or_auto(cls, v: Any) -> Any:
        if isinstance(v, bool) or v == "auto":
            return v
        raise ValueError("expected true, false or auto")
    fused_loss: bool | Literal["auto"] = Field(
        "auto", description="LM head + cross-entropy as one fused operation (no separate logits pass); auto: on "
        "with compile on a CUDA GPU when the blueprint's logits come straight from a bias-free head.lm; true: "
        "wherever the blueprint allows it (an error if it does not)")
    data_order: Literal["random", "sequential"] = Field(
        "random", description="how the training split is read: random windows (each rank its own seed), or "
        "sequential: in order across the token files, each micro-batch the next batch_size x seq_len + 1 tokens, "
        "each rank its own slice, starting again at the first file after the last")
    fit_vocab: bool = Field(
        False, description="set params.vocab to the tokenizer's size (rounded up to vocab_multiple) when the run "
        "builds its model; false: params.vocab is kept as written, and must be at least the tokenizer's size "
        "(the ids past it are padding: never a target, never sampled)")
    vocab_multiple: int = Field(
        1, ge=1, description="with fit_vocab: round the tokenizer's size up to a multiple of this (64 suits GPU "
        "matmuls); the padded ids get -inf logits through head.lm's logit_limit, so the function is unchanged")
    ddp_bucket_mb: float = Field(250.0, gt=0.0, description="DDP gradient bucket size in MiB (torch's default: 25)")
    ddp_bucket_view: bool = Field(True, description="DDP gradient_as_bucket_view: gradients live in the buckets, one copy less")
    ddp_reduce_dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="dtype of DDP's gradient all-reduce: bfloat16 sends half the bytes (each bucket "
        "cast to bf16 and divided by the world size, summed, cast back); the gradients and the optimizer stay "
        "fp32. DDP only")
    nan_policy: Literal["stop", "skip"] = "stop"
    max_skips: int = Field(10, ge=0)
    checkpointing: Any = Field(
        "none", description="activation checkpointing: none; blocks (every block instance recomputed in backward, "
        "only its inputs kept); {every: k} (every k-th block instance); {nodes: [patterns]} (the components whose "
        "paths match, e.g. trunk.*.attn)")

    @field_validator("checkpointing", mode="before")
    @classmethod
    def _checkpointing_form(cls, v: Any) -> Any:
        if v in ("none", "blocks"):
            return v
        if isinstance(v, dict) and set(v) == {"every"}:
            k = v["every"]
            if type(k) is not int or k < 1:
                raise ValueError(f"checkpointing.every must be a whole number >= 1, got {k!r}")
            return {"every": k}
        if isinstance(v, dict) and set(v) == {"nodes"}:
            pats = v["nodes"]
            if not isinstance(pats, list) or not pats or not all(isinstance(x, str) and x for x in pats):
                raise ValueError("checkpointing.nodes must be a non-empty list of path patterns (trunk.*.attn)")
            return {"nodes": list(pats)}
        raise ValueError(f"expected none, blocks, {{every: k}} or {{nodes: [patterns]}}, got {v!r}")

    optimizers: list[OptimizerGroupDoc] | None = Field(
        None, description="optimizers by parameter group (Muon or AdamW, each with its lr and weight decay); "
        "default: one AdamW over every parameter with lr, weight_decay and betas")
    init_rules: list[InitRuleDoc] | None = Field(
        None, description="initialisation by parameter name pattern, applied when the run builds its model; "
        "parameters no rule takes keep their component's init")
    loss_reduction: Literal["mean", "sum"] = Field(
        "mean", description="what the gradient is of: the objective averaged over tokens and micro-batches (mean), "
        "or summed over both (sum); the logged losses are per-token means either way")

    @model_validator(mode="after")
    def _cross_checks(self) -> "TrainConfig":
        if self.decay_frac is not None and self.schedule != "wsd":
            raise ValueError(f"decay_frac is a setting of schedule: wsd, not {self.schedule}")
        if self.optimizers is not None:
            if not self.optimizers:
                raise ValueError("optimizers is empty: list at least one group, or leave it out for the default AdamW")
            dflt = {k: TrainConfig.model_fields[k].default for k in ("lr", "weight_decay", "betas", "min_lr")}
            moved = [k for k, v in dflt.items() if getattr(self, k) != v]
            if moved:
                raise ValueError(f"{', '.join(moved)} {'is' if len(moved) == 1 else 'are'} for the default AdamW; with "
                                 "optimizers each group has its own lr and weight_decay (and its schedule ends at "
                                 "the default floor), so leave them out")
            names = [g.name for g in self.optimizers]
            twice = sorted({n for n in names if names.count(n) > 1})
            if twice:
                raise ValueError(f"optimizer group name(s) {', '.join(twice)} used twice")
        if self.vocab_multiple != 1 and not self.fit_vocab:
            raise ValueError(f"vocab_multiple {self.vocab_multiple} rounds the tokenizer's size that fit_vocab: true "
                             "gives params.vocab; without fit_vocab params.vocab is kept as written: add fit_vocab: "
                             "true, or write the padded size in params.vocab and drop vocab_multiple")
        return self

    @field_validator("val_fraction", "lr", "min_lr", "weight_decay", "grad_clip", "ddp_bucket_mb", mode="before")
    @classmethod
    def _exponent_float(cls, v: Any) -> Any:
        return _yaml12_float(v)

    @field_validator("betas", mode="before")
    @classmethod
    def _betas_from_list(cls, v: Any) -> Any:
        # YAML and JSON give lists; the items stay strict
        return tuple(_yaml12_float(x) for x in v) if isinstance(v, list) else v


class InitDoc(_Strict):
    """How weights start: each component's own init (``default``) or GPT-2's (``gpt2``)."""

    scheme: Literal["default", "gpt2"] = "default"
    std: float = Field(0.02, gt=0.0)


class BlueprintDoc(_Strict):
    """The whole document (after ``extends`` is merged)."""

    physlm: Literal[1] = 1
    name: str
    about: str = ""
    causal: bool = True
    params: dict[str, Any] = Field(default_factory=dict)
    inputs: dict[str, list[str]] = Field(default_factory=lambda: {"tokens": ["batch", "seq"]})
    blocks: dict[str, BlockDoc] = Field(default_factory=dict)
    nodes: dict[str, dict[str, Any]]
    outputs: dict[str, str]
    losses: dict[str, LossDoc] = Field(default_factory=dict)
    growth: list[GrowthStage] = Field(default_factory=list)
    exits: ExitsDoc | None = None
    extensions: dict[str, ExtensionDoc] = Field(default_factory=dict)
    train: TrainConfig = Field(default_factory=TrainConfig)
    init: InitDoc = Field(default_factory=InitDoc)

    @field_validator("outputs")
    @classmethod
    def _has_logits(cls, v: dict[str, str]) -> dict[str, str]:
        if not v:
            raise ValueError("a blueprint needs at least one output (outputs: {logits: head})")
        return v

    @field_validator("exits", mode="before")
    @classmethod
    def _empty_exits(cls, v: Any) -> Any:
        return None if v in ({}, None) else v


def _keys(model: type[BaseModel]) -> list[str]:
    return [f.alias or name for name, f in model.model_fields.items()]


def unknown_key_fix(path: tuple[str | int, ...]) -> str | None:
    """The fix for an unknown key at document path ``path``: the closest known keys of the
    section it is in (did you mean ...?), else where the keys are listed."""
    import difflib

    parent = path[:-1]
    sections: dict[tuple[str | int, ...], type[BaseModel]] = {
        (): BlueprintDoc, ("train",): TrainConfig, ("init",): InitDoc, ("exits",): ExitsDoc}
    model = sections.get(parent)
    if model is None and len(parent) == 3 and parent[0] == "train":
        model = {"optimizers": OptimizerGroupDoc, "init_rules": InitRuleDoc}.get(str(parent[1]))
    if model is None and len(parent) == 2:
        model = {"losses": LossDoc, "growth": GrowthStage, "blocks": BlockDoc}.get(str(parent[0]))
    if model is None or not path:
        return None
    keys = _keys(model)
    near = difflib.get_close_matches(str(path[-1]), keys, n=3)
    if near:
        return f"did you mean {', '.join(near)}?"
    if len(keys) <= 12:
        return f"known keys: {', '.join(keys)}"
    return "`physlm-graph schema` writes every key with its type and doc"
