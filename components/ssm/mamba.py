"""ssm.mamba: the Mamba-1 selective state-space mixer (Jamba's mixer), with a recurrent decode state."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from physlm_graph import Example, Inputs, decode_context, register
from physlm_graph._registry import HFName

from ._dt import StepInitParams, inverse_softplus, log_uniform_dt
from ._mamba_kernels import selective_scan_chunked


class _RMS(nn.Module):
    """``x * rsqrt(mean(x^2) + eps) * weight`` over the last axis, computed in float32."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Mamba(nn.Module):
    """Mamba-1 mixer: a selective SSM with one decay per channel and state index (Gu & Dao 2023).

    With u (B, T, D), Di = expand * D, N = d_state, R = dt_rank::

        [x, z]    = W_in u                                  x, z (Di)
        x         = silu(causal_depthwise_conv(x))          kernel d_conv, bias if conv_bias
        [d, B, C] = W_x x                                   d (R), B (N), C (N), no bias
        (Jamba)     d, B, C = rms(d), rms(B), rms(C)        learned weights, eps dt_bc_norm_eps
        dt        = softplus(W_dt d + b_dt)                 (B, T, Di)
        A         = -exp(A_log)                             (Di, N), init A[d, n] = n + 1
        h_t       = exp(dt_t A) * h_{t-1} + dt_t x_t B_t    (Di, N) per token
        y_t       = h_t C_t + D * x_t                       D (Di,), init 1
        out       = W_out(y * silu(z))

    The scan (``_mamba_kernels.selective_scan_chunked``) runs in float32 in chunks, the chunks
    side by side (on CUDA about sqrt(T) of them, 3 sqrt(T) steps instead of T; on CPU fewer, so a
    step stays in cache), each step one (B, chunks, Di, N) tensor, never the (B, T, Di, N) of the
    whole sequence, with a written-out backward that keeps only the states entering the chunks;
    outputs equal the token-by-token recurrence (``selective_scan``, the reference) to rounding.
    Causal. Generation (decode="recurrent") keeps the last d_conv - 1 conv inputs and the
    (B, Di, N) state in the decode context, so any chunking of the tokens gives the full
    forward's output.

    Source: Gu & Dao 2023 ("Mamba: Linear-Time Sequence Modeling with Selective State
    Spaces"), ``mamba_ssm.modules.mamba_simple.Mamba``; Jamba (Lieber et al. 2024) adds the
    RMSNorms on dt, B and C. Init as there: dt_proj's weight uniform in +-R^-0.5, its bias
    softplus^-1 of a dt log-uniform in [dt_min, dt_max] (floor 1e-4).

    Weights in transformers' names (``JambaMambaMixer``, ``MambaMixer``): ``in_proj``,
    ``conv1d`` (our ``conv_weight`` / ``conv_bias``), ``x_proj``, ``dt_proj``, ``A_log``, ``D``,
    ``out_proj`` and Jamba's ``dt_layernorm``, ``b_layernorm``, ``c_layernorm``.
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | None = None,
        bias: bool = False,
        conv_bias: bool = True,
        dt_bc_norm_eps: float | None = None,
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
    ) -> None:
        super().__init__()
        self.d_inner = expand * embed_dim
        self.d_state, self.d_conv = d_state, d_conv
        self.dt_rank = dt_rank if dt_rank is not None else math.ceil(embed_dim / 16)
        Di, N, R = self.d_inner, d_state, self.dt_rank
        self.in_proj = nn.Linear(embed_dim, 2 * Di, bias=bias)
        self.conv_weight = nn.Parameter(torch.empty(Di, 1, d_conv))
        self.conv_bias = nn.Parameter(torch.empty(Di)) if conv_bias else None
        bound = 1.0 / math.sqrt(d_conv)  # nn.Conv1d's default init for a depthwise kernel
        nn.init.uniform_(self.conv_weight, -bound, bound)
        if self.conv_bias is not None:
            nn.init.uniform_(self.conv_bias, -bound, bound)
        self.x_proj = nn.Linear(Di, R + 2 * N, bias=False)
        self.dt_proj = nn.Linear(R, Di, bias=True)
        self.dt_min, self.dt_max = dt_min, dt_max
        self.init_dt()
        self.A_log = nn.Parameter(torch.log(torch.arange(1, N + 1, dtype=torch.float32)).repeat(Di, 1))  # (Di, N)
        self.D = nn.Parameter(torch.ones(Di))
        self.out_proj = nn.Linear(Di, embed_dim, bias=bias)
        self.dt_bc_norm_eps = dt_bc_norm_eps
        if dt_bc_norm_eps is not None:
            self.dt_norm = _RMS(R, dt_bc_norm_eps)
            self.b_norm = _RMS(N, dt_bc_norm_eps)
            self.c_norm = _RMS(N, dt_bc_norm_eps)

    @torch.no_grad()
    def init_dt(self) -> None:
        """dt_proj as Mamba starts it: weight uniform in +-R^-0.5, bias softplus^-1(dt0), dt0
        log-uniform in [dt_min, dt_max] (floor 1e-4), so every channel starts with its own step."""
        R = self.dt_rank
        nn.init.uniform_(self.dt_proj.weight, -(R**-0.5), R**-0.5)
        dt0 = log_uniform_dt(self.d_inner, self.dt_min, self.dt_max, device=self.dt_proj.bias.device)
        self.dt_proj.bias.copy_(inverse_softplus(dt0))

    def after_init_scheme(self) -> None:
        """A blueprint ``init:`` scheme (gpt2: every Linear N(0, std), biases 0) would give every
        channel the same step softplus(0); dt_proj keeps Mamba's own initialisation."""
        self.init_dt()

    def _conv(self, x: Tensor, cache: Tensor | None) -> tuple[Tensor, Tensor]:
        """Causal depthwise conv of x (B, T, Di) after ``cache`` (B, K-1, Di) or zeros; returns
        the output (B, T, Di) and the new cache, the last K-1 inputs."""
        K = self.d_conv
        if cache is None:
            cache = x.new_zeros(x.shape[0], K - 1, x.shape[2])
        full = torch.cat([cache.to(x.dtype), x], dim=1)  # (B, K-1+T, Di)
        y = F.conv1d(full.transpose(1, 2), self.conv_weight, self.conv_bias, groups=full.shape[2])
        return y.transpose(1, 2), full[:, full.shape[1] - (K - 1) :]

    def forward(self, u: Tensor) -> Tensor:
        Bsz = u.shape[0]
        ctx = decode_context()
        cached = ctx.get(self) if ctx is not None and ctx.offset > 0 else None
        conv_cache, h = cached if cached is not None else (None, None)

        x, z = self.in_proj(u).chunk(2, dim=-1)  # (B, T, Di) each
        x, conv_cache = self._conv(x, conv_cache)
        x = F.silu(x)
        d, Bm, Cm = torch.split(self.x_proj(x), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        if self.dt_bc_norm_eps is not None:
            d, Bm, Cm = self.dt_norm(d), self.b_norm(Bm), self.c_norm(Cm)
        dt = F.softplus(self.dt_proj(d))  # (B, T, Di)
        A = -torch.exp(self.A_log.float())  # (Di, N)
        if h is None:
            h = u.new_zeros(Bsz, self.d_inner, self.d_state, dtype=torch.float32)
        y, h = selective_scan_chunked(dt, A, Bm, Cm, x, h)  # one token: the plain recurrent step
        if ctx is not None:
            ctx.set(self, (conv_cache, h))
        y = (y + x.float() * self.D.float()).to(u.dtype)
        return self.out_proj(y * F.silu(z))

    def extra_repr(self) -> str:
        norm = f", dt_bc_norm_eps={self.dt_bc_norm_eps}" if self.dt_bc_norm_eps is not None else ""
        return f"d_inner={self.d_inner}, d_state={self.d_state}, d_conv={self.d_conv}, dt_rank={self.dt_rank}{norm}"


class MambaParams(StepInitParams):
    d_state: int = Field(16, gt=0, description="SSM state size N per channel (Mamba, Jamba: 16)")
    d_conv: int = Field(4, ge=1, description="taps of the causal depthwise conv over x")
    expand: int = Field(2, gt=0, description="inner width Di = expand * embed_dim")
    dt_rank: int | None = Field(None, gt=0, description="width R of the low-rank dt projection (None: "
                                "ceil(embed_dim / 16), transformers' 'auto')")
    bias: bool = Field(False, description="biases on in_proj and out_proj (Mamba, Jamba: none)")
    conv_bias: bool = Field(True, description="a bias on the depthwise conv (Mamba, Jamba: yes)")
    dt_bc_norm_eps: float | None = Field(None, gt=0.0, description="None: no inner norms; a number: RMSNorms with "
                                         "learned weights on dt, B and C with this eps (Jamba: rms_norm_eps)")
    dt_min: float = Field(1e-3, gt=0.0, description="lower end of the log-uniform dt init")
    dt_max: float = Field(0.1, gt=0.0, description="upper end of the log-uniform dt init")


# transformers' names (JambaMambaMixer; MambaMixer has the same without the three norms)
_HF = {"default": tuple(HFName(ours, (theirs,)) for ours, theirs in (
    ("in_proj.weight", "in_proj.weight"), ("in_proj.bias", "in_proj.bias"),
    ("conv_weight", "conv1d.weight"), ("conv_bias", "conv1d.bias"),
    ("x_proj.weight", "x_proj.weight"), ("dt_proj.weight", "dt_proj.weight"), ("dt_proj.bias", "dt_proj.bias"),
    ("A_log", "A_log"), ("D", "D"), ("out_proj.weight", "out_proj.weight"), ("out_proj.bias", "out_proj.bias"),
    ("dt_norm.weight", "dt_layernorm.weight"), ("b_norm.weight", "b_layernorm.weight"),
    ("c_norm.weight", "c_layernorm.weight")))}


@register(
    "ssm.mamba",
    params=MambaParams,
    decode="recurrent",
    hf=_HF,
    examples=[
        Example({"d_state": 4}, {"x": (2, 9, 16)}),
        Example({"d_state": 4, "d_conv": 3, "dt_rank": 3, "expand": 1, "bias": True, "conv_bias": False,
                 "dt_bc_norm_eps": 1e-6}, {"x": (2, 7, 16)}),
    ],
)
def build_mamba(p: MambaParams, ins: Inputs) -> Mamba:
    return Mamba(embed_dim=ins["x"].dim, d_state=p.d_state, d_conv=p.d_conv, expand=p.expand, dt_rank=p.dt_rank,
                 bias=p.bias, conv_bias=p.conv_bias, dt_bc_norm_eps=p.dt_bc_norm_eps, dt_min=p.dt_min, dt_max=p.dt_max)
