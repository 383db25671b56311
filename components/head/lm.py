"""head.lm: the language-model head, hidden states to vocabulary logits (GPT-2 ``lm_head``)."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn
from torch.nn import functional as F

from physlm_graph import ComponentParams, Example, Inputs, register


class LMHead(nn.Module):
    """Linear readout to logits: ``logits = x W^T (+ b)``.

    Shapes: x (B, T, D) -> (B, T, vocab_size). ``weight`` is (vocab_size, D), the same layout
    as ``embed.token``'s table, so a blueprint's ``tie: tok`` shares one tensor between them
    (GPT-2, Press & Wolf 2017). Initialised N(0, 0.02); the bias, if any, at 0.
    """

    def __init__(self, *, embed_dim: int, vocab_size: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, embed_dim))
        nn.init.normal_(self.weight, mean=0.0, std=0.02)
        self.bias = nn.Parameter(torch.zeros(vocab_size)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)  # (B, T, V)

    def extra_repr(self) -> str:
        return f"embed_dim={self.weight.shape[1]}, vocab_size={self.weight.shape[0]}, bias={self.bias is not None}"


class LMHeadParams(ComponentParams):
    vocab_size: int = Field(gt=0, description="number of logits per position")
    bias: bool = Field(False, description="learned bias on the logits (GPT-2: none)")


@register(
    "head.lm",
    params=LMHeadParams,
    decode="stateless",
    tie_param="weight",
    examples=[
        Example({"vocab_size": 50}, {"x": (2, 8, 16)}),
        Example({"vocab_size": 50, "bias": True}, {"x": (2, 8, 16)}),
    ],
)
def build_lm_head(p: LMHeadParams, ins: Inputs) -> LMHead:
    return LMHead(embed_dim=ins["x"].dim, vocab_size=p.vocab_size, bias=p.bias)
