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

That is 2L + c - 1 Python steps instead of T, each on one (b, c, Di, N) tensor, never the
(b, T, Di, N) of the whole sequence. The decays are computed twice (steps 1 and 3) rather than
kept. Step 3 from the entering state is the sequential recurrence itself, so outputs agree
with ``selective_scan`` to rounding; a single chunk (T <= L, as in a one-token decode step)
skips steps 1 and 2.

The chunk count (``default_chunk_len``): on CUDA c = ceil(sqrt(T)) chunks of ceil(T / c), the
fewest steps (95 for T = 1024), for a device where an op's launch costs more than its work; on
CPU as many, but no more than keep one step's (b, c, Di, N) tensor within ``CPU_STEP_ELEMENTS``
(2^17 floats, 512 KiB), so a step stays in cache. On CPU the token-by-token reference is slow
mostly because its (b, T, Di, N) decays go through memory, not because of its T steps (B = 2,
Di = 512, N = 16, T = 1024, one thread: 32 chunks 78 ms, 8 chunks 54 ms, 2 chunks 48 ms, the
reference 162 ms).

The backward (``_ChunkedScan``) is written out rather than left to autograd, which would keep
every step's decays and states, four (b, T, Di, N) tensors' worth: it keeps the inputs and the
(b, c, Di, N) entering states, recomputes the chunk states (two (b, T, Di, N) lists while the
backward runs) and runs the same chunked scheme backwards in time on the state's gradient.

``selective_scan`` is the token-by-token recurrence, kept as the reference the tests compare
against. Both run in at least float32 (float64 stays float64, for gradcheck).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ._chunks import pad_time

__all__ = ["CPU_STEP_ELEMENTS", "default_chunk_len", "selective_scan", "selective_scan_chunked"]


def _wide(t: Tensor) -> Tensor:
    """``t`` in float32, or float64 if it is float64 already."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


CPU_STEP_ELEMENTS = 2**17


def default_chunk_len(T: int, step_width: int = 1, device_type: str = "cuda") -> int:
    """Tokens per chunk for T tokens: c = ceil(sqrt(T)) chunks (fewest steps), on CPU at most
    ``CPU_STEP_ELEMENTS // step_width`` of them (``step_width`` = b * Di * N, one chunk's
    state), then chunks of ceil(T / c) (module docstring)."""
    T = max(T, 1)
    c = math.isqrt(T - 1) + 1
    if device_type == "cpu":
        c = max(1, min(c, CPU_STEP_ELEMENTS // max(step_width, 1)))
    return -(-T // c)


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
    side (module docstring); ``chunk_len`` None: ``default_chunk_len`` for these sizes and device.

    T is padded at the end to a multiple of the chunk with dt = 0 and x = B = C = 0: a step
    that decays by exp(0) = 1 and adds nothing, so the padding changes neither the outputs
    nor the last state. The backward is written out (``_ChunkedScan``): it keeps only the
    inputs and the state entering each chunk, and recomputes the rest.
    """
    if chunk_len is not None and chunk_len < 1:
        raise ValueError(f"selective_scan_chunked: chunk_len must be >= 1, not {chunk_len}")
    dt, A, x, B, C, h = (_wide(t) for t in (dt, A, x, B, C, h))
    T = x.shape[1]
    if T == 0:
        return x.new_zeros(x.shape), h
    L = chunk_len or default_chunk_len(T, h.shape[0] * h.shape[1] * h.shape[2], x.device.type)
    y, last = _ChunkedScan.apply(*pad_time(L, dt, x, B, C), A, h, L)
    return y[:, :T], last


