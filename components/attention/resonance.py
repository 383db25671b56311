"""attention.resonance: QLLM's iterative ResonanceAttention (sschepis/qllm @ 6a5cb1a; fixed mode is causal)."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from physlm_graph import ComponentParams, Example, Inputs, decode_context, register
from physlm_graph._errors import ComponentError
from physlm_graph.components._decode_cache import AppendCache


class ResonanceAttention(nn.Module):
    """Causal multi-head attention refined over up to N iterations, with halting (QLLM).

    Reproduces ``ResonanceAttention`` of the original QLLM (``sschepis/qllm`` at ``6a5cb1a``,
    identical at ``f209486``; SEEDS.md §4.2). With q, k, v = W_q x, W_k x, W_v x (biased, split
    into H heads of width d), for iteration t = 0 .. N-1:

    - phase shift: delta_{t,h} = phi_h sin(2 pi t / N), added to every element of q and k;
    - scores: S_t = beta_t ((q + delta)(k + delta)^T / sqrt(d) + b_h + M), beta_t = beta0 +
      t beta_step, M = -10000 on future positions (added *before* the beta scaling);
    - A_t = softmax(S_t) for t = 0, else ((1 - mu) softmax(S_t) + mu sg(A_{t-1})), renormalised;
    - halting statistics: the mean row entropy per (b, h), blended with the previous value
      (weight ``entropy_penalty``) where its head mean rose, and a cosine similarity;
    - out = W_o merge(dropout(A_t) v) of the *last* iteration run; earlier ones are discarded,
      so gradients reach only the last iteration's softmax (and phi through its delta).

    Shapes: x (B, T, D) -> out (B, T, D), entropy (): the mean row entropy of the final
    attention weights (before dropout), over batch, heads and rows. The original meant to add
    0.01 x this to the loss (§4.7) but never did; weight it in a blueprint's ``losses:``.

    ``mode="faithful"`` (default: the code as published; declared non-causal, see the leak below,
    so a blueprint must say ``allow_leak: true`` on its node):

    - **bug (self-comparison):** the "previous" weights are overwritten with A_t before the
      cosine check, so the check compares dropout(A_t) with A_t. In eval it is 1: the loop always
      stops after t = 0 and the layer is plain attention at beta0 with delta = 0. In training it
      is about sqrt(1 - p) with noise, next to the 0.95 threshold, so it usually runs many
      iterations: training and eval run at different temperatures.
    - entropy is measured on the dropped-out weights; a sample converges if its head-mean
      entropy < ``entropy_threshold`` or all its heads have cos > ``convergence_threshold``;
      the loop stops when every sample has converged.
    - **dead parameter:** ``resonance_bias`` (1, H, 1, 1) is constant along each row and cancels
      in softmax; it is kept for the published parameter count and gets no gradient.
    - **training-time leak:** the iteration count is one number for the whole batch, decided
      from full T x T matrices, so in training a position's output depends (through the number
      of iterations) on later tokens and on other samples. Eval always runs one iteration and
      is exactly causal.

    ``mode="fixed"`` (what the README describes, causal in train and eval): the cosine compares
    A_t with A_{t-1} before dropout and the entropy is that of A_t, so the schedule is the same
    in train and eval; halting is decided per query row (head-mean row entropy < threshold or
    all heads' row cosine > threshold), each row keeps the weights of the iteration at which it
    converged, and the loop ends when every row has. A row depends only on keys <= its position,
    so the halting decision cannot see the future. ``resonance_bias`` is dropped.

    Cost: up to N materialised (B, H, T, T) softmaxes per call; fixed mode keeps the graphs of
    the iterations at which rows stopped.

    Incremental decoding (``decode: cached``): inside ``physlm_graph.decoding()`` keys and
    values are cached in the decode context and a chunk's queries run the loop against all of
    them. Fixed mode: each row's iterations and halting depend only on its own query and the
    keys up to its position, so a row decoded alone gets the weights it gets in the full
    forward. Faithful mode: in eval (as generation runs) the self-comparison stops the loop
    after iteration 0 for any input, so it is plain causal attention and decodes the same way;
    in training its iteration count depends on the whole chunk. The ``entropy`` output of a
    decoding step is that of the chunk's rows only.
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        num_heads: int,
        max_iterations: int = 10,
        entropy_threshold: float = 0.1,
        entropy_penalty: float = 0.05,
        momentum: float = 0.2,
        beta0: float = 0.8,
        beta_step: float = 0.2,
        convergence_threshold: float = 0.95,
        phase_factor: float = 0.1,
        dropout: float = 0.1,
        mode: Literal["faithful", "fixed"] = "faithful",
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.max_iterations = max_iterations
        self.entropy_threshold = entropy_threshold
        self.entropy_penalty = entropy_penalty
        self.momentum = momentum
        self.beta0 = beta0
        self.beta_step = beta_step
        self.convergence_threshold = convergence_threshold
        self.mode = mode
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.o_proj = nn.Linear(embed_dim, embed_dim)
        if mode == "faithful":
            # Dead: constant along each softmax row. Kept for the published parameter count.
            self.resonance_bias = nn.Parameter(torch.zeros(1, num_heads, 1, 1))
        self.phase_factors = nn.Parameter(torch.full((1, num_heads, 1, 1), phase_factor))
        self.drop = nn.Dropout(dropout)
        self.last_iterations = 0  # iterations run by the last forward (for tests and logging)

    def _heads(self, y: Tensor) -> Tensor:
        B, T, _ = y.shape
        return y.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, d)

    def _weights(self, q: Tensor, k: Tensor, mask: Tensor, t: int, prev: Tensor | None) -> Tensor:
        """The iteration-t attention weights A_t (B, H, T, T), momentum included."""
        delta = self.phase_factors * math.sin(2 * math.pi * t / self.max_iterations)  # (1, H, 1, 1)
        s = (q + delta) @ (k + delta).transpose(-2, -1) / math.sqrt(self.head_dim)  # (B, H, T, T)
        if self.mode == "faithful":
            s = s + self.resonance_bias
        s = (s + mask) * (self.beta0 + t * self.beta_step)
        a = F.softmax(s, dim=-1)
        if prev is not None and self.momentum > 0:
            a = (1 - self.momentum) * a + self.momentum * prev
            a = a / a.sum(dim=-1, keepdim=True)  # a no-op in exact arithmetic, as published
        return a

    def _penalise(self, h: Tensor, prev: Tensor | None, head_dim: int) -> Tensor:
        """Blend the entropy with the previous one where its head mean rose (halting only)."""
        if prev is None or self.entropy_penalty <= 0:
            return h
        rose = (h.mean(head_dim) > prev.mean(head_dim)).unsqueeze(head_dim)
        return torch.where(rose, h * (1 - self.entropy_penalty) + prev * self.entropy_penalty, h)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        B, T, D = x.shape
        q, k, v = self._heads(self.q_proj(x)), self._heads(self.k_proj(x)), self._heads(self.v_proj(x))
        k, v = self._extend_cache(k, v)  # (B, H, S, d), S = cached + T
        S = k.shape[2]
        future = torch.ones(T, S, dtype=torch.bool, device=x.device).triu(S - T + 1)  # key j > query's position
        mask = torch.zeros(T, S, dtype=x.dtype, device=x.device).masked_fill(future, -10000.0)  # (T, S)
        if self.mode == "faithful":
            a, a_drop, n = self._faithful_loop(q, k, mask, halt=not x.is_meta)
        else:
            a, n = self._fixed_loop(q, k, mask, halt=not x.is_meta)
            a_drop = self.drop(a)
        self.last_iterations = n
        y = (a_drop @ v).transpose(1, 2).reshape(B, T, D)  # (B, T, D)
        entropy = -(a * torch.log(a.clamp_min(1e-10))).sum(-1).mean()  # () final weights
        return self.o_proj(y), entropy

    def _extend_cache(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Inside ``decoding()``: append this chunk's keys and values to the cache; return all."""
        ctx = decode_context()
        if ctx is None:
            return k, v
        cache = ctx.get(self)
        if cache is None:
            cache = AppendCache(2, 2)
            ctx.set(self, cache)
        return cache.extend(k, v)

    def _faithful_loop(self, q: Tensor, k: Tensor, mask: Tensor, halt: bool) -> tuple[Tensor, Tensor, int]:
        prev: Tensor | None = None
        prev_h: Tensor | None = None
        for t in range(self.max_iterations):
            a = self._weights(q, k, mask, t, prev)
            prev = a.detach()  # overwritten before the cosine check: the published bug
            a_drop = self.drop(a)
            p = a_drop + 1e-10
            h = -(p * torch.log(p)).sum(-1).mean(-1)  # (B, H) entropy of the dropped weights
            h = self._penalise(h, prev_h, head_dim=1)
            prev_h = h.detach()
            cos = F.cosine_similarity(a_drop.flatten(2), prev.flatten(2), dim=2)  # (B, H)
            done = (h.mean(1) < self.entropy_threshold) | (cos > self.convergence_threshold).all(1)  # (B,)
            if halt and bool(done.all()):
                break
        return a, a_drop, t + 1

    def _fixed_loop(self, q: Tensor, k: Tensor, mask: Tensor, halt: bool) -> tuple[Tensor, int]:
        B, H, T, _ = q.shape
        prev: Tensor | None = None
        prev_h: Tensor | None = None
        kept: Tensor | None = None
        done = torch.zeros(B, T, dtype=torch.bool, device=q.device)  # rows already halted
        for t in range(self.max_iterations):
            a = self._weights(q, k, mask, t, prev)
            # A halted row keeps the weights of the iteration at which it converged.
            kept = a if kept is None else torch.where(done[:, None, :, None], kept, a)
            h = -(a * torch.log(a.clamp_min(1e-10))).sum(-1)  # (B, H, T) row entropy
            h = self._penalise(h.detach(), prev_h, head_dim=1)
            conv = h.mean(1) < self.entropy_threshold  # (B, T)
            if prev is not None:
                cos = F.cosine_similarity(a.detach(), prev, dim=-1)  # (B, H, T)
                conv = conv | (cos > self.convergence_threshold).all(1)
            done = done | conv
            prev, prev_h = a.detach(), h
            if halt and bool(done.all()):
                break
        assert kept is not None
        return kept, t + 1


class ResonanceParams(ComponentParams):
    num_heads: int = Field(gt=0, description="attention heads; must divide the width")
    max_iterations: int = Field(10, gt=0, description="N: most refinement iterations (also the phase period)")
    entropy_threshold: float = Field(
        0.1, ge=0.0, description="epsilon: halt where the head-mean attention entropy falls below this (nats)"
    )
    entropy_penalty: float = Field(
        0.05, ge=0.0, le=1.0, description="weight of the previous entropy where it rose (halting statistic only)"
    )
    momentum: float = Field(0.2, ge=0.0, lt=1.0, description="mu: weight of the previous (detached) attention")
    beta0: float = Field(0.8, gt=0.0, description="inverse temperature of iteration 0")
    beta_step: float = Field(0.2, ge=0.0, description="inverse temperature added per iteration")
    convergence_threshold: float = Field(
        0.95, description="halt where every head's attention cosine similarity exceeds this"
    )
    phase_factor: float = Field(0.1, description="initial value of the learned per-head phase factors phi_h")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="dropout on the attention weights")
    mode: Literal["faithful", "fixed"] = Field(
        "faithful",
        description="faithful: published code (self-comparison halting: 1 iteration in eval, many in "
        "training); fixed: compare with the previous iteration, per-row halting, same in train and eval",
    )


