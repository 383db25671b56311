"""attention.holographic: Holographic LLM V2's dual-path attention (causal softmax + HRR binding).

Reproduces ``HolographicAttention`` of ``Woojiggun/holographic-llm`` @ a404586 (``models/``),
specified in ``shared/reference/SEEDS.md`` §1.1.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn
from torch.nn import functional as F

from physlm_graph import ComponentParams, Example, Inputs, register
from physlm_graph.components._rope import apply_rope

Mode = Literal["faithful", "fixed"]


def hrr_bind_per_token(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """The seed's path B: ``irfft(conj(rfft q) * rfft k * rfft v)`` along the head dim, per token.

    Orthonormal FFTs in fp32. Closed form: ``y[j] = (1/d) sum_m c[m] v[(j - m) mod d]`` with
    ``c[m] = sum_i q[i] k[(i + m) mod d]`` (circular correlation of q with k, then circular
    convolution with v). Shapes (..., d) -> (..., d), dtype of ``q``.
    """
    d = q.shape[-1]
    qf, kf, vf = (torch.fft.rfft(t.float(), dim=-1, norm="ortho") for t in (q, k, v))  # (..., d//2+1)
    return torch.fft.irfft(qf.conj() * kf * vf, n=d, dim=-1, norm="ortho").to(q.dtype)


def hrr_bind_causal(q: Tensor, k: Tensor, v: Tensor, decay: Tensor) -> Tensor:
    """``fixed`` path B: a causal HRR memory along the sequence, read out by each query.

    Per head h (``decay`` is (H,), positive), with ^ the orthonormal rfft along the head dim::

        w_h[tau] = exp(-decay_h * tau),  tau = 0, 1, ...
        M^_t = sum_{s <= t} w_h[t - s] (k^_s * v^_s) / sum_{tau <= t} w_h[tau]   # bound pairs, superposed
        y_t  = irfft(conj(q^_t) * M^_t)                                          # unbind with the query

    The sum over s is a causal convolution along time done with a zero-padded FFT of length
    2T (no wrap-around, so position t only sees s <= t), O(T log T). With ``decay -> inf``
    (w = delta) it is exactly the seed's per-token binding. q, k, v: (B, H, T, d) -> (B, H, T, d).
    """
    B, H, T, d = q.shape
    qf, kf, vf = (torch.fft.rfft(t.float(), dim=-1, norm="ortho") for t in (q, k, v))  # (B, H, T, F)
    tau = torch.arange(T, device=q.device, dtype=torch.float32)  # (T,)
    w = torch.exp(-decay.float()[:, None] * tau)  # (H, T)
    n = 2 * T  # zero padding: linear (not circular) convolution
    kv_t = torch.fft.fft(kf * vf, n=n, dim=2)  # (B, H, 2T, F)
    w_t = torch.fft.fft(w, n=n, dim=-1)  # (H, 2T)
    mem = torch.fft.ifft(kv_t * w_t[None, :, :, None], dim=2)[:, :, :T]  # (B, H, T, F)
    mem = mem / torch.cumsum(w, dim=-1)[None, :, :, None]  # causal weighted mean
    return torch.fft.irfft(qf.conj() * mem, n=d, dim=-1, norm="ortho").to(q.dtype)


class HolographicAttention(nn.Module):
    """Dual-path attention: causal softmax attention blended with holographic (HRR) binding.

    Shapes: x (B, T, D), optional rope table (1, T, 3, D/H) -> (B, T, D). With q, k, v =
    split(W_qkv x) (no bias), heads (B, H, T, d), RoPE on q and k when a table is given (the
    seed uses the interleaved-pair layout: build the ``embed.rope`` node with that style)::

        a   = softmax(q k^T / sqrt(d) + causal mask) v       # path A, dropout on the weights
        y   = path B (see mode)                              # holographic path
        g   = clamp(sigmoid(s), lo, hi)                      # s: scalar, init holographic_strength
        out = dropout(W_o((1 - g) LN_A(a) + g LN_B(y)))      # W_o no bias; LNs affine, eps 1e-5

    Modes (path B):

    - ``faithful``: exactly the seed. y_t = irfft(conj(Q^_t) K^_t V^_t) per token, along the
      head dim (``hrr_bind_per_token``): it mixes no tokens, so the README's "FFT interference
      attention" / "long-range dependency capture" [README≠code] is not what the code does;
      the README's Q^ conj(K^) is conj(Q^) K^ in the code. Causal (path A is masked, path B
      per token). Not reproduced: the seed's try/except "fallback" to *unmasked* attention on
      an FFT error [LEAK, latent]; it never fires on a working FFT.
    - ``fixed`` (default): the README's claim made real. Path B binds along the sequence: each
      past token's key and value are bound (k^ v^), superposed in a decaying causal memory,
      and unbound by the query (``hrr_bind_causal``), computed with a zero-padded FFT along
      time in O(T log T). Per-head learnable decay rates (``decay_raw``, softplus) start with
      half-lives 1 .. 64 tokens. Causal.

    Quirks kept in both modes: the effective initial mix is sigmoid(0.1) ~ 0.525, not 0.1, and
    the clamp after the sigmoid gives s zero gradient once the gate sits at a bound. Weights are
    initialised N(0, 0.02) as in the seed. FFTs run in fp32.
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.1,
        holographic_strength: float = 0.1,
        gate_clamp: tuple[float, float] = (0.05, 0.9),
        mode: Mode = "fixed",
    ) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.dropout, self.gate_clamp, self.mode = dropout, gate_clamp, mode
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=False)
        self.proj = nn.Linear(embed_dim, embed_dim, bias=False)
        for lin in (self.qkv, self.proj):
            nn.init.normal_(lin.weight, mean=0.0, std=0.02)
        self.ln_a = nn.LayerNorm(embed_dim, eps=1e-5)
        self.ln_b = nn.LayerNorm(embed_dim, eps=1e-5)
        self.gate = nn.Parameter(torch.tensor(float(holographic_strength)))
        self.drop = nn.Dropout(dropout)
        if mode == "fixed":
            # decay rate ln2 / half-life, half-lives 1 .. 64 tokens across heads; stored pre-softplus
            half_life = 2.0 ** torch.linspace(0.0, 6.0, num_heads)
            rate = math.log(2.0) / half_life
            self.decay_raw = nn.Parameter(torch.log(torch.expm1(rate)))

    def forward(self, x: Tensor, rope: Tensor | None = None) -> Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (B, H, T, d) each
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        a = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )  # (B, H, T, d)
        if self.mode == "faithful":
            y = hrr_bind_per_token(q, k, v)  # (B, H, T, d)
        else:
            y = hrr_bind_causal(q, k, v, F.softplus(self.decay_raw))  # (B, H, T, d)
        a = a.transpose(1, 2).reshape(B, T, D)
        y = y.transpose(1, 2).reshape(B, T, D)
        g = torch.sigmoid(self.gate).clamp(*self.gate_clamp)  # scalar
        return self.drop(self.proj((1 - g) * self.ln_a(a) + g * self.ln_b(y)))


