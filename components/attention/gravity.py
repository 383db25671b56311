"""attention.gravity: the Newton Gravity Transformer's GravityAttention ("gravity kernel").

Reproduces ``GravityAttention`` of ``leetae9yu/newton-gravity-transformer`` @ aa61083
(``ngt_model.py``), specified in ``shared/reference/SEEDS.md`` §2.1.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn
from torch.nn import functional as F

from physlm_graph import ComponentParams, Example, Inputs, decode_context, register
from physlm_graph._context import DecodeContext
from physlm_graph.components._decode_cache import AppendCache
from physlm_graph.components.attention._gravity_kernels import (
    NEG,
    GravityScore,
    compiled_materialised,
    flex_available,
    gravity_flex,
    gravity_gaussian_sdpa,
    sq_dist,
    sq_dist_exact,
)

Mode = Literal["faithful", "fixed"]
Cutoff = Literal["hard", "soft", "none"]
MassMode = Literal["score", "value"]
Kernel = Literal["inverse_square", "gaussian"]


def _triton_kernels():
    """The Triton kernel module, imported on first CUDA use: triton and torch's Triton-op
    machinery add about a second to an import that CPU work never needs (``physlm-graph build``
    must start in under 3 s). A compiled model imports it while tracing, without a graph break."""
    from physlm_graph.components.attention import _gravity_triton

    if not _gravity_triton.triton_available:
        from physlm_graph.components._triton import warn_slow_path

        warn_slow_path("attention.gravity: triton is not importable, so the inverse-square kernel runs the compiled "
                       "materialised (B, H, T, T) path, 1.4x-1.5x slower per step at NGT's size on an H100; install "
                       "triton (CUDA builds of torch ship it) for the fused kernel")
    return _gravity_triton


class GravityAttention(nn.Module):
    """Attention whose scores come from distances between tokens in a learned coordinate space.

    Shapes: x (B, T, D) (the LayerNormed hidden state), z (B, T, c) or (1, T, c) coordinates,
    mass (B, T, 1) -> out (B, T, D), z_next (B, T, c). With H heads, d = D/H, c_h =
    ``head_coord_dim``::

        V   = W_v x + b_v                              # (B, H, T, d)
        Z   = W_z z + b_z                              # (B, H, T, c_h), per-head coordinates
        d2  = |Z_i - Z_j|^2                            # (B, H, T, T), from Z_i.Z_j and norms
        S   = score(d2, gamma_h, beta_h, m_i, m_j, r)  # see modes; causal mask j > i -> finfo.min
        o   = dropout(softmax_j(S)) V                  # V_j *= m_j first in mass_mode "value"
        out = W_o o + b_o ;  z_next = W_n out + b_n    # z_next sees only the attention output

    gamma_h = softplus(gamma_raw_h) (init ``gamma_init``), beta_h init 0, one radius per layer
    r = softplus(radius_raw) (init ``radius_init``: r ~ 4.018). No custom init (PyTorch
    defaults), as in the seed.

    Modes:

    - ``faithful`` (default: the published numbers depend on it): the seed's
      ``S = (-gamma_h / (d2 + eps) + beta_h) * m_i m_j`` (mass_mode "score"; beta is multiplied
      by the masses too, the README has it outside), or ``-gamma_h / (d2 + eps) + beta_h`` with
      ``V_j *= m_j`` (mass_mode "value"). Cutoffs: ``hard`` fills finfo.min where d2 > r^2,
      ``soft`` multiplies by relu(1 - d2/r^2), ``none``. Flagged behaviour, all kept:
      [README≠code] the sign makes softmax prefer *farther* in-radius tokens (an exclusion
      kernel, not attraction) and heavier pairs get *less* attention; the self score is
      -gamma m_i^2 / eps ~ -6.9e5, so the self weight is 0 except at t = 0; the hard cutoff
      gives the radius no gradient; the soft cutoff is inverted (out-of-radius scores become
      0, the maximum when beta <= 0, so far tokens get *more* weight). Causal.
    - ``fixed``: what the README describes. Near, heavy tokens attract, with a Plummer-softened
      inverse square: ``S = +gamma_h m_i m_j / (d2 + softening)`` (no beta: a per-head shift
      cancels in softmax). Self-attention is allowed (the self score is the largest, finite).
      Cutoffs: ``hard`` as above (radius gets no gradient), ``soft`` subtracts
      softplus((d2 - r^2) / cutoff_width), which decays out-of-radius scores and is
      differentiable in r; ``none``. Causal. That is ``kernel: inverse_square`` (the default).
    - ``fixed`` with ``kernel: gaussian``: the same claim ("near, heavy tokens attract, within a
      learnable radius") with a gaussian kernel, ``S = -gamma_h d2 / r^2 + log m_j``
      (mass_mode "score": softmax weight proportional to m_j exp(-gamma_h d2 / r^2); "value":
      no log-prior, V_j *= m_j). The radius is the kernel's length scale r / sqrt(gamma_h): a
      soft, decaying, differentiable cutoff (``cutoff: soft``, the default for this kernel;
      ``none`` drops r; ``hard`` is refused). Self-attention is allowed and the nearest token
      wins. It is a dot product of augmented vectors (``gaussian_qk``), so it runs in SDPA
      (flash / cuDNN on CUDA, dropout included) at the speed of causal attention. Differences
      from inverse_square: the per-query mass m_i plays no role (a per-row factor), and the
      decay is exp(-d2) instead of 1/(d2 + softening).

    Implementation: the (B, H, T, T, c_h) difference tensor of the seed is never built; d2 is
    rebuilt from a dot product and per-token norms (clamped at 0, diagonal exactly 0), so the CPU
    path holds only (B, H, T, T) scores. ``exact=True`` (constructor only, for reference tests)
    uses the seed's explicit differences. Paths: gaussian -> SDPA (every device). Otherwise on
    CUDA, when Triton is importable: a fused flash-style Triton kernel (``gravity_triton``,
    forward and hand-derived backward, attention dropout included, training and inference): d2
    from an fp32 (non-tf32) dot and norms, the score, an online softmax and P @ V per block of
    keys, so no (B, H, T, T) tensor is ever stored; it is a ``torch.library`` op, so a compiled
    model traces it without a graph break. ``PHYSLM_GRAVITY_TRITON=0`` (or no Triton) falls
    back to: with gradients, ``torch.compile`` of the materialised path (one fused elementwise +
    softmax pass over fp32 (B, H, T, T) scores; FlexAttention would have to capture the
    learnable gamma, beta and masses in ``score_mod``, whose backward is ~50x slower); without
    gradients and attention dropout, FlexAttention (``gravity_flex``). On CPU, the eager
    materialised path.

    Incremental decoding (both modes, both kernels): a pair's score depends only on the two
    tokens, so inside ``physlm_graph.decoding()`` the per-head coordinates, values and masses
    of every chunk are cached in the decode context and each new query scores all cached keys
    (the eager materialised path, (B, H, T_chunk, S) scores).
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        coord_dim: int,
        num_heads: int,
        head_coord_dim: int = 16,
        gamma_init: float = 0.0,
        radius_init: float = 4.0,
        eps: float = 1e-6,
        softening: float = 1.0,
        cutoff_width: float = 1.0,
        cutoff: Cutoff = "hard",
        mass_mode: MassMode = "score",
        use_rsqrt: bool = False,
        dropout: float = 0.1,
        mode: Mode = "faithful",
        kernel: Kernel = "inverse_square",
        exact: bool = False,
    ) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.head_coord_dim = num_heads, embed_dim // num_heads, head_coord_dim
        self.exact = exact
        self.spec = GravityScore(mode, cutoff, mass_mode, eps, softening, cutoff_width, use_rsqrt, kernel)
        self.value = nn.Linear(embed_dim, embed_dim)
        self.coord = nn.Linear(coord_dim, num_heads * head_coord_dim)
        self.proj = nn.Linear(embed_dim, embed_dim)
        self.coord_out = nn.Linear(embed_dim, coord_dim)
        self.gamma_raw = nn.Parameter(torch.full((num_heads,), float(gamma_init)))
        # faithful only: in fixed mode a per-head additive bias cancels in softmax
        self.beta = nn.Parameter(torch.zeros(num_heads)) if mode == "faithful" else None
        self.radius_raw = nn.Parameter(torch.tensor(float(radius_init)))
        self.attn_drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, z: Tensor, mass: Tensor) -> tuple[Tensor, Tensor]:
        ctx = decode_context()
        if ctx is not None:
            return self._decode(ctx, x, z, mass)
        B, T, D = x.shape
        H, spec = self.num_heads, self.spec
        v = self.value(x).view(B, T, H, self.head_dim).transpose(1, 2)  # (B, H, T, d)
        zh = self.coords(z)  # (Bz, H, T, c_h)
        m = mass.squeeze(-1).float()  # (B, T)
        if spec.mass_mode == "value":
            v = v * m[:, None, :, None].to(v.dtype)  # mass as a per-key gain
        gamma = F.softplus(self.gamma_raw)  # (H,)
        r2 = F.softplus(self.radius_raw).square()  # ()
        p_drop = self.attn_drop.p if self.training else 0.0
        mq = m if spec.mass_mode == "score" else None  # (B, T) or None
        if spec.kernel == "gaussian" and not self.exact:
            zc = zh - self.coord.bias.view(H, 1, self.head_coord_dim).float()  # b_z cancels in d2; better conditioned
            o = gravity_gaussian_sdpa(zc, v, gamma, r2 if spec.cutoff == "soft" else None, mq, p_drop)  # (B, H, T, d)
        elif x.is_cuda and not self.exact and (tk := _triton_kernels()).ENABLED:
            o = tk.gravity_triton(zh, v, spec, gamma, self.beta, mq, r2, p_drop)  # (B, H, T, d)
        elif x.is_cuda and not self.exact and flex_available and p_drop == 0.0 and not torch.is_grad_enabled():
            o = gravity_flex(zh.expand(B, -1, -1, -1), v, spec, gamma, self.beta, mq, r2)  # (B, H, T, d)
        elif x.is_cuda and not self.exact:
            o = compiled_materialised(zh, v, spec, gamma, self.beta, mq, r2, p_drop)  # (B, H, T, d)
        else:
            p = self.probs(zh, m, gamma, r2)  # (B, H, T, T)
            o = self.attn_drop(p).to(v.dtype) @ v  # (B, H, T, d)
        out = self.proj(o.transpose(1, 2).reshape(B, T, D))  # (B, T, D)
        return out, self.coord_out(out)

    def _decode(self, ctx: DecodeContext, x: Tensor, z: Tensor, mass: Tensor) -> tuple[Tensor, Tensor]:
        """One chunk of incremental decoding: this chunk's per-head coordinates, values and
        masses are appended to the cache in ``ctx``; the chunk's queries score every cached key
        with the same score, self distance and causal mask as ``probs``."""
        B, T, D = x.shape
        H = self.num_heads
        v = self.value(x).view(B, T, H, self.head_dim).transpose(1, 2)  # (B, H, T, d)
        zq = self.coords(z)  # (Bz, H, T, c_h)
        m = mass.squeeze(-1).float()  # (B, T)
        if self.spec.mass_mode == "value":
            v = v * m[:, None, :, None].to(v.dtype)
        cache = ctx.get(self)
        if cache is None:
            cache = AppendCache(2, 2, 1)
            ctx.set(self, cache)
        zk, vk, mk = cache.extend(zq, v, m)  # (Bz, H, S, c_h), (B, H, S, d), (B, S)
        S = zk.shape[2]
        qpos = torch.arange(S - T, S, device=x.device)[:, None]  # (T, 1) absolute query positions
        kpos = torch.arange(S, device=x.device)[None, :]  # (1, S)
        if self.exact:
            d2 = sq_dist_exact(zq, zk)  # (Bz, H, T, S)
        else:
            d2 = (zq.square().sum(-1, keepdim=True) + zk.square().sum(-1).unsqueeze(-2)
                  - 2.0 * zq @ zk.transpose(-1, -2)).clamp_min(0.0).masked_fill(kpos == qpos, 0.0)  # (Bz, H, T, S)
        score_mass = self.spec.mass_mode == "score"
        m_i = m[:, None, :, None] if score_mass else None  # (B, 1, T, 1)
        m_j = mk[:, None, None, :] if score_mass else None  # (B, 1, 1, S)
        beta = self.beta[:, None, None] if self.beta is not None else None
        gamma, r2 = F.softplus(self.gamma_raw), F.softplus(self.radius_raw).square()
        s = self.spec(d2, gamma[:, None, None], beta, m_i, m_j, r2)  # (B, H, T, S)
        p = torch.softmax(s.masked_fill(kpos > qpos, NEG), dim=-1)
        o = self.attn_drop(p).to(vk.dtype) @ vk  # (B, H, T, d)
        out = self.proj(o.transpose(1, 2).reshape(B, T, D))
        return out, self.coord_out(out)

    def probs(self, zh: Tensor, m: Tensor, gamma: Tensor, r2: Tensor) -> Tensor:
        """Attention weights before dropout, (B, H, T, T) fp32, from per-head coordinates
        zh (Bz, H, T, c_h), masses m (B, T), gamma (H,) and r^2."""
        T = zh.shape[-2]
        d2 = sq_dist_exact(zh, zh) if self.exact else sq_dist(zh, zh)  # (Bz, H, T, T)
        m_i = m[:, None, :, None] if self.spec.mass_mode == "score" else None  # (B, 1, T, 1)
        m_j = m[:, None, None, :] if self.spec.mass_mode == "score" else None  # (B, 1, 1, T)
        beta = self.beta[:, None, None] if self.beta is not None else None  # (H, 1, 1)
        s = self.spec(d2, gamma[:, None, None], beta, m_i, m_j, r2)  # (B or Bz, H, T, T)
        future = torch.ones(T, T, dtype=torch.bool, device=s.device).triu(1)  # (T, T)
        return torch.softmax(s.masked_fill(future, NEG), dim=-1)

    def coords(self, z: Tensor) -> Tensor:
        """Per-head coordinates W_z z + b_z: (Bz, T, c) -> (Bz, H, T, c_h), fp32."""
        return self.coord(z).view(z.shape[0], z.shape[1], self.num_heads, self.head_coord_dim).transpose(1, 2).float()


