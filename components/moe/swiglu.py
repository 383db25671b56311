"""moe.swiglu: top-k routed bias-free SwiGLU experts, with an optional shared expert (Mixtral,
Qwen2-MoE, Jamba, DeepSeek-style)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from physlm_graph import ComponentParams, Example, Inputs, register
from physlm_graph._registry import HFName
from physlm_graph.components.ffn.swiglu import SwiGLU

from ._dispatch import _grouped_mm_ok, expert_ranks, router_z_loss, switch_balance


class SwiGLUExperts(nn.Module):
    """E bias-free SwiGLU MLPs stored stacked: expert e maps x (D) to
    ``down_e (silu(gate_e x) * up_e x)``.

    Weights: gate and up (E, H, D), down (E, D, H): each expert's slice is laid out as an
    ``nn.Linear`` weight (out, in), as transformers' per-expert ``w1`` / ``w3`` / ``w2`` (or
    ``gate_proj`` / ``up_proj`` / ``down_proj``) and initialised like one (uniform in
    +-1/sqrt(fan_in)).

    ``forward(x, expert)`` runs assignments: x (M, D) token vectors, expert (M,) their expert
    ids; returns (M, D). Dropless. Batched, never a Python loop over experts: on CUDA bf16 (with
    ``torch._grouped_mm``, D and H multiples of 8, a Hopper-class GPU) a grouped GEMM over the
    assignments sorted by expert, elsewhere a
    padded (E, C, D) buffer and ``bmm`` (C the largest expert load, one host sync; on meta every
    assignment).
    """

    def __init__(self, *, num_experts: int, embed_dim: int, hidden_dim: int) -> None:
        super().__init__()
        e, d, h = num_experts, embed_dim, hidden_dim
        self.num_experts, self.embed_dim, self.hidden_dim = e, d, h
        self.gate = nn.Parameter(torch.empty(e, h, d))
        self.up = nn.Parameter(torch.empty(e, h, d))
        self.down = nn.Parameter(torch.empty(e, d, h))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for w in (self.gate, self.up, self.down):
            bound = 1.0 / math.sqrt(w.shape[-1])
            nn.init.uniform_(w, -bound, bound)

    def forward(self, x: Tensor, expert: Tensor) -> Tensor:
        counts, rank = expert_ranks(expert, self.num_experts)
        if self.hidden_dim % 8 == 0 and _grouped_mm_ok(x, self.gate):  # the hidden rows 16-byte aligned too
            return self._grouped(x, expert, counts)
        cap = x.shape[0] if x.is_meta else max(int(counts.max()), 1) if x.shape[0] else 1
        buf = x.new_zeros(self.num_experts, cap, x.shape[-1])  # (E, C, D)
        buf = buf.index_put((expert, rank), x)  # every (expert, rank) pair is distinct
        h = F.silu(torch.bmm(buf, self.gate.transpose(1, 2))) * torch.bmm(buf, self.up.transpose(1, 2))  # (E, C, H)
        y = torch.bmm(h, self.down.transpose(1, 2))  # (E, C, D)
        return y[expert, rank]  # (M, D)

    def _grouped(self, x: Tensor, expert: Tensor, counts: Tensor) -> Tensor:
        order = torch.argsort(expert, stable=True)  # (M,) contiguous per-expert slices
        offs = counts.cumsum(0).to(torch.int32)  # (E,) end of each expert's slice
        xs = x[order]  # (M, D)
        g = torch._grouped_mm(xs, self.gate.transpose(1, 2), offs=offs)  # (M, H)
        u = torch._grouped_mm(xs, self.up.transpose(1, 2), offs=offs)
        ys = torch._grouped_mm(F.silu(g) * u, self.down.transpose(1, 2), offs=offs)  # (M, D)
        return torch.empty_like(ys).index_copy_(0, order, ys)  # back to assignment order


class SwiGLUMoE(nn.Module):
    """Token-choice top-k mixture of bias-free SwiGLU experts (Mixtral; Qwen2-MoE; Jamba).

    For a token x (D), router W_r (E x D, no bias) run in fp32:

        p      = softmax(W_r x)                         over all E experts
        (w, e) = top_k(p)
        w      = w / sum w                              if normalize_weights
        out    = sum_j w_j * SwiGLU_{e_j}(x)            SwiGLU_e(x) = down_e(silu(gate_e x) * up_e x)
               + sigmoid(g . x) * SwiGLU_shared(x)      with a shared expert (the gate g if shared_gate)

    Mixtral renormalises the k weights (normalize_weights: true); Qwen2-MoE says so with
    ``norm_topk_prob`` (false in its default config) and adds an always-on shared expert of
    width ``shared_hidden_dim`` scaled by a sigmoid gate (``shared_gate``); Jamba keeps the raw
    probabilities. Dropless: every assignment is computed, so the layer is per token (causal,
    stateless in incremental decoding).

    Shapes: x (B, T, D) -> out (B, T, D), balance (), z_loss (). ``balance`` is the Switch
    load-balance loss E * sum_i f_i P_i (f_i: the fraction of the N k assignments sent to expert
    i, P_i: its mean router probability), 1 when uniform; transformers' Mixtral aux loss is k
    times this per layer, computed over the router logits of all layers at once. ``z_loss`` is
    mean(logsumexp(router logits)^2). Both unweighted: a blueprint weights them in ``losses:``.

    With k = 1, renormalising makes the single weight 1 and cuts the router off from the main
    loss, so ``normalize_weights: true`` with ``top_k: 1`` is refused.
    """

    def __init__(self, *, embed_dim: int, num_experts: int, top_k: int, hidden_dim: int, normalize_weights: bool,
                 shared_hidden_dim: int | None = None, shared_gate: bool = False) -> None:
        super().__init__()
        self.num_experts, self.top_k, self.normalize_weights = num_experts, top_k, normalize_weights
        self.embed_dim, self.hidden_dim = embed_dim, hidden_dim
        self.shared_hidden_dim = shared_hidden_dim if shared_hidden_dim is not None else 0
        self.router = nn.Linear(embed_dim, num_experts, bias=False)
        self.experts = SwiGLUExperts(num_experts=num_experts, embed_dim=embed_dim, hidden_dim=hidden_dim)
        self.shared = SwiGLU(embed_dim=embed_dim, hidden_dim=shared_hidden_dim) if shared_hidden_dim else None
        self.shared_gate = nn.Linear(embed_dim, 1, bias=False) if shared_gate else None

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, t, d = x.shape
        k = self.top_k
        xt = x.reshape(b * t, d)  # (N, D)
        logits = F.linear(xt.float(), self.router.weight.float())  # (N, E) router in fp32
        probs = logits.softmax(dim=-1)  # (N, E)
        w, expert = probs.topk(k, dim=-1)  # (N, k)
        if self.normalize_weights:
            w = w / w.sum(dim=-1, keepdim=True)
        y = self.experts(xt.repeat_interleave(k, dim=0), expert.reshape(-1))  # (N k, D)
        out = (y.view(b * t, k, d) * w[..., None].to(y.dtype)).sum(dim=1)  # (N, D)
        if self.shared is not None:
            s = self.shared(xt)  # (N, D)
            if self.shared_gate is not None:
                s = torch.sigmoid(self.shared_gate(xt)) * s
            out = out + s
        return out.view(b, t, d), switch_balance(probs, expert.reshape(-1), self.num_experts), router_z_loss(logits)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, top_k={self.top_k}, hidden_dim={self.hidden_dim}, "
                f"normalize_weights={self.normalize_weights}"
                + (f", shared_hidden_dim={self.shared_hidden_dim}" if self.shared is not None else ""))


class SwiGLUMoEParams(ComponentParams):
    num_experts: int = Field(ge=1, description="number of routed experts E (Mixtral: 8, Qwen2-MoE: 60)")
    top_k: int = Field(ge=1, description="experts per token k, <= num_experts (Mixtral: 2, Qwen2-MoE: 4)")
    hidden_dim: int = Field(gt=0, description="hidden width H of every routed expert (Mixtral 8x7B: 14336)")
    normalize_weights: bool = Field(
        description="renormalise the k chosen router probabilities to sum to 1 (Mixtral: true; Qwen2-MoE: its "
                    "norm_topk_prob, false by default; Jamba: false); refused with top_k 1")
    shared_hidden_dim: int | None = Field(
        None, gt=0, description="width of an always-on shared SwiGLU expert added to the routed ones (Qwen2-MoE: "
                                "shared_expert_intermediate_size); None: no shared expert")
    shared_gate: bool = Field(False, description="scale the shared expert by sigmoid(g . x), g a learned (D,) "
                                                 "vector (Qwen2-MoE); needs shared_hidden_dim")

    @model_validator(mode="after")
    def _consistent(self) -> SwiGLUMoEParams:
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) must be <= num_experts ({self.num_experts})")
        if self.top_k == 1 and self.normalize_weights:
            raise ValueError("normalize_weights: true with top_k: 1 makes every expert weight 1, so the router gets "
                             "no gradient from the main loss; use normalize_weights: false or top_k >= 2")
        if self.shared_gate and self.shared_hidden_dim is None:
            raise ValueError("shared_gate: true needs a shared expert (set shared_hidden_dim)")
        return self


def _experts(w1: str, w3: str, w2: str) -> tuple[HFName, ...]:
    """transformers' per-expert Linear weights ``experts.{e}.<name>.weight``, stacked into ours."""
    return tuple(HFName(f"experts.{ours}", (f"experts.{{e}}.{theirs}.weight",), stack="num_experts")
                 for ours, theirs in (("gate", w1), ("up", w3), ("down", w2)))


