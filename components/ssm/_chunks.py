"""Chunking along time that the chunked scans share (``ssm.ssd``'s SSD scan, ``ssm.mamba``'s scan)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def pad_time(chunk: int, *ts: Tensor) -> tuple[Tensor, ...]:
    """Each tensor (b, T, ...) zero-padded at the end of its time axis (dim 1) to a multiple of
    ``chunk``. Zeros after the last token: causal, and in the scans a zero step (dt = 0, x = B =
    C = 0) neither decays nor feeds the state."""
    pad = (-ts[0].shape[1]) % chunk
    if not pad:
        return ts
    return tuple(F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in ts)
