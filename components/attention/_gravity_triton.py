"""Private Triton kernel of ``attention.gravity`` (NGT): fused, flash-style inverse-square gravity attention.

``gravity_triton`` computes the function of ``gravity_materialised`` (kernel ``inverse_square``)
without materialising the (B, H, T, T) scores. Forward, per (b, h) and block of queries, the
keys are streamed in blocks up to the diagonal (blocks above it are skipped)::

    d2_ij = max(n_i + n_j - 2 z_i.z_j, 0), d2_ii = 0   # n = |z|^2; 3xTF32 dot (fp32-accurate, not plain tf32)
    s_ij  = GravityScore(d2_ij, gamma_h, beta_h, m_i, m_j, r^2)   # fp32; j > i and hard-out: weight 0
    o_i   = sum_j dropout(softmax_j(s_ij)) v_j          # online softmax (FlashAttention-2)

P @ V runs in v's dtype (bf16 under autocast) with fp32 accumulation, as the materialised
``p.to(v.dtype) @ v``. Masked pairs (future keys, hard cutoff) get weight exactly 0, as
exp(finfo.min - max) in the materialised softmax; the diagonal (d2 = 0) is always in radius,
so every row has a real entry. Kept per row: lse_i, and whether the row is one-hot (every other
weight underflowed: faithful's self score -gamma m^2 / eps ~ -1e6 when nothing else is in
radius). Dropout: a Philox keep mask, uniform(i, j) >= p, key (seed, b H + h), one Philox call
(counter i ceil(T / 4) + j // 4) for four consecutive keys (``_uniform4``); the seed drawn from
torch's RNG per call and saved for the backward; applied to the normalised weights and scaled
by 1 / (1 - p).

Backward, one program per (b, h) and block of keys, streaming the blocks of queries at and
below the diagonal (the transposed tile, so no computed tensor is transposed)::

    P_ij  = exp(s_ij - lse_i) ;  dP_ij = M_ij / (1 - p) dO_i.v_j ;  delta_i = dO_i.O_i
    dS_ij = P_ij (dP_ij - delta_i) ;  dV_j = sum_i P_ij M_ij / (1 - p) dO_i

with O in fp32 and P unrounded (the forward keeps sum_j P_ij v_j besides the bf16 output), so
delta_i = sum_j P_ij dP_ij as in the materialised softmax backward; a one-hot row's weight-1
entry gets P = 1 and dS = 0 exactly (as the materialised softmax has; recomputing a score of
~1e6 is an ulp off). dS is then chained through the score by hand (the derivatives of
``GravityScore.__call__``: relu', softplus' with torch's threshold 20, the hard mask; and
``sq_dist``'s clamp, grad where raw d2 >= 0, and zero diagonal) to g = dL/d(d2), and with
d2 = n_i + n_j - 2 z_i.z_j::

    dZ_i = 2 z_i sum_j g_ij - 2 sum_j g_ij z_j  (as a query)  +  2 z_i sum_k g_ki - 2 sum_k g_ki z_k  (as a key)

The keys' terms (dV, dZ, dm_j) accumulate in registers and are stored once; the queries'
(dZ, dm_i) are atomically added to fp32 buffers (summation order, hence the last bits, vary
from run to run); gamma, beta and r^2 partials go per (b, h, key block) to a buffer reduced in
torch, as are the masses over heads and dZ over the batch when the coordinates are shared.
r^2 gets a gradient from the soft cutoffs only (hard is a boolean mask, "none" ignores it).

Layers: ``_fwd`` / ``_bwd`` launch the kernels; ``GravityTritonFn`` is a plain autograd Function
over them (testable under ``TRITON_INTERPRET=1`` on CPU); ``torch.ops.physlm_graph.gravity_fwd``
/ ``gravity_bwd`` wrap the same launchers as ``torch.library.triton_op``s (``custom_op`` on an
older torch) with ``register_autograd``, so an outer ``torch.compile`` traces them without a
graph break; ``gravity_triton`` calls those. ``PHYSLM_GRAVITY_TRITON=0`` (read at import;
``ENABLED`` at run time) sends ``attention.gravity`` back to the materialised path.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from physlm_graph._errors import PhysLMError
from physlm_graph.components._triton import define_op, pow2, tl, triton, triton_available, wrap_triton
from physlm_graph.components.attention._gravity_kernels import GravityScore

__all__ = ["triton_available", "ENABLED", "gravity_triton", "gravity_triton_keep_mask", "GravityTritonFn"]

ENABLED = triton_available and os.environ.get("PHYSLM_GRAVITY_TRITON", "1") != "0"

HARD, SOFT, NONE = 0, 1, 2
_CUTOFF = {"hard": HARD, "soft": SOFT, "none": NONE}


# Precision of the coordinate products (the score's z_i.z_j and the backward's two dZ products):
# "tf32x3" (the default: three tf32 tensor-core products, the 3xTF32 split) or "ieee" (fp32 FMA
# on the CUDA cores). faithful's 1 / (d2 + 1e-6) cannot take plain tf32. On an H100 the two are
# equally accurate against fp64 (benchmarks/gravity_precision.py: the same errors, ~1e-7 to 5e-6
# relative in fp32) and tf32x3 makes the kernel's forward + backward 24-28% faster
# (benchmarks/gravity_kernel.py). PHYSLM_GRAVITY_ZDOT picks one at import.
ZDOT_PRECISION = os.environ.get("PHYSLM_GRAVITY_ZDOT", "tf32x3")
if ZDOT_PRECISION not in ("ieee", "tf32x3"):  # a user's setting: a plain error, not an "internal error"
    raise PhysLMError(f"the environment variable PHYSLM_GRAVITY_ZDOT must be 'ieee' or 'tf32x3', not {ZDOT_PRECISION!r}")

if triton_available:
    NEG_F32 = tl.constexpr(-3.4028234663852886e38)  # finfo(float32).min, as the materialised mask
    ZDOT = tl.constexpr(ZDOT_PRECISION)

    @triton.jit
    def _uniform4(seed_bh, offs_m, start_n, T, BM: tl.constexpr, BN: tl.constexpr):
        """Uniform [0, 1) numbers of the (BM, BN) tile of pairs (i, j), j from start_n (a multiple
        of 4): one Philox call (key (seed, b H + h), counter i ceil(T / 4) + j // 4) gives the four
        numbers of keys 4g .. 4g + 3, a quarter of the integer work of one call per pair."""
        g = start_n // 4 + tl.arange(0, BN // 4)
        r0, r1, r2, r3 = tl.randint4x(seed_bh, offs_m[:, None] * ((T + 3) // 4) + g[None, :])
        r = tl.join(tl.join(r0, r2), tl.join(r1, r3))  # (BM, BN / 4, 2, 2): [i, g, b, a] = r_{2b + a}
        return tl.uint_to_uniform_float(tl.reshape(r, (BM, BN)))  # as tl.rand converts

    @triton.jit
    def _score(za, na, ma, zbT, nb, mb, offs_a, offs_b, T, gamma, beta, r2, shift, width,
               FAITHFUL: tl.constexpr, CUTOFF: tl.constexpr, MASS: tl.constexpr, MASK: tl.constexpr,
               KEYS_A: tl.constexpr):
        """Scores of an (A, B) tile of tokens a x b, the validity mask and what the backward needs
        (GravityScore). The score is symmetric in (i, j) but for causality: rows a are the queries
        (forward) or the keys (KEYS_A, backward: the tile is S^T). zbT (CP, B): b's coordinates,
        loaded transposed. MASK: the tile touches the diagonal or T (causal / bounds / diagonal
        checks); off it every pair is a past, in-bounds, off-diagonal one."""
        raw = na[:, None] + nb[None, :] - 2.0 * tl.dot(za, zbT, input_precision=ZDOT)  # (A, B)
        if MASK:
            d2 = tl.where(offs_a[:, None] == offs_b[None, :], 0.0, tl.maximum(raw, 0.0))
            if KEYS_A:
                valid = offs_a[:, None] <= offs_b[None, :]
            else:
                valid = offs_b[None, :] <= offs_a[:, None]
            valid = valid & (offs_a[:, None] < T) & (offs_b[None, :] < T)
        else:
            d2 = tl.maximum(raw, 0.0)
            valid = d2 >= 0.0  # (unused: every pair is valid; Triton 3.6 returns no None)
        inv = 1.0 / (d2 + shift)
        if FAITHFUL:
            s0 = beta - gamma * inv
        else:
            s0 = gamma * inv
        if MASS:
            mm = ma[:, None] * mb[None, :]
            s1 = s0 * mm
        else:
            mm = s0  # (unused)
            s1 = s0
        aux = d2  # faithful soft: 1 - d2 / r2; fixed soft: (d2 - r2) / width
        e = d2  # fixed soft: exp(min(aux, 20)), kept for softplus' in the backward
        if CUTOFF == 0:
            if MASK:
                valid = valid & (d2 <= r2)
            else:
                valid = d2 <= r2
            s = s1
        elif CUTOFF == 1:
            if FAITHFUL:
                aux = 1.0 - d2 * (1.0 / r2)  # one scalar reciprocal, not a division per pair
                s = s1 * tl.maximum(aux, 0.0)
            else:
                # the special-function unit is this kernel's bottleneck: one exp and one log per
                # pair (log(1 + e) is off from log1p(e) by at most ~6e-8 absolute, where e < 1e-7;
                # scores are O(1) or larger), and a multiply by 1 / width (a compile-time constant)
                aux = (d2 - r2) * (1.0 / width)
                e = tl.exp(tl.minimum(aux, 20.0))
                s = s1 - tl.where(aux > 20.0, aux, tl.log(1.0 + e))  # F.softplus (threshold 20)
        else:
            s = s1
        return s, valid, raw, d2, inv, s0, s1, mm, aux, e

    @triton.jit
    def _score_grads(ds, offs_m, offs_n, raw, d2, inv, s0, s1, mm, aux, e, gamma, r2, width,
                     FAITHFUL: tl.constexpr, CUTOFF: tl.constexpr, MASS: tl.constexpr, MASK: tl.constexpr):
        """From dS = dL/ds (0 on masked pairs): g = dL/d(d2) (0 on the diagonal and where sq_dist
        clamps), and the elementwise gradient terms of gamma, beta, r^2 and the mass product."""
        if CUTOFF == 1 and FAITHFUL:
            ds1 = ds * tl.maximum(aux, 0.0)
        else:
            ds1 = ds
        if MASS:
            ds0 = ds1 * mm
        else:
            ds0 = ds1
        if FAITHFUL:
            gd2 = ds0 * gamma * inv * inv
            ggam = -ds0 * inv
        else:
            gd2 = -ds0 * gamma * inv * inv
            ggam = ds0 * inv
        gr2 = ggam  # (unused unless soft)
        if CUTOFF == 1:
            if FAITHFUL:
                rr = 1.0 / r2  # scalar
                t = tl.where(aux > 0.0, ds * s1, 0.0)  # relu'(1 - d2 / r2)
                gd2 = gd2 - t * rr
                gr2 = t * d2 * (rr * rr)
            else:  # e = exp(min(aux, 20)) from the recomputed score
                t = ds * tl.where(aux > 20.0, 1.0, e / (e + 1.0)) * (1.0 / width)  # softplus' as torch computes it
                gd2 = gd2 - t
                gr2 = t
        keep = raw >= 0.0
        if MASK:
            keep = keep & (offs_m[:, None] != offs_n[None, :])
        g = tl.where(keep, gd2, 0.0)
        return g, ggam, ds0, gr2, ds1 * s0

    @triton.jit
    def _head_consts(GAMMA, BETA, R2, SEED, h, bh, FAITHFUL: tl.constexpr, DROPOUT: tl.constexpr):
        """gamma_h, beta_h (gamma when there is none), r^2 and the (b, h) Philox key."""
        gamma = tl.load(GAMMA + h)
        beta = gamma
        if FAITHFUL:
            beta = tl.load(BETA + h)
        r2 = tl.load(R2)
        seed_bh = bh
        if DROPOUT:
            seed_bh = tl.load(SEED).to(tl.int64) + (bh.to(tl.int64) << 32)
        return gamma, beta, r2, seed_bh

    @triton.jit
    def _load_z(Zbh, offs, in_t, offs_c, s_zt, s_zc, C, TRANS: tl.constexpr):
        """Coordinates of a block of tokens, fp32: (BLK, CP), or (CP, BLK) with TRANS."""
        if TRANS:
            z = tl.load(Zbh + offs_c[:, None] * s_zc + offs[None, :] * s_zt,
                        mask=(offs_c[:, None] < C) & in_t[None, :], other=0.0)
        else:
            z = tl.load(Zbh + offs[:, None] * s_zt + offs_c[None, :] * s_zc,
                        mask=in_t[:, None] & (offs_c[None, :] < C), other=0.0)
        return z.to(tl.float32)

    @triton.jit
    def _load_nm(Nbh, MASS, b, offs, in_t, s_mb, s_mt, MASS_SCORE: tl.constexpr):
        """|z|^2 and masses (|z|^2 again, unused, without mass_mode score) of a block of tokens."""
        n = tl.load(Nbh + offs, mask=in_t, other=0.0)
        m = n
        if MASS_SCORE:
            m = tl.load(MASS + b * s_mb + offs * s_mt, mask=in_t, other=1.0)
        return n, m

    @triton.jit
    def _dot_v(a, b, IEEE: tl.constexpr):
        """Products with the values (P V, dO V^T, P^T dO): ieee for fp32 v, native for bf16/fp16."""
        if IEEE:
            return tl.dot(a, b, input_precision="ieee")
        else:
            return tl.dot(a, b)

    @triton.jit
    def _fwd_tile(acc, acc_lo, m_i, l_i, zq, nq, mq, offs_m, start_n, Zbh, Nbh, Vbh, MASS, b, s_mb, s_mt, s_zt, s_zc,
                  s_vt, s_vd, T, C, D, gamma, beta, r2, shift, width, seed_bh, p_drop, drop_scale,
                  FAITHFUL: tl.constexpr, CUTOFF: tl.constexpr, MASS_SCORE: tl.constexpr, DROPOUT: tl.constexpr,
                  V_IEEE: tl.constexpr, MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  CP: tl.constexpr, DP: tl.constexpr):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_c = tl.arange(0, CP)
        offs_d = tl.arange(0, DP)
        in_n = offs_n < T
        zkT = _load_z(Zbh, offs_n, in_n, offs_c, s_zt, s_zc, C, True)  # (CP, BN)
        nk, mk = _load_nm(Nbh, MASS, b, offs_n, in_n, s_mb, s_mt, MASS_SCORE)
        s, valid, _, _, _, _, _, _, _, _ = _score(zq, nq, mq, zkT, nk, mk, offs_m, offs_n, T, gamma, beta, r2, shift,
                                               width, FAITHFUL, CUTOFF, MASS_SCORE, MASK, False)
        if MASK or CUTOFF == 0:
            s = tl.where(valid, s, NEG_F32)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        if MASK or CUTOFF == 0:
            p = tl.where(valid, tl.exp(s - m_new[:, None]), 0.0)  # masked: exactly 0, never exp(0)
        else:
            p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            keep = _uniform4(seed_bh, offs_m, start_n, T, BLOCK_M, BLOCK_N) >= p_drop
            p = tl.where(keep, p * drop_scale, 0.0)
        vk = tl.load(Vbh + offs_n[:, None] * s_vt + offs_d[None, :] * s_vd,
                     mask=in_n[:, None] & (offs_d[None, :] < D), other=0.0)  # (BN, DP)
        p_v = p.to(vk.dtype)  # P @ V in v's dtype, as the materialised p.to(v.dtype) @ v
        acc = acc * alpha[:, None] + _dot_v(p_v, vk, V_IEEE)
        if not V_IEEE:  # + the rounding residual of P, for O32 = sum_j P_ij v_j with P unrounded
            acc_lo = acc_lo * alpha[:, None] + tl.dot((p - p_v.to(tl.float32)).to(vk.dtype), vk)
        return acc, acc_lo, m_new, l_i

    @triton.jit
    def _fwd_kernel(Z, NRM, V, O, O32, STATS, GAMMA, BETA, MASS, R2, SEED,
                    s_zb, s_zh, s_zt, s_zc, s_nb, s_vb, s_vh, s_vt, s_vd, s_ob, s_oh, s_ot, s_od, s_mb, s_mt,
                    H, T, C, D, shift: tl.constexpr, width: tl.constexpr, p_drop: tl.constexpr,
                    drop_scale: tl.constexpr,
                    FAITHFUL: tl.constexpr, CUTOFF: tl.constexpr, MASS_SCORE: tl.constexpr,
                    DROPOUT: tl.constexpr, V_IEEE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CP: tl.constexpr, DP: tl.constexpr):
        """Program (query block, b h): online softmax over the key blocks up to the diagonal.
        Writes O (B, H, T, D) in v's dtype, O32 (B, H, T, D) fp32 (sum_j P_ij v_j with P unrounded:
        the backward's delta = rowsum(dO * O32) then matches its dS exactly as the materialised
        softmax backward does; a bf16 P or O there biases every row's dS) and
        STATS (2, B, H, T): lse, and the backward's one-hot threshold. The float hyperparameters
        are constexprs (one compile per value; runtime floats can arrive as fp64 under inductor)."""
        pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # the longest rows first
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_c = tl.arange(0, CP)
        offs_d = tl.arange(0, DP)
        Zbh = Z + b * s_zb + h * s_zh
        Nbh = NRM + b * s_nb + h * T  # |z|^2 (Bz, H, T), contiguous: one rounding for every kernel
        Vbh = V + b * s_vb + h * s_vh
        zq = _load_z(Zbh, offs_m, offs_m < T, offs_c, s_zt, s_zc, C, False)  # (BM, CP)
        nq, mq = _load_nm(Nbh, MASS, b, offs_m, offs_m < T, s_mb, s_mt, MASS_SCORE)
        gamma, beta, r2, seed_bh = _head_consts(GAMMA, BETA, R2, SEED, h, bh, FAITHFUL, DROPOUT)

        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + NEG_F32
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, DP], dtype=tl.float32)
        acc_lo = tl.zeros([BLOCK_M, DP], dtype=tl.float32)
        lo = pid_m * BLOCK_M  # keys below lo: past and in bounds for every row of the block
        for start_n in range(0, lo, BLOCK_N):
            acc, acc_lo, m_i, l_i = _fwd_tile(acc, acc_lo, m_i, l_i, zq, nq, mq, offs_m, start_n, Zbh, Nbh, Vbh, MASS, b, s_mb, s_mt,
                                      s_zt, s_zc, s_vt, s_vd, T, C, D, gamma, beta, r2, shift, width, seed_bh, p_drop,
                                      drop_scale, FAITHFUL, CUTOFF, MASS_SCORE, DROPOUT, V_IEEE, False, BLOCK_M, BLOCK_N, CP, DP)
        for start_n in range(lo, tl.minimum(lo + BLOCK_M, T), BLOCK_N):
            acc, acc_lo, m_i, l_i = _fwd_tile(acc, acc_lo, m_i, l_i, zq, nq, mq, offs_m, start_n, Zbh, Nbh, Vbh, MASS, b, s_mb, s_mt,
                                      s_zt, s_zc, s_vt, s_vd, T, C, D, gamma, beta, r2, shift, width, seed_bh, p_drop,
                                      drop_scale, FAITHFUL, CUTOFF, MASS_SCORE, DROPOUT, V_IEEE, True, BLOCK_M, BLOCK_N, CP, DP)
        in_m = offs_m < T
        l_i = tl.where(in_m, l_i, 1.0)
        o = acc / l_i[:, None]
        o32 = (acc + acc_lo) / l_i[:, None]
        tl.store(O + b * s_ob + h * s_oh + offs_m[:, None] * s_ot + offs_d[None, :] * s_od, o.to(O.dtype.element_ty),
                 mask=in_m[:, None] & (offs_d[None, :] < D))
        tl.store(O32 + (bh * T + offs_m[:, None]) * D + offs_d[None, :], o32, mask=in_m[:, None] & (offs_d[None, :] < D))
        tl.store(STATS + bh * T + offs_m, m_i + tl.log(l_i), mask=in_m)
        # one-hot rows (every other weight underflowed: l == 1): the backward takes P = 1 and dS = 0
        # for their weight-1 entry, as the materialised softmax has exactly (P = 1, dP - P dP = 0);
        # the threshold 1e-3 picks it out (the others are < 1e-7) whatever the recompute's rounding
        tl.store(STATS + tl.num_programs(1) * T + bh * T + offs_m, tl.where(l_i == 1.0, 1e-3, 2.0), mask=in_m)

    @triton.jit
    def _bwd_tile(dv, dzk, dmk, sg, sb, sr, zk, zkT, nk, mk, vk, offs_n, start_m, Zbh, Nbh, DObh, MASS, STATS, DELTA,
                  DZR, DMR, bh, b, BH, s_mb, s_mt, s_zt, s_zc, s_dt, s_dd, T, C, D, gamma, beta, r2, shift, width,
                  seed_bh, p_drop, drop_scale,
                  FAITHFUL: tl.constexpr, CUTOFF: tl.constexpr, MASS_SCORE: tl.constexpr, DROPOUT: tl.constexpr,
                  V_IEEE: tl.constexpr, MASK: tl.constexpr, BLOCK_M: tl.constexpr, CP: tl.constexpr,
                  DP: tl.constexpr, start_n, BLOCK_N: tl.constexpr):
        """One (keys BN) x (queries BM) tile of the transposed problem (S^T, P^T, dS^T): no
        transposes of computed tensors; query-side operands are loaded in both layouts."""
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_c = tl.arange(0, CP)
        offs_d = tl.arange(0, DP)
        in_m = offs_m < T
        zq = _load_z(Zbh, offs_m, in_m, offs_c, s_zt, s_zc, C, False)  # (BM, CP)
        zqT = _load_z(Zbh, offs_m, in_m, offs_c, s_zt, s_zc, C, True)  # (CP, BM)
        nq, mq = _load_nm(Nbh, MASS, b, offs_m, in_m, s_mb, s_mt, MASS_SCORE)
        lse = tl.load(STATS + bh * T + offs_m, mask=in_m, other=0.0)
        sT, valid, raw, d2, inv, s0, s1, mm, aux, e = _score(
            zk, nk, mk, zqT, nq, mq, offs_n, offs_m, T, gamma, beta, r2, shift, width,
            FAITHFUL, CUTOFF, MASS_SCORE, MASK, True)  # (BN, BM)
        if MASK or CUTOFF == 0:
            pT = tl.exp(tl.where(valid, sT - lse[None, :], NEG_F32))  # masked: exp(-huge) = 0
        else:
            pT = tl.exp(sT - lse[None, :])
        # one-hot rows (see the forward): their weight-1 entry is exactly 1 (its score can be ~1e6,
        # where a recomputed s an ulp off moves exp(s - lse) by %), and its dS is exactly 0
        thr = tl.load(STATS + BH * T + bh * T + offs_m, mask=in_m, other=2.0)
        one = pT > thr[None, :]
        pT = tl.where(one, 1.0, pT)
        do = tl.load(DObh + offs_m[:, None] * s_dt + offs_d[None, :] * s_dd,
                     mask=in_m[:, None] & (offs_d[None, :] < D), other=0.0).to(vk.dtype)  # (BM, DP)
        doT = tl.load(DObh + offs_d[:, None] * s_dd + offs_m[None, :] * s_dt,
                      mask=(offs_d[:, None] < D) & in_m[None, :], other=0.0).to(vk.dtype)  # (DP, BM)
        dpT = _dot_v(vk, doT, V_IEEE)  # (BN, BM)
        if DROPOUT:
            keepT = tl.trans(_uniform4(seed_bh, offs_m, start_n, T, BLOCK_M, BLOCK_N)) >= p_drop  # the forward's, (BN, BM)
            dv += _dot_v(tl.where(keepT, pT * drop_scale, 0.0).to(vk.dtype), do, V_IEEE)
            dpT = tl.where(keepT, dpT * drop_scale, 0.0)
        else:
            dv += _dot_v(pT.to(vk.dtype), do, V_IEEE)
        delta = tl.load(DELTA + bh * T + offs_m, mask=in_m, other=0.0)
        dsT = tl.where(one, 0.0, pT * (dpT - delta[None, :]))
        gT, ggam, gbeta, gr2, gm = _score_grads(dsT, offs_n, offs_m, raw, d2, inv, s0, s1, mm, aux, e, gamma, r2, width,
                                                FAITHFUL, CUTOFF, MASS_SCORE, MASK)
        # keys (this program): registers; queries: atomics into the row buffers
        dzk += 2.0 * zk * tl.sum(gT, 1)[:, None] - 2.0 * tl.dot(gT, zq, input_precision=ZDOT)  # (BN, CP)
        dzqT = 2.0 * zqT * tl.sum(gT, 0)[None, :] - 2.0 * tl.dot(zkT, gT, input_precision=ZDOT)  # (CP, BM)
        row = bh * T + offs_m
        tl.atomic_add(DZR + offs_c[:, None] + row[None, :] * C, dzqT, mask=(offs_c[:, None] < C) & in_m[None, :],
                      sem="relaxed")
        if MASS_SCORE:
            dmk += tl.sum(gm * mq[None, :], 1)  # ds/dm_j = s0 m_i
            tl.atomic_add(DMR + row, tl.sum(gm * mk[:, None], 0), mask=in_m, sem="relaxed")  # ds/dm_i = s0 m_j
        sg += tl.sum(ggam, 1)
        if FAITHFUL:
            sb += tl.sum(gbeta, 1)
        if CUTOFF == 1:
            sr += tl.sum(gr2, 1)
        return dv, dzk, dmk, sg, sb, sr

    @triton.jit
    def _bwd_kernel(Z, NRM, V, DO, STATS, DELTA, GAMMA, BETA, MASS, R2, SEED, DZR, DZC, DV, DMR, DMC, PART,
                    s_zb, s_zh, s_zt, s_zc, s_nb, s_vb, s_vh, s_vt, s_vd, s_db, s_dh, s_dt, s_dd, s_mb, s_mt,
                    H, T, C, D, shift: tl.constexpr, width: tl.constexpr, p_drop: tl.constexpr,
                    drop_scale: tl.constexpr,
                    FAITHFUL: tl.constexpr, CUTOFF: tl.constexpr, MASS_SCORE: tl.constexpr,
                    DROPOUT: tl.constexpr, V_IEEE: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, CP: tl.constexpr, DP: tl.constexpr):
        """Program (key block, b h): stream the query blocks at and below the diagonal. Keys'
        dV, dZ (column term) and dm_j accumulate in registers and are stored once (DV, DZC, DMC);
        queries' dZ (row term) and dm_i are atomically added to DZR (B, H, T, C) and DMR
        (B, H, T); gamma / beta / r^2 partials go to PART (B H, n_blocks, 3)."""
        pid = tl.program_id(0)  # key block 0 has the most query blocks: launched first
        bh = tl.program_id(1)
        BH = tl.num_programs(1)
        b = bh // H
        h = bh % H
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_c = tl.arange(0, CP)
        offs_d = tl.arange(0, DP)
        in_n = offs_n < T
        Zbh = Z + b * s_zb + h * s_zh
        Nbh = NRM + b * s_nb + h * T
        gamma, beta, r2, seed_bh = _head_consts(GAMMA, BETA, R2, SEED, h, bh, FAITHFUL, DROPOUT)
        zk = _load_z(Zbh, offs_n, in_n, offs_c, s_zt, s_zc, C, False)  # (BN, CP)
        zkT = _load_z(Zbh, offs_n, in_n, offs_c, s_zt, s_zc, C, True)  # (CP, BN)
        nk, mk = _load_nm(Nbh, MASS, b, offs_n, in_n, s_mb, s_mt, MASS_SCORE)
        vk = tl.load(V + b * s_vb + h * s_vh + offs_n[:, None] * s_vt + offs_d[None, :] * s_vd,
                     mask=in_n[:, None] & (offs_d[None, :] < D), other=0.0)  # (BN, DP)
        DObh = DO + b * s_db + h * s_dh
        dv = tl.zeros([BLOCK_N, DP], dtype=tl.float32)
        dzk = tl.zeros([BLOCK_N, CP], dtype=tl.float32)
        dmk = tl.zeros([BLOCK_N], dtype=tl.float32)
        sg = tl.zeros([BLOCK_N], dtype=tl.float32)
        sb = tl.zeros([BLOCK_N], dtype=tl.float32)
        sr = tl.zeros([BLOCK_N], dtype=tl.float32)
        lo = pid * BLOCK_N
        mid = tl.minimum(lo + BLOCK_N, T)  # query blocks in [lo, mid) meet the diagonal
        full = (T // BLOCK_M) * BLOCK_M  # query blocks in [mid, full): past the diagonal, in bounds
        for start_m in range(lo, mid, BLOCK_M):
            dv, dzk, dmk, sg, sb, sr = _bwd_tile(
                dv, dzk, dmk, sg, sb, sr, zk, zkT, nk, mk, vk, offs_n, start_m, Zbh, Nbh, DObh, MASS, STATS, DELTA, DZR,
                DMR, bh, b, BH, s_mb, s_mt, s_zt, s_zc, s_dt, s_dd, T, C, D, gamma, beta, r2, shift, width, seed_bh,
                p_drop, drop_scale, FAITHFUL, CUTOFF, MASS_SCORE, DROPOUT, V_IEEE, True, BLOCK_M, CP, DP, lo, BLOCK_N)
        for start_m in range(mid, full, BLOCK_M):
            dv, dzk, dmk, sg, sb, sr = _bwd_tile(
                dv, dzk, dmk, sg, sb, sr, zk, zkT, nk, mk, vk, offs_n, start_m, Zbh, Nbh, DObh, MASS, STATS, DELTA, DZR,
                DMR, bh, b, BH, s_mb, s_mt, s_zt, s_zc, s_dt, s_dd, T, C, D, gamma, beta, r2, shift, width, seed_bh,
                p_drop, drop_scale, FAITHFUL, CUTOFF, MASS_SCORE, DROPOUT, V_IEEE, False, BLOCK_M, CP, DP, lo, BLOCK_N)
        for start_m in range(tl.maximum(mid, full), T, BLOCK_M):  # the partial last query block
            dv, dzk, dmk, sg, sb, sr = _bwd_tile(
                dv, dzk, dmk, sg, sb, sr, zk, zkT, nk, mk, vk, offs_n, start_m, Zbh, Nbh, DObh, MASS, STATS, DELTA, DZR,
                DMR, bh, b, BH, s_mb, s_mt, s_zt, s_zc, s_dt, s_dd, T, C, D, gamma, beta, r2, shift, width, seed_bh,
                p_drop, drop_scale, FAITHFUL, CUTOFF, MASS_SCORE, DROPOUT, V_IEEE, True, BLOCK_M, CP, DP, lo, BLOCK_N)
        row = bh * T + offs_n
        tl.store(DZC + row[:, None] * C + offs_c[None, :], dzk, mask=in_n[:, None] & (offs_c[None, :] < C))
        tl.store(DV + row[:, None] * D + offs_d[None, :], dv.to(DV.dtype.element_ty),
                 mask=in_n[:, None] & (offs_d[None, :] < D))
        if MASS_SCORE:
            tl.store(DMC + row, dmk, mask=in_n)
        part = PART + (bh * tl.num_programs(0) + pid) * 3
        tl.store(part, tl.sum(sg, 0))
        tl.store(part + 1, tl.sum(sb, 0))
        tl.store(part + 2, tl.sum(sr, 0))

    @triton.jit
    def _delta_kernel(DO, O, DELTA, s_db, s_dh, s_dt, s_dd, s_ob, s_oh, s_ot, s_od, H, T, D,
                      BLOCK: tl.constexpr, DP: tl.constexpr):
        """delta (B, H, T) = rowsum(dO * O) in fp32, from strided dO and O."""
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        offs_t = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        offs_d = tl.arange(0, DP)
        mask = (offs_t[:, None] < T) & (offs_d[None, :] < D)
        do = tl.load(DO + b * s_db + h * s_dh + offs_t[:, None] * s_dt + offs_d[None, :] * s_dd, mask=mask, other=0.0)
        o = tl.load(O + b * s_ob + h * s_oh + offs_t[:, None] * s_ot + offs_d[None, :] * s_od, mask=mask, other=0.0)
        tl.store(DELTA + bh * T + offs_t, tl.sum(do.to(tl.float32) * o.to(tl.float32), 1), mask=offs_t < T)

    @triton.jit
    def _keep_kernel(SEED, OUT, H, T, p_drop, BLOCK: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        bh = tl.program_id(2)
        seed_bh = tl.load(SEED).to(tl.int64) + (bh.to(tl.int64) << 32)
        offs_m = pid_m * BLOCK + tl.arange(0, BLOCK)
        offs_n = pid_n * BLOCK + tl.arange(0, BLOCK)
        keep = _uniform4(seed_bh, offs_m, pid_n * BLOCK, T, BLOCK, BLOCK) >= p_drop
        ptr = OUT + (bh * T + offs_m[:, None]).to(tl.int64) * T + offs_n[None, :]
        tl.store(ptr, keep.to(tl.int8), mask=(offs_m[:, None] < T) & (offs_n[None, :] < T))


# (BLOCK_M, BLOCK_N, num_warps, num_stages) by value head dim; the backward's BLOCK_N (keys per
# program) must be a multiple of its BLOCK_M (queries per step), the forward's BLOCK_M of its BLOCK_N.
# d = 64: the fastest of a small sweep on an H100 (B 16, H 8, T 512, c_h 16); d = 32 / 128: run and
# checked there, not tuned. The kernels are register-bound (the fp32 FMA dots): bigger tiles spill.
FWD_CONFIG = {32: (64, 64, 4, 2), 64: (64, 64, 4, 2), 128: (64, 32, 4, 2)}
BWD_CONFIG = {32: (32, 32, 4, 2), 64: (32, 32, 4, 2), 128: (16, 32, 4, 2)}


def _config(table: dict, d: int) -> tuple[int, int, int, int]:
    return table[min((k for k in table if k >= d), default=max(table))]


def _check(zh: Tensor, v: Tensor) -> None:
    T = zh.shape[-2]
    if T * T >= 2**31:
        raise ValueError(f"gravity_triton: T = {T} too long for int32 dropout offsets (T^2 < 2^31)")


def _fwd(zh: Tensor, v: Tensor, gamma: Tensor, beta: Tensor | None, mass: Tensor | None, r2: Tensor,
         seed: Tensor | None, faithful: bool, cutoff: int, shift: float, width: float, p: float) -> tuple[Tensor, Tensor, Tensor]:
    """Launch the forward: -> o (B, H, T, d) in v's dtype, stats (2, B, H, T) fp32 (lse; one-hot
    threshold), o32 (B, H, T, d) fp32 (O with P unrounded, for the backward's delta)."""
    _, H, T, C = zh.shape
    B, _, _, D = v.shape
    o = torch.empty((B, H, T, D), dtype=v.dtype, device=v.device)
    o32 = torch.empty((B, H, T, D), dtype=torch.float32, device=v.device)  # O unrounded: the backward's delta
    stats = torch.empty((2, B, H, T), dtype=torch.float32, device=v.device)
    if v.is_meta:  # shape inference only
        return o, stats, o32
    bm, bn, warps, stages = _config(FWD_CONFIG, D)
    mass_ = mass if mass is not None else gamma
    nrm = zh.float().square().sum(-1).contiguous()  # (Bz, H, T)
    wrap_triton(_fwd_kernel)[(triton.cdiv(T, bm), B * H)](
        zh, nrm, v, o, o32, stats, gamma, beta if beta is not None else gamma, mass_, r2, seed if seed is not None else gamma,
        zh.stride(0) if zh.shape[0] > 1 else 0, zh.stride(1), zh.stride(2), zh.stride(3), H * T if zh.shape[0] > 1 else 0,
        v.stride(0), v.stride(1), v.stride(2), v.stride(3), o.stride(0), o.stride(1), o.stride(2), o.stride(3),
        mass_.stride(0) if mass is not None else 0, mass_.stride(-1),
        H, T, C, D, shift, width, p, 1.0 / (1.0 - p),
        FAITHFUL=faithful, CUTOFF=cutoff, MASS_SCORE=mass is not None, DROPOUT=p > 0.0,
        V_IEEE=v.dtype == torch.float32, BLOCK_M=bm, BLOCK_N=bn, CP=pow2(C), DP=pow2(D),
        num_warps=warps, num_stages=stages,
    )
    return o, stats, o32


def _bwd(do: Tensor, zh: Tensor, v: Tensor, o: Tensor, stats: Tensor, gamma: Tensor, beta: Tensor | None,
         mass: Tensor | None, r2: Tensor, seed: Tensor | None, faithful: bool, cutoff: int, shift: float,
         width: float, p: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Launch the backward: -> dzh (Bz, H, T, c), dv (B, H, T, d), dgamma (H,), dbeta (H,) (zeros
    without beta), dmass (B, T) (empty without mass), dr2 () (zeros unless soft)."""
    Bz, H, T, C = zh.shape
    B, _, _, D = v.shape
    bm, bn, warps, stages = _config(BWD_CONFIG, D)
    n_blocks = triton.cdiv(T, bn)
    delta = torch.empty((B, H, T), dtype=torch.float32, device=v.device)  # rowsum(dO * O)
    dzr = torch.zeros((B, H, T, C), dtype=torch.float32, device=v.device)  # atomics: query (row) terms
    dzc = torch.empty((B, H, T, C), dtype=torch.float32, device=v.device)  # key (column) terms
    dv = torch.empty((B, H, T, D), dtype=v.dtype, device=v.device)
    dmr = torch.zeros((B, H, T) if mass is not None else (0,), dtype=torch.float32, device=v.device)
    dmc = torch.empty((B, H, T) if mass is not None else (0,), dtype=torch.float32, device=v.device)
    part = torch.empty((B * H, n_blocks, 3), dtype=torch.float32, device=v.device)
    mass_ = mass if mass is not None else gamma
    if not v.is_meta:  # (meta: shape inference only)
        wrap_triton(_delta_kernel)[(triton.cdiv(T, 64), B * H)](
            do, o, delta, do.stride(0), do.stride(1), do.stride(2), do.stride(3),
            o.stride(0), o.stride(1), o.stride(2), o.stride(3), H, T, D, BLOCK=64, DP=pow2(D),
        )
        nrm = zh.float().square().sum(-1).contiguous()  # (Bz, H, T), as in the forward
        wrap_triton(_bwd_kernel)[(n_blocks, B * H)](
            zh, nrm, v, do, stats, delta, gamma, beta if beta is not None else gamma, mass_, r2,
            seed if seed is not None else gamma, dzr, dzc, dv, dmr, dmc, part,
            zh.stride(0) if Bz > 1 else 0, zh.stride(1), zh.stride(2), zh.stride(3), H * T if Bz > 1 else 0,
            v.stride(0), v.stride(1), v.stride(2), v.stride(3), do.stride(0), do.stride(1), do.stride(2), do.stride(3),
            mass_.stride(0) if mass is not None else 0, mass_.stride(-1),
            H, T, C, D, shift, width, p, 1.0 / (1.0 - p),
            FAITHFUL=faithful, CUTOFF=cutoff, MASS_SCORE=mass is not None, DROPOUT=p > 0.0,
            V_IEEE=v.dtype == torch.float32, BLOCK_N=bn, BLOCK_M=bm, CP=pow2(C), DP=pow2(D),
            num_warps=warps, num_stages=stages,
        )
    dz = dzr + dzc  # (B, H, T, C)
    dzh = dz.sum(0, keepdim=True) if Bz == 1 and B > 1 else dz  # coordinates shared over the batch
    parts = part.view(B, H, n_blocks, 3).sum((0, 2))  # (H, 3)
    dmass = (dmr + dmc).sum(1) if mass is not None else dmr  # (B, T): m_i (rows) + m_j (columns), over heads
    dgamma, dbeta = parts[:, 0].to(gamma.dtype).clone(), parts[:, 1].to(gamma.dtype).clone()  # no aliased outputs
    return dzh.to(zh.dtype), dv, dgamma, dbeta, dmass, parts[:, 2].sum().to(r2.dtype)


def _spec_args(spec: GravityScore) -> tuple[bool, int, float, float]:
    if spec.kernel != "inverse_square":
        raise ValueError("gravity_triton: kernel inverse_square only (gaussian runs in SDPA)")
    faithful = spec.mode == "faithful"
    return faithful, _CUTOFF[spec.cutoff], float(spec.eps if faithful else spec.softening), float(spec.cutoff_width)


class GravityTritonFn(torch.autograd.Function):
    """The raw autograd path over ``_fwd`` / ``_bwd`` (no torch.library op; eager only)."""

    @staticmethod
    def forward(ctx, zh, v, gamma, beta, mass, r2, seed, faithful, cutoff, shift, width, p):  # type: ignore[override]
        o, lse, o32 = _fwd(zh, v, gamma, beta, mass, r2, seed, faithful, cutoff, shift, width, p)
        ctx.save_for_backward(zh, v, o32, lse, gamma, beta, mass, r2, seed)
        ctx.args = (faithful, cutoff, shift, width, p)
        return o

    @staticmethod
    def backward(ctx, do):  # type: ignore[override]
        zh, v, o, lse, gamma, beta, mass, r2, seed = ctx.saved_tensors
        faithful, cutoff, shift, width, p = ctx.args
        g = _bwd(do, zh, v, o, lse, gamma, beta, mass, r2, seed, faithful, cutoff, shift, width, p)
        return _grads_out(g, beta, mass, cutoff) + (None,) * 6


def _grads_out(g: tuple[Tensor, ...], beta: Tensor | None, mass: Tensor | None, cutoff: int) -> tuple:
    dzh, dv, dgamma, dbeta, dmass, dr2 = g
    return dzh, dv, dgamma, dbeta if beta is not None else None, dmass if mass is not None else None, \
        dr2 if cutoff == SOFT else None


# ---------------------------------------------------------------------------------------------
# torch.library ops: what torch.compile sees (traced into the graph without a break).
# ---------------------------------------------------------------------------------------------

_op_available = False
if triton_available:
    def _fwd_op_impl(zh: Tensor, v: Tensor, gamma: Tensor, beta: Tensor | None, mass: Tensor | None, r2: Tensor,
                     seed: Tensor | None, faithful: bool, cutoff: int, shift: float, width: float,
                     p: float) -> tuple[Tensor, Tensor, Tensor]:
        return _fwd(zh, v, gamma, beta, mass, r2, seed, faithful, cutoff, shift, width, p)

    def _fwd_fake(zh, v, gamma, beta, mass, r2, seed, faithful, cutoff, shift, width, p):
        B, H, T, _ = v.shape
        return v.new_empty(v.shape), v.new_empty((2, B, H, T), dtype=torch.float32), \
            v.new_empty(v.shape, dtype=torch.float32)

    def _bwd_op_impl(do: Tensor, zh: Tensor, v: Tensor, o: Tensor, lse: Tensor, gamma: Tensor, beta: Tensor | None,
                     mass: Tensor | None, r2: Tensor, seed: Tensor | None, faithful: bool, cutoff: int,
                     shift: float, width: float, p: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        return _bwd(do, zh, v, o, lse, gamma, beta, mass, r2, seed, faithful, cutoff, shift, width, p)

    def _bwd_fake(do, zh, v, o, lse, gamma, beta, mass, r2, seed, faithful, cutoff, shift, width, p):
        B, H, T, _ = v.shape
        dm = zh.new_empty((B, T) if mass is not None else (0,), dtype=torch.float32)
        return zh.new_empty(zh.shape), v.new_empty(v.shape), gamma.new_empty(gamma.shape), \
            gamma.new_empty(gamma.shape), dm, r2.new_empty(())

    try:
        _fwd_op = define_op("gravity_fwd", _fwd_op_impl, _fwd_fake)
        _bwd_op = define_op("gravity_bwd", _bwd_op_impl, _bwd_fake)

        def _setup(ctx, inputs, output):
            zh, v, gamma, beta, mass, r2, seed, faithful, cutoff, shift, width, p = inputs
            o, lse, o32 = output
            ctx.save_for_backward(zh, v, o32, lse, gamma, beta, mass, r2, seed)
            ctx.args = (faithful, cutoff, shift, width, p)
            ctx.mark_non_differentiable(lse, o32)

        def _backward(ctx, do, dlse, do32):
            zh, v, o, lse, gamma, beta, mass, r2, seed = ctx.saved_tensors
            faithful, cutoff, shift, width, p = ctx.args
            g = _bwd_op(do, zh, v, o, lse, gamma, beta, mass, r2, seed, faithful, cutoff, shift, width, p)
            return _grads_out(tuple(g), beta, mass, cutoff) + (None,) * 6

        _fwd_op.register_autograd(_backward, setup_context=_setup)
        _op_available = True
    except Exception:  # pragma: no cover - a torch without usable torch.library ops: the raw Function
        _op_available = False


def _draw_seed(v: Tensor, generator: torch.Generator | None) -> Tensor:
    """One Philox seed per call, from torch's RNG (``generator``'s, else v's device default), as a
    (1,) int64 tensor on v's device: no host sync, traceable."""
    dev = generator.device if generator is not None else v.device
    seed = torch.randint(0, 2**31 - 1, (1,), generator=generator, device=dev, dtype=torch.int64)
    return seed.to(v.device)


def gravity_triton(
    zh: Tensor,
    v: Tensor,
    spec: GravityScore,
    gamma: Tensor,
    beta: Tensor | None,
    mass: Tensor | None,
    r2: Tensor,
    dropout_p: float = 0.0,
    *,
    generator: torch.Generator | None = None,
    use_op: bool = True,
) -> Tensor:
    """Fused causal gravity attention: zh (Bz, H, T, c) fp32 (Bz in {1, B}), v (B, H, T, d) -> (B, H, T, d).

    Same arguments and function as ``gravity_materialised`` (kernel inverse_square); ``mass``
    (B, T) for mass_mode "score" only, ``beta`` (H,) for faithful only, r2 a 0-dim tensor.
    Attention dropout ``dropout_p`` uses a Philox mask (see ``gravity_triton_keep_mask``).
    ``use_op=False`` calls the raw autograd Function (no torch.library op; eager only).
    """
    if not triton_available:
        raise RuntimeError("gravity_triton needs triton")
    faithful, cutoff, shift, width = _spec_args(spec)
    _check(zh, v)
    p = float(dropout_p)
    seed = _draw_seed(v, generator) if p > 0.0 else None
    gamma, r2 = gamma.float(), r2.float().reshape(())
    beta = beta.float() if beta is not None and faithful else None
    mass = mass.float() if mass is not None and spec.mass_mode == "score" else None
    args = (zh, v, gamma, beta, mass, r2, seed, faithful, cutoff, shift, width, p)
    if use_op and _op_available:
        return torch.ops.physlm_graph.gravity_fwd(*args)[0]
    return GravityTritonFn.apply(*args)


def gravity_triton_keep_mask(seed: int | Tensor, B: int, H: int, T: int, p: float, device: torch.device | str) -> Tensor:
    """The (B, H, T, T) bool dropout keep mask the kernels draw for ``seed`` and probability p."""
    seed_t = torch.as_tensor(seed, dtype=torch.int64, device=device).reshape(1)
    out = torch.empty((B, H, T, T), dtype=torch.int8, device=device)
    blk = 32
    _keep_kernel[(triton.cdiv(T, blk), triton.cdiv(T, blk), B * H)](seed_t, out, H, T, float(p), BLOCK=blk)
    return out.bool()
