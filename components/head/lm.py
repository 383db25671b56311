"""head.lm: the language-model head, hidden states to vocabulary logits (GPT-2 ``lm_head``)."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn
from torch.nn import functional as F

from physlm_graph import ComponentError, ComponentParams, Example, Inputs, register
from physlm_graph._registry import HFName


class LMHead(nn.Module):
    """Linear readout to logits: ``logits = x W^T (+ b)``.

    Shapes: x (B, T, D) -> (B, T, vocab_size). ``weight`` is (vocab_size, D), the same layout
    as ``embed.token``'s table, so a blueprint's ``tie: tok`` shares one tensor between them
    (GPT-2, Press & Wolf 2017). Initialised N(0, 0.02); the bias, if any, at 0.

    ``logit_limit`` L < vocab_size: the logits of ids >= L are -inf. A vocabulary padded for the
    GPU's sake (GPT-2's 50257 ids in a 50304-row table) then computes exactly the function of the
    unpadded one: the padded ids get no probability, no gradient, and are never sampled.
    """

    def __init__(self, *, embed_dim: int, vocab_size: int, bias: bool = False, logit_limit: int | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, embed_dim))
        nn.init.normal_(self.weight, mean=0.0, std=0.02)
        self.bias = nn.Parameter(torch.zeros(vocab_size)) if bias else None
        self.logit_limit = logit_limit if logit_limit is not None and logit_limit < vocab_size else None
        if self.logit_limit is not None:
            self.register_buffer("padded", torch.arange(vocab_size) >= self.logit_limit, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        logits = F.linear(x, self.weight, self.bias)  # (B, T, V)
        if self.logit_limit is not None:
            logits = logits.masked_fill(self.padded, float("-inf"))
        return logits

    def extra_repr(self) -> str:
        limit = f", logit_limit={self.logit_limit}" if self.logit_limit is not None else ""
        return f"embed_dim={self.weight.shape[1]}, vocab_size={self.weight.shape[0]}, bias={self.bias is not None}{limit}"


class LMHeadParams(ComponentParams):
    vocab_size: int = Field(gt=0, description="number of logits per position")
    bias: bool = Field(False, description="learned bias on the logits (GPT-2: none)")
    logit_limit: int | None = Field(
        None, gt=0, description="ids at and past this one get -inf logits: a vocabulary padded to a multiple "
                                "of 64 for speed (train.vocab_multiple sets it) with only the first ids real")


@register(
    "head.lm",
    hf={"default": (HFName("weight", ("weight",)), HFName("bias", ("bias",)))},  # transformers' names
    params=LMHeadParams,
    decode="stateless",
    tie_param="weight",
    examples=[
        Example({"vocab_size": 50}, {"x": (2, 8, 16)}),
        Example({"vocab_size": 50, "bias": True}, {"x": (2, 8, 16)}),
        Example({"vocab_size": 64, "logit_limit": 50}, {"x": (2, 8, 16)}),
    ],
)
def build_lm_head(p: LMHeadParams, ins: Inputs) -> LMHead:
    if p.logit_limit is not None and p.logit_limit > p.vocab_size:
        raise ComponentError(f"logit_limit ({p.logit_limit}) is more than vocab_size ({p.vocab_size})",
                             param="logit_limit", expected=f"at most {p.vocab_size}", got=str(p.logit_limit),
                             fix="leave it out, or raise vocab_size")
    return LMHead(embed_dim=ins["x"].dim, vocab_size=p.vocab_size, bias=p.bias, logit_limit=p.logit_limit)
