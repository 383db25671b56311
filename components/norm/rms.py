"""norm.rms: RMSNorm over the last dimension (LLaMA ``attention_norm``, ``ffn_norm``, ``norm``; Gemma's (1 + w) form)."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn

from physlm_graph import ComponentParams, Example, Inputs, register
from physlm_graph._registry import HFName


class RMSNorm(nn.Module):
    """Root-mean-square normalisation (Zhang & Sennrich 2019): ``x * rsqrt(mean(x^2) + eps) * weight``.

    No centring and no bias. As in Hugging Face ``LlamaRMSNorm``, the normalisation runs in
    float32 and is cast back to the input dtype before the weight multiplies it (bit for bit
    HF's result when weight and x share a dtype); the output keeps the input dtype even when
    the weight is float32 master weights under bf16 activations. weight starts at 1.

    ``unit_offset`` (Gemma, Gemma 2): the scale is ``1 + weight`` and weight starts at 0, so a
    weight decayed towards 0 leaves the normalised x unscaled; as in Gemma, the scale multiplies
    in float32 and the product is cast back to the input dtype.
    Shapes: x (B, T, D) -> (B, T, D).
    """

    def __init__(self, *, embed_dim: int, eps: float = 1e-6, unit_offset: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.unit_offset = unit_offset
        self.weight = nn.Parameter(torch.zeros(embed_dim) if unit_offset else torch.ones(embed_dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)  # (B, T, D) fp32
        if self.unit_offset:
            return (xf * (1.0 + self.weight.float())).to(x.dtype)
        return (self.weight * xf.to(x.dtype)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}" + (", unit_offset=True" if self.unit_offset else "")


class RMSNormParams(ComponentParams):
    eps: float = Field(1e-6, gt=0.0, description="added to the mean square for stability (LLaMA: 1e-6 or 1e-5)")
    unit_offset: bool = Field(False, description="scale by 1 + weight, weight starting at 0 (Gemma, Gemma 2; "
                                                 "transformers stores that weight)")


@register(
    "norm.rms",
    hf={"default": (HFName("weight", ("weight",)),)},  # transformers' names
    params=RMSNormParams,
    decode="stateless",
    examples=[Example({}, {"x": (2, 8, 16)}), Example({"eps": 1e-5, "unit_offset": True}, {"x": (2, 8, 16)})],
)
def build_rms_norm(p: RMSNormParams, ins: Inputs) -> RMSNorm:
    return RMSNorm(embed_dim=ins["x"].dim, eps=p.eps, unit_offset=p.unit_offset)
