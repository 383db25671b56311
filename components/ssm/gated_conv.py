"""ssm.gated_conv: Brain-Inspired GPT V2's "MambaBlock", which is a gated 4-tap causal conv."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from physlm_graph import Example, Inputs, decode_context, register

from ._dt import StepInitParams, log_uniform_dt


class GatedConv(nn.Module):
    """Brain-GPT V2 "MambaBlock" as published: a gated causal depthwise convolution, no SSM.

    With u (B, T, D) and Di = expand * D::

        [x_in, z]         = W_in u                         (B, T, 2 Di), no bias
        x_c               = silu(causal_depthwise_conv(x_in))   kernel d_conv, no bias
        [B_s, C_s, dt~]   = [W_bc x_c, W_dt~ x_c]          sizes d_state, d_state, 1
        dt                = softplus(W_dt dt~ + b_dt)      (B, T, Di), rank-1 dt
        y                 = x_c * sigmoid(dt) + x_c * D_skip
        out               = W_out(y * silu(z))             (B, T, D), no bias

    Source: ``comsa33/brain-inspired-gpt`` @ 2beb863, ``brain_gpt/core/model_brain_v2.py``,
    class ``MambaBlock`` (SEEDS.md section 3.5). Reproduced faithfully, with its flaws:

    - **not an SSM** (README != code): the selective scan is never run. B_s and C_s are
      computed and discarded, and so is the discretised A, so the block's receptive field is
      the d_conv taps of the conv and nothing more. For the real selective SSM use ``ssm.ssd``.
    - **dead parameters**: the published ``x_proj`` is one Linear producing [B_s, C_s, dt~].
      Here its B/C rows are the parameter ``x_proj_bc`` and its dt row ``x_proj_dt``, so the
      rows that never get a gradient are a parameter of their own; B_s and C_s are still
      computed (and dropped) in forward, as published. The log-A table (``A_log``,
      log(1..d_state) per channel) is kept as a buffer, as published, and never read.
    - dt is ``sigmoid``-squashed after the softplus, so it only rescales x_c by a factor in
      (0.5, 1); with D_skip the block computes x_c * (sigmoid(dt) + D_skip).

    Init as published: b_dt = log(dt0) (not softplus^-1(dt0)), dt0 log-uniform in
    [dt_min, dt_max] floored at 1e-4; D_skip = 1; Linear/Conv defaults elsewhere. Causal.
    Generation (decode="cached") keeps the last d_conv - 1 conv inputs in the decode context.
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
    ) -> None:
        super().__init__()
        d_inner = expand * embed_dim
        self.d_inner, self.d_conv = d_inner, d_conv
        self.in_proj = nn.Linear(embed_dim, 2 * d_inner, bias=False)
        self.conv = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, bias=False)
        # the published x_proj = Linear(Di, 2 d_state + 1, bias=False), split by its rows
        x_proj = nn.Linear(d_inner, 2 * d_state + 1, bias=False)
        self.x_proj_bc = nn.Parameter(x_proj.weight.detach()[: 2 * d_state].clone())  # (2N, Di)
        self.x_proj_dt = nn.Parameter(x_proj.weight.detach()[2 * d_state :].clone())  # (1, Di)
        self.dt_proj = nn.Linear(1, d_inner, bias=True)
        with torch.no_grad():
            self.dt_proj.bias.copy_(torch.log(log_uniform_dt(d_inner, dt_min, dt_max)))
        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(d_inner, 1)  # (Di, N)
        self.register_buffer("A_log", torch.log(A))  # published, never read
        self.D_skip = nn.Parameter(torch.ones(d_inner))
        self.out_proj = nn.Linear(d_inner, embed_dim, bias=False)

    def _conv(self, x: Tensor) -> Tensor:
        """Causal depthwise conv over time; in generation, continue from the cached inputs."""
        K = self.d_conv
        ctx = decode_context()
        cache = ctx.get(self) if ctx is not None and ctx.offset > 0 else None
        if cache is None:
            cache = x.new_zeros(x.shape[0], K - 1, x.shape[2])
        full = torch.cat([cache.to(x.dtype), x], dim=1)  # (B, K-1+T, Di)
        if ctx is not None:
            ctx.set(self, full[:, full.shape[1] - (K - 1) :])
        return self.conv(full.transpose(1, 2)).transpose(1, 2)  # (B, T, Di)

    def forward(self, u: Tensor) -> Tensor:
        x, z = self.in_proj(u).chunk(2, dim=-1)  # (B, T, Di) each
        x = F.silu(self._conv(x))
        F.linear(x, self.x_proj_bc)  # B_s, C_s (B, T, 2N): computed and discarded, as published
        dt = F.softplus(self.dt_proj(F.linear(x, self.x_proj_dt)))  # (B, T, Di)
        y = x * torch.sigmoid(dt) + x * self.D_skip
        return self.out_proj(y * F.silu(z))


class GatedConvParams(StepInitParams):
    d_state: int = Field(16, gt=0, description="size of the (discarded) B and C projections")
    d_conv: int = Field(4, ge=1, description="taps of the causal depthwise conv (the receptive field)")
    expand: int = Field(2, gt=0, description="inner width Di = expand * embed_dim")
    dt_min: float = Field(1e-3, gt=0.0, description="lower end of the log-uniform dt init")
    dt_max: float = Field(0.1, gt=0.0, description="upper end of the log-uniform dt init")


@register(
    "ssm.gated_conv",
    params=GatedConvParams,
    decode="cached",
    flags=("not-an-ssm (faithful: B, C and A computed and discarded)",),
    examples=[
        Example(
            {"d_state": 4},
            {"x": (2, 9, 16)},
            no_grad=("x_proj_bc",),
            no_grad_why="the published block computes B and C and discards them",
        )
    ],
)
def build_gated_conv(p: GatedConvParams, ins: Inputs) -> GatedConv:
    return GatedConv(
        embed_dim=ins["x"].dim,
        d_state=p.d_state,
        d_conv=p.d_conv,
        expand=p.expand,
        dt_min=p.dt_min,
        dt_max=p.dt_max,
    )
