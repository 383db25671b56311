"""Glue shared by the private Triton kernel modules (``attention/_gravity_triton.py``,
``attention/_holographic_triton.py``): the optional import, torch.library's ``wrap_triton``, the
definition of a traceable op, tile-size rounding, and the once-per-process warning that a
component runs without its fused kernels (no triton, or a shape they do not take). Imported by
those modules and the components on first CUDA use only: triton's import costs about a second
that CPU work never needs.
"""

from __future__ import annotations

import functools
import warnings

import torch

__all__ = ["triton", "tl", "triton_available", "wrap_triton", "define_op", "pow2", "warn_slow_path"]

try:
    import triton
    import triton.language as tl

    triton_available = True
except ImportError:  # pragma: no cover - CPU-only installs
    triton = tl = None  # type: ignore[assignment]
    triton_available = False

try:
    from torch.library import wrap_triton
except ImportError:  # pragma: no cover - torch < 2.6: launch the kernels directly

    def wrap_triton(kernel):  # type: ignore[no-redef]
        return kernel


def define_op(name: str, fn, fake):  # noqa: ANN001, ANN201
    """``physlm_graph::<name>`` from the launcher ``fn``: a ``torch.library.triton_op`` (traceable by
    torch.compile, its own fake implementation), or on an older torch a ``custom_op`` with ``fake``."""
    triton_op = getattr(torch.library, "triton_op", None)
    if triton_op is not None:
        return triton_op(f"physlm_graph::{name}", fn, mutates_args=())
    op = torch.library.custom_op(f"physlm_graph::{name}", fn, mutates_args=())
    op.register_fake(fake)
    return op


def pow2(n: int, lo: int = 16) -> int:
    """The power of two >= n, at least ``lo`` (16: tl.dot's least dimension)."""
    return max(lo, 1 << (int(n) - 1).bit_length())


@functools.cache
def warn_slow_path(message: str) -> None:
    """No silent slow path: ``message`` (why a component runs without its fused kernels) once per
    process (cached), pointing at the forward that wanted them."""
    warnings.warn(message, RuntimeWarning, stacklevel=3)  # the forward that needed the kernels
