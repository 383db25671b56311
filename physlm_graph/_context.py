"""Incremental decoding state shared by components during generation.

The fx graph is the same for training and generation. During generation the runtime opens a
``DecodeContext``; components registered with ``decode="cached"`` look it up with
``decode_context()`` and keep their per-module state (a KV cache, an SSM state) in it, and
position-dependent components read ``ctx.offset`` (the absolute position of the first token
of the chunk being run). Outside generation ``decode_context()`` is None and every component
runs its full-sequence path.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

__all__ = ["DecodeContext", "decode_context", "decoding"]

_local = threading.local()


class DecodeContext:
    """Per-generation state: the position offset and one state slot per module."""

    def __init__(self) -> None:
        self.offset = 0
        self._state: dict[int, Any] = {}

    def get(self, module: object, default: Any = None) -> Any:
        return self._state.get(id(module), default)

    def set(self, module: object, value: Any) -> None:
        self._state[id(module)] = value

    def clear(self) -> None:
        self._state.clear()
        self.offset = 0


def decode_context() -> DecodeContext | None:
    """The active decode context, or None outside incremental generation."""
    return getattr(_local, "ctx", None)


@contextlib.contextmanager
def decoding(ctx: DecodeContext | None = None) -> Iterator[DecodeContext]:
    """Run the enclosed forward calls incrementally with ``ctx`` (a new one by default)."""
    prev = getattr(_local, "ctx", None)
    _local.ctx = ctx if ctx is not None else DecodeContext()
    try:
        yield _local.ctx
    finally:
        _local.ctx = prev