def _steps(t: Tensor, L: int, shape: tuple[int, int]) -> tuple[Tensor, ...]:
    """(b, c*L, F) -> L views (b, c, *shape): step j of every chunk side by side."""
    b, T = t.shape[:2]
    return t.reshape(b, T // L, L, *shape).unbind(2)


def _entering_states(dt: Tensor, x: Tensor, B: Tensor, A: Tensor, h: Tensor, L: int) -> Tensor:
    """Steps 1 and 2 of the module docstring: the state entering each chunk, (b, c, Di, N)."""
    b, T, Di = x.shape
    N, c = A.shape[1], T // L
    if c == 1:
        return h.unsqueeze(1)
    S = x.new_zeros(b, c - 1, Di, N)
    for dt_j, u_j, B_j in zip(_steps(dt[:, : T - L], L, (Di, 1)), _steps((dt * x)[:, : T - L], L, (Di, 1)),
                              _steps(B[:, : T - L], L, (1, N))):
        S.mul_(torch.mul(dt_j, A).exp_()).addcmul_(u_j, B_j)  # (b, c-1, Di, N): + dt x B
    chunk_decay = torch.exp(dt[:, : T - L].reshape(b, c - 1, L, Di, 1).sum(2) * A)  # (b, c-1, Di, N)
    entering = [h]
    for S_z, decay_z in zip(S.unbind(1), chunk_decay.unbind(1)):
        entering.append(torch.addcmul(S_z, decay_z, entering[-1]))  # (b, Di, N)
    return torch.stack(entering, 1)  # (b, c, Di, N)


class _ChunkedScan(torch.autograd.Function):
    """The chunked scan on padded inputs (T a multiple of L) with its backward written out.

    The backward is the same scan run backwards in time on the adjoint g_t = dLoss/dh_t::

        g_t = gy_t C_t + exp(dt_{t+1} A) g_{t+1}          (from the last state's gradient)
        dB_t = sum_d g_t dt_t x_t    d(dt_t x_t) = sum_n g_t B_t    dC_t = sum_d gy_t h_t
        M_t = g_t exp(dt_t A) h_{t-1}:  d dt_t += sum_n M_t A,  dA = sum_t M_t dt_t,  dh_0 = exp(dt_1 A) g_1

    chunked as the forward is: each chunk but the first from a zero adjoint, side by side; the
    adjoint crosses chunks backwards; then every chunk again from its incoming adjoint, with the
    chunk's states recomputed from the saved entering states. Held for the backward: the inputs
    and (b, c, Di, N) entering states, not the (b, T, Di, N) steps autograd would keep.
    """

    @staticmethod
    def forward(ctx, dt, x, B, C, A, h, L):
        b, T, Di = x.shape
        N = A.shape[1]
        H_in = _entering_states(dt, x, B, A, h, L)
        H, ys = H_in.clone(), []  # updated in place (no autograd in here); H_in is kept
        # 3. each chunk again from its entering state, side by side, reading y at every step
        for dt_j, u_j, B_j, C_j in zip(_steps(dt, L, (Di, 1)), _steps(dt * x, L, (Di, 1)), _steps(B, L, (1, N)),
                                       _steps(C, L, (N, 1))):
            H.mul_(torch.mul(dt_j, A).exp_()).addcmul_(u_j, B_j)  # (b, c, Di, N)
            ys.append(H @ C_j)  # (b, c, Di, 1): sum_n h C
        ctx.save_for_backward(dt, x, B, C, A, H_in)
        ctx.L = L
        # the last chunk's end state is the state after the last token (padding keeps it)
        return torch.stack(ys, 2).view(b, T, Di), H[:, -1]

    @staticmethod
    @once_differentiable
    def backward(ctx, gy, g_last):
        dt, x, B, C, A, H_in = ctx.saved_tensors
        L = ctx.L
        b, T, Di = x.shape
        N, c = A.shape[1], T // L
        gy = x.new_zeros(b, T, Di) if gy is None else gy
        g_last = H_in.new_zeros(b, Di, N) if g_last is None else g_last
        dts, us, gys = _steps(dt, L, (Di, 1)), _steps(dt * x, L, (Di, 1)), _steps(gy, L, (Di, 1))
        Bs, Cs = _steps(B, L, (1, N)), _steps(C, L, (1, N))

        # the forward's steps again: each step's decay and the state before it; dC on the way
        decays, before, dC = [], [], []
        H = H_in.clone()  # the states in `before` are overwritten below; H_in is the saved one
        for dt_j, u_j, B_j, gy_j in zip(dts, us, Bs, gys):
            decays.append(torch.mul(dt_j, A).exp_())  # (b, c, Di, N)
            before.append(H)
            H = torch.addcmul(decays[-1] * H, u_j, B_j)
            dC.append(gy_j.transpose(-1, -2) @ H)  # (b, c, 1, N): sum_d gy h

        # the adjoint entering each chunk from its end: each chunk but the first from zero ...
        incoming = [g_last]  # adjoint of the state a chunk leaves behind, last chunk first
        if c > 1:
            q = H_in.new_zeros(b, c - 1, Di, N)
            for j in reversed(range(L)):
                q.addcmul_(gys[j][:, 1:], Cs[j][:, 1:]).mul_(decays[j][:, 1:])
            # ... then across chunks backwards: chunk z+1's adjoint at its start is chunk z's at its end
            chunk_decay = torch.exp(dt.view(b, c, L, Di, 1)[:, 1:].sum(2) * A)  # (b, c-1, Di, N)
            for z in reversed(range(c - 1)):
                incoming.append(torch.addcmul(q[:, z], chunk_decay[:, z], incoming[-1]))
        G = torch.stack(incoming[::-1], 1)  # (b, c, Di, N)

        # every chunk from its incoming adjoint, backwards, with the gradients of each step
        du, dB, d_dt, MA = [], [], [], torch.zeros_like(G)
        for j in reversed(range(L)):
            G.addcmul_(gys[j], Cs[j])  # g_t (G is this backward's own: updated in place)
            du.append(G @ Bs[j].transpose(-1, -2))  # (b, c, Di, 1): sum_n g B
            dB.append(us[j].transpose(-1, -2) @ G)  # (b, c, 1, N): sum_d g dt x
            M = before[j].mul_(decays[j]).mul_(G)  # dLoss / d(dt_t A), in the state's buffer (used last here)
            d_dt.append((M * A).sum(-1, keepdim=True))  # (b, c, Di, 1)
            MA.addcmul_(M, dts[j])
            G.mul_(decays[j])
        du, d_dt, dB = (_rows(ts[::-1]) for ts in (du, d_dt, dB))  # gathered last step first
        return d_dt + du * x, du * dt, dB, _rows(dC), MA.sum((0, 1)), G[:, 0], None


def _rows(steps: list[Tensor]) -> Tensor:
    """L tensors (b, c, ...) of step j of every chunk -> (b, c*L, last axis): ``_steps`` undone."""
    t = torch.stack(steps, 2)  # (b, c, L, ...)
    return t.reshape(t.shape[0], t.shape[1] * t.shape[2], t.shape[-2] * t.shape[-1])
