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

Import from other components as ``from physlm_graph.components._rope import apply_rope``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

__all__ = ["RopeStyle", "RopeFrequencies", "rope_inv_freq", "truncated_inv_freq", "rope_table", "apply_rope"]

RopeStyle = Literal["half", "interleaved"]
RopeFrequencies = Literal["rope", "truncated"]


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


def rope_table(
    offset: int, length: int, *, head_dim: int, base: float, style: RopeStyle, device: torch.device | str | None = None,
    frequencies: RopeFrequencies = "rope", sign: int = 1,
) -> Tensor:
    """The RoPE table for absolute positions ``offset .. offset + length - 1``: (1, length, 3, head_dim) float32.

    ``frequencies``: ``rope`` (``rope_inv_freq``) or ``truncated`` (``truncated_inv_freq``);
    ``sign``: 1, or -1 to turn every pair by the opposite angle."""
    if frequencies not in ("rope", "truncated") or sign not in (1, -1):
        raise ValueError(f"unknown RoPE frequencies {frequencies!r} or sign {sign!r}; expected 'rope' or 'truncated', 1 or -1")
    half = head_dim // 2
    inv_freq = truncated_inv_freq(head_dim, base, device) if frequencies == "truncated" else rope_inv_freq(head_dim, base, device)
    pos = torch.arange(offset, offset + length, dtype=torch.float32, device=device)  # (T,)
    angles = pos[:, None] * inv_freq[None, :]  # (T, hd/2)
    cos, sin = angles.cos(), angles.sin() * sign
    idx = torch.arange(head_dim, device=device)  # (hd,)
    if style == "half":
        # out[:h] = x[:h] cos - x[h:] sin ;  out[h:] = x[h:] cos + x[:h] sin
        cos = torch.cat([cos, cos], dim=-1)  # (T, hd)
        sin = torch.cat([-sin, sin], dim=-1)  # (T, hd)
        partner = (idx + half) % head_dim
    elif style == "interleaved":
        # out[2i] = x[2i] cos - x[2i+1] sin ;  out[2i+1] = x[2i+1] cos + x[2i] sin
        cos = cos.repeat_interleave(2, dim=-1)  # (T, hd)
        sin = torch.stack([-sin, sin], dim=-1).flatten(-2)  # (T, hd)
        partner = idx + 1 - 2 * (idx % 2)
    else:
        raise ValueError(f"unknown RoPE style {style!r}; expected 'half' or 'interleaved'")
    partner = partner.to(torch.float32).expand(length, head_dim)  # (T, hd)
    return torch.stack([cos, sin, partner], dim=1).unsqueeze(0)  # (1, T, 3, hd)


def apply_rope(x: Tensor, table: Tensor) -> Tensor:
    """Rotate ``x`` (B, H, T, head_dim) by ``table`` (1, T, 3, head_dim); returns x's shape and dtype.

    ``out = x * cos + x[..., partner] * sin_signed``; cos and sin are cast to ``x.dtype`` first
    (as Hugging Face LLaMA does under bf16). The partner row is read from the first position:
    it is the same at every position.
    """
    cos = table[:, :, 0].unsqueeze(1).to(x.dtype)  # (1, 1, T, hd)
    sin = table[:, :, 1].unsqueeze(1).to(x.dtype)  # (1, 1, T, hd)
    partner = table[0, 0, 2].long()  # (hd,)
    return x * cos + x.index_select(-1, partner) * sin
