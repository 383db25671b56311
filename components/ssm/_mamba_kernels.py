"""Pure-PyTorch kernels for the Mamba-1 selective scan, shared by ``ssm.mamba``.

The recurrence, per channel d and state index n (state h of shape (Di, N))::

    h_t = exp(dt_t A) * h_{t-1} + dt_t x_t B_t        y_t = sum_n h_t C_t

Mamba-1's decay differs per channel *and* state index (A is (Di, N)), so the matrix form of
the Mamba-2 scan (``_ssd_kernels``: one scalar decay per head, the chunk as a masked
C.B product) does not apply: written that way the intra-chunk weights would be a
(L, L, Di, N) tensor. Writing the state as ``exp(cum_t) * cumsum(exp(-cum_s) ...)`` with
cumulative log-decays costs no more than the recurrence but overflows fp32 as soon as a
chunk's total log-decay passes about -88 (dt = 0.1 with A = -16 over 64 tokens is -102),
and differences of large cumulative sums lose the precision of the small decays.

``selective_scan_chunked`` therefore keeps the recurrence's own arithmetic (one product and
one sum per step, decays never above 1) and gets its speed from doing the steps for many
chunks at once. With chunks of L tokens, c = ceil(T / L) of them:

1. every chunk but the last runs the recurrence from a zero state, side by side, L steps of
   (b, c - 1, Di, N) tensors; this gives each chunk's end state S_z;
2. the states cross chunks sequentially: ``h_in[z+1] = exp(A sum_{t in z} dt_t) h_in[z] + S_z``,
   c - 1 steps of (b, Di, N) (the decay over a chunk is one exp of a sum of dt, never above 1);
3. every chunk runs the recurrence again, now from its entering state, side by side, and
   reads y off each step.

That is 2L + c - 1 Python steps instead of T (L = ceil(sqrt(T)) by default: 95 for T = 1024),
each on one (b, c, Di, N) tensor, never the (b, T, Di, N) of the whole sequence: the memory of
a step grows with T / L. The decays are computed twice (steps 1 and 3) rather than kept. Step 3
from the entering state is the sequential recurrence itself, so outputs agree with
``selective_scan`` to rounding; a single chunk (T <= L, as in a one-token decode step) skips
steps 1 and 2. Under autograd each step's tensors are kept for the backward, as the
token-by-token loop keeps its own: training memory is still of order (b, T, Di, N).

``selective_scan`` is the token-by-token recurrence, kept as the reference the tests compare
against. Both run in at least float32 (float64 stays float64, for gradcheck).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._chunks import pad_time

__all__ = ["default_chunk_len", "selective_scan", "selective_scan_chunked"]


def _wide(t: Tensor) -> Tensor:
    """``t`` in float32, or float64 if it is float64 already."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def default_chunk_len(T: int) -> int:
    """ceil(sqrt(T)): balances the 2L steps inside chunks against the T / L steps across them."""
    return max(1, math.isqrt(max(T, 1) - 1) + 1)


def selective_scan(dt: Tensor, A: Tensor, B: Tensor, C: Tensor, x: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
    """The Mamba-1 recurrence, one token at a time from state ``h``; returns ``(y, last state)``.

    Shapes: dt and x (b, T, Di) (dt already positive), A (Di, N) (negative), B and C
    (b, T, N), h (b, Di, N). The reference for ``selective_scan_chunked``: O(T) Python steps
    and (b, T, Di, N) decays held at once.
    """
    dt, A, x, B, C, h = (_wide(t) for t in (dt, A, x, B, C, h))
    decay = torch.exp(dt.unsqueeze(-1) * A)  # (b, T, Di, N)
    push = (dt * x).unsqueeze(-1) * B.unsqueeze(2)  # (b, T, Di, N)
    ys = []
    # unbind: one view per step whose backward is one stack, where indexing [:, t] would give
    # each step's gradient as a zero-filled (b, T, Di, N) tensor, O(T^2 Di N) in the backward
    for decay_t, push_t, C_t in zip(decay.unbind(1), push.unbind(1), C.unbind(1)):
        h = decay_t * h + push_t  # (b, Di, N)
        ys.append(torch.einsum("bdn,bn->bd", h, C_t))
    y = torch.stack(ys, dim=1) if ys else x.new_zeros(x.shape)  # (b, T, Di)
    return y, h


def selective_scan_chunked(
    dt: Tensor, A: Tensor, B: Tensor, C: Tensor, x: Tensor, h: Tensor, *, chunk_len: int | None = None
) -> tuple[Tensor, Tensor]:
    """The same function as ``selective_scan``, in chunks of ``chunk_len`` tokens run side by
    side (module docstring); ``chunk_len`` None: ``default_chunk_len(T)``.

    T is padded at the end to a multiple of the chunk with dt = 0 and x = B = C = 0: a step
    that decays by exp(0) = 1 and adds nothing, so the padding changes neither the outputs
    nor the last state.
    """
    dt, A, x, B, C, h = (_wide(t) for t in (dt, A, x, B, C, h))
    b, T, Di = x.shape
    N = A.shape[1]
    L = default_chunk_len(T) if chunk_len is None else chunk_len
    if L < 1:
        raise ValueError(f"selective_scan_chunked: chunk_len must be >= 1, not {L}")
    dt, u, B, C = pad_time(L, dt, dt * x, B, C)
    c = dt.shape[1] // L
    # step j of every chunk side by side, as views whose backward is one stack (as in selective_scan)
    dt_sums = dt.view(b, c, L, Di, 1).sum(2)  # (b, c, Di, 1): dt summed over each chunk
    dt = dt.view(b, c, L, Di, 1).unbind(2)  # L x (b, c, Di, 1)
    u = u.view(b, c, L, Di, 1).unbind(2)  # L x (b, c, Di, 1)
    B = B.view(b, c, L, 1, N).unbind(2)  # L x (b, c, 1, N)
    C = C.view(b, c, L, N, 1).unbind(2)  # L x (b, c, N, 1)

    # 1. each chunk but the last from a zero state, side by side: the state it leaves behind
    if c > 1:
        S = x.new_zeros(b, c - 1, Di, N)
        for dt_j, u_j, B_j in zip(dt, u, B):
            decay = torch.exp(dt_j[:, :-1] * A)  # (b, c-1, Di, N)
            S = torch.addcmul(decay * S, u_j[:, :-1], B_j[:, :-1])  # + dt x B, (b, c-1, Di, N)
        # 2. across chunks: the state entering chunk z+1 is chunk z's from h_in[z] plus S[z]
        chunk_decay = torch.exp(dt_sums[:, :-1] * A)  # (b, c-1, Di, N): the decay over a whole chunk
        entering = [h]
        for S_z, decay_z in zip(S.unbind(1), chunk_decay.unbind(1)):
            entering.append(torch.addcmul(S_z, decay_z, entering[-1]))  # (b, Di, N)
        H = torch.stack(entering, 1)  # (b, c, Di, N)
    else:
        H = h.unsqueeze(1)  # (b, 1, Di, N)

    # 3. each chunk again from its entering state, side by side, reading y at every step
    ys = []
    for dt_j, u_j, B_j, C_j in zip(dt, u, B, C):
        H = torch.addcmul(torch.exp(dt_j * A) * H, u_j, B_j)  # (b, c, Di, N)
        ys.append(H @ C_j)  # (b, c, Di, 1): sum_n h C
    y = torch.stack(ys, 2).view(b, c * L, Di)[:, :T]  # (b, T, Di)
    return y, H[:, -1]  # the last chunk's end state: the state after token T (padding keeps it)