class GravityAttentionParams(ComponentParams):
    num_heads: int = Field(gt=0, description="number of heads; must divide the width of x")
    head_coord_dim: int = Field(16, gt=0, description="per-head coordinate width c_h (W_z: c -> H c_h)")
    gamma_init: float = Field(0.0, description="initial raw gamma (per head; gamma = softplus(raw), ~0.693)")
    radius_init: float = Field(4.0, description="initial raw radius (one per layer; r = softplus(raw), ~4.018)")
    eps: float = Field(1e-6, gt=0.0, description="faithful only: added to d2 in -gamma / (d2 + eps)")
    softening: float = Field(1.0, gt=0.0, description="fixed only: Plummer softening added to d2")
    cutoff_width: float = Field(1.0, gt=0.0, description="fixed + soft cutoff only: width of the softplus decay")
    cutoff: Cutoff = Field("hard", description="radius cutoff: hard (mask; radius gets no gradient), soft, none")
    mass_mode: MassMode = Field("score", description="score: scores times m_i m_j; value: values times m_j")
    use_rsqrt: bool = Field(False, description="compute 1/(d2+eps) as rsqrt(d2+eps)^2 (the seed's --use-rsqrt)")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="dropout on the attention weights")
    mode: Mode = Field("faithful", description="faithful: the seed's exclusion kernel; fixed: softened attraction")
    kernel: Kernel = Field(
        "inverse_square",
        description="fixed only: inverse_square (+gamma m_i m_j / (d2 + softening)) or gaussian "
        "(-gamma d2 / r^2 + log m_j, a dot product: runs in SDPA / flash; cutoff soft (default) or none)",
    )

    @model_validator(mode="before")
    @classmethod
    def _gaussian_cutoff_default(cls, data: object) -> object:
        # the gaussian kernel *is* a soft radius: default its cutoff to soft, not hard
        if isinstance(data, dict) and data.get("kernel") == "gaussian" and "cutoff" not in data:
            return {**data, "cutoff": "soft"}
        return data

    @model_validator(mode="after")
    def _mode_specific(self) -> GravityAttentionParams:
        set_ = self.model_fields_set
        if self.mode == "faithful" and "kernel" in set_:
            raise ValueError("kernel applies to mode: fixed only (faithful is the seed's inverse-distance kernel)")
        if self.kernel == "gaussian":
            bad = {"softening", "cutoff_width", "use_rsqrt"} & set_
            if bad:
                raise ValueError(f"{', '.join(sorted(bad))} apply to kernel: inverse_square only")
            if self.cutoff == "hard":
                raise ValueError("kernel: gaussian takes cutoff soft (r is the kernel width) or none; "
                                 "a hard radius mask is not a dot product")
        if self.mode == "fixed" and "eps" in set_:
            raise ValueError("eps applies to mode: faithful only; mode: fixed uses softening")
        if self.mode == "faithful" and {"softening", "cutoff_width"} & set_:
            raise ValueError("softening and cutoff_width apply to mode: fixed only")
        if "cutoff_width" in set_ and self.cutoff != "soft":
            raise ValueError("cutoff_width applies to cutoff: soft only")
        return self


