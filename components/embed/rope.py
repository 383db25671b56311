"""embed.rope: the rotary position table (RoPE) that attention components apply to q and k."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from physlm_graph import ComponentParams, Example, Inputs, decode_context, register
from physlm_graph.components._rope import RopeFrequencies, RopeStyle, rope_table
from physlm_graph.components._static_cache import static_cache


class RotaryTable(nn.Module):
    """Rotary position embedding table (Su et al. 2021, RoFormer; LLaMA).

    For absolute position ``p`` and channel pair ``i`` the angle is ``p * base ** (-2 i / d)``.
    The output packs, per position and channel, ``[cos, sin_signed, partner]`` so that an
    attention rotates q and k with ``apply_rope(x, table) = x * cos + x[..., partner] *
    sin_signed`` whatever the style (see ``components/_rope.py``):

    - ``half``: channel i pairs with i + d/2 (Hugging Face / GPT-NeoX ``rotate_half``);
    - ``interleaved``: channel 2i pairs with 2i + 1 (RoFormer, Meta's LLaMA reference code).

    ``frequencies="truncated"`` is half-truncated RoPE (modded-nanogpt): only the first d/4 pairs
    turn, at ``base ** (-k / (d/4 - 1))``, k = 0 .. d/4 - 1; the other d/4 pairs keep theta = 0.
    ``sign=-1`` turns the pairs the other way: with ``half``, ``y1 = x1 cos + x2 sin``,
    ``y2 = -x1 sin + x2 cos`` (modded-nanogpt's direction; 1 gives ``y1 = x1 cos - x2 sin``).

    Shapes: tokens (B, T) (only T is read) -> (1, T, 3, head_dim) float32. Positions start at
    ``decode_context().offset`` during incremental generation, else 0 (with the decode engine's
    preallocated buffers, row b's positions are read from a tensor and the table is (B, T, 3, hd)).
    No parameters; the table
    is computed on the fly (T x head_dim/2 cos/sin, negligible next to attention), so it is
    right on any device the graph is moved to.
    """

    def __init__(self, *, head_dim: int, base: float = 10000.0, max_seq_len: int, style: RopeStyle = "half",
                 frequencies: RopeFrequencies = "rope", sign: int = 1) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.base = base
        self.max_seq_len = max_seq_len
        self.style = style
        self.frequencies = frequencies
        self.sign = sign

    def forward(self, tokens: Tensor) -> Tensor:
        ctx = decode_context()
        static = static_cache(ctx)
        if static is not None:  # each row at its own positions: rows of the whole table (B, T, 3, hd)
            return self._full_table(tokens.device)[static.positions]
        offset = ctx.offset if ctx is not None else 0
        seq_len = tokens.shape[1]
        if offset + seq_len > self.max_seq_len:
            raise ValueError(
                f"embed.rope: positions {offset}..{offset + seq_len - 1} do not fit "
                f"max_seq_len {self.max_seq_len}; shorten the sequence or raise max_seq_len"
            )
        return rope_table(
            offset, seq_len, head_dim=self.head_dim, base=self.base, style=self.style, device=tokens.device,
            frequencies=self.frequencies, sign=self.sign,
        )  # (1, T, 3, hd)

    def _full_table(self, device: torch.device) -> Tensor:
        """The table of positions 0 .. max_seq_len - 1 (max_seq_len, 3, hd), made once per device
        (the same values as ``rope_table(offset, T)``: angles are position times frequency)."""
        table = getattr(self, "_table", None)
        if table is None or table.device != device:
            table = rope_table(0, self.max_seq_len, head_dim=self.head_dim, base=self.base, style=self.style,
                               device=device, frequencies=self.frequencies, sign=self.sign)[0]
            self._table = table
        return table

    def extra_repr(self) -> str:
        extra = "" if self.frequencies == "rope" and self.sign == 1 else f", frequencies={self.frequencies!r}, sign={self.sign}"
        return f"head_dim={self.head_dim}, base={self.base}, max_seq_len={self.max_seq_len}, style={self.style!r}{extra}"


class RotaryTableParams(ComponentParams):
    head_dim: int = Field(gt=0, description="per-head width of q and k (even)")
    base: float = Field(10000.0, gt=1.0, description="frequency base theta (LLaMA 1/2: 10000, LLaMA 3: 500000)")
    max_seq_len: int = Field(gt=0, description="longest sequence (context length) allowed")
    style: RopeStyle = Field("half", description="channel pairing: 'half' (HF rotate_half) or 'interleaved'")
    frequencies: RopeFrequencies = Field(
        "rope", description="rope: pair i turns at base^(-2i/d); truncated: the first d/4 pairs at "
                            "base^(-k/(d/4-1)), the other d/4 not at all (modded-nanogpt, base 1024)")
    sign: Literal[1, -1] = Field(
        1, description="direction of the turn: 1 (RoFormer, LLaMA: y1 = x1 cos - x2 sin) or -1 "
                       "(modded-nanogpt: y1 = x1 cos + x2 sin)")

    @model_validator(mode="after")
    def _even_head_dim(self) -> RotaryTableParams:
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.frequencies == "truncated" and (self.head_dim % 4 or self.head_dim < 8):
            raise ValueError(f"frequencies: truncated needs head_dim a multiple of 4 and at least 8, got {self.head_dim}")
        return self


@register(
    "embed.rope",
    params=RotaryTableParams,
    inputs=("tokens",),
    decode="cached",  # position-dependent: reads decode_context().offset
    examples=[
        Example({"head_dim": 8, "max_seq_len": 16}, {"tokens": ((2, 8), torch.long)}),
        Example({"head_dim": 8, "max_seq_len": 16, "style": "interleaved", "base": 500000.0}, {"tokens": ((2, 8), torch.long)}),
        Example({"head_dim": 16, "max_seq_len": 16, "base": 1024.0, "frequencies": "truncated", "sign": -1},
                {"tokens": ((2, 8), torch.long)}),
    ],
)
def build_rotary_table(p: RotaryTableParams, ins: Inputs) -> RotaryTable:
    return RotaryTable(head_dim=p.head_dim, base=p.base, max_seq_len=p.max_seq_len, style=p.style,
                       frequencies=p.frequencies, sign=p.sign)
