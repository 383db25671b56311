"""ffn.swiglu: the gated feed-forward block of LLaMA (SwiGLU) and, with another gate activation, Gemma's GeGLU."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import Tensor, nn
from torch.nn import functional as F

from physlm_graph import ComponentParams, Example, Inputs, register
from physlm_graph._registry import HFName

_ACTS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


class SwiGLU(nn.Module):
    """Gated feed-forward (Shazeer 2020, "GLU Variants"; LLaMA): ``w2(act(w1 x) * w3 x)``.

    ``act`` is the gate's activation: ``silu`` is SwiGLU (LLaMA, Mistral, Qwen, OLMo 2),
    ``gelu_tanh`` GeGLU with GELU's tanh approximation (Gemma, Gemma 2: transformers'
    ``gelu_pytorch_tanh``), ``gelu`` GeGLU with the exact (erf) GELU (T5 v1.1).

    Shapes: x (B, T, D) -> (B, T, D); w1 and w3 map D -> hidden_dim, w2 maps hidden_dim -> D.
    Names follow Meta's LLaMA code (w1 gate, w3 up, w2 down). LLaMA sizes hidden_dim as
    about 8/3 D rounded up to a multiple of 256 and has no biases.
    """

    def __init__(self, *, embed_dim: int, hidden_dim: int, bias: bool = False,
                 act: Literal["silu", "gelu", "gelu_tanh"] = "silu") -> None:
        super().__init__()
        self.act = act
        self.w1 = nn.Linear(embed_dim, hidden_dim, bias=bias)
        self.w3 = nn.Linear(embed_dim, hidden_dim, bias=bias)
        self.w2 = nn.Linear(hidden_dim, embed_dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(_ACTS[self.act](self.w1(x)) * self.w3(x))  # (B, T, D)

    def extra_repr(self) -> str:
        return f"act={self.act!r}"


class SwiGLUParams(ComponentParams):
    hidden_dim: int = Field(gt=0, description="width of the gated hidden layer (LLaMA-7B: 11008 for D 4096)")
    bias: bool = Field(False, description="biases in the three linear layers (LLaMA: none)")
    act: Literal["silu", "gelu", "gelu_tanh"] = Field(
        "silu", description="the gate's activation: silu (SwiGLU), gelu_tanh (GeGLU as Gemma's), gelu (exact GeGLU)")


@register(
    "ffn.swiglu",
    hf={"default": tuple(HFName(f"{ours}.{k}", (f"{theirs}.{k}",)) for ours, theirs in
                         (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")) for k in ("weight", "bias"))},
    params=SwiGLUParams,
    decode="stateless",
    examples=[
        Example({"hidden_dim": 48}, {"x": (2, 8, 16)}),
        Example({"hidden_dim": 48, "bias": True}, {"x": (2, 8, 16)}),
        Example({"hidden_dim": 48, "act": "gelu_tanh"}, {"x": (2, 8, 16)}),
        Example({"hidden_dim": 48, "act": "gelu"}, {"x": (2, 8, 16)}),
    ],
)
def build_swiglu(p: SwiGLUParams, ins: Inputs) -> SwiGLU:
    return SwiGLU(embed_dim=ins["x"].dim, hidden_dim=p.hidden_dim, bias=p.bias, act=p.act)