def _no_grad(mode: str, cutoff: str, mass_mode: str, kernel: str = "inverse_square") -> tuple[tuple[str, ...], str]:
    names, why = [], []
    if kernel == "gaussian":
        names.append("coord.bias")
        why.append("gaussian: d2 is translation invariant, so the SDPA path drops b_z (its exact gradient is 0)")
    if cutoff != "soft":
        names.append("radius_raw")
        why.append("the hard cutoff is a boolean mask and 'none' ignores the radius")
    if mode == "faithful" and mass_mode == "value" and cutoff != "soft":
        names.append("beta")
        why.append("without a mass product or soft cutoff beta is a per-row shift that softmax cancels")
    return tuple(names), "; ".join(why)


def _example(mode: str, cutoff: str, mass_mode: str, **extra: object) -> Example:
    ng, why = _no_grad(mode, cutoff, mass_mode, str(extra.get("kernel", "inverse_square")))
    params = {"num_heads": 2, "head_coord_dim": 4, "mode": mode, "cutoff": cutoff, "mass_mode": mass_mode, **extra}
    return Example(params, {"x": (2, 8, 16), "z": (2, 8, 6), "mass": (2, 8, 1)}, no_grad=ng, no_grad_why=why)


@register(
    "attention.gravity",
    params=GravityAttentionParams,
    inputs=("x", "z", "mass"),
    outputs=("out", "z_next"),
    decode="cached",
    flags=("faithful: repels near tokens, inverted soft cutoff (README≠code)",),
    examples=[
        _example("faithful", "hard", "score"),
        _example("faithful", "soft", "score"),
        _example("faithful", "none", "score"),
        _example("faithful", "hard", "value", use_rsqrt=True),
        _example("faithful", "soft", "value"),
        _example("fixed", "hard", "score"),
        _example("fixed", "soft", "score", cutoff_width=2.0),
        _example("fixed", "none", "value"),
        _example("fixed", "soft", "value", dropout=0.0),
        _example("fixed", "soft", "score", kernel="gaussian"),
        _example("fixed", "soft", "value", kernel="gaussian", dropout=0.0),
        _example("fixed", "none", "score", kernel="gaussian", dropout=0.0),
    ],
)
def build_gravity_attention(p: GravityAttentionParams, ins: Inputs) -> GravityAttention:
    D = ins["x"].dim
    if D % p.num_heads:
        raise ValueError(f"attention.gravity: num_heads {p.num_heads} must divide the width of x ({D})")
    return GravityAttention(
        embed_dim=D,
        coord_dim=ins["z"].dim,
        num_heads=p.num_heads,
        head_coord_dim=p.head_coord_dim,
        gamma_init=p.gamma_init,
        radius_init=p.radius_init,
        eps=p.eps,
        softening=p.softening,
        cutoff_width=p.cutoff_width,
        cutoff=p.cutoff,
        mass_mode=p.mass_mode,
        use_rsqrt=p.use_rsqrt,
        dropout=p.dropout,
        mode=p.mode,
        kernel=p.kernel,
    )