_SHARED = tuple(HFName(f"shared.{ours}.weight", (f"shared_expert.{theirs}.weight",))
                for ours, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")))
# transformers' names, as save_pretrained writes them (one tensor per expert and projection):
# Mixtral's block_sparse_moe (the family maps the module), Qwen2-MoE's mlp, Jamba's feed_forward.
_HF = {
    "mixtral": (HFName("router.weight", ("gate.weight",)), *_experts("w1", "w3", "w2")),
    "default": (HFName("router.weight", ("gate.weight",)), *_experts("gate_proj", "up_proj", "down_proj"), *_SHARED,
                HFName("shared_gate.weight", ("shared_expert_gate.weight",))),
    "jamba": (HFName("router.weight", ("router.weight",)), *_experts("gate_proj", "up_proj", "down_proj")),
}


@register(
    "moe.swiglu",
    params=SwiGLUMoEParams,
    outputs=("out", "balance", "z_loss"),
    decode="stateless",
    hf=_HF,
    examples=[
        Example({"num_experts": 4, "top_k": 2, "hidden_dim": 24, "normalize_weights": True}, {"x": (2, 8, 16)}),
        Example({"num_experts": 4, "top_k": 2, "hidden_dim": 12, "normalize_weights": False, "shared_hidden_dim": 20,
                 "shared_gate": True}, {"x": (2, 8, 16)}),
        Example({"num_experts": 3, "top_k": 1, "hidden_dim": 8, "normalize_weights": False}, {"x": (2, 6, 8)}),
    ],
)
def build_swiglu_moe(p: SwiGLUMoEParams, ins: Inputs) -> SwiGLUMoE:
    return SwiGLUMoE(embed_dim=ins["x"].dim, num_experts=p.num_experts, top_k=p.top_k, hidden_dim=p.hidden_dim,
                     normalize_weights=p.normalize_weights, shared_hidden_dim=p.shared_hidden_dim,
                     shared_gate=p.shared_gate)
