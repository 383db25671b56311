"""embed.rope: the rotary position table (RoPE) that attention components apply to q and k."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from physlm_graph import ComponentParams, Example, Inputs, decode_context, register
from physlm_graph.components._rope import RopeFrequencies, RopeScaling, RopeScalingKind, RopeStyle, rope_table
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

    ``rotary_dim`` r < head_dim is partial rotary (GPT-NeoX ``rotary_pct``, Phi
    ``partial_rotary_factor``): the first r channels turn, paired within themselves as in a
    head of width r (``half``: i with i + r/2) at ``base ** (-2 i / r)``; the other channels
    pass unchanged. ``scaling`` stretches the frequencies for a longer context: ``linear``
    (theta / factor), ``llama3`` (Llama 3.1's wavelength-banded blend) or ``yarn`` (a ramp
    between theta and theta / factor, cos and sin scaled by ``attention_factor``); the formulas
    are in ``components/_rope.py``. Each of their settings is refused where its scaling does
    not read it.

    Shapes: tokens (B, T) (only T is read) -> (1, T, 3, head_dim) float32. Positions start at
    ``decode_context().offset`` during incremental generation, else 0 (with the decode engine's
    preallocated buffers, row b's positions are read from a tensor and the table is (B, T, 3, hd)).
    No parameters; the table
    is computed on the fly (T x head_dim/2 cos/sin, negligible next to attention), so it is
    right on any device the graph is moved to.
    """

    def __init__(self, *, head_dim: int, base: float = 10000.0, max_seq_len: int, style: RopeStyle = "half",
                 frequencies: RopeFrequencies = "rope", sign: int = 1, rotary_dim: int | None = None,
                 scaling: RopeScaling | None = None) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.base = base
        self.max_seq_len = max_seq_len
        self.style = style
        self.frequencies = frequencies
        self.sign = sign
        self.rotary_dim = rotary_dim
        self.scaling = scaling if scaling is not None and scaling.kind != "none" else None

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
            frequencies=self.frequencies, sign=self.sign, rotary_dim=self.rotary_dim, scaling=self.scaling,
        )  # (1, T, 3, hd)

    def _full_table(self, device: torch.device) -> Tensor:
        """The table of positions 0 .. max_seq_len - 1 (max_seq_len, 3, hd), made once per device
        (the same values as ``rope_table(offset, T)``: angles are position times frequency)."""
        table = getattr(self, "_table", None)
        if table is None or table.device != device:
            table = rope_table(0, self.max_seq_len, head_dim=self.head_dim, base=self.base, style=self.style,
                               device=device, frequencies=self.frequencies, sign=self.sign,
                               rotary_dim=self.rotary_dim, scaling=self.scaling)[0]
            self._table = table
        return table

    def extra_repr(self) -> str:
        extra = "" if self.frequencies == "rope" and self.sign == 1 else f", frequencies={self.frequencies!r}, sign={self.sign}"
        if self.rotary_dim is not None:
            extra += f", rotary_dim={self.rotary_dim}"
        if self.scaling is not None:
            extra += f", scaling={self.scaling}"
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
    rotary_dim: int | None = Field(
        None, gt=0, description="partial rotary: only the first rotary_dim channels of a head turn, even, <= head_dim "
                                "(None: all; GPT-NeoX: head_dim * rotary_pct)")
    scaling: RopeScalingKind = Field(
        "none", description="context extension of the frequencies: none, linear (theta / factor), llama3 (Llama 3.1) "
                            "or yarn (YaRN)")
    factor: float | None = Field(None, ge=1.0, description="context extension factor (linear, llama3, yarn; "
                                                           "Llama 3.1: 8)")
    original_max_seq_len: int | None = Field(
        None, gt=0, description="the context the model was pretrained with (llama3, yarn; Llama 3.1: 8192)")
    low_freq_factor: float | None = Field(
        None, gt=0.0, description="llama3: pairs with wavelength above original_max_seq_len / low_freq_factor take "
                                  "theta / factor (Llama 3.1: 1)")
    high_freq_factor: float | None = Field(
        None, gt=0.0, description="llama3: pairs with wavelength below original_max_seq_len / high_freq_factor keep "
                                  "theta (Llama 3.1: 4)")
    beta_fast: float | None = Field(None, gt=0.0, description="yarn: pairs turning more than this many times over "
                                                              "original_max_seq_len keep theta (None: 32)")
    beta_slow: float | None = Field(None, gt=0.0, description="yarn: pairs turning fewer times than this take "
                                                              "theta / factor (None: 1)")
    attention_factor: float | None = Field(
        None, gt=0.0, description="yarn: factor on cos and sin (None: 0.1 ln(factor) + 1)")
    truncate: bool | None = Field(None, description="yarn: floor / ceil the ramp's ends to whole pairs (None: true)")

    @model_validator(mode="after")
    def _even_head_dim(self) -> RotaryTableParams:
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        rd = self.head_dim if self.rotary_dim is None else self.rotary_dim
        if self.rotary_dim is not None and (rd % 2 or rd > self.head_dim):
            raise ValueError(f"rotary_dim must be even and at most head_dim ({self.head_dim}), got {rd}")
        if self.frequencies == "truncated" and (rd % 4 or rd < 8):
            raise ValueError(f"frequencies: truncated needs {'rotary_dim' if self.rotary_dim else 'head_dim'} a "
                             f"multiple of 4 and at least 8, got {rd}")
        uses = _SCALING_USES[self.scaling]
        unused = [k for k in _SCALING_KEYS if k not in uses and getattr(self, k) is not None]
        if unused:
            raise ValueError(f"{', '.join(unused)} {'is' if len(unused) == 1 else 'are'} not read with scaling: "
                             f"{self.scaling} (it reads {', '.join(uses) or 'none of them'})")
        lacking = [k for k in _SCALING_NEEDS[self.scaling] if getattr(self, k) is None]
        if lacking:
            raise ValueError(f"scaling: {self.scaling} needs {', '.join(lacking)}")
        if self.scaling == "llama3" and not self.high_freq_factor > self.low_freq_factor:  # type: ignore[operator]
            raise ValueError(f"high_freq_factor ({self.high_freq_factor}) must be above low_freq_factor "
                             f"({self.low_freq_factor})")
        if self.scaling == "yarn" and (self.beta_fast or 32.0) < (self.beta_slow or 1.0):
            raise ValueError(f"beta_fast ({self.beta_fast or 32.0}) must be at least beta_slow ({self.beta_slow or 1.0})")
        return self

    def rope_scaling(self) -> RopeScaling | None:
        if self.scaling == "none":
            return None
        set_ = {k: getattr(self, k) for k in _SCALING_USES[self.scaling] if getattr(self, k) is not None}
        return RopeScaling(kind=self.scaling, **set_)


