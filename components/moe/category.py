"""moe.category: Holographic LLM V2's DynamicCategoryMoE (top-1 "language game" experts)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ._dispatch import StackedExperts, router_z_loss, switch_balance
from physlm_graph import ComponentParams, Example, Inputs, register

# Published constants of the seed (`models/moe_ffn.py`), not blueprint knobs.
_EMA_DECAY = 0.9
_RENORM_EVERY = 100
_TOPOLOGY_SCALE = 0.1


class DynamicCategoryMoE(nn.Module):
    """Top-1 mixture of E expert MLPs, each adding its own "language game" embedding to its input.

    Reproduces ``DynamicCategoryMoE`` of Holographic LLM V2 (``Woojiggun/holographic-llm``
    @ a404586, ``models/moe_ffn.py``; SEEDS.md §1.3). For a token x (D):

        logits = W_r x + b_r                          (E)
        e      = argmax softmax(logits)               top-1
        y      = Expert_e(x + s * G_e)                Expert_e = Linear(D,H) -> GELU -> Dropout -> Linear(H,D)
        out    = y (faithful)  |  p_e * y (fixed)
        out   += 0.1 * topology_info                  when the port is connected

    with G (E, D) ~ N(0, 0.02^2) and s = ``expert_embed_scale``; the router starts as in the
    seed (W_r ~ N(0, 0.02^2), b_r = 0), the experts like ``nn.Linear``. Shapes: x (B, T, D),
    topology_info (B, T, D) -> out (B, T, D), balance (), z_loss (). The experts run batched
    (``components.moe._dispatch``: stacked (E, D, H) weights, tokens scattered by expert).

    ``faithful`` (as published; each a flagged bug):

    - the output is **not** multiplied by the router probability, so the router gets **no
      gradient** and routing stays a fixed random partition of its input space;
    - ``balance`` = MSE(c / sum c, 1/E) from EMA count buffers c (initialised to 1, updated
      in training c <- 0.9 c + 0.1 n_e per forward, renormalised to sum E every 100th call).
      It is a constant with respect to the parameters (zero gradient), so it balances
      nothing. The seed returns it (times 0.01) only in training; here it is returned always,
      unweighted;
    - ``z_loss`` is 0 (the seed has none); the router runs in the module's dtype.

    ``fixed`` (the default; what "adaptive gating / load balancing" promised): out = p_e * y,
    so the router learns; ``balance`` is the Switch loss E * sum_i f_i P_i; ``z_loss`` is
    mean(logsumexp(logits)^2); the router runs in fp32. Both are unweighted (a blueprint uses
    0.01 and 1e-3). In training, the router's input (not the experts') is multiplied by
    U(1 - eps, 1 + eps) noise, eps = ``router_jitter`` (Switch Transformer's jitter, 1e-2;
    0 turns it off); f_i, P_i, the z-loss and the gate p_e all come from the jittered logits.
    Per-token in both modes, hence causal; any leak comes in only through ``topology_info``
    (the faithful topology processor's).
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        num_experts: int = 3,
        hidden_dim: int = 3072,
        dropout: float = 0.1,
        expert_embed_scale: float = 0.1,
        mode: Literal["faithful", "fixed"] = "fixed",
        router_jitter: float = 1e-2,
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.expert_embed_scale = expert_embed_scale
        self.mode = mode
        self.router_jitter = router_jitter
        self.router = nn.Linear(embed_dim, num_experts)
        nn.init.normal_(self.router.weight, std=0.02)  # the seed's model-wide init: near-uniform routing
        nn.init.zeros_(self.router.bias)
        self.experts = StackedExperts(
            num_experts=num_experts, embed_dim=embed_dim, hidden_dim=hidden_dim, dropout=dropout
        )
        self.game_embed = nn.Parameter(torch.randn(num_experts, embed_dim) * 0.02)  # G (E, D)
        if mode == "faithful":
            self.register_buffer("expert_counts", torch.ones(num_experts))  # EMA loads c (E,)
            self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x: Tensor, topology_info: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        b, t, d = x.shape
        xf = x.reshape(b * t, d)  # (N, D)
        if self.mode == "faithful":
            logits = self.router(xf)  # (N, E) in the module dtype, as published
        else:
            w, bias = self.router.weight.float(), self.router.bias.float()
            xr = xf.float()  # (N, D)
            if self.training and self.router_jitter > 0:
                # Switch jitter: multiplicative U(1-eps, 1+eps) noise on the router's input only
                xr = xr * torch.empty_like(xr).uniform_(1.0 - self.router_jitter, 1.0 + self.router_jitter)
            logits = F.linear(xr, w, bias)  # (N, E) router in fp32
        probs = logits.softmax(dim=-1)  # (N, E)
        top_p, expert = probs.max(dim=-1)  # (N,), (N,)
        xin = xf + self.expert_embed_scale * self.game_embed[expert]  # (N, D)
        y, _ = self.experts(xin, expert)  # (N, D)

        if self.mode == "faithful":
            if self.training:
                self._update_counts(expert)
            c = self.expert_counts
            share = c / (c.sum() + 1e-6)  # (E,)
            balance = F.mse_loss(share, torch.full_like(share, 1.0 / self.num_experts))
            z_loss = x.new_zeros(())
        else:
            y = y * top_p[:, None].to(y.dtype)
            balance = switch_balance(probs, expert, self.num_experts)
            z_loss = router_z_loss(logits)

        out = y.view(b, t, d)
        if topology_info is not None:
            out = out + _TOPOLOGY_SCALE * topology_info
        return out, balance, z_loss

    @torch.no_grad()
    def _update_counts(self, expert: Tensor) -> None:
        """c <- 0.9 c + 0.1 n, then every 100th call c <- E c / (sum c + 1e-6); no host sync."""
        c = self.expert_counts
        n = torch.zeros_like(c).index_add_(0, expert, torch.ones_like(expert, dtype=c.dtype))  # (E,)
        c.mul_(_EMA_DECAY).add_(n, alpha=1.0 - _EMA_DECAY)
        self.calls.add_(1)
        renorm = self.calls % _RENORM_EVERY == 0
        c.copy_(torch.where(renorm, c / (c.sum() + 1e-6) * self.num_experts, c))


class DynamicCategoryMoEParams(ComponentParams):
    num_experts: int = Field(3, ge=1, description="number of experts E (the seed's num_language_games)")
    hidden_dim: int = Field(3072, gt=0, description="hidden width H of every expert MLP (seed: intermediate_size)")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="dropout between the expert's GELU and its output layer")
    expert_embed_scale: float = Field(0.1, description="scale s of the expert embedding G_e added to the expert's input")
    mode: Literal["faithful", "fixed"] = Field(
        "fixed",
        description="faithful: as published (untrained router, constant EMA balance, no z-loss); "
        "fixed: probability-weighted output, Switch balance loss and router z-loss",
    )
    router_jitter: float = Field(
        1e-2,
        ge=0.0,
        lt=1.0,
        description="fixed mode, training only: the router's input is multiplied by U(1-eps, 1+eps) noise "
        "(Switch Transformer's jitter, eps 1e-2); 0 turns it off. Ignored in faithful mode",
    )


