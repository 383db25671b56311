"""topology.processor: Holographic LLM V2's EfficientTopologyProcessor, faithful or causal k-NN."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from physlm_graph import ComponentParams, Example, Inputs, decode_context, register
from physlm_graph.components._decode_cache import AppendCache

_FEATURE_DIM = 128  # width of the seed's topology encoder (W_e is 128 x D)
_METRIC_DIM = 64  # each similarity statistic is embedded by its own Linear(1, 64)
_DEFAULT_RATE = 0.05
_DEFAULT_K = 4


class TopologyProcessor(nn.Module):
    """Adds a learned "topology" signal to every token: ``out = u + r * g`` (r a scalar, init 0.1).

    Reproduces ``EfficientTopologyProcessor`` of Holographic LLM V2
    (``Woojiggun/holographic-llm`` @ a404586, ``models/topology.py``; SEEDS.md §1.2).
    Shapes: u (B, T, D) -> (B, T, D).

    ``faithful`` (as published): one global summary per sequence, broadcast to all positions.

        n_s = min(64, max(16, floor(sampling_rate * T))); S = randperm(T)[:n_s] if T > n_s else all
        f   = dropout(relu(W_e mean_{t in S} u_t + b_e))                  (B, 128)
        G   = U U^T,  U = rows of u_S normalised to unit length           (B, n_s, n_s)
        s   = [L_d(mean G), L_c(mean 1[G > 0.5]), L_k(mean G^2)]           (B, 192), stats under no_grad
        g   = W_int [f; s] + b_int                                         (B, D), same for every t

    Flagged: **[LEAK]** g mixes tokens from the whole sequence (future positions, and pad
    positions when training pads), so every position, position 0 included, sees the future;
    the sample S is drawn from the global RNG on every call, eval mode included
    (nondeterministic inference); the seed's ``k_neighbors`` is accepted and ignored, so here
    a non-default value is refused in this mode; nothing is positional.

    ``fixed`` (the default; the README's "k-NN local aggregation, position-aware", causal):
    each token i aggregates its k most similar earlier-or-equal tokens,

        z     = normalize(W_p u)                                           (B, T, 128)
        s_ij  = z_i . z_j - softplus(lambda) * log(1 + i - j)    for j <= i,  -inf for j > i
        N(i)  = top-k_j s_ij,   a_ij = softmax_{j in N(i)} s_ij            (B, T, k)
        g_i   = dropout(W_a sum_{j in N(i)} a_ij u_j)                      (B, T, D)

    with lambda a learned distance-decay (init softplus^-1(0.1)). Cost O(B T^2) for the scores.
    Rows i < k - 1 have fewer than k candidates; the extra picks score -inf and weigh 0.
    ``sampling_rate`` only applies to the faithful mode and is refused otherwise.

    Incremental decoding: the fixed mode keeps every token's projected z and input u in the
    decode context, and a chunk's queries pick their neighbours among all cached tokens (the
    same scores as the full forward). The faithful mode cannot decode incrementally: its
    summary is drawn from the whole sequence at random, so each new token changes what every
    position receives; generation recomputes the full context for each token.
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        sampling_rate: float = _DEFAULT_RATE,
        k_neighbors: int = _DEFAULT_K,
        dropout: float = 0.1,
        mode: Literal["faithful", "fixed"] = "fixed",
    ) -> None:
        super().__init__()
        self.mode = mode
        self.sampling_rate = sampling_rate
        self.k_neighbors = k_neighbors
        self.drop = nn.Dropout(dropout)
        self.residual_weight = nn.Parameter(torch.tensor(0.1))  # r
        if mode == "faithful":
            self.encoder = nn.Linear(embed_dim, _FEATURE_DIM)  # W_e, b_e
            self.density = nn.Linear(1, _METRIC_DIM)
            self.connectivity = nn.Linear(1, _METRIC_DIM)
            self.clustering = nn.Linear(1, _METRIC_DIM)
            self.integration = nn.Linear(_FEATURE_DIM + 3 * _METRIC_DIM, embed_dim)  # W_int
        else:
            self.proj = nn.Linear(embed_dim, _FEATURE_DIM, bias=False)  # W_p: similarity space
            self.decay = nn.Parameter(torch.tensor(math.log(math.expm1(0.1))))  # softplus -> 0.1
            self.out_proj = nn.Linear(embed_dim, embed_dim)  # W_a

    def forward(self, u: Tensor) -> Tensor:
        g = self._global_summary(u) if self.mode == "faithful" else self._causal_knn(u)
        return u + self.residual_weight * g

    # -- faithful: random-sample global summary (leaks the future) -------------------------
    def _global_summary(self, u: Tensor) -> Tensor:
        b, t, d = u.shape
        n_s = min(64, max(16, int(t * self.sampling_rate)))
        if t > n_s:
            idx = torch.randperm(t, device=u.device)[:n_s]  # one sample shared by the batch
            u = u[:, idx, :]  # (B, n_s, D)
        f = self.drop(F.relu(self.encoder(u.mean(dim=1))))  # (B, 128)
        un = F.normalize(u, p=2, dim=-1)
        sim = un @ un.transpose(1, 2)  # (B, n_s, n_s), diagonal included
        with torch.no_grad():  # as published: the statistics carry no gradient to u
            density = sim.mean(dim=(1, 2))[:, None]  # (B, 1)
            connectivity = (sim > 0.5).to(sim.dtype).mean(dim=(1, 2))[:, None]
            clustering = sim.square().mean(dim=(1, 2))[:, None]
        stats = torch.cat([self.density(density), self.connectivity(connectivity), self.clustering(clustering)], -1)
        g = self.integration(torch.cat([f, stats], dim=-1))  # (B, D)
        return g[:, None, :].expand(b, t, d)  # the same vector at every position

    # -- fixed: causal k-nearest-neighbour aggregation ---------------------------------------
    def _causal_knn(self, u: Tensor) -> Tensor:
        b, t, d = u.shape
        z = F.normalize(self.proj(u), dim=-1)  # (B, T, 128)
        zk, uk = z, u
        ctx = decode_context()
        if ctx is not None:  # decoding: this chunk's queries see the cached earlier tokens too
            cache = ctx.get(self)
            if cache is None:
                cache = AppendCache(1, 1)
                ctx.set(self, cache)
            zk, uk = cache.extend(z, u)  # (B, S, .)
        s_len = zk.shape[1]
        k = min(self.k_neighbors, s_len)
        qpos = torch.arange(s_len - t, s_len, device=u.device)
        dist = qpos[:, None] - torch.arange(s_len, device=u.device)[None, :]  # (T, S) i - j
        decay = F.softplus(self.decay) * torch.log1p(dist.clamp(min=0).to(u.dtype))  # (T, S)
        scores = z @ zk.transpose(1, 2) - decay  # (B, T, S) cosine minus distance penalty
        scores = scores.masked_fill(dist < 0, float("-inf"))  # only j <= i
        top, idx = scores.topk(k, dim=-1)  # (B, T, k); self (score 1) is always a candidate
        attn = top.softmax(dim=-1)  # (B, T, k), -inf picks weigh 0
        nb = uk.gather(1, idx.reshape(b, t * k, 1).expand(b, t * k, d)).view(b, t, k, d)  # (B, T, k, D)
        agg = (attn[..., None] * nb).sum(dim=2)  # (B, T, D)
        return self.drop(self.out_proj(agg))


