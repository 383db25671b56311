"""Private Triton kernels of ``attention.holographic`` (mode ``fixed``): path B fused and chunked.

``hrr_causal_triton`` computes ``hrr_bind_causal`` (see ``holographic.py``): per head h, with ^
the orthonormal rfft along the head dim in the packed real layout of ``real_dft_bases`` (re part
and im part as two (., h) halves; slot 0 holds DC and Nyquist, multiplied componentwise)::

    P_s = k^_s * v^_s                                     # bound pairs
    W_ts = exp(-lam_h (t - s)) for s <= t, else 0        # causal decay weights
    M_t = sum_s W_ts P_s / Z_t,  Z_t = sum_s W_ts        # decayed causal mean
    y_t = irfft(conj(q^_t) * M_t)                         # unbind with the query

The torch path runs this as about fifteen fp32 elementwise, copy and GEMM kernels over
(B, H, T, d) tensors (stacked spectra, their products, the (H, T, T) weight matrix product and
the permutes around it), forward and backward. Here the sum over s <= t is split as the chunked
linear recurrence (as SSD): inside a chunk of C tokens a (C, C) causal product with the
weights built in registers; across chunks a state, since for s before the chunk starting at t0,
W_ts = exp(-lam (t - t0 + 1)) exp(-lam (t0 - 1 - s)). O(T C) work, no (T, T) tile ever visited:

- forward: ``_pairs_kernel`` per chunk writes P (fp32) and the chunk's end state
  E_c = sum_s exp(-lam (e_c - s)) [P_s, 1] (e_c its last position); ``_fwd_kernel`` per chunk
  sums the earlier E_c decayed to its start, adds the in-chunk product, normalises, unbinds with
  q^ and writes y token-major (B, T, H, d), so the reshape to (B, T, D) is free. It keeps M
  (fp32) and Z for the backward.
- backward: ``_query_kernel`` per chunk: dz = dy irfft^T, dq^ = conj(dz) * M, dq; G_t =
  (q^_t * dz_t) / Z_t and c_t = -<q^_t * dz_t, M_t> / Z_t (the gradients of M's numerator and
  normaliser), and the chunk's sums of a_t G_t, u a_t G_t, a_t c_t, u a_t c_t with u = t - t0 + 1,
  a_t = exp(-lam u). ``_key_kernel`` per chunk n: dP_s = sum_{t >= s} W_ts G_t and the decay's
  sum of -(t - s) W_ts dW_ts, dW_ts = <G_t, P_s> + c_t, inside the chunk by (C, C) products,
  from the later chunks through their sums (t - s splits as (t - e_n) + (e_n - s)); then
  dk^ = conj(v^) * dP, dv^ = conj(k^) * dP and the adjoint bases.

q, k and v arrive as one (3, B, H, T, d) tensor of any strides (the projection's packed
(B, T, 3, H, d) output permuted, no copy; or a stack when rope rotated q and k); their gradient
is returned in the same packed layout. Every product is fp32 (inputs upcast on load), as the
torch path with autocast off; the tile products (``tl.dot``) use TF32 when
``torch.backends.cuda.matmul.allow_tf32`` is set, as torch's fp32 matmuls do, else fp32 FMA.
The decay gradient's partial sums go per (b, h, key block) to a buffer summed in torch.

Layers, as ``_gravity_triton``: ``_fwd`` / ``_bwd`` launch; ``HoloTritonFn`` is the plain
autograd Function (runs under ``TRITON_INTERPRET=1`` on CPU for the tests); the
``torch.ops.physlm_graph.holo_causal_fwd`` / ``_bwd`` ``triton_op``s let an outer
``torch.compile`` trace it without a graph break. ``PHYSLM_HOLOGRAPHIC_TRITON=0`` (read at
import) sends ``attention.holographic`` back to the torch path.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from physlm_graph.components._triton import define_op, pow2, tl, triton, triton_available, wrap_triton

__all__ = ["triton_available", "ENABLED", "supports", "hrr_causal_triton", "HoloTritonFn"]

ENABLED = triton_available and os.environ.get("PHYSLM_HOLOGRAPHIC_TRITON", "1") != "0"

MAX_HEAD_DIM = 128


def supports(head_dim: int) -> bool:
    """Head dims the kernels take: even (the packed spectrum is then exactly d wide), up to 128."""
    return head_dim % 2 == 0 and 2 <= head_dim <= MAX_HEAD_DIM


if triton_available:

    @triton.jit
    def _tile(X, s_t, s_d, offs_t, offs_d, T, D):
        """(len(offs_t), len(offs_d)) fp32 tile of a (T, D) matrix with strides (s_t, s_d); 0 outside."""
        mask = (offs_t[:, None] < T) & (offs_d[None, :] < D)
        return tl.load(X + offs_t[:, None] * s_t + offs_d[None, :] * s_d, mask=mask, other=0.0).to(tl.float32)

    @triton.jit
    def _basis(BASE, row0, col0, n_rows, n_cols, ld, R: tl.constexpr, C: tl.constexpr, TRANS: tl.constexpr):
        """(R, C) tile of a row-major fp32 matrix (leading dim ``ld``) from (row0, col0), n_rows x
        n_cols of it real (0 elsewhere); ``TRANS``: the tile of its transpose instead."""
        r = tl.arange(0, R)
        c = tl.arange(0, C)
        if TRANS:  # tile[i, j] = A[row0 + j, col0 + i]
            mask = (r[:, None] < n_cols) & (c[None, :] < n_rows)
            ptr = BASE + (row0 + c[None, :]) * ld + col0 + r[:, None]
        else:
            mask = (r[:, None] < n_rows) & (c[None, :] < n_cols)
            ptr = BASE + (row0 + r[:, None]) * ld + col0 + c[None, :]
        return tl.load(ptr, mask=mask, other=0.0)

    @triton.jit
    def _spec_mul(ar, ai, br, bi, slot0, CONJ: tl.constexpr):
        """Bin-wise product of packed spectra (conj(a) * b if CONJ); slot 0's pair componentwise."""
        rr = ar * br
        ii = ai * bi
        if CONJ:
            re = tl.where(slot0, rr, rr + ii)
            im = tl.where(slot0, ii, ar * bi - ai * br)
        else:
            re = tl.where(slot0, rr, rr - ii)
            im = tl.where(slot0, ii, ar * bi + ai * br)
        return re, im

    @triton.jit
    def _spectrum(x, FWD, D, Hh, DP: tl.constexpr, HP: tl.constexpr, PREC: tl.constexpr):
        """re, im halves of the packed spectrum of the rows of x (n, DP): x @ fwd[:, :h], x @ fwd[:, h:]."""
        fr = _basis(FWD, 0, 0, D, Hh, 2 * Hh, DP, HP, False)
        fi = _basis(FWD, 0, Hh, D, Hh, 2 * Hh, DP, HP, False)
        return tl.dot(x, fr, input_precision=PREC), tl.dot(x, fi, input_precision=PREC)

    @triton.jit
    def _to_time(sr, si, BASE, D, Hh, DP: tl.constexpr, HP: tl.constexpr, INV_BASES: tl.constexpr,
                 PREC: tl.constexpr):
        """Rows of packed spectra back to (n, DP): with ``INV_BASES`` sr @ inv[:h] + si @ inv[h:]
        (``BASE`` = inv, (2h, d)); else the adjoint of ``_spectrum``, sr @ fwd[:, :h]^T + si @ fwd[:, h:]^T."""
        if INV_BASES:
            br = _basis(BASE, 0, 0, Hh, D, D, HP, DP, False)
            bi = _basis(BASE, Hh, 0, Hh, D, D, HP, DP, False)
        else:
            br = _basis(BASE, 0, 0, D, Hh, 2 * Hh, HP, DP, True)
            bi = _basis(BASE, 0, Hh, D, Hh, 2 * Hh, HP, DP, True)
        return tl.dot(sr, br, input_precision=PREC) + tl.dot(si, bi, input_precision=PREC)

    @triton.jit
    def _bound_pairs(QKV, s_w, s_t, s_d, offs_t, offs_d, FWD, T, D, Hh, slot0,
                     DP: tl.constexpr, HP: tl.constexpr, PREC: tl.constexpr):
        """Spectra of the k and v rows ``offs_t`` (QKV at this (b, h)) and their bound pairs
        P = k^ * v^: kr, ki, vr, vi, pr, pi, each (len(offs_t), HP)."""
        kr, ki = _spectrum(_tile(QKV + s_w, s_t, s_d, offs_t, offs_d, T, D), FWD, D, Hh, DP, HP, PREC)
        vr, vi = _spectrum(_tile(QKV + 2 * s_w, s_t, s_d, offs_t, offs_d, T, D), FWD, D, Hh, DP, HP, PREC)
        pr, pi = _spec_mul(kr, ki, vr, vi, slot0, False)
        return kr, ki, vr, vi, pr, pi

    @triton.jit
    def _pairs_kernel(QKV, s_w, s_b, s_h, s_t, s_d, FWD, DECAY, P, E, H, T, D, Hh,
                      C: tl.constexpr, DP: tl.constexpr, HP: tl.constexpr, PREC: tl.constexpr):
        """Per chunk c of C tokens: P_s = k^_s * v^_s (fp32, re | im halves of width HP), and the
        chunk's state at its last position e_c: E_c = sum_s exp(-lam (e_c - s)) [P_s, 1]."""
        pid = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        offs_t = pid * C + tl.arange(0, C)
        offs_d = tl.arange(0, DP)
        offs_h = tl.arange(0, HP)
        _, _, _, _, pr, pi = _bound_pairs(QKV + b * s_b + h * s_h, s_w, s_t, s_d, offs_t, offs_d, FWD, T, D, Hh,
                                          (offs_h == 0)[None, :], DP, HP, PREC)
        ptr = P + bh * T * 2 * HP + offs_t[:, None] * 2 * HP + offs_h[None, :]
        mask = offs_t[:, None] < T
        tl.store(ptr, pr, mask=mask)
        tl.store(ptr + HP, pi, mask=mask)
        lam = tl.load(DECAY + h).to(tl.float32)
        j = tl.arange(0, C).to(tl.float32)
        e = tl.where(offs_t < T, tl.exp(-lam * (C - 1 - j)), 0.0)
        ptr = E + (bh * tl.num_programs(0) + pid) * (2 * HP + 1) + offs_h
        tl.store(ptr, tl.sum(e[:, None] * pr, 0))
        tl.store(ptr + HP, tl.sum(e[:, None] * pi, 0))
        tl.store(E + (bh * tl.num_programs(0) + pid) * (2 * HP + 1) + 2 * HP, tl.sum(e, 0))

    @triton.jit
    def _fwd_kernel(QKV, s_w, s_b, s_h, s_t, s_d, FWD, INV, DECAY, P, E, M, Z, Y, s_yb, s_yt, s_yh,
                    H, T, D, Hh, C: tl.constexpr, DP: tl.constexpr, HP: tl.constexpr, PREC: tl.constexpr):
        """Per chunk m: the state entering it (the earlier chunks' E, decayed), plus the (C, C)
        causal product inside it; normalise, unbind with q^, back to time; y token-major."""
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        n_c = tl.num_programs(0)
        b = bh // H
        h = bh % H
        offs_m = pid_m * C + tl.arange(0, C)
        offs_d = tl.arange(0, DP)
        offs_h = tl.arange(0, HP)
        slot0 = (offs_h == 0)[None, :]
        lam = tl.load(DECAY + h).to(tl.float32)
        # state at position m C - 1: sum over chunks c < m of exp(-lam C (m - 1 - c)) E_c
        sr = tl.zeros((HP,), dtype=tl.float32)
        si = tl.zeros((HP,), dtype=tl.float32)
        sz = tl.sum(tl.zeros((HP,), dtype=tl.float32), 0)  # fp32 scalar, loop-carried
        for c in range(0, pid_m):
            f = tl.exp(-lam * C * (pid_m - 1 - c).to(tl.float32))
            ptr = E + (bh * n_c + c) * (2 * HP + 1)
            sr += f * tl.load(ptr + offs_h)
            si += f * tl.load(ptr + HP + offs_h)
            sz += f * tl.load(ptr + 2 * HP)
        i = tl.arange(0, C)
        into = tl.exp(-lam * (i + 1).to(tl.float32))  # decay from position m C - 1 to each row
        ptr = P + bh * T * 2 * HP + offs_m[:, None] * 2 * HP + offs_h[None, :]
        in_t = offs_m[:, None] < T
        pr = tl.load(ptr, mask=in_t, other=0.0)
        pi = tl.load(ptr + HP, mask=in_t, other=0.0)
        rel = (i[:, None] - i[None, :]).to(tl.float32)  # t - s inside the chunk
        w = tl.where((rel >= 0) & (offs_m[None, :] < T), tl.exp(-lam * tl.maximum(rel, 0.0)), 0.0)
        acc_r = tl.dot(w, pr, input_precision=PREC) + into[:, None] * sr[None, :]
        acc_i = tl.dot(w, pi, input_precision=PREC) + into[:, None] * si[None, :]
        z = tl.sum(w, 1) + into * sz
        inv_z = 1.0 / tl.maximum(z, 1.0)  # z >= 1 (the diagonal weight) on real rows
        mr = acc_r * inv_z[:, None]
        mi = acc_i * inv_z[:, None]
        q = _tile(QKV + b * s_b + h * s_h, s_t, s_d, offs_m, offs_d, T, D)
        qr, qi = _spectrum(q, FWD, D, Hh, DP, HP, PREC)
        zr, zi = _spec_mul(qr, qi, mr, mi, slot0, True)
        y = _to_time(zr, zi, INV, D, Hh, DP, HP, True, PREC)
        row = offs_m[:, None] < T
        tl.store(Y + b * s_yb + offs_m[:, None] * s_yt + h * s_yh + offs_d[None, :], y.to(Y.dtype.element_ty),
                 mask=row & (offs_d[None, :] < D))
        ptr = M + bh * T * 2 * HP + offs_m[:, None] * 2 * HP + offs_h[None, :]
        tl.store(ptr, mr, mask=row)
        tl.store(ptr + HP, mi, mask=row)
        tl.store(Z + bh * T + offs_m, z, mask=offs_m < T)

    @triton.jit
    def _query_kernel(QKV, s_w, s_b, s_h, s_t, s_d, DY, s_yb, s_yt, s_yh, FWD, INV, DECAY, M, Z, G, L,
                      DQKV, g_w, g_b, g_h, g_t, g_d, H, T, D, Hh,
                      C: tl.constexpr, DP: tl.constexpr, HP: tl.constexpr, PREC: tl.constexpr):
        """Per chunk m: dq; G_t = (q^ * dz) / Z_t, c_t = -<q^ * dz, M_t> / Z_t; and the chunk's sums
        for the later key chunks, with a_t = exp(-lam (t - m C + 1)): L = [sum a G, sum (t - m C + 1) a G,
        sum a c, sum (t - m C + 1) a c]."""
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        offs_m = pid_m * C + tl.arange(0, C)
        offs_d = tl.arange(0, DP)
        offs_h = tl.arange(0, HP)
        slot0 = (offs_h == 0)[None, :]
        row = offs_m[:, None] < T
        qr, qi = _spectrum(_tile(QKV + b * s_b + h * s_h, s_t, s_d, offs_m, offs_d, T, D), FWD, D, Hh, DP, HP, PREC)
        dy = _tile(DY + b * s_yb + h * s_yh, s_yt, 1, offs_m, offs_d, T, D)
        # dz = dy @ inv^T, halves: dy @ inv[:h]^T, dy @ inv[h:]^T
        ir_t = _basis(INV, 0, 0, Hh, D, D, DP, HP, True)
        ii_t = _basis(INV, Hh, 0, Hh, D, D, DP, HP, True)
        dzr = tl.dot(dy, ir_t, input_precision=PREC)
        dzi = tl.dot(dy, ii_t, input_precision=PREC)
        ptr = M + bh * T * 2 * HP + offs_m[:, None] * 2 * HP + offs_h[None, :]
        mr = tl.load(ptr, mask=row, other=0.0)
        mi = tl.load(ptr + HP, mask=row, other=0.0)
        dqr, dqi = _spec_mul(dzr, dzi, mr, mi, slot0, True)
        dq = _to_time(dqr, dqi, FWD, D, Hh, DP, HP, False, PREC)
        tl.store(DQKV + b * g_b + h * g_h + offs_m[:, None] * g_t + offs_d[None, :] * g_d,
                 dq.to(DQKV.dtype.element_ty), mask=row & (offs_d[None, :] < D))
        dmr, dmi = _spec_mul(qr, qi, dzr, dzi, slot0, False)
        inv_z = 1.0 / tl.maximum(tl.load(Z + bh * T + offs_m, mask=offs_m < T, other=1.0), 1.0)
        c = -tl.sum(dmr * mr + dmi * mi, 1) * inv_z  # 0 on rows past T (dy is 0 there)
        gr = dmr * inv_z[:, None]
        gi = dmi * inv_z[:, None]
        ptr = G + bh * T * (2 * HP + 1) + offs_m[:, None] * (2 * HP + 1) + offs_h[None, :]
        tl.store(ptr, gr, mask=row)
        tl.store(ptr + HP, gi, mask=row)
        tl.store(G + bh * T * (2 * HP + 1) + offs_m * (2 * HP + 1) + 2 * HP, c, mask=offs_m < T)
        lam = tl.load(DECAY + h).to(tl.float32)
        u = (tl.arange(0, C) + 1).to(tl.float32)
        a = tl.exp(-lam * u)
        ptr = L + (bh * tl.num_programs(0) + pid_m) * (4 * HP + 2) + offs_h
        tl.store(ptr, tl.sum(a[:, None] * gr, 0))
        tl.store(ptr + HP, tl.sum(a[:, None] * gi, 0))
        tl.store(ptr + 2 * HP, tl.sum((u * a)[:, None] * gr, 0))
        tl.store(ptr + 3 * HP, tl.sum((u * a)[:, None] * gi, 0))
        ptr = L + (bh * tl.num_programs(0) + pid_m) * (4 * HP + 2) + 4 * HP
        tl.store(ptr, tl.sum(a * c, 0))
        tl.store(ptr + 1, tl.sum(u * a * c, 0))

    @triton.jit
    def _key_kernel(QKV, s_w, s_b, s_h, s_t, s_d, FWD, DECAY, G, L, DQKV, g_w, g_b, g_h, g_t, g_d, PART,
                    H, T, D, Hh, C: tl.constexpr, DP: tl.constexpr, HP: tl.constexpr, PREC: tl.constexpr):
        """Per key chunk n (last position e = n C + C - 1): dP_s = sum_{t >= s} W_ts G_t, inside the
        chunk by a (C, C) product, from the later chunks through their sums L (W_ts = a_t b_s with
        b_s = exp(-lam (e - s))); the decay's partial sum; then dk and dv."""
        pid_n = tl.program_id(0)
        bh = tl.program_id(1)
        n_c = tl.num_programs(0)
        b = bh // H
        h = bh % H
        offs_n = pid_n * C + tl.arange(0, C)
        offs_d = tl.arange(0, DP)
        offs_h = tl.arange(0, HP)
        slot0 = (offs_h == 0)[None, :]
        kr, ki, vr, vi, pr, pi = _bound_pairs(QKV + b * s_b + h * s_h, s_w, s_t, s_d, offs_n, offs_d, FWD, T, D, Hh,
                                              slot0, DP, HP, PREC)
        lam = tl.load(DECAY + h).to(tl.float32)
        key_in = offs_n < T
        # the later chunks, k = m - n - 1 chunks between: t - e = (t - m C + 1) + C k
        rr = tl.zeros((HP,), dtype=tl.float32)
        ri = tl.zeros((HP,), dtype=tl.float32)
        rr2 = tl.zeros((HP,), dtype=tl.float32)
        ri2 = tl.zeros((HP,), dtype=tl.float32)
        rc = tl.sum(tl.zeros((HP,), dtype=tl.float32), 0)  # fp32 scalars, loop-carried
        rc2 = rc
        for m in range(pid_n + 1, n_c):
            k = (m - pid_n - 1).to(tl.float32)
            f = tl.exp(-lam * C * k)
            ptr = L + (bh * n_c + m) * (4 * HP + 2)
            lr = tl.load(ptr + offs_h)
            li = tl.load(ptr + HP + offs_h)
            lc = tl.load(ptr + 4 * HP)
            rr += f * lr
            ri += f * li
            rr2 += f * (tl.load(ptr + 2 * HP + offs_h) + C * k * lr)
            ri2 += f * (tl.load(ptr + 3 * HP + offs_h) + C * k * li)
            rc += f * lc
            rc2 += f * (tl.load(ptr + 4 * HP + 1) + C * k * lc)
        j = tl.arange(0, C)
        gap = (C - 1 - j).to(tl.float32)  # e - s
        bs = tl.where(key_in, tl.exp(-lam * gap), 0.0)
        dpr = bs[:, None] * rr[None, :]
        dpi = bs[:, None] * ri[None, :]
        cross = bs * (tl.sum(pr * rr2[None, :] + pi * ri2[None, :], 1) + rc2
                      + gap * (tl.sum(pr * rr[None, :] + pi * ri[None, :], 1) + rc))
        # inside the chunk: t, s both in it, t >= s
        Gbh = G + bh * T * (2 * HP + 1)
        in_t = offs_n[:, None] < T
        ptr = Gbh + offs_n[:, None] * (2 * HP + 1) + offs_h[None, :]
        gr = tl.load(ptr, mask=in_t, other=0.0)
        gi = tl.load(ptr + HP, mask=in_t, other=0.0)
        c = tl.load(Gbh + offs_n * (2 * HP + 1) + 2 * HP, mask=key_in, other=0.0)
        rel = (j[None, :] - j[:, None]).to(tl.float32)  # (C, C): t - s, s down the rows
        w = tl.where((rel >= 0) & key_in[None, :] & key_in[:, None], tl.exp(-lam * tl.maximum(rel, 0.0)), 0.0)
        dpr += tl.dot(w, gr, input_precision=PREC)
        dpi += tl.dot(w, gi, input_precision=PREC)
        dw = tl.dot(pr, tl.trans(gr), input_precision=PREC) + tl.dot(pi, tl.trans(gi), input_precision=PREC)
        dlam = -tl.sum(rel * w * (dw + c[None, :]), 1) - cross
        tl.store(PART + bh * n_c + pid_n, tl.sum(dlam, 0))
        dkr, dki = _spec_mul(vr, vi, dpr, dpi, slot0, True)
        dvr, dvi = _spec_mul(kr, ki, dpr, dpi, slot0, True)
        mask = in_t & (offs_d[None, :] < D)
        gbase = DQKV + b * g_b + h * g_h + offs_n[:, None] * g_t + offs_d[None, :] * g_d
        dk = _to_time(dkr, dki, FWD, D, Hh, DP, HP, False, PREC)
        tl.store(gbase + g_w, dk.to(DQKV.dtype.element_ty), mask=mask)
        dv = _to_time(dvr, dvi, FWD, D, Hh, DP, HP, False, PREC)
        tl.store(gbase + 2 * g_w, dv.to(DQKV.dtype.element_ty), mask=mask)


