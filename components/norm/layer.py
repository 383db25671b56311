"""norm.layer: LayerNorm over the last dimension (GPT-2 ``ln_1``, ``ln_2``, ``ln_f``)."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn
from torch.nn import functional as F

from physlm_graph import ComponentParams, Example, Inputs, register
from physlm_graph._registry import HFName


class LayerNorm(nn.Module):
    """Layer normalisation (Ba et al. 2016): ``(x - mean) / sqrt(var + eps) * weight + bias``.

    Mean and (biased) variance over the last dimension. Shapes: x (B, T, D) -> (B, T, D).
    ``bias=False`` drops the additive term (nanoGPT's ``bias`` option). weight starts at 1,
    bias at 0.
    """

    def __init__(self, *, embed_dim: int, eps: float = 1e-5, bias: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(embed_dim))
        self.bias = nn.Parameter(torch.zeros(embed_dim)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, bias={self.bias is not None}"


class LayerNormParams(ComponentParams):
    eps: float = Field(1e-5, gt=0.0, description="added to the variance for stability")
    bias: bool = Field(True, description="learned additive bias (GPT-2: yes)")


@register(
    "norm.layer",
    hf={"default": (HFName("weight", ("weight",)), HFName("bias", ("bias",)))},  # transformers' names
    params=LayerNormParams,
    decode="stateless",
    examples=[
        Example({}, {"x": (2, 8, 16)}),
        Example({"bias": False, "eps": 1e-6}, {"x": (2, 8, 16)}),
    ],
)
def build_layer_norm(p: LayerNormParams, ins: Inputs) -> LayerNorm:
    return LayerNorm(embed_dim=ins["x"].dim, eps=p.eps, bias=p.bias)
