"""ffn.mlp: the transformer feed-forward block, Linear -> GELU -> Linear -> Dropout (GPT-2)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import Tensor, nn

from physlm_graph import ComponentParams, Example, Inputs, register
from physlm_graph._registry import HFName
from physlm_graph.components.ffn._gelu_mlp import fused_dtype, gelu_mlp


class MLP(nn.Module):
    """Two-layer feed-forward network: ``dropout(W2 gelu(W1 x + b1) + b2)``.

    Shapes: x (B, T, D) -> (B, T, D). GPT-2 uses hidden_dim = 4 D and GELU's tanh approximation.

    With ``approximate="tanh"`` on a GPU in bf16/fp16 (autocast or half weights), the GELU runs
    inside the two matmuls' epilogues (``_gelu_mlp.py``; the same function and gradients).
    ``fused = False`` on the module keeps the three-step path (benchmarks compare the two).
    """

    def __init__(self, *, embed_dim: int, hidden_dim: int, dropout: float = 0.0, bias: bool = True,
                 approximate: str = "none") -> None:
        super().__init__()
        self.fc = nn.Linear(embed_dim, hidden_dim, bias=bias)
        self.act = nn.GELU(approximate=approximate)
        self.proj = nn.Linear(hidden_dim, embed_dim, bias=bias)
        self.drop = nn.Dropout(dropout)
        self.fused = approximate == "tanh" and hidden_dim % 8 == 0 and embed_dim % 8 == 0

    def forward(self, x: Tensor) -> Tensor:
        if self.fused and type(self.fc) is nn.Linear and type(self.proj) is nn.Linear:
            dtype = fused_dtype(x, self.fc.weight, self.proj.weight)
            if dtype is not None:
                return self.drop(gelu_mlp(x, self.fc.weight, self.fc.bias, self.proj.weight, self.proj.bias, dtype))
        return self.drop(self.proj(self.act(self.fc(x))))


class MLPParams(ComponentParams):
    hidden_dim: int = Field(gt=0, description="width of the hidden layer (GPT-2: 4 * embed_dim)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the output")
    bias: bool = Field(True, description="biases in both linear layers")
    approximate: Literal["none", "tanh"] = Field(
        "none", description="GELU form: exact (erf) or the tanh approximation (GPT-2's; on GPUs it runs "
                            "inside the matmuls)")


@register(
    "ffn.mlp",
    hf={"conv1d": (HFName("fc.weight", ("c_fc.weight",), transposed=True), HFName("fc.bias", ("c_fc.bias",)),
                   HFName("proj.weight", ("c_proj.weight",), transposed=True), HFName("proj.bias", ("c_proj.bias",)))},
    params=MLPParams,
    decode="stateless",
    examples=[Example({"hidden_dim": 64}, {"x": (2, 8, 16)}),
              Example({"hidden_dim": 64, "approximate": "tanh"}, {"x": (2, 8, 16)})],
)
def build_mlp(p: MLPParams, ins: Inputs) -> MLP:
    return MLP(embed_dim=ins["x"].dim, hidden_dim=p.hidden_dim, dropout=p.dropout, bias=p.bias,
               approximate=p.approximate)
