"""Shared mixture-of-experts machinery: stacked expert MLPs and batched token dispatch.

Not a component (the leading underscore keeps the library loader from importing it as one);
``moe.category`` and ``moe.topk`` build on it.

Dispatch works on *assignments*: a flat list of (token vector, expert id) pairs in priority
order (top-1 gives one per token, top-k gives k). Each assignment gets a rank, its position
among the assignments of the same expert; with a capacity C, ranks >= C are dropped. The
expert MLPs then run batched, never in a Python loop over tokens or experts:

- CUDA bf16 (and ``torch._grouped_mm`` present): sort the assignments by expert and run one
  grouped GEMM per layer over the contiguous per-expert slices (no padding, no host sync);
- elsewhere (CPU, fp32, the meta device): scatter the assignments into a padded
  ``(E, C + 1, D)`` buffer (row C of each expert is a dump slot for dropped assignments) and
  run two ``baddbmm`` calls. For dropless routing C is the largest expert load, read with one
  host sync; on meta it is the worst case, every assignment.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["StackedExperts", "expert_ranks", "switch_balance", "router_z_loss"]


def expert_ranks(expert: Tensor, num_experts: int) -> tuple[Tensor, Tensor]:
    """Per-expert load and each assignment's rank within its expert, in priority order.

    expert: (M,) expert ids, earlier entries have priority. Returns counts (E,) and rank (M,),
    where rank[m] = #{m' < m : expert[m'] = expert[m]}.
    """
    m = expert.shape[0]
    order = torch.argsort(expert, stable=True)  # (M,) groups by expert, keeps priority order
    counts = torch.zeros(num_experts, dtype=torch.long, device=expert.device)
    counts.index_add_(0, expert, torch.ones_like(expert))  # (E,)
    starts = counts.cumsum(0) - counts  # (E,) first sorted slot of each expert
    sorted_rank = torch.arange(m, device=expert.device) - starts[expert[order]]  # (M,)
    rank = torch.empty_like(sorted_rank).scatter_(0, order, sorted_rank)  # back to priority order
    return counts, rank


def switch_balance(probs: Tensor, expert: Tensor, num_experts: int) -> Tensor:
    """Switch-Transformer load-balance loss ``E * sum_i f_i P_i`` (unweighted; 1 when uniform).

    probs: (N, E) router probabilities; expert: (M,) the chosen experts of all assignments.
    f_i is the fraction of assignments routed to i (not differentiable), P_i the mean router
    probability of i (carries the gradient).
    """
    counts = torch.zeros(num_experts, dtype=probs.dtype, device=probs.device)
    counts.index_add_(0, expert, torch.ones_like(expert, dtype=probs.dtype))  # (E,)
    frac = counts / expert.shape[0]  # (E,)
    return num_experts * (frac * probs.mean(0)).sum()


def router_z_loss(logits: Tensor) -> Tensor:
    """ST-MoE router z-loss ``mean(logsumexp(logits)^2)`` (unweighted), logits (N, E) in fp32."""
    return torch.logsumexp(logits, dim=-1).square().mean()


def _grouped_mm_ok(x: Tensor, w: Tensor) -> bool:
    if not (hasattr(torch, "_grouped_mm") and x.is_cuda and x.dtype == torch.bfloat16 and w.dtype == x.dtype):
        return False
    # grouped GEMM wants 16-byte aligned rows and a Hopper-class (or newer) GPU
    return x.shape[-1] % 8 == 0 and w.shape[-1] % 8 == 0 and torch.cuda.get_device_capability(x.device)[0] >= 9


class StackedExperts(nn.Module):
    """E two-layer GELU MLPs stored as stacked weights, ``W2_e dropout(gelu(W1_e x + b1_e)) + b2_e``.

    Weights: w1 (E, D, H), b1 (E, H), w2 (E, H, D), b2 (E, D), each initialised like an
    ``nn.Linear`` of the same fan-in (uniform in +-1/sqrt(fan_in)).
    """

    def __init__(self, *, num_experts: int, embed_dim: int, hidden_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        e, d, h = num_experts, embed_dim, hidden_dim
        self.num_experts = e
        self.w1 = nn.Parameter(torch.empty(e, d, h))
        self.b1 = nn.Parameter(torch.empty(e, h))
        self.w2 = nn.Parameter(torch.empty(e, h, d))
        self.b2 = nn.Parameter(torch.empty(e, d))
        self.drop = nn.Dropout(dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for w, b, fan_in in ((self.w1, self.b1, self.w1.shape[1]), (self.w2, self.b2, self.w2.shape[1])):
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(w, -bound, bound)
            nn.init.uniform_(b, -bound, bound)

    def forward(self, x: Tensor, expert: Tensor, capacity: int | None = None) -> tuple[Tensor, Tensor]:
        """x (M, D) assignments in priority order, expert (M,) their experts.

        Returns y (M, D), zero for dropped assignments, and keep (M,) bool.
        """
        m = x.shape[0]
        counts, rank = expert_ranks(expert, self.num_experts)
        keep = rank < capacity if capacity is not None else torch.ones_like(expert, dtype=torch.bool)
        if _grouped_mm_ok(x, self.w1):
            return self._grouped(x, expert, counts) * keep[:, None].to(x.dtype), keep
        if capacity is not None:
            cap = min(capacity, m)
        elif x.is_meta:
            cap = m  # worst case: every assignment on one expert
        else:
            cap = int(counts.max())  # one host sync per call for dropless routing on CPU
        slot = torch.where(keep, rank, torch.full_like(rank, cap))  # (M,) dropped -> dump row
        buf = x.new_zeros(self.num_experts, cap + 1, x.shape[-1])  # (E, C+1, D)
        # accumulate: only the dump row sees repeated indices, and it is discarded
        buf = buf.index_put((expert, slot), x, accumulate=True)
        h = self.drop(F.gelu(torch.baddbmm(self.b1[:, None], buf, self.w1)))  # (E, C+1, H)
        y = torch.baddbmm(self.b2[:, None], h, self.w2)  # (E, C+1, D)
        return y[expert, slot] * keep[:, None].to(y.dtype), keep  # (M, D)

    def _grouped(self, x: Tensor, expert: Tensor, counts: Tensor) -> Tensor:
        order = torch.argsort(expert, stable=True)  # (M,) contiguous per-expert slices
        e_sorted = expert[order]
        offs = counts.cumsum(0).to(torch.int32)  # (E,) end of each expert's slice
        xs = x[order]  # (M, D)
        h = torch._grouped_mm(xs, self.w1, offs=offs) + self.b1[e_sorted]  # (M, H)
        h = self.drop(F.gelu(h))
        ys = torch._grouped_mm(h, self.w2, offs=offs) + self.b2[e_sorted]  # (M, D)
        return torch.empty_like(ys).index_copy_(0, order, ys)  # back to priority order