class HolographicAttentionParams(ComponentParams):
    num_heads: int = Field(gt=0, description="number of heads; must divide the input width")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="dropout on path A's weights and on the output")
    holographic_strength: float = Field(
        0.1, description="initial gate logit s (pre-sigmoid: 0.1 gives a mix of ~0.525, as in the seed)"
    )
    gate_clamp: tuple[float, float] = Field(
        (0.05, 0.9), description="[lo, hi] the gate sigmoid(s) is clamped to (no gradient outside)"
    )
    mode: Mode = Field(
        "fixed",
        description="faithful: the seed's per-token head-dim binding; fixed: causal binding along the sequence",
    )

    @model_validator(mode="after")
    def _check_clamp(self) -> HolographicAttentionParams:
        lo, hi = self.gate_clamp
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"gate_clamp must satisfy 0 <= lo < hi <= 1, got {self.gate_clamp}")
        return self


@register(
    "attention.holographic",
    params=HolographicAttentionParams,
    inputs=("x", "rope"),
    optional_inputs=("rope",),
    flags=("faithful: path B mixes no tokens (README≠code)",),
    examples=[
        Example({"num_heads": 2, "mode": "faithful"}, {"x": (2, 8, 16)}),
        Example({"num_heads": 2, "mode": "fixed"}, {"x": (2, 8, 16)}),
        Example({"num_heads": 4, "mode": "fixed", "dropout": 0.0}, {"x": (2, 12, 32)}),
    ],
)
def build_holographic_attention(p: HolographicAttentionParams, ins: Inputs) -> HolographicAttention:
    D = ins["x"].dim
    if D % p.num_heads:
        raise ValueError(f"attention.holographic: num_heads {p.num_heads} must divide the input width {D}")
    return HolographicAttention(
        embed_dim=D,
        num_heads=p.num_heads,
        dropout=p.dropout,
        holographic_strength=p.holographic_strength,
        gate_clamp=p.gate_clamp,
        mode=p.mode,
    )
