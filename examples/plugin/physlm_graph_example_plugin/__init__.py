"""norm.scale_norm: ScaleNorm (Nguyen & Salazar 2019, "Transformers without Tears"), as a plugin.

An example of a component living in its own package: the package declares the entry point
``physlm_graph.components`` (see pyproject.toml), and physlm-graph imports this module the
first time it looks a component up, which runs the ``@register`` below.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import Tensor, nn

from physlm_graph import ComponentParams, Example, Inputs, register

__all__ = ["ScaleNorm", "ScaleNormParams"]


class ScaleNorm(nn.Module):
    """``y = g * x / max(||x||, eps)``: one learned scalar g (init sqrt(D)) instead of a gain per feature.

    Shapes: x (B, T, D) -> (B, T, D). Works position by position, so it is causal.
    """

    def __init__(self, *, embed_dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.g = nn.Parameter(torch.tensor(math.sqrt(embed_dim)))

    def forward(self, x: Tensor) -> Tensor:
        norm = x.norm(dim=-1, keepdim=True).clamp_min(self.eps)  # (B, T, 1)
        return self.g * x / norm


class ScaleNormParams(ComponentParams):
    eps: float = Field(1e-5, gt=0.0, description="smallest norm divided by")


@register("norm.scale_norm", params=ScaleNormParams, decode="stateless",
          examples=[Example({"eps": 1e-5}, {"x": (2, 8, 16)})])
def build_scale_norm(p: ScaleNormParams, ins: Inputs) -> ScaleNorm:
    return ScaleNorm(embed_dim=ins["x"].dim, eps=p.eps)
