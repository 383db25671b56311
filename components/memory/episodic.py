"""memory.episodic: Brain-Inspired GPT V2's EpisodicMemoryModule, a large key-value store read
with top-k attention and written with a Hebbian blend."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from physlm_graph import ComponentParams, Example, Inputs, decode_context, register


class EpisodicMemory(nn.Module):
    """Brain-Inspired GPT V2's episodic memory (``comsa33/brain-inspired-gpt@2beb863``,
    ``brain_gpt/core/model_brain_v2.py``: ``EpisodicMemoryModule`` plus the model's memory gate).

    Store: keys K and values V, each (M, D) buffers, initialised N(0, 0.02^2).

    Read, per token x (D), then over the sequence::

        q = W_q sg(x)                                   (sg: the query does not train x)
        s = q K^T / sqrt(D);  (s_top, idx) = top_k(s)   (B, T, top_k)
        r = sum_j softmax(s_top)_j V[idx_j]             (B, T, D)
        r = LSTM_2layer(r)                              over time: causal
        out = x + sigmoid(MLP(x)) r                     MLP = Linear(D, D/4) -> ReLU -> Linear(D/4, 1)

    Write (Hebbian), from this forward's input, under no_grad, after the read: ``write_positions``
    random sequence positions (the same ones in every row, all of them when T is shorter, as
    published) give N = B n vectors k' = W_k x, v' = W_v x. Each picks its ``write_slots`` most
    cosine-similar slots (cos(k', K_m)) and blends them toward (k', v') with
    alpha = sg(eta) sigmoid(cos), eta a parameter initialised to ``write_rate``.

    The published write is a Python loop, each blend seeing the previous ones. Here all writes
    are scored against the store as it was before the write and applied at once; when several
    writes j hit one slot m the rule is::

        P_m = prod_j (1 - alpha_j)                      what a sequential loop keeps of the old slot
        slot_m <- P_m slot_m + (1 - P_m) sum_j alpha_j new_j / sum_j alpha_j

    which is the published blend exactly when a slot is hit once, stays a convex blend, and does
    not depend on the order of the writes (alpha is clamped to 1, reached only if eta > 1).

    The original writes from the final hidden state of the whole stack; a component inside a
    graph sees only its input, so this one writes its input x. The published ``age`` buffer
    only serves a write path the model never takes, and is not kept.

    Shapes: x (B, T, D) -> (B, T, D). Causal within a sequence (the read is per-token, the LSTM
    runs forward in time, the write happens after the read); the store is state shared across
    calls, by design. Incremental decoding carries the LSTM state in ``decode_context()``.

    mode ``faithful`` (the published code):
      - the store buffers are non-persistent: a checkpoint does not keep what was written;
      - read and write run only in eval; a training forward is the identity, so none of W_q,
        W_k, W_v, the LSTM, the gate or eta is ever trained, and ``generate`` adds an untrained
        perturbation [flagged];
      - eval forwards write, so repeated calls on the same input give different outputs.

    mode ``fixed`` (what the README promised): the read runs in training too, so W_q, the LSTM
    and the gate learn (W_k, W_v and eta only feed the no-grad write, and get no gradient, as
    published); the store is persistent buffers saved in checkpoints; the write runs in training
    forwards, and in eval only with ``write_in_eval``.
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        memory_size: int = 5000,
        top_k: int = 10,
        write_positions: int = 64,
        write_slots: int = 5,
        write_rate: float = 0.1,
        mode: Literal["faithful", "fixed"] = "fixed",
        write_in_eval: bool = False,
    ) -> None:
        super().__init__()
        D = embed_dim
        self.mode = mode
        self.top_k = top_k
        self.write_positions = write_positions
        self.write_slots = write_slots
        self.write_in_eval = write_in_eval
        persistent = mode == "fixed"
        self.register_buffer("keys", torch.randn(memory_size, D) * 0.02, persistent=persistent)
        self.register_buffer("values", torch.randn(memory_size, D) * 0.02, persistent=persistent)
        self.query = nn.Linear(D, D, bias=False)
        self.key_proj = nn.Linear(D, D, bias=False)
        self.value_proj = nn.Linear(D, D, bias=False)
        self.eta = nn.Parameter(torch.tensor(float(write_rate)))
        self.lstm = nn.LSTM(D, D, num_layers=2, batch_first=True)
        self.gate = nn.Sequential(nn.Linear(D, max(1, D // 4)), nn.ReLU(), nn.Linear(max(1, D // 4), 1), nn.Sigmoid())
        # the published model initialises every Linear N(0, 0.02^2), biases 0 (the LSTM keeps
        # PyTorch's init)
        for m in [self.query, self.key_proj, self.value_proj, self.gate[0], self.gate[2]]:
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def read(self, x: Tensor) -> Tensor:
        q = self.query(x.detach())  # (B, T, D)
        scores = q @ self.keys.T / math.sqrt(x.shape[-1])  # (B, T, M)
        top, idx = scores.topk(self.top_k, dim=-1)  # (B, T, k)
        w = torch.softmax(top, dim=-1)  # (B, T, k)
        r = torch.einsum("btk,btkd->btd", w, self.values[idx])  # (B, T, D)
        ctx = decode_context()
        state = ctx.get(self) if ctx is not None else None
        r, state = self.lstm(r, state)  # (B, T, D)
        if ctx is not None:
            ctx.set(self, state)
        return r

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "faithful" and self.training:
            return x  # published: memory only when not training
        out = x + self.gate(x) * self.read(x)  # (B, T, D)
        writes = not self.training if self.mode == "faithful" else (self.training or self.write_in_eval)
        if writes and self.write_positions > 0 and not x.is_meta:
            self.write(x.detach())
        return out

    @torch.no_grad()
    def write(self, h: Tensor) -> None:
        # In float32 whatever the autocast: the blend accumulates with index_add, which takes
        # one dtype, and a bf16 blend would round small updates of the store away.
        with torch.autocast(h.device.type, enabled=False):
            self._write(h)

    def _write(self, h: Tensor) -> None:
        B, T, D = h.shape
        pos = torch.randperm(T, device=h.device)[: self.write_positions]  # (n,)
        h = h[:, pos].reshape(-1, D).to(self.key_proj.weight.dtype)  # (N, D)
        k_new, v_new = self.key_proj(h).float(), self.value_proj(h).float()  # (N, D)
        cos = F.normalize(k_new, dim=-1) @ F.normalize(self.keys.float(), dim=-1).T  # (N, M)
        sim, slot = cos.topk(self.write_slots, dim=-1)  # (N, s)
        alpha = (self.eta.detach().float() * torch.sigmoid(sim)).clamp(0.0, 1.0).flatten()  # (N s,)
        slot = slot.flatten()  # (N s,)
        row = torch.arange(h.shape[0], device=h.device).repeat_interleave(self.write_slots)  # (N s,)
        M = self.keys.shape[0]
        keep = torch.zeros(M, device=h.device).index_add(0, slot, torch.log1p(-alpha)).exp()  # (M,)
        mass = torch.zeros(M, device=h.device).index_add(0, slot, alpha).clamp_min(1e-12)  # (M,)

        def blend(store: Tensor, new: Tensor) -> Tensor:
            new = (alpha[:, None] * new[row]).float()  # (N s, D)
            target = torch.zeros(store.shape, device=h.device).index_add(0, slot, new) / mass[:, None]
            return (keep[:, None] * store.float() + (1 - keep[:, None]) * target).to(store.dtype)  # (M, D)

        # out of place: this forward's read saved K for backward (fixed mode trains through it)
        self.keys = blend(self.keys, k_new)
        self.values = blend(self.values, v_new)


class EpisodicParams(ComponentParams):
    memory_size: int = Field(5000, gt=0, description="number of memory slots M")
    top_k: int = Field(10, gt=0, description="slots read per token")
    write_positions: int = Field(64, ge=0, description="random sequence positions written per forward (0: no write)")
    write_slots: int = Field(5, gt=0, description="most cosine-similar slots each written vector blends into")
    write_rate: float = Field(0.1, gt=0.0, le=1.0, description="initial eta of the Hebbian blend (never trained)")
    mode: Literal["faithful", "fixed"] = Field(
        "fixed", description="faithful: eval-only, untrained, not checkpointed (published); fixed: trained, saved"
    )
    write_in_eval: bool = Field(False, description="fixed mode: also write in eval forwards")

    @model_validator(mode="after")
    def _check(self) -> EpisodicParams:
        if self.top_k > self.memory_size or self.write_slots > self.memory_size:
            raise ValueError(
                f"top_k ({self.top_k}) and write_slots ({self.write_slots}) must not exceed "
                f"memory_size ({self.memory_size})"
            )
        if self.mode == "faithful" and self.write_in_eval:
            raise ValueError("write_in_eval is for mode: fixed; faithful always writes in eval, never in training")
        return self


@register(
    "memory.episodic",
    params=EpisodicParams,
    decode="cached",
    flags=(
        "faithful: eval-only and never trained; store not saved in checkpoints",
        "store is state shared across calls (written after the read)",
    ),
    examples=[
        Example(
            {"memory_size": 32, "top_k": 4, "write_positions": 4},
            {"x": (2, 8, 16)},
            no_grad=("key_proj.*", "value_proj.*", "eta"),
            no_grad_why="W_k, W_v and eta feed only the no-grad Hebbian write (as published)",
        ),
        # the conformance probes run one module twice and compare; an eval write between the two
        # runs would change the second read, so this example disables the write (tests cover it)
        Example(
            {"memory_size": 32, "top_k": 4, "write_positions": 0, "mode": "faithful"},
            {"x": (2, 8, 16)},
            no_grad=("*",),
            no_grad_why="faithful: a training forward is the identity, nothing is trained (as published)",
        ),
    ],
)
def build_episodic(p: EpisodicParams, ins: Inputs) -> EpisodicMemory:
    return EpisodicMemory(
        embed_dim=ins["x"].dim,
        memory_size=p.memory_size,
        top_k=p.top_k,
        write_positions=p.write_positions,
        write_slots=p.write_slots,
        write_rate=p.write_rate,
        mode=p.mode,
        write_in_eval=p.write_in_eval,
    )


__all__ = ["EpisodicMemory", "EpisodicParams"]
