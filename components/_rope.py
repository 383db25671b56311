"""Rotary position embedding (RoPE) helpers shared by every attention component.

RoPE (Su et al. 2021, "RoFormer") rotates each pair of channels of a query or key vector at
absolute position ``t`` by the angle ``t * theta_i`` with ``theta_i = base ** (-2 i / d)``,
``i = 0 .. d/2 - 1``. Two channel layouts are in use:

- ``"half"`` (GPT-NeoX, Hugging Face LLaMA ``rotate_half``): channel ``i`` pairs with
  ``i + d/2``;
- ``"interleaved"`` (RoFormer, Meta's LLaMA reference code, complex multiplication): channel
  ``2i`` pairs with ``2i + 1``.

Either way the rotation is ``out = x * cos + x[..., partner] * sin_signed``, where ``cos`` and
``sin_signed`` are laid out per channel (the first channel of a pair takes ``-sin``, the
second ``+sin``) and ``partner`` is the index of the other channel of the pair. The table that
``embed.rope`` produces holds exactly these three rows, so an attention applies it with
``apply_rope(x, table)`` without knowing the style::

    table: (1, T, 3, head_dim) = [cos, sin_signed, partner index (as float)]

Two variants of the angles (``embed.rope``'s ``frequencies`` and ``sign``):

- ``frequencies="truncated"`` (half-truncated RoPE, modded-nanogpt): of the d/2 pairs only the
  first d/4 turn, at ``theta_k = base ** (-k / (d/4 - 1))`` for ``k = 0 .. d/4 - 1`` (the first
  at 1, the last at 1 / base); the other d/4 pairs have ``theta = 0`` and pass unchanged;
- ``sign=-1`` turns every pair the other way (angle ``-t * theta``): with the half layout,
  ``y1 = x1 cos + x2 sin``, ``y2 = -x1 sin + x2 cos`` (modded-nanogpt's direction).

Partial rotary (GPT-NeoX ``rotary_pct``, Phi ``partial_rotary_factor``): only the first
``rotary_dim`` channels of a head turn, paired among themselves as if the head were
``rotary_dim`` wide (frequencies ``base ** (-2 i / rotary_dim)``); the other channels pass
unchanged (cos 1, sin 0, partner itself). The table keeps the full ``head_dim`` width, so an
attention applies it exactly as a full one.

Context extension (``RopeScaling``) changes the frequencies of the turning pairs:

- ``linear`` (position interpolation, Chen et al. 2023): every ``theta_i`` divided by ``factor``;
- ``llama3`` (Llama 3.1): with wavelength ``w_i = 2 pi / theta_i`` and the pretraining context
  ``L``, pairs with ``w_i < L / high_freq_factor`` keep ``theta_i``, pairs with
  ``w_i > L / low_freq_factor`` take ``theta_i / factor``, and the ones between blend the two
  with ``s = (L / w_i - low) / (high - low)``: ``(1 - s) theta_i / factor + s theta_i``;
- ``yarn`` (Peng et al. 2023): pair i blends ``theta_i`` (extrapolation) and ``theta_i / factor``
  (interpolation) with a linear ramp over the pair index between the pairs that turn
  ``beta_fast`` and ``beta_slow`` times over ``L`` positions (the ramp ends floored / ceiled
  when ``truncate``), and cos and sin are multiplied by ``attention_factor`` (default
  ``0.1 ln(factor) + 1``), which scales q k^T by its square.

The arithmetic follows transformers' ``modeling_rope_utils`` step for step, so imported
checkpoints get the same angles in float32.

Import from other components as ``from physlm_graph.components._rope import apply_rope``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

__all__ = ["RopeStyle", "RopeFrequencies", "RopeScalingKind", "RopeScaling", "rope_inv_freq", "truncated_inv_freq",
           "scale_inv_freq", "rope_table", "apply_rope"]

RopeStyle = Literal["half", "interleaved"]
RopeFrequencies = Literal["rope", "truncated"]
RopeScalingKind = Literal["none", "linear", "llama3", "yarn"]


@dataclass(frozen=True)
class RopeScaling:
    """How the frequencies are stretched for a longer context (see the module docstring).

    ``factor`` for every kind but ``none``; ``low_freq_factor``, ``high_freq_factor`` for
    ``llama3``; ``beta_fast``, ``beta_slow``, ``truncate`` and ``attention_factor`` (None: from
    ``factor``) for ``yarn``; ``original_max_seq_len`` (the pretraining context) for both.
    """

    kind: RopeScalingKind = "none"
    factor: float = 1.0
    original_max_seq_len: int = 0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    truncate: bool = True


def rope_inv_freq(head_dim: int, base: float, device: torch.device | str | None = None) -> Tensor:
    """``theta_i = 1 / base ** (2 i / head_dim)`` for ``i < head_dim / 2``, in float32: (head_dim/2,).

    Computed as Hugging Face's LLaMA does, so angles agree bit for bit with its checkpoints.
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    return 1.0 / (base**exponents)


