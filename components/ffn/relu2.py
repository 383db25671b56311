"""ffn.relu2: the squared-ReLU feed-forward block, Linear -> ReLU^2 -> Linear (Primer; modded-nanogpt)."""

from __future__ import annotations

from pydantic import Field
from torch import Tensor, nn

from physlm_graph import ComponentParams, Example, Inputs, register


class ReLU2MLP(nn.Module):
    """Two-layer feed-forward network with a squared ReLU: ``W2 relu(W1 x + b1)^2 + b2``.

    So et al. 2021 (Primer) found ``relu(x)^2`` better than GELU at equal cost; the modded-nanogpt
    speedrun uses it with hidden_dim = 4 D. Shapes: x (B, T, D) -> (B, T, D); ``fc`` is D -> hidden,
    ``proj`` hidden -> D (the names ``ffn.mlp`` uses, so name patterns for init and optimizer
    groups match both).
    """

    def __init__(self, *, embed_dim: int, hidden_dim: int, bias: bool = True) -> None:
        super().__init__()
        self.fc = nn.Linear(embed_dim, hidden_dim, bias=bias)
        self.proj = nn.Linear(hidden_dim, embed_dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x).relu().square()  # (B, T, hidden)
        return self.proj(h)  # (B, T, D)


class ReLU2MLPParams(ComponentParams):
    hidden_dim: int = Field(gt=0, description="width of the hidden layer (modded-nanogpt: 4 * embed_dim)")
    bias: bool = Field(True, description="biases in both linear layers")


@register(
    "ffn.relu2",
    params=ReLU2MLPParams,
    decode="stateless",
    examples=[Example({"hidden_dim": 64}, {"x": (2, 8, 16)}),
              Example({"hidden_dim": 48, "bias": False}, {"x": (2, 8, 16)})],
)
def build_relu2_mlp(p: ReLU2MLPParams, ins: Inputs) -> ReLU2MLP:
    return ReLU2MLP(embed_dim=ins["x"].dim, hidden_dim=p.hidden_dim, bias=p.bias)