_SCALING_KEYS = ("factor", "original_max_seq_len", "low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow",
                 "attention_factor", "truncate")
_SCALING_USES: dict[str, tuple[str, ...]] = {
    "none": (), "linear": ("factor",),
    "llama3": ("factor", "original_max_seq_len", "low_freq_factor", "high_freq_factor"),
    "yarn": ("factor", "original_max_seq_len", "beta_fast", "beta_slow", "attention_factor", "truncate"),
}
_SCALING_NEEDS: dict[str, tuple[str, ...]] = {
    "none": (), "linear": ("factor",), "llama3": ("factor", "original_max_seq_len", "low_freq_factor", "high_freq_factor"),
    "yarn": ("factor", "original_max_seq_len"),
}


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
        Example({"head_dim": 16, "max_seq_len": 16, "rotary_dim": 4}, {"tokens": ((2, 8), torch.long)}),
        Example({"head_dim": 16, "max_seq_len": 64, "scaling": "llama3", "factor": 8.0, "original_max_seq_len": 16,
                 "low_freq_factor": 1.0, "high_freq_factor": 4.0}, {"tokens": ((2, 8), torch.long)}),
        Example({"head_dim": 16, "max_seq_len": 64, "rotary_dim": 8, "scaling": "yarn", "factor": 4.0,
                 "original_max_seq_len": 16}, {"tokens": ((2, 8), torch.long)}),
    ],
)
def build_rotary_table(p: RotaryTableParams, ins: Inputs) -> RotaryTable:
    return RotaryTable(head_dim=p.head_dim, base=p.base, max_seq_len=p.max_seq_len, style=p.style,
                       frequencies=p.frequencies, sign=p.sign, rotary_dim=p.rotary_dim, scaling=p.rope_scaling())
