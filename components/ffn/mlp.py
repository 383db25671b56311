"""ffn.mlp: the transformer feed-forward block, Linear -> GELU -> Linear -> Dropout (GPT-2)."""

from __future__ import annotations

from pydantic import Field
from torch import Tensor, nn

from physlm_graph import ComponentParams, Example, Inputs, register


class MLP(nn.Module):
    """Two-layer feed-forward network: ``dropout(W2 gelu(W1 x + b1) + b2)``.

    Shapes: x (B, T, D) -> (B, T, D). GPT-2 uses hidden_dim = 4 D and tanh-free GELU.
    """

    def __init__(self, *, embed_dim: int, hidden_dim: int, dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        self.fc = nn.Linear(embed_dim, hidden_dim, bias=bias)
        self.act = nn.GELU()
        self.proj = nn.Linear(hidden_dim, embed_dim, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.proj(self.act(self.fc(x))))


class MLPParams(ComponentParams):
    hidden_dim: int = Field(gt=0, description="width of the hidden layer (GPT-2: 4 * embed_dim)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the output")
    bias: bool = Field(True, description="biases in both linear layers")


@register(
    "ffn.mlp",
    params=MLPParams,
    decode="stateless",
    examples=[Example({"hidden_dim": 64}, {"x": (2, 8, 16)})],
)
def build_mlp(p: MLPParams, ins: Inputs) -> MLP:
    return MLP(embed_dim=ins["x"].dim, hidden_dim=p.hidden_dim, dropout=p.dropout, bias=p.bias)
