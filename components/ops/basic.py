"""Plain tensor ops that become ``call_function`` nodes: ``add``, ``mul``, ``concat``, ``scale``,
``cast``.

Each is a module-level function so the generated fx code can name it
(``physlm_graph.components.ops.basic.add``). Tensors come positionally, parameters as
keywords: ``fn(*tensors, **params)``. ``add`` and ``mul`` broadcast (a (1, T, D) position
embedding adds to a (B, T, D) token embedding).
"""

from __future__ import annotations

import torch
from typing import Literal

from pydantic import Field
from torch import Tensor

from physlm_graph import ComponentParams, Example, register_function

__all__ = ["add", "mul", "concat", "scale", "cast"]


def add(*xs: Tensor) -> Tensor:
    """Elementwise sum of any number of tensors, with broadcasting (residual connections)."""
    out = xs[0]
    for x in xs[1:]:
        out = out + x
    return out


def mul(*xs: Tensor) -> Tensor:
    """Elementwise product of any number of tensors, with broadcasting (gates)."""
    out = xs[0]
    for x in xs[1:]:
        out = out * x
    return out


def concat(*xs: Tensor, dim: int = -1) -> Tensor:
    """Concatenate any number of tensors along ``dim`` (default: the feature dimension)."""
    return torch.cat(xs, dim=dim)


def scale(x: Tensor, *, factor: float) -> Tensor:
    """Multiply one tensor by a constant ``factor`` (e.g. Gemma's sqrt(D) embedding scale)."""
    return x * factor


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cast(x: Tensor, *, to: str = "keep") -> Tensor:
    """Change one tensor's dtype: ``keep`` (the identity), ``autocast`` (the autocast dtype while
    autocast is on for the tensor's device, else the identity) or a dtype by name.

    Its use is the residual stream's precision. Under autocast a residual stream that starts from
    an fp32 embedding stays fp32 (``fp32 + bf16 -> fp32`` at every add), so every LayerNorm and
    residual add reads and writes fp32, and every branch's gradient is cast back to bf16 on its
    own. Cast once to ``autocast`` after the embedding, the stream and its gradient are bf16 (as
    llm.c trains GPT-2). This halves that traffic and rounds every residual add to bf16: a change of
    numerics, so the op's default is ``keep``; ``gpt2-124m.yaml`` asks for ``autocast`` through its
    ``params.residual`` (measured: docs/blueprint.md).
    """
    if to == "keep":
        return x
    if to == "autocast":
        dev = x.device.type
        if dev in ("cuda", "cpu", "xpu") and torch.is_autocast_enabled(dev):
            return x.to(torch.get_autocast_dtype(dev))
        return x
    return x.to(_DTYPES[to])


class CastParams(ComponentParams):
    to: Literal["keep", "autocast", "float32", "bfloat16", "float16"] = Field(
        "keep", description="keep (identity), autocast (the autocast dtype while autocast is on) or a dtype")


class ConcatParams(ComponentParams):
    dim: int = Field(-1, description="dimension to concatenate along (-1: features)")


class ScaleParams(ComponentParams):
    factor: float = Field(description="the constant multiplier")


_PAIR = {"a": (2, 8, 16), "b": (2, 8, 16)}

register_function("add", add, examples=[Example({}, _PAIR), Example({}, {"a": (2, 8, 16), "b": (1, 8, 16)})])
register_function("mul", mul, examples=[Example({}, _PAIR)])
register_function(
    "concat",
    concat,
    params=ConcatParams,
    examples=[Example({}, {"a": (2, 8, 16), "b": (2, 8, 4)}), Example({"dim": 1}, _PAIR)],
)
register_function("scale", scale, params=ScaleParams, variadic=False, examples=[Example({"factor": 2.0}, {"x": (2, 8, 16)})])
register_function(
    "cast",
    cast,
    params=CastParams,
    variadic=False,
    examples=[Example({"to": "autocast"}, {"x": (2, 8, 16)}), Example({"to": "float32"}, {"x": (2, 8, 16)})],
)
