"""ssm.ssd: the Mamba-2 selective state-space mixer, chunked SSD scan in pure PyTorch."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from physlm_graph import Example, Inputs, decode_context, register
from physlm_graph._registry import HFName

from ._dt import StepInitParams, inverse_softplus, log_uniform_dt
from ._ssd_kernels import ssd_chunked, ssd_step


class GatedRMSNorm(nn.Module):
    """``rmsnorm(y * silu(z)) * weight``, normalised over groups of ``group_size`` channels.

    Mamba-2's ``RMSNormGated`` with ``norm_before_gate=False``: the gate is applied first, so
    the norm sees the gated signal. y, z: (B, T, Di) -> (B, T, Di).
    """

    def __init__(self, *, dim: int, group_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.group_size = group_size
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, y: Tensor, z: Tensor) -> Tensor:
        g = y * F.silu(z)
        shape = g.shape
        g = g.reshape(*shape[:-1], shape[-1] // self.group_size, self.group_size)  # (B, T, G, Di/G)
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)
        return g.reshape(shape) * self.weight


class SSD(nn.Module):
    """Mamba-2 mixer: a selective SSM evaluated by the chunked state-space-dual (SSD) scan.

    With u (B, T, D), Di = expand * D, H = Di / head_dim heads of width P = head_dim, G
    groups of B/C of size N = d_state::

        [z, xBC, dt] = W_in u                      z (Di), xBC (Di + 2 G N), dt (H)
        [x, B, C]    = silu(causal_depthwise_conv(xBC))       kernel d_conv, bias if conv_bias
        dt           = softplus(dt + dt_bias)                 (B, T, H)
        A            = -exp(A_log)                            (H,), one scalar decay per head
        h_t          = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T    (H, P, N) per token
        y_t          = h_t C_t + D x_t                        D (H,), init 1
        out          = W_out(w * rmsnorm_G(y * silu(z)))      RMS over G groups of Di/G, eps norm_eps

    ``bias`` adds biases to W_in and W_out (off in Mamba-2's released models).

    The scan is the SSD chunked form (``_ssd_kernels.ssd_chunked``): O(T * chunk_size) work
    in matrix products, no loop over tokens; T is padded at the end to a multiple of
    ``chunk_size``. Causal. Generation (decode="cached") keeps the last d_conv - 1 conv
    inputs and the (B, H, P, N) SSM state in the decode context: a one-token call is the
    constant-cost recurrent step, a longer chunk runs the chunked scan from the cached state.

    Source: Dao & Gu 2024 ("Transformers are SSMs"), ``mamba_ssm.modules.mamba2.Mamba2``
    and its ``ssd_minimal`` reference; defaults as there (d_state 64, d_conv 4, expand 2,
    head_dim 64, ngroups 1, chunk 64 here vs 256 there, dt in [1e-3, 0.1], A in [1, 16]).
    This is the real SSM that Brain-GPT V2's "MambaBlock" (``ssm.gated_conv``) promised.

    Weights in transformers' names (``Mamba2Mixer``, Bamba's ``BambaMixer``): ``in_proj``,
    ``conv1d`` (our ``conv_weight`` / ``conv_bias``), ``dt_bias``, ``A_log``, ``D``, ``norm``
    (the gated RMSNorm), ``out_proj``; the same splits [z | xBC | dt] and [x | B | C].
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        d_state: int = 64,
        d_conv: int = 4,
        expand: int = 2,
        head_dim: int = 64,
        ngroups: int = 1,
        chunk_size: int = 64,
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        A_init_range: tuple[float, float] = (1.0, 16.0),
        norm_eps: float = 1e-5,
        bias: bool = False,
        conv_bias: bool = True,
    ) -> None:
        super().__init__()
        self.d_inner = expand * embed_dim
        self.num_heads = self.d_inner // head_dim
        self.head_dim, self.d_state, self.ngroups = head_dim, d_state, ngroups
        self.d_conv, self.chunk_size = d_conv, chunk_size
        conv_dim = self.d_inner + 2 * ngroups * d_state
        self.in_proj = nn.Linear(embed_dim, self.d_inner + conv_dim + self.num_heads, bias=bias)
        self.conv_weight = nn.Parameter(torch.empty(conv_dim, 1, d_conv))
        self.conv_bias = nn.Parameter(torch.empty(conv_dim)) if conv_bias else None
        bound = 1.0 / math.sqrt(d_conv)  # nn.Conv1d's default init for a depthwise kernel
        nn.init.uniform_(self.conv_weight, -bound, bound)
        if self.conv_bias is not None:
            nn.init.uniform_(self.conv_bias, -bound, bound)
        # dt_bias = softplus^-1(dt0), dt0 log-uniform in [dt_min, dt_max] (floor 1e-4)
        self.dt_bias = nn.Parameter(inverse_softplus(log_uniform_dt(self.num_heads, dt_min, dt_max)))
        lo, hi = A_init_range
        self.A_log = nn.Parameter(torch.log(torch.empty(self.num_heads).uniform_(lo, hi)))
        self.D = nn.Parameter(torch.ones(self.num_heads))
        self.norm = GatedRMSNorm(dim=self.d_inner, group_size=self.d_inner // ngroups, eps=norm_eps)
        self.out_proj = nn.Linear(self.d_inner, embed_dim, bias=bias)

    def _conv(self, xbc: Tensor, cache: Tensor | None) -> tuple[Tensor, Tensor]:
        """Causal depthwise conv of xbc (B, T, Cc) after ``cache`` (B, K-1, Cc) or zeros.

        Returns the conv output (B, T, Cc) and the new cache: the last K-1 inputs.
        """
        K = self.d_conv
        if cache is None:
            cache = xbc.new_zeros(xbc.shape[0], K - 1, xbc.shape[2])
        full = torch.cat([cache.to(xbc.dtype), xbc], dim=1)  # (B, K-1+T, Cc)
        y = F.conv1d(full.transpose(1, 2), self.conv_weight, self.conv_bias, groups=full.shape[2])
        return y.transpose(1, 2), full[:, full.shape[1] - (K - 1) :]  # (B, T, Cc), (B, K-1, Cc)

    def forward(self, u: Tensor) -> Tensor:
        Bsz, T, _ = u.shape
        H, P, N, G = self.num_heads, self.head_dim, self.d_state, self.ngroups
        ctx = decode_context()
        cached = ctx.get(self) if ctx is not None and ctx.offset > 0 else None
        conv_cache, ssm_state = cached if cached is not None else (None, None)

        z, xbc, dt = torch.split(self.in_proj(u), [self.d_inner, self.d_inner + 2 * G * N, H], dim=-1)
        xbc, conv_cache = self._conv(xbc, conv_cache)
        x, Bm, Cm = torch.split(F.silu(xbc), [self.d_inner, G * N, G * N], dim=-1)
        x = x.reshape(Bsz, T, H, P)  # (B, T, H, P)
        Bm = Bm.reshape(Bsz, T, G, N)  # group g serves heads g*H/G .. (g+1)*H/G - 1
        Cm = Cm.reshape(Bsz, T, G, N)
        dt = F.softplus(dt + self.dt_bias)  # (B, T, H)
        A = -torch.exp(self.A_log)  # (H,)

        if ctx is not None and T == 1 and ssm_state is not None:
            y, ssm_state = ssd_step(x[:, 0], dt[:, 0], A, Bm[:, 0], Cm[:, 0], ssm_state)
            y = y.unsqueeze(1)  # (B, 1, H, P)
        else:
            y, ssm_state = ssd_chunked(x, dt, A, Bm, Cm, chunk_size=self.chunk_size, initial_state=ssm_state)
        if ctx is not None:
            ctx.set(self, (conv_cache, ssm_state))
        y = y + x * self.D[:, None]  # (B, T, H, P)
        y = self.norm(y.reshape(Bsz, T, self.d_inner), z)
        return self.out_proj(y)


class SSDParams(StepInitParams):
    d_state: int = Field(64, gt=0, description="SSM state size N per head (Mamba-2: 64 or 128)")
    d_conv: int = Field(4, ge=1, description="taps of the causal depthwise conv over [x, B, C]")
    expand: int = Field(2, gt=0, description="inner width Di = expand * embed_dim")
    head_dim: int = Field(64, gt=0, description="channels P per head; heads H = Di / head_dim")
    ngroups: int = Field(1, gt=0, description="groups of B/C shared by H / ngroups heads each")
    chunk_size: int = Field(64, gt=0, description="tokens per chunk of the SSD scan")
    dt_min: float = Field(1e-3, gt=0.0, description="lower end of the log-uniform dt init")
    dt_max: float = Field(0.1, gt=0.0, description="upper end of the log-uniform dt init")
    A_init_range: tuple[float, float] = Field(
        (1.0, 16.0), description="A = -exp(A_log) starts with -A uniform in this range"
    )
    norm_eps: float = Field(1e-5, gt=0.0, description="epsilon of the gated RMSNorm before out_proj")
    bias: bool = Field(False, description="biases on in_proj and out_proj (Mamba-2: none)")
    conv_bias: bool = Field(True, description="a bias on the depthwise conv (Mamba-2: yes)")

    @model_validator(mode="after")
    def _check(self) -> "SSDParams":
        lo, hi = self.A_init_range
        if not 0.0 < lo <= hi:
            raise ValueError(f"A_init_range {self.A_init_range} must satisfy 0 < low <= high")
        return self


# transformers' names (Mamba2Mixer, BambaMixer): the same tensors, the conv kept as nn.Conv1d's (C, 1, K)
_HF = {"default": tuple(HFName(ours, (theirs,)) for ours, theirs in (
    ("in_proj.weight", "in_proj.weight"), ("in_proj.bias", "in_proj.bias"),
    ("conv_weight", "conv1d.weight"), ("conv_bias", "conv1d.bias"),
    ("dt_bias", "dt_bias"), ("A_log", "A_log"), ("D", "D"), ("norm.weight", "norm.weight"),
    ("out_proj.weight", "out_proj.weight"), ("out_proj.bias", "out_proj.bias")))}


@register(
    "ssm.ssd",
    params=SSDParams,
    decode="cached",
    hf=_HF,
    examples=[
        Example({"d_state": 8, "head_dim": 8, "chunk_size": 4}, {"x": (2, 10, 32)}),
        Example({"d_state": 8, "head_dim": 8, "chunk_size": 4, "ngroups": 2, "d_conv": 3}, {"x": (2, 9, 32)}),
        Example({"d_state": 8, "head_dim": 8, "chunk_size": 4, "bias": True, "conv_bias": False, "norm_eps": 1e-6},
                {"x": (2, 9, 32)}),
    ],
)
def build_ssd(p: SSDParams, ins: Inputs) -> SSD:
    D = ins["x"].dim
    d_inner = p.expand * D
    if d_inner % p.head_dim:
        raise ValueError(f"expand * embed_dim = {d_inner} is not a multiple of head_dim {p.head_dim}")
    if (d_inner // p.head_dim) % p.ngroups:
        raise ValueError(f"heads {d_inner // p.head_dim} are not a multiple of ngroups {p.ngroups}")
    return SSD(
        embed_dim=D,
        d_state=p.d_state,
        d_conv=p.d_conv,
        expand=p.expand,
        head_dim=p.head_dim,
        ngroups=p.ngroups,
        chunk_size=p.chunk_size,
        dt_min=p.dt_min,
        dt_max=p.dt_max,
        A_init_range=p.A_init_range,
        norm_eps=p.norm_eps,
        bias=p.bias,
        conv_bias=p.conv_bias,
    )