@register(
    "moe.category",
    params=DynamicCategoryMoEParams,
    inputs=("x", "topology_info"),
    optional_inputs=("topology_info",),
    outputs=("out", "balance", "z_loss"),
    decode="stateless",
    flags=(
        "untrained-router (faithful)",
        "constant-balance-loss (faithful)",
        "inherits topology_info's leak when connected to a leaking source",
    ),
    examples=[
        Example({"hidden_dim": 32, "dropout": 0.0}, {"x": (2, 8, 16)}),
        Example(
            {"hidden_dim": 32, "mode": "faithful"},
            {"x": (2, 8, 16), "topology_info": (2, 8, 16)},
            no_grad=("router.*",),
            no_grad_why="faithful: the output is not weighted by the router probability and the "
            "balance loss is computed from buffers, so the router gets no gradient (as published)",
        ),
        Example({"num_experts": 4, "hidden_dim": 24, "expert_embed_scale": 0.5}, {"x": (2, 6, 8), "topology_info": (2, 6, 8)}),
    ],
)
def build_category_moe(p: DynamicCategoryMoEParams, ins: Inputs) -> DynamicCategoryMoE:
    return DynamicCategoryMoE(
        embed_dim=ins["x"].dim,
        num_experts=p.num_experts,
        hidden_dim=p.hidden_dim,
        dropout=p.dropout,
        expert_embed_scale=p.expert_embed_scale,
        mode=p.mode,
        router_jitter=p.router_jitter,
    )
