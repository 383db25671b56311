"""memory.hcw: QLLM's Homomorphic Computational Wrapper, a learned key-value memory read by
every token, with an optional stated write rule for the README's "self-evolving memory"."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from physlm_graph import ComponentParams, Example, Inputs, register


class HCWMemory(nn.Module):
    """QLLM's HomomorphicComputationalWrapper (``sschepis/qllm@6a5cb1a``,
    ``src/model/homomorphic_wrapper.py``): ``x + scale * Adapter(read(x))``.

    Math, per token x (D), memory of M slots::

        q = LN(keyNet(x))              keyNet = Linear(D, D/2) -> LN -> GELU -> Dropout -> Linear(D/2, key_dim)
        a = softmax(q K^T / sqrt(key_dim))      K rows L2-normalised at use, K: (M, key_dim)
        r = a V                                 V: (M, D)
        out = x + scale * Adapter(r)    Adapter = Linear(D, 2D) -> LN -> GELU -> Dropout -> Linear(2D, D)

    K and V are learnable parameters (Kaiming normal). Shapes: x (B, T, D) -> (B, T, D).
    Per-token, so causal; its cost is two (B T, M) matmuls, small for M = 64.

    ``update="none"`` (default) is the published code: the README's "self-evolving memory"
    (``update_memory``) is never called there [README!=code], so the memory is static and
    learned by gradient only.

    ``update="ema"`` implements the README's promise with a stated write rule. The values used
    are ``V + S`` where S (``memory_state``, M x D) is a persistent buffer, so a checkpoint keeps
    what was written. In every training-mode forward, under no_grad, *after* the read::

        mass_m = sum_{b,t} a_btm                      read mass of slot m in this batch
        mean_m = sum_{b,t} a_btm x_bt / mass_m        the inputs that read slot m
        w_m    = mass_m / max_m' mass_m'              in [0, 1]: the most-read slot gets 1
        S_m   += eta w_m (mean_m - (V_m + S_m))       i.e. V_m + S_m moves a fraction eta w_m
                                                      toward mean_m (a convex blend)

    The write uses only the current batch's tokens and happens after this forward's output is
    computed, so no token's output depends on a later token of the same forward; across steps
    the state is shared, which is the point. Eval-mode forwards never write, so incremental
    decoding (in eval) is stateless in both modes.
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        memory_size: int = 64,
        memory_key_dim: int = 128,
        dropout: float = 0.1,
        scale: float = 0.1,
        update: Literal["none", "ema"] = "none",
        write_rate: float = 0.01,
    ) -> None:
        super().__init__()
        D = embed_dim
        self.scale = scale
        self.update = update
        self.write_rate = write_rate
        self.key_net = nn.Sequential(
            nn.Linear(D, D // 2),
            nn.LayerNorm(D // 2),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(D // 2, memory_key_dim),
        )
        self.key_norm = nn.LayerNorm(memory_key_dim)
        self.memory_keys = nn.Parameter(torch.empty(memory_size, memory_key_dim))
        self.memory_values = nn.Parameter(torch.empty(memory_size, D))
        nn.init.kaiming_normal_(self.memory_keys)
        nn.init.kaiming_normal_(self.memory_values)
        self.adapter = nn.Sequential(
            nn.Linear(D, 2 * D), nn.LayerNorm(2 * D), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * D, D)
        )
        if update == "ema":
            self.register_buffer("memory_state", torch.zeros(memory_size, D))

    def values(self) -> Tensor:
        if self.update == "ema":
            return self.memory_values + self.memory_state  # (M, D)
        return self.memory_values

    def forward(self, x: Tensor) -> Tensor:
        q = self.key_norm(self.key_net(x))  # (B, T, kd)
        keys = F.normalize(self.memory_keys, dim=-1)  # (M, kd)
        a = torch.softmax(q @ keys.T / math.sqrt(keys.shape[-1]), dim=-1)  # (B, T, M)
        v = self.values()
        out = x + self.scale * self.adapter(a @ v)  # (B, T, D)
        if self.update == "ema" and self.training and not x.is_meta:
            self.write(x.detach(), a.detach(), v.detach())
        return out

    @torch.no_grad()
    def write(self, x: Tensor, a: Tensor, v: Tensor) -> None:
        a = a.flatten(0, -2).float()  # (N, M)
        x = x.flatten(0, -2).float()  # (N, D)
        mass = a.sum(0)  # (M,)
        mean = (a.T @ x) / mass.clamp_min(1e-12)[:, None]  # (M, D)
        w = mass / mass.max().clamp_min(1e-12)  # (M,)
        step = self.write_rate * w[:, None] * (mean - v.float())  # (M, D)
        # in place is safe: autograd saved V + S (a new tensor), never S itself
        self.memory_state.add_(step.to(self.memory_state.dtype))


class HCWParams(ComponentParams):
    memory_size: int = Field(
        64, gt=0, description="number of memory slots M (1000 in src/config.py, 64 in the utils config)"
    )
    memory_key_dim: int = Field(128, gt=0, description="width of the memory keys")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="dropout inside keyNet and the adapter")
    scale: float = Field(0.1, description="factor on the adapter output (the published delta_factor)")
    update: Literal["none", "ema"] = Field(
        "none", description="none: static learned memory (published); ema: training forwards write the state"
    )
    write_rate: float = Field(0.01, gt=0.0, le=1.0, description="eta of the ema write (only with update: ema)")

    @model_validator(mode="after")
    def _write_rate_needs_ema(self) -> HCWParams:
        if self.update == "none" and "write_rate" in self.model_fields_set:
            raise ValueError("write_rate has no effect with update: none; set update: ema or drop write_rate")
        return self


@register(
    "memory.hcw",
    params=HCWParams,
    decode="stateless",
    flags=("update: ema writes a persistent state in training forwards",),
    examples=[
        Example({"memory_size": 8, "memory_key_dim": 16}, {"x": (2, 8, 32)}),
        Example({"memory_size": 8, "memory_key_dim": 16, "update": "ema", "write_rate": 0.1}, {"x": (2, 8, 32)}),
    ],
)
def build_hcw(p: HCWParams, ins: Inputs) -> HCWMemory:
    return HCWMemory(
        embed_dim=ins["x"].dim,
        memory_size=p.memory_size,
        memory_key_dim=p.memory_key_dim,
        dropout=p.dropout,
        scale=p.scale,
        update=p.update,
        write_rate=p.write_rate,
    )


__all__ = ["HCWMemory", "HCWParams"]
