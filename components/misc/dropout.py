"""misc.dropout: standalone dropout (GPT-2's embedding dropout ``drop``)."""

from __future__ import annotations

from pydantic import Field
from torch import Tensor, nn
from torch.nn import functional as F

from physlm_graph import ComponentParams, Example, Inputs, register


class Dropout(nn.Module):
    """Dropout (Srivastava et al. 2014): in training, zero each element with probability ``p``
    and scale the rest by ``1 / (1 - p)``; the identity in eval mode.

    Shapes: any -> same. Draws from the global torch RNG.
    """

    def __init__(self, *, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return F.dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class DropoutParams(ComponentParams):
    p: float = Field(ge=0.0, lt=1.0, description="probability of zeroing an element in training")


@register(
    "misc.dropout",
    params=DropoutParams,
    decode="stateless",
    examples=[Example({"p": 0.1}, {"x": (2, 8, 16)})],
)
def build_dropout(p: DropoutParams, ins: Inputs) -> Dropout:
    return Dropout(p=p.p)
