"""Private kernels of ``attention.gravity`` (NGT): squared distances, the score, the fast paths.

One elementwise function, ``GravityScore.__call__``, defines the score from a squared
distance; the materialised path calls it on (B, H, T, T) tensors (eagerly on CPU, fused by
``torch.compile`` on CUDA: ``gravity_materialised``), the FlexAttention path (CUDA inference)
inside a ``score_mod``, so all compute the same function. The fixed ``gaussian`` kernel is a
pure dot product and runs in SDPA (flash / cuDNN on CUDA) everywhere: ``gravity_gaussian_sdpa``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from torch.nn import functional as F

__all__ = [
    "GravityScore",
    "sq_dist",
    "sq_dist_exact",
    "gravity_flex",
    "flex_available",
    "gaussian_qk",
    "gravity_gaussian_sdpa",
    "gravity_materialised",
]

NEG = torch.finfo(torch.float32).min  # the seed masks with finfo(dtype).min, not -inf; scores are fp32


def sq_dist(zq: Tensor, zk: Tensor) -> Tensor:
    """``|zq_i - zk_j|^2`` from a dot product and per-token norms, clamped at 0: (..., T, c) -> (..., T, T).

    Never materialises the (..., T, T, c) difference tensor. The diagonal is set to exactly 0
    (self distance), as the explicit difference gives; off the diagonal the result differs from
    the explicit form by cancellation only (~1e-7 relative in fp32).
    """
    nq = zq.square().sum(-1, keepdim=True)  # (..., T, 1)
    nk = zk.square().sum(-1).unsqueeze(-2)  # (..., 1, T)
    d2 = (nq + nk - 2.0 * zq @ zk.transpose(-1, -2)).clamp_min(0.0)  # (..., T, T)
    eye = torch.eye(d2.shape[-1], dtype=torch.bool, device=d2.device)
    return d2.masked_fill(eye, 0.0)


def sq_dist_exact(zq: Tensor, zk: Tensor) -> Tensor:
    """The seed's form: explicit (..., T, T, c) differences. Memory-hungry; for reference tests."""
    return (zq.unsqueeze(-2) - zk.unsqueeze(-3)).square().sum(-1)  # (..., T, T)


@dataclass(frozen=True)
class GravityScore:
    """The gravity score of one (query i, key j) pair from its squared distance ``d2``.

    ``faithful`` (the seed, SEEDS.md §2.1)::

        s = -gamma_h * inv(d2 + eps) + beta_h ;  s *= m_i m_j  (mass_mode "score")
        hard: s = NEG where d2 > r^2 ;  soft: s *= relu(1 - d2 / r^2) ;  none: s

    ``fixed`` (attraction; Plummer-softened inverse square, beta dropped: it cancels)::

        s = +gamma_h * inv(d2 + softening) ;  s *= m_i m_j  (mass_mode "score")
        hard: s = NEG where d2 > r^2 ;  soft: s -= softplus((d2 - r^2) / cutoff_width) ;  none: s

    ``fixed`` with ``kernel="gaussian"`` (a dot product in disguise; see ``gaussian_qk``)::

        s = -gamma_h * d2 / r^2 (soft) or -gamma_h * d2 (none) ;  s += log m_j  (mass_mode "score")

    ``inv(u)`` is ``1/u``, or ``rsqrt(u)^2`` with ``use_rsqrt`` (the seed's flag; same value).
    All arguments broadcast elementwise; ``m_i``/``m_j``/``beta`` may be None when unused.
    """

    mode: Literal["faithful", "fixed"]
    cutoff: Literal["hard", "soft", "none"]
    mass_mode: Literal["score", "value"]
    eps: float
    softening: float
    cutoff_width: float
    use_rsqrt: bool
    kernel: Literal["inverse_square", "gaussian"] = "inverse_square"

    def __call__(self, d2: Tensor, gamma: Tensor, beta: Tensor | None, m_i: Tensor | None, m_j: Tensor | None, r2: Tensor) -> Tensor:
        if self.kernel == "gaussian":
            s = -gamma * d2 / r2 if self.cutoff == "soft" else -gamma * d2
            if self.mass_mode == "score":
                s = s + log_mass(m_j)  # key log-prior: weight proportional to m_j
            return s
        shift = self.eps if self.mode == "faithful" else self.softening
        inv = torch.rsqrt(d2 + shift).square() if self.use_rsqrt else 1.0 / (d2 + shift)
        if self.mode == "faithful":
            s = -gamma * inv + beta
        else:
            s = gamma * inv
        if self.mass_mode == "score":
            s = s * m_i * m_j  # the seed multiplies beta by the mass product too
        if self.cutoff == "hard":
            s = torch.where(d2 > r2, NEG, s)  # boolean mask: no gradient reaches the radius
        elif self.cutoff == "soft" and self.mode == "faithful":
            s = s * F.relu(1.0 - d2 / r2)  # inverted: out-of-radius pairs get 0, the maximum when beta <= 0
        elif self.cutoff == "soft":
            s = s - F.softplus((d2 - r2) / self.cutoff_width)  # decays out-of-radius pairs
        return s


