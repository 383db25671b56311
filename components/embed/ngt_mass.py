"""embed.ngt_mass: the Newton Gravity Transformer's per-token mass, ``softplus(E_mass[x])``."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn
from torch.nn import functional as F

from physlm_graph import ComponentParams, Example, Inputs, register


class NGTMass(nn.Module):
    """Per-token mass: ``m[b, t] = softplus(E_mass[tokens[b, t]])``, one scalar per vocabulary item.

    Shapes: tokens (B, T) integer -> (B, T, 1), positive. ``weight`` is (vocab_size, 1),
    initialised N(0, 1) (PyTorch's Embedding default; the seed has no custom init), so the
    initial masses are softplus of a standard normal (median ~0.69). The mass depends only on
    the token id: the seed (``ngt_model.py``, SEEDS.md §2.0) computes it once and feeds the same
    m to every layer's ``attention.gravity`` and to ``loss.gravity_repulsion``.
    """

    def __init__(self, *, vocab_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, 1))
        nn.init.normal_(self.weight)

    def forward(self, tokens: Tensor) -> Tensor:
        return F.softplus(F.embedding(tokens, self.weight))  # (B, T, 1)


class NGTMassParams(ComponentParams):
    vocab_size: int = Field(gt=0, description="number of token ids (rows of the mass table)")


@register(
    "embed.ngt_mass",
    params=NGTMassParams,
    inputs=("tokens",),
    decode="stateless",
    examples=[Example({"vocab_size": 50}, {"tokens": ((2, 8), torch.long)})],
)
def build_ngt_mass(p: NGTMassParams, ins: Inputs) -> NGTMass:
    return NGTMass(vocab_size=p.vocab_size)
