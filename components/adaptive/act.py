"""adaptive.act: Adaptive Computation Time over repeats of one shared pre-norm MLP block."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from physlm_graph import ComponentParams, Example, Inputs, register


class ResidualMLPBlock(nn.Module):
    """The repeated step: ``x + W2 gelu(W1 LN(x))``, per token. x (B, T, D) -> (B, T, D)."""

    def __init__(self, *, embed_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(embed_dim)
        self.fc = nn.Linear(embed_dim, hidden_dim)
        self.proj = nn.Linear(hidden_dim, embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.proj(F.gelu(self.fc(self.norm(x))))


class ACT(nn.Module):
    """Adaptive Computation Time (Graves 2016) over repeats of one shared residual MLP block.

    The block f (``ResidualMLPBlock``, weights shared by every repeat) is applied up to
    ``max_steps`` times, x_n = f(x_{n-1}), x_0 = x; after each application a halting MLP
    gives p_n = sigmoid(W_b relu(W_a x_n)) (D -> D/4 -> 1) per token. Every position halts
    on its own, so with a per-token block the output stays causal. Shapes: x (B, T, D) ->
    out (B, T, D), ponder () (scalar).

    ``fixed`` (trained Graves ACT, train and eval alike)::

        N(t)  = min{n : p_1 + .. + p_n >= threshold}, or max_steps
        R(t)  = 1 - (p_1 + .. + p_{N-1})
        out   = sum_{n<N} p_n x_n + R x_N             (a weighted mean of the states)
        ponder = mean over (B, T) of N(t) + R(t)       (unweighted; R carries the gradient)

    ``faithful``: Brain-GPT V2 ``AdaptiveComputationTime`` (``comsa33/brain-inspired-gpt``
    @ 2beb863, ``brain_gpt/core/model_brain_v2.py``, SEEDS.md section 3.5), where the step
    is the whole L-layer stack; here it is the internal block. As published:

    - **inference only**: in training the block runs once (out = f(x)) and the halting MLP
      is never used, so it **never trains**; in eval the untrained p ~ 0.5 makes out about
      0.5 f(x) + 0.5 f(f(x)), a block applied a different number of times than in training.
    - eval halting: running = H < threshold; D_n = running * min(R, p_n); H += D_n;
      R -= D_n; out += D_n x_n; and after the loop out += R x_last, where x_last is the
      state at the step the loop stopped.
    - **[LEAK] the loop stops early as soon as every position of the whole batch has
      halted**, so x_last, and through R the output of any position that halted with
      R > 0 (H in [threshold, 1)), depends on later tokens and on other batch rows.
      Declared non-causal. (On the meta device the loop takes the full max_steps path.)
    - no ponder loss exists: the ``ponder`` port gives the published statistic, the mean
      number of updates N (running steps), detached; 1 in training.

    Incremental decoding: ``fixed`` is per token (``decode: stateless``): a token decoded
    alone runs the same steps as in the full forward. ``faithful`` cannot decode
    incrementally (``decode: none``): its loop stops when every position of the chunk has
    halted, so a position's output depends on the other tokens run with it, and a token
    decoded alone gets a different output; generation recomputes the full context.
    """

    def __init__(
        self, *, embed_dim: int, hidden_dim: int, max_steps: int, threshold: float, mode: str
    ) -> None:
        super().__init__()
        self.max_steps, self.threshold, self.mode = max_steps, threshold, mode
        self.block = ResidualMLPBlock(embed_dim=embed_dim, hidden_dim=hidden_dim)
        quarter = max(1, embed_dim // 4)
        self.halt = nn.Sequential(nn.Linear(embed_dim, quarter), nn.ReLU(), nn.Linear(quarter, 1))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.mode == "fixed":
            return self._graves(x)
        if self.training:
            return self.block(x), x.new_ones(())
        return self._published(x)

    def _graves(self, x: Tensor) -> tuple[Tensor, Tensor]:
        cum = x.new_zeros(*x.shape[:-1], 1)  # (B, T, 1): p summed over steps before halting
        running = torch.ones_like(cum, dtype=torch.bool)
        steps = x.new_zeros(cum.shape)  # N(t), filled at the halting step
        rem = x.new_zeros(cum.shape)  # R(t), filled at the halting step
        out = torch.zeros_like(x)
        for n in range(1, self.max_steps + 1):
            x = self.block(x)
            p = torch.sigmoid(self.halt(x))  # (B, T, 1)
            last = n == self.max_steps
            halts = running if last else running & (cum + p >= self.threshold)
            w = torch.where(halts, 1 - cum, torch.where(running, p, 0.0))  # (B, T, 1)
            out = out + w * x
            rem = torch.where(halts, 1 - cum, rem)
            steps = torch.where(halts, float(n), steps)
            cum = torch.where(running & ~halts, cum + p, cum)
            running = running & ~halts
            if not last and not x.is_meta and not bool(running.any()):
                break  # every position has halted; later steps would add nothing
        return out, (steps + rem).mean()

    def _published(self, x: Tensor) -> tuple[Tensor, Tensor]:
        H = x.new_zeros(*x.shape[:-1], 1)  # (B, T, 1): accumulated halting probability
        R = torch.ones_like(H)  # remainders
        n_updates = torch.zeros_like(H)
        out = torch.zeros_like(x)
        for _ in range(self.max_steps):
            x = self.block(x)
            p = torch.sigmoid(self.halt(x))  # (B, T, 1)
            running = (H < self.threshold).to(x.dtype)
            delta = running * torch.minimum(R, p)
            H = H + delta
            R = R - delta
            n_updates = n_updates + running
            out = out + delta * x
            if not x.is_meta and bool((H >= self.threshold).all()):
                break  # the published global early exit: the leak described above
        out = out + R * x
        return out, n_updates.mean().detach()


class ACTParams(ComponentParams):
    mode: Literal["faithful", "fixed"] = Field(
        "fixed",
        description="fixed: trained Graves ACT with a ponder cost; faithful: Brain-GPT V2's "
        "inference-only halting with its global early exit (leaks)",
    )
    max_steps: int = Field(4, gt=0, description="most repeats of the shared block")
    threshold: float = Field(
        0.99, gt=0.0, le=1.0, description="halt once the summed halting probability reaches this (1 - eps)"
    )
    hidden_dim: int | None = Field(None, gt=0, description="hidden width of the repeated MLP block; None: 4 * embed_dim")


@register(
    "adaptive.act",
    params=ACTParams,
    outputs=("out", "ponder"),
    causal=lambda p: p.mode == "fixed",
    decode=lambda p: "stateless" if p.mode == "fixed" else "none",
    flags=("leaks-future (faithful: global early exit)", "untrained halting (faithful)"),
    examples=[
        Example({"hidden_dim": 32}, {"x": (2, 8, 16)}),
        Example({"hidden_dim": 32, "max_steps": 3, "threshold": 0.9}, {"x": (2, 5, 16)}),
        Example(
            {"mode": "faithful", "hidden_dim": 32, "threshold": 0.5},
            {"x": (1, 6, 16)},
            no_grad=("halt.*",),
            no_grad_why="faithful: in training the block runs once and the halting MLP is unused",
        ),
    ],
)
def build_act(p: ACTParams, ins: Inputs) -> ACT:
    D = ins["x"].dim
    return ACT(
        embed_dim=D,
        hidden_dim=p.hidden_dim or 4 * D,
        max_steps=p.max_steps,
        threshold=p.threshold,
        mode=p.mode,
    )
