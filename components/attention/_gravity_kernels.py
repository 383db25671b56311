"""Private kernels of ``attention.gravity`` (NGT): squared distances, the score, a FlexAttention path.

One elementwise function, ``GravityScore.__call__``, defines the score from a squared
distance; the CPU path calls it on (B, H, T, T) tensors and the GPU path calls it inside a
FlexAttention ``score_mod``, so both compute the same function.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from torch.nn import functional as F

__all__ = ["GravityScore", "sq_dist", "sq_dist_exact", "gravity_flex", "flex_available"]

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

    def __call__(self, d2: Tensor, gamma: Tensor, beta: Tensor | None, m_i: Tensor | None, m_j: Tensor | None, r2: Tensor) -> Tensor:
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
    out = fn(q, k, v.float(), score_mod=score_mod, block_mask=_block_masks[key], scale=1.0)  # (B, H, T, d)
    return out.to(v.dtype)
