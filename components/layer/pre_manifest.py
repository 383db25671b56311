"""layer.pre_manifest: QLLM HEAD's PreManifestLayer, a gated low-rank update + LayerNorm."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from physlm_graph import ComponentParams, Example, Inputs, register


def prime_factors(dim: int, prime: int) -> Tensor:
    """``f_i = 0.5 + 0.5 cos(2 pi (i mod p) / p)``: a fixed per-channel modulation in [0, 1]."""
    i = torch.arange(dim, dtype=torch.float64)
    return (0.5 + 0.5 * torch.cos(2 * math.pi * torch.remainder(i, prime) / prime)).float()


class PreManifestLayer(nn.Module):
    """QLLM HEAD ``PreManifestLayer``: a gated, periodically modulated low-rank update of h.

    With h (B, T, D) and r = base_dim::

        u   = f * W_up gelu(W_down h)          W_down: D -> r, W_up: r -> D, with biases
        g   = sigmoid(W_g h)                   (B, T, D), W_g: D -> D with bias
        out = layer_norm((1 - g) * h + g * u)  no affine, eps 1e-5

    f_i = 0.5 + 0.5 cos(2 pi (i mod p) / p) with p = ``prime``: channels i = 0 mod p get the
    update in full, channels near i = p/2 mod p almost none. Per-token and causal.

    Source: ``sschepis/qllm`` @ 75bc92b, ``src/model/pre_manifest_layer.py`` (SEEDS.md
    section 4.6), used at the start of every block of the HEAD model, so it re-normalises
    the residual stream itself (README != code: it is not the iterative logit refiner of the
    original architecture, which is SEEDS.md section 4.5). The HEAD model passes
    base_dim = max(32, D / 4) and its "prime" from the list [max(8, D / (4 L))] * L, i.e. 16
    for D 768, L 12 (not a prime); the class's own defaults (prime 7, base_dim 32) are unused
    there. No bugs to flag: the layer does what its code says; the output LayerNorm has no
    affine parameters, as published.
    """

    def __init__(self, *, embed_dim: int, base_dim: int, prime: int) -> None:
        super().__init__()
        self.down = nn.Linear(embed_dim, base_dim)
        self.up = nn.Linear(base_dim, embed_dim)
        self.gate = nn.Linear(embed_dim, embed_dim)
        self.register_buffer("factors", prime_factors(embed_dim, prime))  # (D,)

    def forward(self, h: Tensor) -> Tensor:
        u = self.up(F.gelu(self.down(h))) * self.factors  # (B, T, D)
        g = torch.sigmoid(self.gate(h))  # (B, T, D)
        return F.layer_norm(h * (1 - g) + u * g, h.shape[-1:])


class PreManifestParams(ComponentParams):
    prime: int = Field(
        16,
        gt=0,
        description="period p of the channel modulation (HEAD default list value for D 768, L 12: 16)",
    )
    base_dim: int | None = Field(
        None, gt=0, description="rank r of the update; None: max(32, embed_dim // 4) as HEAD passes"
    )


@register(
    "layer.pre_manifest",
    params=PreManifestParams,
    decode="stateless",
    examples=[
        Example({}, {"x": (2, 6, 16)}),
        Example({"prime": 5, "base_dim": 8}, {"x": (2, 6, 24)}),
    ],
)
def build_pre_manifest(p: PreManifestParams, ins: Inputs) -> PreManifestLayer:
    D = ins["x"].dim
    return PreManifestLayer(embed_dim=D, base_dim=p.base_dim or max(32, D // 4), prime=p.prime)
