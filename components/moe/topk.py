"""moe.topk: a general top-k routed mixture of GELU expert MLPs, dropless or with a capacity."""

from __future__ import annotations

import math

import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from physlm_graph import ComponentParams, Example, Inputs, register

from ._dispatch import StackedExperts, router_z_loss, switch_balance


class TopKMoE(nn.Module):
    """Token-choice top-k mixture of experts (Switch / GShard / Mixtral style).

    For a token x (D), with router W_r (E x D, no bias) run in fp32:

        p      = softmax(W_r x)                       (E)
        (w, e) = top_k(p)                             k weights and experts
        w      = w / sum w                            if normalize_weights (k >= 2)
        out    = sum_j w_j * Expert_{e_j}(x)          Expert = Linear(D,H) -> GELU -> Linear(H,D)

    Shapes: x (B, T, D) -> out (B, T, D), balance (), z_loss (). ``balance`` is the Switch
    loss E * sum_i f_i P_i (f_i: fraction of the N*k assignments sent to expert i, P_i: mean
    router probability), 1 when uniform; ``z_loss`` is mean(logsumexp(logits)^2). Both are
    unweighted (Switch uses 0.01, ST-MoE 1e-3).

    Capacity: with ``capacity_factor`` cf, each expert takes at most
    C = ceil(cf * B * T * k / E) assignments; the rest are dropped (that term of the sum is 0,
    the residual stream carries the token). Assignments claim slots in order of position,
    then batch row, then rank j, so whether a token is dropped depends only on tokens at its
    own or earlier positions: the layer stays causal (it does couple the rows of a batch, and
    C depends on B * T, so generation with another length drops differently). Without a
    capacity (``None``) routing is dropless.

    Experts are stacked (E, D, H) / (E, H, D) weights, dispatched by sorting assignments by
    expert: ``torch._grouped_mm`` on CUDA bf16, else a padded (E, C, D) ``baddbmm``.

    With k = 1 the weight is the router probability itself (Switch): renormalising a single
    weight makes it 1 and cuts the router off from the main loss, so that is refused.
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        num_experts: int = 8,
        top_k: int = 2,
        hidden_dim: int,
        capacity_factor: float | None = None,
        normalize_weights: bool = True,
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        self.normalize_weights = normalize_weights
        self.router = nn.Linear(embed_dim, num_experts, bias=False)
        self.experts = StackedExperts(num_experts=num_experts, embed_dim=embed_dim, hidden_dim=hidden_dim)

    def capacity(self, num_tokens: int) -> int | None:
        if self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, t, d = x.shape
        k = self.top_k
        xt = x.transpose(0, 1).reshape(t * b, d)  # (N, D), position-major: the priority order
        logits = F.linear(xt.float(), self.router.weight.float())  # (N, E) router in fp32
        probs = logits.softmax(dim=-1)  # (N, E)
        w, expert = probs.topk(k, dim=-1)  # (N, k)
        if self.normalize_weights:
            w = w / w.sum(dim=-1, keepdim=True)
        xa = xt.repeat_interleave(k, dim=0)  # (N*k, D) one row per assignment
        y, _ = self.experts(xa, expert.reshape(-1), self.capacity(b * t))  # (N*k, D)
        y = (y.view(t * b, k, d) * w[..., None].to(y.dtype)).sum(dim=1)  # (N, D)
        out = y.view(t, b, d).transpose(0, 1)  # (B, T, D)
        return out, switch_balance(probs, expert.reshape(-1), self.num_experts), router_z_loss(logits)


class TopKMoEParams(ComponentParams):
    num_experts: int = Field(8, ge=1, description="number of experts E")
    top_k: int = Field(2, ge=1, description="experts per token k (<= num_experts)")
    hidden_dim: int = Field(gt=0, description="hidden width H of every expert MLP")
    capacity_factor: float | None = Field(
        None,
        gt=0.0,
        description="None: dropless; a float cf: each expert takes at most ceil(cf * B * T * k / E) "
        "assignments and drops the rest",
    )
    normalize_weights: bool | None = Field(
        None,
        description="renormalise the k router probabilities to sum to 1; default: yes for top_k >= 2, no for "
        "top_k 1 (one renormalised weight is always 1 and the router would get no gradient from the main loss)",
    )

    @model_validator(mode="after")
    def _k_fits(self) -> TopKMoEParams:
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) must be <= num_experts ({self.num_experts})")
        if self.top_k == 1 and self.normalize_weights:
            raise ValueError("normalize_weights: true with top_k: 1 makes every expert weight 1, so the router gets "
                             "no gradient from the main loss; leave normalize_weights out (with top_k 1 the expert "
                             "output is scaled by its router probability, as in Switch) or use top_k >= 2")
        return self

    @property
    def normalize(self) -> bool:
        return self.top_k > 1 if self.normalize_weights is None else self.normalize_weights


@register(
    "moe.topk",
    params=TopKMoEParams,
    outputs=("out", "balance", "z_loss"),
    decode=lambda p: "stateless" if p.capacity_factor is None else "none",
    examples=[
        Example({"num_experts": 4, "top_k": 2, "hidden_dim": 32}, {"x": (2, 8, 16)}),
        Example({"num_experts": 4, "top_k": 2, "hidden_dim": 32, "capacity_factor": 1.0}, {"x": (2, 8, 16)}),
        Example({"num_experts": 3, "top_k": 1, "hidden_dim": 16, "normalize_weights": False}, {"x": (2, 6, 8)}),
    ],
)
def build_topk_moe(p: TopKMoEParams, ins: Inputs) -> TopKMoE:
    return TopKMoE(
        embed_dim=ins["x"].dim,
        num_experts=p.num_experts,
        top_k=p.top_k,
        hidden_dim=p.hidden_dim,
        capacity_factor=p.capacity_factor,
        normalize_weights=p.normalize,
    )