class TopologyProcessorParams(ComponentParams):
    sampling_rate: float = Field(
        _DEFAULT_RATE,
        gt=0.0,
        le=1.0,
        description="faithful only: fraction of positions sampled (clamped to 16..64 positions)",
    )
    k_neighbors: int = Field(_DEFAULT_K, ge=1, description="fixed only: earlier-or-equal neighbours each token aggregates")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="faithful: on the 128-d feature; fixed: on the aggregate")
    mode: Literal["faithful", "fixed"] = Field(
        "fixed",
        description="faithful: random global summary as published (leaks the future); fixed: causal k-NN aggregation",
    )

    @model_validator(mode="after")
    def _mode_owns_its_knobs(self) -> TopologyProcessorParams:
        if self.mode == "faithful" and self.k_neighbors != _DEFAULT_K:
            raise ValueError(
                f"k_neighbors={self.k_neighbors} has no effect in faithful mode (the seed ignores it); "
                "leave it at 4 or use mode: fixed"
            )
        if self.mode == "fixed" and self.sampling_rate != _DEFAULT_RATE:
            raise ValueError(
                f"sampling_rate={self.sampling_rate} has no effect in fixed mode (it aggregates every earlier "
                "token's neighbours); leave it at 0.05 or use mode: faithful"
            )
        return self


@register(
    "topology.processor",
    params=TopologyProcessorParams,
    causal=lambda p: p.mode != "faithful",
    decode=lambda p: "cached" if p.mode == "fixed" else "none",
    flags=(
        "leaks-future (faithful): a global summary of randomly sampled positions is added to every position",
        "nondeterministic in eval (faithful): the sample is redrawn every call",
    ),
    examples=[
        Example({"dropout": 0.0}, {"x": (2, 8, 16)}),
        Example({"k_neighbors": 3, "dropout": 0.0}, {"x": (2, 12, 8)}),
        Example({"mode": "faithful", "dropout": 0.0}, {"x": (2, 8, 16)}),
        Example({"mode": "faithful", "sampling_rate": 0.5, "dropout": 0.0}, {"x": (2, 40, 8)}),
    ],
)
def build_topology_processor(p: TopologyProcessorParams, ins: Inputs) -> TopologyProcessor:
    return TopologyProcessor(
        embed_dim=ins["x"].dim,
        sampling_rate=p.sampling_rate,
        k_neighbors=p.k_neighbors,
        dropout=p.dropout,
        mode=p.mode,
    )