def _chunk(T: int, d: int) -> tuple[int, int]:
    """(chunk length, warps): 64-token chunks at d <= 64, 32 at d = 128 (registers); shorter
    sequences one power-of-two chunk (at least 16, tl.dot's least)."""
    return min(64 if d <= 64 else 32, pow2(T)), 4


def _prec() -> str:
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _check(qkv: Tensor, decay: Tensor, fwd: Tensor, inv: Tensor) -> None:
    if qkv.dim() != 5 or qkv.shape[0] != 3:
        raise ValueError(f"hrr_causal_triton: qkv must be (3, B, H, T, d), got {tuple(qkv.shape)}")
    _, _, H, _, d = qkv.shape
    if not supports(d):
        raise ValueError(f"hrr_causal_triton: head dim {d} not supported (even, <= {MAX_HEAD_DIM})")
    if decay.shape != (H,) or fwd.shape != (d, d) or inv.shape != (d, d):
        raise ValueError("hrr_causal_triton: decay must be (H,), the bases (d, d) each")


def _fwd(qkv: Tensor, decay: Tensor, fwd: Tensor, inv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """-> y (B, T, H, d) in qkv's dtype, M (B, H, T, 2 HP) fp32, Z (B, H, T) fp32."""
    _, B, H, T, d = qkv.shape
    HP = pow2(d // 2)
    y = torch.empty((B, T, H, d), dtype=qkv.dtype, device=qkv.device)
    m = torch.empty((B, H, T, 2 * HP), dtype=torch.float32, device=qkv.device)
    z = torch.empty((B, H, T), dtype=torch.float32, device=qkv.device)
    if qkv.is_meta:
        return y, m, z
    C, warps = _chunk(T, d)
    n_c = triton.cdiv(T, C)
    p = torch.empty_like(m)
    e = torch.empty((B * H, n_c, 2 * HP + 1), dtype=torch.float32, device=qkv.device)
    DP, prec = pow2(d), _prec()
    s = qkv.stride()
    wrap_triton(_pairs_kernel)[(n_c, B * H)](
        qkv, *s, fwd, decay, p, e, H, T, d, d // 2, C=C, DP=DP, HP=HP, PREC=prec, num_warps=warps)
    wrap_triton(_fwd_kernel)[(n_c, B * H)](
        qkv, *s, fwd, inv, decay, p, e, m, z, y, y.stride(0), y.stride(1), y.stride(2),
        H, T, d, d // 2, C=C, DP=DP, HP=HP, PREC=prec, num_warps=warps)
    return y, m, z


def _bwd(dy: Tensor, qkv: Tensor, decay: Tensor, fwd: Tensor, inv: Tensor, m: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
    """-> dqkv (3, B, H, T, d) (a view of a packed (B, T, 3, H, d) buffer), ddecay (H,)."""
    _, B, H, T, d = qkv.shape
    HP = m.shape[-1] // 2
    dbuf = torch.empty((B, T, 3, H, d), dtype=qkv.dtype, device=qkv.device)
    dqkv = dbuf.permute(2, 0, 3, 1, 4)
    C, warps = _chunk(T, d)
    n_c = triton.cdiv(T, C)
    part = torch.empty((B * H, n_c), dtype=torch.float32, device=qkv.device)
    if not qkv.is_meta:
        dy = dy.contiguous()  # (B, T, H, d)
        g = torch.empty((B, H, T, 2 * HP + 1), dtype=torch.float32, device=qkv.device)  # G_t, c_t
        sums = torch.empty((B * H, n_c, 4 * HP + 2), dtype=torch.float32, device=qkv.device)
        DP, prec = pow2(d), _prec()
        s, gs = qkv.stride(), dqkv.stride()
        wrap_triton(_query_kernel)[(n_c, B * H)](
            qkv, *s, dy, dy.stride(0), dy.stride(1), dy.stride(2), fwd, inv, decay, m, z, g, sums, dqkv, *gs,
            H, T, d, d // 2, C=C, DP=DP, HP=HP, PREC=prec, num_warps=warps)
        wrap_triton(_key_kernel)[(n_c, B * H)](
            qkv, *s, fwd, decay, g, sums, dqkv, *gs, part, H, T, d, d // 2,
            C=C, DP=DP, HP=HP, PREC=prec, num_warps=warps)
    ddecay = part.view(B, H, n_c).sum((0, 2)).to(decay.dtype)
    return dqkv, ddecay


class HoloTritonFn(torch.autograd.Function):
    """The raw autograd path over ``_fwd`` / ``_bwd`` (no torch.library op; eager only)."""

    @staticmethod
    def forward(ctx, qkv, decay, fwd, inv):  # type: ignore[override]
        y, m, z = _fwd(qkv, decay, fwd, inv)
        ctx.save_for_backward(qkv, decay, fwd, inv, m, z)
        return y

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        qkv, decay, fwd, inv, m, z = ctx.saved_tensors
        dqkv, ddecay = _bwd(dy, qkv, decay, fwd, inv, m, z)
        return dqkv, ddecay, None, None


_op_available = False
if triton_available:
    def _fwd_op_impl(qkv: Tensor, decay: Tensor, fwd: Tensor, inv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return _fwd(qkv, decay, fwd, inv)

    def _fwd_fake(qkv, decay, fwd, inv):
        _, B, H, T, d = qkv.shape
        HP = pow2(d // 2)
        return qkv.new_empty((B, T, H, d)), qkv.new_empty((B, H, T, 2 * HP), dtype=torch.float32), \
            qkv.new_empty((B, H, T), dtype=torch.float32)

    def _bwd_op_impl(dy: Tensor, qkv: Tensor, decay: Tensor, fwd: Tensor, inv: Tensor, m: Tensor,
                     z: Tensor) -> tuple[Tensor, Tensor]:
        return _bwd(dy, qkv, decay, fwd, inv, m, z)

    def _bwd_fake(dy, qkv, decay, fwd, inv, m, z):
        _, B, H, T, d = qkv.shape
        return qkv.new_empty((B, T, 3, H, d)).permute(2, 0, 3, 1, 4), decay.new_empty((H,))

    try:
        _fwd_op = define_op("holo_causal_fwd", _fwd_op_impl, _fwd_fake)
        _bwd_op = define_op("holo_causal_bwd", _bwd_op_impl, _bwd_fake)

        def _setup(ctx, inputs, output):
            qkv, decay, fwd, inv = inputs
            _, m, z = output
            ctx.save_for_backward(qkv, decay, fwd, inv, m, z)
            ctx.mark_non_differentiable(m, z)

        def _backward(ctx, dy, dm, dz):
            qkv, decay, fwd, inv, m, z = ctx.saved_tensors
            dqkv, ddecay = _bwd_op(dy, qkv, decay, fwd, inv, m, z)
            return dqkv, ddecay, None, None

        _fwd_op.register_autograd(_backward, setup_context=_setup)
        _op_available = True
    except Exception:  # pragma: no cover - a torch without usable torch.library ops: the raw Function
        _op_available = False


def hrr_causal_triton(qkv: Tensor, decay: Tensor, fwd: Tensor, inv: Tensor, *, use_op: bool = True) -> Tensor:
    """``hrr_bind_causal`` fused: qkv (3, B, H, T, d) any strides, decay (H,) > 0, the packed real
    DFT bases ``fwd``, ``inv`` (d, d) -> y (B, T, H, d) in qkv's dtype (token-major).

    ``use_op=False`` calls the raw autograd Function (no torch.library op; eager only).
    """
    if not triton_available:
        raise RuntimeError("hrr_causal_triton needs triton")
    _check(qkv, decay, fwd, inv)
    args = (qkv, decay.float(), fwd.float().contiguous(), inv.float().contiguous())
    if use_op and _op_available:
        return torch.ops.physlm_graph.holo_causal_fwd(*args)[0]
    return HoloTritonFn.apply(*args)
