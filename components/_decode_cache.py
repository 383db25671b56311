"""An append-only decode cache whose buffers double when full.

Concatenating a chunk's keys to the cache (``torch.cat``) copies the whole cache on every
generated token, so a token's cost grows with the position even where the attention itself is
cheap. ``AppendCache`` keeps one buffer per tensor with spare room along its sequence axis and
writes each chunk in place; a full buffer is reallocated at twice the length, so appending is
amortised O(chunk). ``extend`` returns views of the first ``length`` positions.
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["AppendCache"]

_MIN_CAPACITY = 64


class AppendCache:
    """Tensors grown along their own sequence axis ``dims[i]``, chunk by chunk."""

    def __init__(self, *dims: int) -> None:
        self.dims = dims
        self.bufs: list[Tensor] | None = None
        self.length = 0

    def extend(self, *new: Tensor) -> tuple[Tensor, ...]:
        """Append one chunk of each tensor; return views of everything cached so far."""
        T = new[0].shape[self.dims[0]]
        need = self.length + T
        if self.bufs is None or need > self.bufs[0].shape[self.dims[0]]:
            cap = max(2 * need, _MIN_CAPACITY)
            bufs = []
            for i, (t, d) in enumerate(zip(new, self.dims)):
                shape = list(t.shape)
                shape[d] = cap
                b = t.new_empty(shape)
                if self.bufs is not None and self.length:
                    b.narrow(d, 0, self.length).copy_(self.bufs[i].narrow(d, 0, self.length))
                bufs.append(b)
            self.bufs = bufs
        for b, t, d in zip(self.bufs, new, self.dims):
            b.narrow(d, self.length, T).copy_(t)
        self.length = need
        return tuple(b.narrow(d, 0, need) for b, d in zip(self.bufs, self.dims))

    def truncate(self, length: int) -> AppendCache:
        """Forget every position from ``length`` on (speculative decoding's rejected rows)."""
        self.length = min(self.length, length)
        return self
