"""embed.ngt_coords: the Newton Gravity Transformer's initial coordinates ``z0 = E_coord[position]``."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn

from physlm_graph import ComponentParams, Example, Inputs, decode_context, register


class NGTCoords(nn.Module):
    """Initial token coordinates from absolute position: ``z0[b, t] = E_coord[offset + t]``.

    Shapes: tokens (B, T) integer (read only for B and T) -> (B, T, coord_dim), a broadcast view
    of one (T, coord_dim) slice. ``weight`` is (max_len, coord_dim), initialised N(0, 1)
    (PyTorch's Embedding default; the seed, SEEDS.md §2.0, has no custom init). In the first
    layer the coordinates therefore depend only on position, not on the token. ``offset`` is
    ``decode_context().offset`` during incremental generation and 0 otherwise, so generating
    chunk by chunk gives the same coordinates as the full sequence.
    """

    def __init__(self, *, max_len: int, coord_dim: int) -> None:
        super().__init__()
        self.max_len = max_len
        self.weight = nn.Parameter(torch.empty(max_len, coord_dim))
        nn.init.normal_(self.weight)

    def forward(self, tokens: Tensor) -> Tensor:
        B, T = tokens.shape
        ctx = decode_context()
        offset = ctx.offset if ctx is not None else 0
        if offset + T > self.max_len:
            raise ValueError(
                f"embed.ngt_coords: positions up to {offset + T - 1} but max_len is {self.max_len}; "
                "crop the context or raise max_len"
            )
        z = self.weight[offset : offset + T]  # (T, c)
        return z.unsqueeze(0).expand(B, -1, -1)  # (B, T, c)


class NGTCoordsParams(ComponentParams):
    max_len: int = Field(gt=0, description="number of positions in the coordinate table (the block size)")
    coord_dim: int = Field(gt=0, description="coordinate width c (the seed's coord_dim)")


@register(
    "embed.ngt_coords",
    params=NGTCoordsParams,
    inputs=("tokens",),
    decode="cached",
    examples=[Example({"max_len": 16, "coord_dim": 6}, {"tokens": ((2, 8), torch.long)})],
)
def build_ngt_coords(p: NGTCoordsParams, ins: Inputs) -> NGTCoords:
    return NGTCoords(max_len=p.max_len, coord_dim=p.coord_dim)