@register(
    "attention.resonance",
    params=ResonanceParams,
    outputs=("out", "entropy"),
    causal=lambda p: p.mode != "faithful",
    decode="cached",
    flags=(
        "leaks-future in training: the halting step depends on later tokens (faithful)",
        "self-comparison halting: 1 iteration in eval, many in training (faithful)",
        "dead resonance_bias (faithful)",
        "training-time halting depends on later tokens and batch-mates (faithful)",
    ),
    examples=[
        Example(
            # 0.99: training never halts by the noisy self-comparison, only by the entropy (1.0):
            # it stops at t = 2 here, so phi gets a gradient (delta = 0 at t = 0), and the step
            # depends on later tokens, which the probe in training mode sees (eval stops at t = 0).
            {"num_heads": 2, "convergence_threshold": 0.99, "entropy_threshold": 1.0},
            {"x": (2, 8, 16)},
            probe_training=True,
            no_grad=("resonance_bias",),
            no_grad_why="constant along each softmax row, it cancels (a dead parameter of the original)",
        ),
        Example({"num_heads": 4, "mode": "fixed"}, {"x": (2, 12, 32)}),
        Example({"num_heads": 2, "mode": "fixed", "dropout": 0.0, "max_iterations": 4}, {"x": (2, 8, 16)}),
    ],
)
def build_resonance(p: ResonanceParams, ins: Inputs) -> ResonanceAttention:
    D = ins["x"].dim
    if D % p.num_heads:
        divisors = [h for h in range(1, D + 1) if D % h == 0]
        raise ComponentError(
            f"num_heads must divide the width {D}",
            param="num_heads",
            expected=f"a divisor of {D}",
            got=str(p.num_heads),
            fix="use one of " + ", ".join(map(str, divisors[:8])),
        )
    return ResonanceAttention(embed_dim=D, **p.model_dump())