def log_mass(m: Tensor) -> Tensor:
    """``log m`` with m clamped to the smallest normal fp32 (a zero mass gives a finite prior)."""
    return m.clamp_min(torch.finfo(torch.float32).tiny).log()


# ---------------------------------------------------------------------------------------------
# Fixed gaussian kernel: a pure dot product, so SDPA (flash / cuDNN) runs it at full speed.
# ---------------------------------------------------------------------------------------------


def gaussian_qk(zh: Tensor, gamma: Tensor, r2: Tensor | None, mass: Tensor | None, batch: int, width: int) -> tuple[Tensor, Tensor]:
    """Augmented queries and keys whose plain dot product is the gaussian gravity score.

    zh (Bz, H, T, c) fp32 coordinates (the bias of W_z already removed: distances are
    translation invariant), gamma (H,), r2 () or None (cutoff "none"), mass (B, T) or None
    (mass_mode "value") -> q', k' (B, H, T, P) fp32, P = max(width, c + 1 rounded up to 8)::

        z'   = z * sqrt(gamma_h) / r                       # per-head gamma and radius folded in
        q'_i = [2 z'_i, 1, 0...]                           # (the row constant -|z'_i|^2 dropped:
        k'_j = [z'_j, -|z'_j|^2 + log m_j, 0...]           #  softmax_j is invariant to it)
        q'_i . k'_j = -|z'_i - z'_j|^2 + |z'_i|^2 + log m_j = -gamma_h d2_ij / r^2 + log m_j + c_i

    so ``softmax_j(q'_i . k'_j)`` (scale 1) is ``softmax_j(-gamma_h d2 / r^2 + log m_j)``.
    ``width`` pads q'/k' with zeros to the value head dim: flash attention needs equal head
    dims for q, k and v, and the zero channels change no dot product.
    """
    scale = gamma.float().sqrt()  # (H,)
    if r2 is not None:
        scale = scale * torch.rsqrt(r2.float())
    zs = zh.float() * scale[:, None, None]  # (Bz, H, T, c)
    last = -zs.square().sum(-1, keepdim=True)  # (Bz, H, T, 1)
    if mass is not None:
        last = last + log_mass(mass.float())[:, None, :, None]  # (B, H, T, 1)
    Bz, H, T, c = zs.shape
    q = torch.cat([2.0 * zs, torch.ones_like(zs[..., :1])], dim=-1).expand(batch, H, T, c + 1)  # (B, H, T, c+1)
    k = torch.cat([zs.expand(batch, H, T, c), last.expand(batch, H, T, 1)], dim=-1)  # (B, H, T, c+1)
    P = max(width, -(-(c + 1) // 8) * 8)
    return F.pad(q, (0, P - c - 1)), F.pad(k, (0, P - c - 1))


def gravity_gaussian_sdpa(
    zh: Tensor, v: Tensor, gamma: Tensor, r2: Tensor | None, mass: Tensor | None, dropout_p: float = 0.0
) -> Tensor:
    """Causal gaussian gravity attention in SDPA: zh (Bz, H, T, c), v (B, H, T, d) -> (B, H, T, d).

    q'/k' are built in fp32 (``gaussian_qk``) and cast to v's dtype (bf16 under autocast: the
    flash / cuDNN kernels need it); scale 1, ``is_causal=True``. Attention dropout is SDPA's
    own, so the fast path also serves training. Same function on CPU (SDPA's CPU kernels).
    """
    B, H, T, d = v.shape
    q, k = gaussian_qk(zh, gamma, r2, mass, B, d)
    P = q.shape[-1]
    vv = F.pad(v, (0, P - d)) if P > d else v  # coordinates wider than the value head: pad v too
    o = F.scaled_dot_product_attention(q.to(v.dtype), k.to(v.dtype), vv, is_causal=True, scale=1.0, dropout_p=dropout_p)
    return o[..., :d] if P > d else o  # (B, H, T, d)


# ---------------------------------------------------------------------------------------------
# Materialised path (any kernel): eager on CPU, fused by torch.compile on CUDA.
# ---------------------------------------------------------------------------------------------


def gravity_materialised(
    zh: Tensor,
    v: Tensor,
    spec: GravityScore,
    gamma: Tensor,
    beta: Tensor | None,
    mass: Tensor | None,
    r2: Tensor,
    dropout_p: float = 0.0,
) -> Tensor:
    """softmax(score(d2) + causal mask) with dropout, then @ v: zh (Bz, H, T, c) fp32, v (B, H, T, d).

    The (B, H, T, T) scores are fp32 (the faithful -gamma / (d2 + eps) needs it near d2 = 0);
    ``mass`` (B, T) is given for mass_mode "score" only. ``torch.compile`` of this function
    (``compiled_materialised``) fuses the norms, the elementwise score, the mask and the
    softmax into a few passes over the (B, H, T, T) tensor.
    """
    T = zh.shape[-2]
    d2 = sq_dist(zh, zh)  # (Bz, H, T, T)
    m_i = mass[:, None, :, None] if mass is not None else None  # (B, 1, T, 1)
    m_j = mass[:, None, None, :] if mass is not None else None  # (B, 1, 1, T)
    b = beta[:, None, None] if beta is not None else None  # (H, 1, 1)
    s = spec(d2, gamma[:, None, None], b, m_i, m_j, r2)  # (B, H, T, T)
    future = torch.ones(T, T, dtype=torch.bool, device=s.device).triu(1)  # (T, T)
    p = torch.softmax(s.masked_fill(future, NEG), dim=-1)
    p = F.dropout(p, dropout_p) if dropout_p > 0 else p
    return p.to(v.dtype) @ v  # (B, H, T, d)


_compiled_materialised = None


def compiled_materialised(*args, **kwargs) -> Tensor:
    """``gravity_materialised`` under ``torch.compile`` (built on first use; shapes dynamic
    after the first recompile, so generation's growing T does not hit the recompile limit)."""
    global _compiled_materialised
    if torch.compiler.is_compiling():  # inside a compiled model: let the outer compile fuse it
        return gravity_materialised(*args, **kwargs)
    if _compiled_materialised is None:
        _compiled_materialised = torch.compile(gravity_materialised)
    return _compiled_materialised(*args, **kwargs)


# ---------------------------------------------------------------------------------------------
# GPU fast path: FlexAttention with the distance rebuilt from an augmented dot product.
# ---------------------------------------------------------------------------------------------

try:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    flex_available = True
except ImportError:  # pragma: no cover - older torch
    flex_available = False

_compiled_flex = None
_block_masks: dict[tuple[int, str], object] = {}


def _causal(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    return q_idx >= kv_idx


def augment(zh: Tensor) -> tuple[Tensor, Tensor]:
    """``q' = [2 z_i, -|z_i|^2, -1]``, ``k' = [z_j, 1, |z_j|^2]`` so ``q'.k' = -|z_i - z_j|^2``.

    (B, H, T, c) fp32 -> two (B, H, T, P) with P = c + 2 rounded up to a multiple of 16 (zeros).
    """
    n = zh.square().sum(-1, keepdim=True)  # (B, H, T, 1)
    one = torch.ones_like(n)
    q = torch.cat([2.0 * zh, -n, -one], dim=-1)  # (B, H, T, c+2)
    k = torch.cat([zh, one, n], dim=-1)  # (B, H, T, c+2)
    pad = -q.shape[-1] % 16
    return F.pad(q, (0, pad)), F.pad(k, (0, pad))


def gravity_flex(
    zh: Tensor,
    v: Tensor,
    spec: GravityScore,
    gamma: Tensor,
    beta: Tensor | None,
    mass: Tensor | None,
    r2: Tensor,
    *,
    compile: bool = True,
) -> Tensor:
    """Causal gravity attention with FlexAttention: zh (B, H, T, c), v (B, H, T, d) -> (B, H, T, d).

    ``mass`` (B, T) is given only for mass_mode "score" (for "value", pre-scale v). No
    attention dropout (flex has none): the caller uses this only when dropout is inactive.
    Learnable per-head gamma/beta, the masses and r^2 are captured by ``score_mod``; the masses
    are captured as two separate tensors (query side, key side) because FlexAttention refuses
    one grad-requiring tensor indexed twice. ``compile=False`` runs flex eagerly (unfused; any
    device) so the CPU test can check this function against the materialised path.
    """
    global _compiled_flex
    B, H, T, _ = zh.shape
    q, k = augment(zh.float())
    mq = mk = None
    if mass is not None:
        mq, mk = mass.float(), mass.float().clone()  # (B, T) each

    def score_mod(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        d2 = torch.where(q_idx == kv_idx, 0.0, (-score).clamp_min(0.0))
        m_i = mq[b, q_idx] if mq is not None else None
        m_j = mk[b, kv_idx] if mk is not None else None
        return spec(d2, gamma[h], beta[h] if beta is not None else None, m_i, m_j, r2)

    key = (T, str(zh.device))
    if key not in _block_masks:
        _block_masks[key] = create_block_mask(_causal, None, None, T, T, device=zh.device)
    fn = flex_attention
    if compile:
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        fn = _compiled_flex
    d = v.shape[-1]
    vp = F.pad(v.float(), (0, -d % 16))  # FlexAttention needs value head dims of at least 16; zeros are inert
    out = fn(q, k, vp, score_mod=score_mod, block_mask=_block_masks[key], scale=1.0)  # (B, H, T, d')
    return out[..., :d].to(v.dtype)
