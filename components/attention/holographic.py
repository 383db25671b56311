"""attention.holographic: Holographic LLM V2's dual-path attention (causal softmax + HRR binding).

Reproduces ``HolographicAttention`` of ``Woojiggun/holographic-llm`` @ a404586 (``models/``),
specified in ``shared/reference/SEEDS.md`` §1.1.
"""

from __future__ import annotations

import contextlib
import math
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn
from torch.nn import functional as F

from physlm_graph import ComponentParams, Example, Inputs, decode_context, register
from physlm_graph._context import DecodeContext
from physlm_graph.components._decode_cache import AppendCache
from physlm_graph.components._rope import apply_rope

Mode = Literal["faithful", "fixed"]


_CHUNK = 64  # time-chunk length of the fixed mode's decayed causal sum
_DENSE_MAX_T = 1024  # up to this length the causal mean is one product with a (H, T, T) weight matrix


def real_dft_bases(d: int, device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """The orthonormal rfft / irfft along a length-``d`` axis as real matrices, in a packed layout.

    A real vector's spectrum has exactly ``d`` real degrees of freedom: the real bins 0 and d/2
    (even d) and the complex bins 1 .. ceil(d/2) - 1. With ``h = ceil(d/2)`` "slots", the packed
    spectrum is ``(..., 2h)`` = [Re X_0 .. Re X_{h-1} | X_{d/2} (0 for odd d), Im X_1 .. Im X_{h-1}]:
    slot 0 holds the two real bins (DC, Nyquist) as a pair, slots 1 .. h-1 one complex bin each.
    Returns float32 ``(fwd, inv)``: ``x @ fwd`` is ``rfft(x, norm="ortho")`` packed and
    ``X @ inv`` is ``irfft(X, n=d, norm="ortho")`` of a packed spectrum. Shapes (d, 2h), (2h, d);
    2h = d for even d (square, so no odd matmul sizes). Built in float64, rounded once.
    """
    h = (d + 1) // 2
    n = torch.arange(d, dtype=torch.float64)
    f = torch.arange(h, dtype=torch.float64)
    ang = 2 * math.pi * n[:, None] * f[None, :] / d  # (d, h)
    cos, im = torch.cos(ang) / math.sqrt(d), -torch.sin(ang) / math.sqrt(d)  # Re X_f, Im X_f
    im[:, 0] = torch.cos(math.pi * n) / math.sqrt(d) if d % 2 == 0 else 0.0  # slot 0: Nyquist (real)
    fwd = torch.cat([cos, im], dim=1)  # (d, 2h)
    mult = torch.full((h, 1), 2.0, dtype=torch.float64)  # bins +-f both in the full spectrum
    mult[0] = 1.0  # DC and Nyquist once
    inv = torch.cat([mult * cos.T, mult * im.T], dim=0)  # (2h, d): sum_f mult_f (Re cos - Im sin)
    return fwd.to(device=device, dtype=torch.float32), inv.to(device=device, dtype=torch.float32)


def _spec_mul(a: Tensor, b: Tensor, conj_a: bool = False) -> Tensor:
    """Bin-wise product of two packed spectra (``real_dft_bases``), ``conj(a) * b`` if ``conj_a``:
    complex product in slots 1 .. h-1, component-wise product of the real (DC, Nyquist) pair in
    slot 0 (conjugation leaves it alone). Real ops only, one fused kernel under torch.compile;
    no slicing (its backward would zero-fill whole tensors in eager)."""
    h = a.shape[-1] // 2
    ar, ai = a.unflatten(-1, (2, h)).unbind(-2)
    br, bi = b.unflatten(-1, (2, h)).unbind(-2)
    rr, ii = ar * br, ai * bi
    sign = 1.0 if conj_a else -1.0
    slot0 = torch.arange(h, device=a.device) == 0  # (h,)
    re = torch.where(slot0, rr, rr + sign * ii)
    im = torch.where(slot0, ii, torch.addcmul(ar * bi, ai, br, value=-sign))
    return torch.stack((re, im), dim=-2).flatten(-2)


def _triton_kernels(head_dim: int):
    """The fused kernels of path B (``_holographic_triton``), imported on first CUDA use (triton's
    import costs about a second that CPU work never needs); None where they cannot run (said once
    per process: no triton, or a head dim they do not take) or are turned off."""
    from physlm_graph.components import _triton
    from physlm_graph.components.attention import _holographic_triton as ht

    if not ht.triton_available:
        _triton.warn_slow_path("attention.holographic: triton is not importable, so the fixed mode's path B runs as "
                               "separate torch kernels (slower on a GPU); install triton (CUDA builds of torch ship "
                               "it) for the fused kernels")
        return None
    if not ht.ENABLED:  # PHYSLM_HOLOGRAPHIC_TRITON=0: asked for
        return None
    if not ht.supports(head_dim):
        _triton.warn_slow_path(f"attention.holographic: the fused kernels take even head dims up to "
                               f"{ht.MAX_HEAD_DIM}, not {head_dim}, so the fixed mode's path B runs as separate "
                               "torch kernels (slower on a GPU)")
        return None
    return ht


_AUTOCAST_DEVICES = frozenset({"cuda", "cpu", "xpu", "mps", "hpu", "mtia", "maia"})


def _fp32(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off (path B runs in fp32, as the seed's FFTs); a no-op where autocast does not exist (meta)."""
    # A fixed list rather than torch.amp.is_autocast_available: dynamo cannot trace that call
    # (it broke the compiled graph once per layer on torch 2.11).
    if device.type in _AUTOCAST_DEVICES:
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _spectra(q: Tensor, k: Tensor, v: Tensor, bases: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor]:
    """Packed fp32 spectra of q, k, v (3, ..., 2h) in one matmul, and the inverse basis."""
    fwd, inv = real_dft_bases(q.shape[-1], q.device) if bases is None else (t.float() for t in bases)
    return torch.stack((q, k, v)).float() @ fwd, inv


def hrr_bind_per_token(q: Tensor, k: Tensor, v: Tensor, bases: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """The seed's path B: ``irfft(conj(rfft q) * rfft k * rfft v)`` along the head dim, per token.

    Orthonormal transforms in fp32 (autocast off), done as real DFT-basis matmuls
    (``real_dft_bases``; ``bases`` = its output, built here if not given) and real elementwise
    products: no complex dtype, so it fuses under torch.compile; the same function as the FFT
    form to float32 rounding. Closed form: ``y[j] = (1/d) sum_m c[m] v[(j - m) mod d]`` with
    ``c[m] = sum_i q[i] k[(i + m) mod d]`` (circular correlation of q with k, then circular
    convolution with v). Shapes (..., d) -> (..., d), dtype of ``q``.
    """
    with _fp32(q.device):
        (qf, kf, vf), inv = _spectra(q, k, v, bases)
        return (_spec_mul(_spec_mul(qf, kf, conj_a=True), vf) @ inv).to(q.dtype)


def hrr_bind_per_token_packed(qkv: Tensor, bases: tuple[Tensor, Tensor]) -> Tensor:
    """``hrr_bind_per_token`` on the packed projection (..., 3, H, d) -> (..., H, d).

    The same function; the three spectra come from one matmul on the projection as it is laid
    out, so no stacked copy of q, k, v is made (nor, in the backward, scattered back), and the
    result is already token-major. Used when no rope rotates q and k first.
    """
    fwd, inv = (t.float() for t in bases)
    with _fp32(qkv.device):
        spec = qkv.float() @ fwd  # (..., 3, H, 2h)
        qf, kf, vf = spec.unbind(-3)
        return (_spec_mul(_spec_mul(qf, kf, conj_a=True), vf) @ inv).to(qkv.dtype)


def decayed_causal_sum(x: Tensor, decay: Tensor, chunk: int = _CHUNK) -> Tensor:
    """``out[:, h, t] = sum_{s <= t} exp(-decay_h (t - s)) x[:, h, s]`` along dim 2, exactly, in O(T).

    x (B, H, T, P), decay (H,) >= 0. The linear recurrence S_t = exp(-decay) S_{t-1} + x_t in
    chunked form (as SSD / chunked linear attention): inside a chunk of C steps a (C, C) causal
    decay matrix (a batched matmul); across chunks, each chunk's total decayed to its end
    (the intra result's last row) is carried by an (n, n) causal decay matrix over the n = T/C
    chunks and decayed into each position. Every factor is exp(-decay * (>= 0)) <= 1, so
    nothing overflows. Zero padding at the end of time keeps it causal.
    """
    B, H, T, P = x.shape
    C = min(chunk, T)
    n = -(-T // C)
    if n * C != T:
        x = F.pad(x, (0, 0, 0, n * C - T))
    xc = x.reshape(B, H, n, C, P)
    lam = decay.to(x.dtype).view(H, 1, 1)
    i = torch.arange(C, device=x.device, dtype=x.dtype)
    rel = i[:, None] - i[None, :]  # (C, C): t - s inside a chunk
    intra = torch.exp(-lam * rel.clamp(min=0)) * (rel >= 0)  # (H, C, C)
    y = torch.einsum("hij,bhnjp->bhnip", intra, xc)  # (B, H, n, C, P)
    if n > 1:
        c = torch.arange(n, device=x.device, dtype=x.dtype)
        relc = c[:, None] - 1 - c[None, :]  # (n, n): chunk c reads chunks c' < c, decayed from c' end
        inter = torch.exp(-lam * C * relc.clamp(min=0)) * (relc >= 0)  # (H, n, n)
        carry = torch.einsum("hnm,bhmp->bhnp", inter, y[:, :, :, -1])  # state entering chunk n
        into = torch.exp(-lam * (i + 1))  # (H, 1, C): decay from the previous chunk's end to i
        y = y + into.view(1, H, 1, C, 1) * carry[:, :, :, None, :]
    return y.reshape(B, H, n * C, P)[:, :, :T]


def decayed_causal_mean(x: Tensor, decay: Tensor) -> Tensor:
    """``sum_{s <= t} w_h[t - s] x[:, h, s] / sum_{tau <= t} w_h[tau]`` with w_h[tau] = exp(-decay_h tau).

    x (B, H, T, P), decay (H,) >= 0. Up to ``_DENSE_MAX_T`` steps: one batched product with the
    row-normalised (H, T, T) causal weight matrix (32 MB at H = 8, T = 1024), so the sum and the
    normalisation are a single matmul over the whole sequence, forward and backward, instead of
    the chunked recurrence's several passes over x. Longer: ``decayed_causal_sum`` (O(T)) and a
    cumulative-sum normaliser. The same function either way (tested against each other).
    """
    T = x.shape[2]
    if T <= _DENSE_MAX_T:
        t = torch.arange(T, device=x.device, dtype=x.dtype)
        rel = t[:, None] - t[None, :]  # (T, T): t - s
        w = torch.exp(-decay.to(x.dtype).view(-1, 1, 1) * rel.clamp(min=0)) * (rel >= 0)  # (H, T, T)
        return torch.einsum("hts,bhsp->bhtp", w / w.sum(-1, keepdim=True), x)  # each row sums to 1
    w = torch.exp(-decay.to(x.dtype)[:, None] * torch.arange(T, device=x.device, dtype=x.dtype))  # (H, T)
    return decayed_causal_sum(x, decay) / torch.cumsum(w, dim=-1)[None, :, :, None]


def hrr_bind_causal(
    q: Tensor, k: Tensor, v: Tensor, decay: Tensor, bases: tuple[Tensor, Tensor] | None = None
) -> Tensor:
    """``fixed`` path B: a causal HRR memory along the sequence, read out by each query.

    Per head h (``decay`` is (H,), positive), with ^ the orthonormal rfft along the head dim::

        w_h[tau] = exp(-decay_h * tau),  tau = 0, 1, ...
        M^_t = sum_{s <= t} w_h[t - s] (k^_s * v^_s) / sum_{tau <= t} w_h[tau]   # bound pairs, superposed
        y_t  = irfft(conj(q^_t) * M^_t)                                          # unbind with the query

    The transforms are real DFT-basis matmuls (as ``hrr_bind_per_token``); the decayed mean over
    s <= t is ``decayed_causal_mean``: one product with a causal weight matrix up to 1024
    steps, the chunked O(T) recurrence ``decayed_causal_sum`` beyond. fp32 (autocast off). With
    ``decay -> inf`` (w = delta) it is exactly the seed's per-token binding. q, k, v:
    (B, H, T, d) -> (B, H, T, d).
    """
    with _fp32(q.device):
        (qf, kf, vf), inv = _spectra(q, k, v, bases)  # (B, H, T, 2h) each
        mem = decayed_causal_mean(_spec_mul(kf, vf), decay.float())  # bound pairs k^ v^, causal weighted mean
        return (_spec_mul(qf, mem, conj_a=True) @ inv).to(q.dtype)


def hrr_bind_causal_chunk(
    q: Tensor, k: Tensor, v: Tensor, decay: Tensor, bases: tuple[Tensor, Tensor],
    state: tuple[Tensor, Tensor] | None,
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """``hrr_bind_causal`` for a chunk that continues a sequence, carrying the decayed state.

    The memory before normalisation is the linear recurrence S_t = exp(-decay) S_{t-1} + k^_t v^_t
    and its normaliser N_t = exp(-decay) N_{t-1} + 1, so M^_t = S_t / N_t. ``state`` is
    (S, N) after the last token seen, (B, H, 2h) and (H,), or None at the start; inside the
    chunk, position i (0-based) adds exp(-decay (i + 1)) times the carried state to the chunk's
    own decayed sum (``decayed_causal_sum``). Returns y (B, H, T, d) and the state after the chunk.
    """
    with _fp32(q.device):
        (qf, kf, vf), inv = _spectra(q, k, v, bases)  # (B, H, T, 2h) each
        lam = decay.float()  # (H,)
        T = q.shape[2]
        pos = torch.arange(T, device=q.device, dtype=torch.float32)
        s = decayed_causal_sum(_spec_mul(kf, vf), lam)  # (B, H, T, 2h)
        n = torch.cumsum(torch.exp(-lam[:, None] * pos), dim=-1)  # (H, T)
        if state is not None:
            into = torch.exp(-lam[:, None] * (pos + 1))  # (H, T)
            s = s + into[None, :, :, None] * state[0][:, :, None, :]
            n = n + into * state[1][:, None]
        y = (_spec_mul(qf, s / n[None, :, :, None], conj_a=True) @ inv).to(q.dtype)
        return y, (s[:, :, -1], n[:, -1])


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
      and unbound by the query (``hrr_bind_causal``); the decaying sum along time is the
      exponential-decay linear recurrence, done exactly: one product with the (H, T, T) causal
      weight matrix up to 1024 tokens, a chunked O(T) scan (matmuls) beyond.
      Per-head learnable decay rates (``decay_raw``, softplus) start with
      half-lives 1 .. 64 tokens. Causal. On CUDA with Triton (even head dims up to 128) path B
      runs as fused kernels (``_holographic_triton``: the weights built in registers, y written
      token-major; the same function, tested against this path); ``PHYSLM_HOLOGRAPHIC_TRITON=0``
      turns them off.

    Quirks kept in both modes: the effective initial mix is sigmoid(0.1) ~ 0.525, not 0.1, and
    the clamp after the sigmoid gives s zero gradient once the gate sits at a bound. Weights are
    initialised N(0, 0.02) as in the seed. Path B runs in fp32 (autocast off), as the seed's FFTs;
    its rfft / irfft along the head dim are matmuls with fixed real DFT bases (non-persistent
    buffers ``dft_fwd``, ``dft_inv``: not in the state dict), with no complex dtype.

    Incremental decoding (both modes): inside ``physlm_graph.decoding()`` path A keeps a KV
    cache in the decode context; the fixed path B carries its decayed memory (the running sum
    S_t = exp(-decay) S_{t-1} + k^_t v^_t and its normaliser, ``hrr_bind_causal_chunk``), so a
    token costs the same at any position; the faithful path B is per token and needs no state.
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
        # real DFT bases along the head dim (fp32 constants, not in the state dict)
        for name, basis in zip(("dft_fwd", "dft_inv"), real_dft_bases(self.head_dim)):
            self.register_buffer(name, basis, persistent=False)
        if mode == "fixed":
            # decay rate ln2 / half-life, half-lives 1 .. 64 tokens across heads; stored pre-softplus
            half_life = 2.0 ** torch.linspace(0.0, 6.0, num_heads)
            rate = math.log(2.0) / half_life
            self.decay_raw = nn.Parameter(torch.log(torch.expm1(rate)))

    def forward(self, x: Tensor, rope: Tensor | None = None) -> Tensor:
        B, T, D = x.shape
        packed = self.qkv(x).view(B, T, 3, self.num_heads, self.head_dim)  # (B, T, 3, H, d)
        q, k, v = packed.permute(2, 0, 3, 1, 4)  # (B, H, T, d) each
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        bases = (self.dft_fwd, self.dft_inv)
        ctx = decode_context()
        if ctx is not None:
            return self._decode(ctx, q, k, v, bases)
        a = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )  # (B, H, T, d)
        if self.mode == "fixed" and x.is_cuda and (tk := _triton_kernels(self.head_dim)) is not None:
            qkv = packed.permute(2, 0, 3, 1, 4) if rope is None else torch.stack((q, k, v))  # (3, B, H, T, d)
            y = tk.hrr_causal_triton(qkv, F.softplus(self.decay_raw), *bases).reshape(B, T, D)  # token-major
        elif self.mode == "faithful" and rope is None:
            y = hrr_bind_per_token_packed(packed, bases).reshape(B, T, D)  # per token: layout-free
        else:
            if self.mode == "faithful":
                y = hrr_bind_per_token(q, k, v, bases)  # (B, H, T, d)
            else:
                y = hrr_bind_causal(q, k, v, F.softplus(self.decay_raw), bases)  # (B, H, T, d)
            y = y.transpose(1, 2).reshape(B, T, D)
        return self._mix(a.transpose(1, 2).reshape(B, T, D), y)

    def _mix(self, a: Tensor, y: Tensor) -> Tensor:
        g = torch.sigmoid(self.gate).clamp(*self.gate_clamp)  # scalar
        return self.drop(self.proj((1 - g) * self.ln_a(a) + g * self.ln_b(y)))

    def _decode(self, ctx: DecodeContext, q: Tensor, k: Tensor, v: Tensor, bases: tuple[Tensor, Tensor]) -> Tensor:
        """One chunk of incremental decoding: path A's keys and values are appended to a cache,
        path B carries (fixed) the decayed memory's state or (faithful) needs none."""
        B, H, T, d = q.shape
        past = ctx.get(self)  # (KV cache, path B's state)
        cache = AppendCache(2, 2) if past is None else past[0]
        ka, va = cache.extend(k, v)  # (B, H, S, d)
        S = ka.shape[2]
        mask = None if T == 1 or S == T else torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
        a = F.scaled_dot_product_attention(q, ka, va, attn_mask=mask, is_causal=S == T and T > 1)  # (B, H, T, d)
        if self.mode == "fixed":
            y, mem = hrr_bind_causal_chunk(q, k, v, F.softplus(self.decay_raw), bases, None if past is None else past[1])
        else:
            y, mem = hrr_bind_per_token(q, k, v, bases), None
        ctx.set(self, (cache, mem))
        return self._mix(a.transpose(1, 2).reshape(B, T, H * d), y.transpose(1, 2).reshape(B, T, H * d))


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
    decode="cached",
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