def truncated_inv_freq(head_dim: int, base: float, device: torch.device | str | None = None) -> Tensor:
    """Half-truncated frequencies, float32 (head_dim/2,): ``base ** (-k / (q - 1))`` for
    ``k < q = head_dim / 4``, then q zeros (pairs that do not turn). ``head_dim`` a multiple of 4,
    at least 8."""
    q = head_dim // 4
    turning = (1.0 / base) ** torch.linspace(0, 1, steps=q, dtype=torch.float32, device=device)  # (q,)
    return torch.cat([turning, turning.new_zeros(head_dim // 2 - q)])


def scale_inv_freq(inv_freq: Tensor, dim: int, base: float, scaling: RopeScaling) -> tuple[Tensor, float]:
    """``inv_freq`` (dim/2,) of a ``dim``-channel rotation stretched by ``scaling``, and the factor
    on cos and sin (1 but for yarn). Same operations, in the same order, as transformers."""
    s = scaling
    if s.kind == "none":
        return inv_freq, 1.0
    if s.kind == "linear":
        return inv_freq / s.factor, 1.0
    if s.kind == "llama3":
        low_wavelen = s.original_max_seq_len / s.low_freq_factor
        high_wavelen = s.original_max_seq_len / s.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        out = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
        smooth = (s.original_max_seq_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
        smoothed = (1 - smooth) * out / s.factor + smooth * out
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, out), 1.0
    if s.kind == "yarn":
        attn = s.attention_factor if s.attention_factor is not None else (
            0.1 * math.log(s.factor) + 1.0 if s.factor > 1 else 1.0)

        def correction_dim(rotations: float) -> float:  # the pair index that turns ``rotations`` times over L
            return (dim * math.log(s.original_max_seq_len / (rotations * 2 * math.pi))) / (2 * math.log(base))

        low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
        if s.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001  # a ramp of zero width would divide by zero
        device = inv_freq.device
        pos_freqs = base ** (torch.arange(0, dim, 2, device=device).to(dtype=torch.float) / dim)
        extrapolated, interpolated = 1.0 / pos_freqs, 1.0 / (s.factor * pos_freqs)
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1).to(device)
        keep = 1 - ramp  # 1: extrapolate (high frequencies), 0: interpolate
        return interpolated * (1 - keep) + extrapolated * keep, attn
    raise ValueError(f"unknown RoPE scaling {s.kind!r}; expected none, linear, llama3 or yarn")


def rope_table(
    offset: int, length: int, *, head_dim: int, base: float, style: RopeStyle, device: torch.device | str | None = None,
    frequencies: RopeFrequencies = "rope", sign: int = 1, rotary_dim: int | None = None,
    scaling: RopeScaling | None = None,
) -> Tensor:
    """The RoPE table for absolute positions ``offset .. offset + length - 1``: (1, length, 3, head_dim) float32.

    ``frequencies``: ``rope`` (``rope_inv_freq``) or ``truncated`` (``truncated_inv_freq``);
    ``sign``: 1, or -1 to turn every pair by the opposite angle; ``rotary_dim``: the leading
    channels that turn (None: all); ``scaling``: context extension of the frequencies."""
    if frequencies not in ("rope", "truncated") or sign not in (1, -1):
        raise ValueError(f"unknown RoPE frequencies {frequencies!r} or sign {sign!r}; expected 'rope' or 'truncated', 1 or -1")
    rd = head_dim if rotary_dim is None else rotary_dim
    if rd % 2 or not 0 < rd <= head_dim:
        raise ValueError(f"rotary_dim must be even and in 1..head_dim ({head_dim}), got {rd}")
    half = rd // 2
    inv_freq = truncated_inv_freq(rd, base, device) if frequencies == "truncated" else rope_inv_freq(rd, base, device)
    factor = 1.0
    if scaling is not None:
        inv_freq, factor = scale_inv_freq(inv_freq, rd, base, scaling)
    pos = torch.arange(offset, offset + length, dtype=torch.float32, device=device)  # (T,)
    angles = pos[:, None] * inv_freq[None, :]  # (T, rd/2)
    cos, sin = angles.cos(), angles.sin() * sign
    if factor != 1.0:
        cos, sin = cos * factor, sin * factor
    idx = torch.arange(rd, device=device)  # (rd,)
    if style == "half":
        # out[:h] = x[:h] cos - x[h:] sin ;  out[h:] = x[h:] cos + x[:h] sin
        cos = torch.cat([cos, cos], dim=-1)  # (T, rd)
        sin = torch.cat([-sin, sin], dim=-1)  # (T, rd)
        partner = (idx + half) % rd
    elif style == "interleaved":
        # out[2i] = x[2i] cos - x[2i+1] sin ;  out[2i+1] = x[2i+1] cos + x[2i] sin
        cos = cos.repeat_interleave(2, dim=-1)  # (T, rd)
        sin = torch.stack([-sin, sin], dim=-1).flatten(-2)  # (T, rd)
        partner = idx + 1 - 2 * (idx % 2)
    else:
        raise ValueError(f"unknown RoPE style {style!r}; expected 'half' or 'interleaved'")
    if rd < head_dim:  # the channels that do not turn: cos 1, sin 0, partner itself
        rest = head_dim - rd
        cos = torch.cat([cos, cos.new_ones(length, rest)], dim=-1)  # (T, hd)
        sin = torch.cat([sin, sin.new_zeros(length, rest)], dim=-1)
        partner = torch.cat([partner, torch.arange(rd, head_dim, device=device)])
    partner = partner.to(torch.float32).expand(length, head_dim)  # (T, hd)
    return torch.stack([cos, sin, partner], dim=1).unsqueeze(0)  # (1, T, 3, hd)


class _Partners(torch.autograd.Function):
    """``x.index_select(-1, partner)`` for a ``partner`` that is a permutation of the channels
    (every table ``rope_table`` makes), differentiated as the inverse permutation's gather.

    Autograd would take index_select's backward, an ``index_add`` into zeros: on a GPU a scatter
    with atomic adds over every q and k, in each layer, that the compiler cannot fuse. The
    gradient of a permutation is the same numbers gathered the other way (each channel receives
    exactly one term), so this backward is one more fused read."""

    @staticmethod
    def forward(x: Tensor, partner: Tensor) -> Tensor:  # type: ignore[override]
        return x.index_select(-1, partner)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, Tensor], output: Tensor) -> None:
        ctx.save_for_backward(inputs[1])  # the inverse is made in backward: inference never pays for it

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (partner,) = ctx.saved_tensors
        inverse = torch.empty_like(partner).scatter_(0, partner, torch.arange(partner.numel(), device=partner.device))
        return grad.index_select(-1, inverse), None


def apply_rope(x: Tensor, table: Tensor) -> Tensor:
    """Rotate ``x`` (B, H, T, head_dim) by ``table`` (1, T, 3, head_dim); returns x's shape and dtype.

    ``out = x * cos + x[..., partner] * sin_signed``; cos and sin are cast to ``x.dtype`` first
    (as Hugging Face LLaMA does under bf16). The partner row is read from the first position:
    it is the same at every position, and a permutation of the channels (``_Partners``).
    """
    cos = table[:, :, 0].unsqueeze(1).to(x.dtype)  # (1, 1, T, hd)
    sin = table[:, :, 1].unsqueeze(1).to(x.dtype)  # (1, 1, T, hd)
    partner = table[0, 0, 2].long()  # (hd,)
    return x * cos + _Partners.apply(x, partner) * sin
