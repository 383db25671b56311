"""The optimizer and the learning-rate schedule.

    opt = make_optimizer(model, owners=node_components(cm), lr=1e-3, weight_decay=0.1, betas=(0.9, 0.99))
    for g in opt.param_groups: g["lr"] = lr_at(step, lr=1e-3, min_lr=1e-4, warmup=100, steps=5000)

AdamW (Loshchilov & Hutter 2019) with weight decay on matrices only: norms, biases and
embedding tables (token and position) are not decayed. The learning rate is a pure function
of the step, so a resumed run follows the same curve as an uninterrupted one.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import nn

__all__ = ["make_optimizer", "param_groups", "lr_at", "node_components"]

Schedule = Literal["cosine", "constant", "linear"]


def node_components(cm: Any) -> dict[str, str]:
    """Node path -> component name (``trunk.0.attn`` -> ``attention.causal``) of a CompiledModel."""
    return {path: node.use for path, node in cm.resolved.nodes.items()}


def _owner(name: str, owners: dict[str, str]) -> str | None:
    """The component owning parameter ``trunk.0.attn.qkv.weight``: the longest node path prefix."""
    parts = name.split(".")
    for k in range(len(parts) - 1, 0, -1):
        use = owners.get(".".join(parts[:k]))
        if use is not None:
            return use
    return None


def _no_decay(name: str, p: nn.Parameter, module_of: dict[str, nn.Module], owners: dict[str, str]) -> bool:
    if p.ndim < 2:  # norm gains, biases, scalar gates
        return True
    if isinstance(module_of.get(name), nn.Embedding):
        return True
    use = _owner(name, owners)
    return use is not None and use.split(".")[0] == "embed"  # token and position tables


def param_groups(model: nn.Module, *, weight_decay: float, owners: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Two AdamW groups: decayed matrices, and everything else (norms, biases, embeddings).

    Tied parameters appear once (``named_parameters`` de-duplicates), under their first name.
    Each group carries ``names`` so optimizer state can be saved and checked by name.
    """
    owners = owners or {}
    module_of = {f"{mn}.{pn}" if mn else pn: m for mn, m in model.named_modules() for pn, _ in m.named_parameters(recurse=False)}
    decay, keep = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (keep if _no_decay(name, p, module_of, owners) else decay).append((name, p))
    return [
        {"params": [p for _, p in decay], "names": [n for n, _ in decay], "weight_decay": weight_decay},
        {"params": [p for _, p in keep], "names": [n for n, _ in keep], "weight_decay": 0.0},
    ]


def make_optimizer(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    owners: dict[str, str] | None = None,
) -> torch.optim.AdamW:
    """AdamW over ``param_groups``; the fused kernel on CUDA."""
    groups = param_groups(model, weight_decay=weight_decay, owners=owners)
    on_cuda = any(p.is_cuda for g in groups for p in g["params"])
    kw = {"fused": True} if on_cuda else {}
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), **kw)


def lr_at(step: int, *, lr: float, min_lr: float | None, warmup: int, steps: int, schedule: Schedule = "cosine") -> float:
    """Learning rate for optimizer step ``step`` (0-based) of ``steps``.

    Linear warmup ``lr * (step + 1) / (warmup + 1)`` (nanoGPT), then ``constant``, ``linear``
    down to ``min_lr``, or ``cosine`` down to ``min_lr`` at the last step; ``min_lr`` defaults
    to ``lr / 10``.
    """
    floor = lr / 10 if min_lr is None else min_lr
    if step < warmup:
        return lr * (step + 1) / (warmup + 1)
    if schedule == "constant":
        return lr
    span = max(1, steps - warmup)
    frac = min(1.0, (step - warmup) / span)
    if schedule == "linear":
        return lr + (floor - lr) * frac
    return floor + 0.5 * (1.0 + math.cos(math.pi * frac)) * (lr - floor)
