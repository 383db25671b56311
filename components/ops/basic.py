"""Plain tensor ops that become ``call_function`` nodes: ``add``, ``mul``, ``concat``, ``scale``.

Each is a module-level function so the generated fx code can name it
(``physlm_graph.components.ops.basic.add``). Tensors come positionally, parameters as
keywords: ``fn(*tensors, **params)``. ``add`` and ``mul`` broadcast (a (1, T, D) position
embedding adds to a (B, T, D) token embedding).
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from physlm_graph import ComponentParams, Example, register_function

__all__ = ["add", "mul", "concat", "scale"]


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
