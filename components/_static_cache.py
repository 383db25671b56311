"""Preallocated decode buffers: the static path of incremental decoding.

The append path (``_decode_cache.AppendCache``, or a ``torch.cat`` per token) gives every step
tensors one position longer than the last, so a step can neither be captured as a CUDA graph
nor compiled once. The static path keeps, for a fixed batch ``B`` and a fixed ``max_len``:

- one key buffer and one value buffer (B, H_kv, max_len, hd) per attention module, written in
  place at each row's positions (``scatter_`` along the sequence axis);
- ``positions`` (B, T): the absolute position of every token of the chunk being run, per row,
  so rows of different lengths decode side by side; position embeddings read it;
- ``mask`` (B, 1, T, max_len): query t of row b sees key j iff ``j <= positions[b, t]``.
  Keys past a row's position hold stale values (a padded prompt's tail, or nothing yet):
  the mask hides them, and each is overwritten before a query can reach it.

Every shape is fixed by (B, T, max_len), and ``begin`` computes the chunk's positions and mask
from a position tensor on the device, so a one-token step has no host sync and no shape that
changes from token to token. A decode context carries one ``StaticCache`` as its ``static``
attribute (``runtime/decode_engine.py`` opens it); components find it with ``static_cache()``
and otherwise keep their append path, so both protocols live side by side.
"""

from __future__ import annotations

import torch
from torch import Tensor

from physlm_graph._context import DecodeContext, decode_context

__all__ = ["ATTENTION", "StaticCache", "StaticDecodeContext", "static_cache"]

# How an attention node attends over the buffers: "sdpa" calls scaled_dot_product_attention with
# the length mask; "math" writes it out (q k^T, the masked softmax in float32, times v), which the
# compiler can fuse around a one-token query instead of calling a fixed kernel.
ATTENTION = ("sdpa", "math")


class StaticCache:
    """Key/value buffers of a fixed size per attention module, and the chunk's positions and mask."""

    def __init__(self, *, batch: int, max_len: int, device: torch.device | str, attention: str = "sdpa") -> None:
        if attention not in ATTENTION:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION)}, got {attention!r}")
        self.attention = attention  # how attention nodes attend over the buffers (ATTENTION)
        self.batch = batch
        self.max_len = max_len
        self.device = torch.device(device)
        self._keys = torch.arange(max_len, device=self.device)  # (S,)
        self._kv: dict[int, tuple[Tensor, Tensor]] = {}
        self.positions = torch.zeros(batch, 1, dtype=torch.long, device=self.device)  # (B, T)
        self.mask = torch.ones(batch, 1, 1, max_len, dtype=torch.bool, device=self.device)  # (B, 1, T, S)

    def begin(self, start: Tensor, length: int) -> None:
        """Set the chunk about to run: row b's tokens sit at ``start[b] .. start[b] + length - 1``."""
        steps = torch.arange(length, device=self.device)  # (T,)
        self.positions = start.view(-1, 1) + steps  # (B, T)
        self.mask = self._keys.view(1, 1, 1, -1) <= self.positions[:, None, :, None]  # (B, 1, T, S)

    def window_mask(self, window: int | None) -> Tensor:
        """``mask``, and with a sliding ``window`` W only the W latest keys up to each query's
        position (key j seen iff ``positions - W < j <= positions``)."""
        if window is None:
            return self.mask
        return self.mask & (self._keys.view(1, 1, 1, -1) > self.positions[:, None, :, None] - window)

    def write_kv(self, owner: object, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write the chunk's keys and values (B, H_kv, T, hd) of ``owner`` at the chunk's positions;
        return the whole buffers (B, H_kv, max_len, hd). Buffers are made on first use."""
        bufs = self._kv.get(id(owner))
        if bufs is None:
            B, Hkv, _, hd = k.shape
            bufs = (k.new_zeros(B, Hkv, self.max_len, hd), v.new_zeros(B, Hkv, self.max_len, v.shape[-1]))
            self._kv[id(owner)] = bufs
        kb, vb = bufs
        idx = self.positions[:, None, :, None]  # (B, 1, T, 1)
        kb.scatter_(2, idx.expand(k.shape), k.to(kb.dtype))
        vb.scatter_(2, idx.expand(v.shape), v.to(vb.dtype))
        return kb, vb

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for pair in self._kv.values() for t in pair)


class StaticDecodeContext(DecodeContext):
    """A decode context that also carries a ``StaticCache``: components that know the static
    path use it, the others keep their own state in the context as before."""

    def __init__(self, static: StaticCache) -> None:
        super().__init__()
        self.static = static


def static_cache(ctx: DecodeContext | None = None) -> StaticCache | None:
    """The active decode context's ``StaticCache``, or None (no decoding, or the append path)."""
    ctx = decode_context() if ctx is None else ctx
    return getattr(ctx, "static", None)
