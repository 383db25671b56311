"""The speedrun's training recipe as pure pieces, each usable by any blueprint's model.

    groups = select_groups(model, SPEEDRUN_GROUPS)             # parameters by name pattern
    apply_init_rules(model, SPEEDRUN_INIT)                     # weights by name pattern
    opts = make_optimizers(groups)                             # one Muon and one AdamW
    for opt in opts:                                           # each step
        for g in opt.param_groups:
            g["lr"] = wsd_lr(step, lr=g["initial_lr"], steps=3250, decay_frac=0.7)

Patterns are the blueprint's globs over dotted names (``*`` one segment, ``**`` any number,
``{a,b}`` alternatives), matched against ``named_parameters()`` names; a rule may also ask for
matrices (ndim >= 2) or vectors (ndim < 2) only. The first rule that matches a parameter takes
it, and a parameter no rule matches is an error naming it.

These pieces are not wired to ``train:`` yet: ``physlm-graph train`` still builds its own AdamW
and schedule (``runtime/optim.py``). ``docs/speedrun.md`` says what remains.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from physlm_graph._resolve import glob_to_regex

__all__ = ["GroupRule", "InitRule", "SPEEDRUN_GROUPS", "SPEEDRUN_INIT", "select_groups", "wsd_lr",
           "apply_init_rules", "make_optimizers", "describe_optimizers", "MUON_NS_SIMPLE"]

Shape = Literal["any", "matrix", "vector"]

# The Newton-Schulz iteration of the speedrun's simple baseline: X <- a X + (b A + c A^2) X with
# A = X X^T, (a, b, c) = (2, -1.5, 0.5), 12 steps, in bf16 (torch's default is a tuned quintic, 5 steps).
MUON_NS_SIMPLE = {"ns_coefficients": (2.0, -1.5, 0.5), "ns_steps": 12}


def _fits(shape: Shape, p: torch.Tensor) -> bool:
    return shape == "any" or (p.ndim >= 2) == (shape == "matrix")


@dataclass(frozen=True)
class GroupRule:
    """Parameters whose names match one of ``patterns`` (and ``shape``) form the group ``name``,
    trained by ``optimizer`` with ``settings`` (``lr``, ``weight_decay``, ``betas``, ``eps``, ...)."""

    name: str
    patterns: tuple[str, ...]
    optimizer: Literal["muon", "adamw"]
    settings: dict[str, Any] = field(default_factory=dict)
    shape: Shape = "any"


@dataclass(frozen=True)
class InitRule:
    """Parameters matching ``patterns`` (and ``shape``) start as ``init``: ``zeros``, ``ones``,
    ``normal`` (N(0, std^2)) or ``fan_in`` (N(0, scale / fan_in), fan_in the last dimension)."""

    patterns: tuple[str, ...]
    init: Literal["zeros", "ones", "normal", "fan_in"]
    std: float = 1.0
    scale: float = 1.0
    shape: Shape = "any"


_ADAMW = {"betas": (0.8, 0.95), "eps": 1e-10, "weight_decay": 0.001}

# The optimization track's tuned settings (issue 26) for blueprints/speedrun-track3.yaml's names.
SPEEDRUN_GROUPS = (
    GroupRule("blocks", ("trunk.**",), "muon", {"lr": 0.025, "weight_decay": 0.05}, shape="matrix"),
    GroupRule("embed", ("tok.weight",), "adamw", {**_ADAMW, "lr": 0.7}),
    GroupRule("head", ("head.weight",), "adamw", {**_ADAMW, "lr": 0.004}),
    GroupRule("vectors", ("**",), "adamw", {**_ADAMW, "lr": 0.015}, shape="vector"),
)

# The program zeroes every weight named *proj*: the blocks' output projections and its head (named proj).
SPEEDRUN_INIT = (
    InitRule(("trunk.*.attn.proj.weight", "trunk.*.mlp.proj.weight", "head.weight"), "zeros"),
    InitRule(("tok.weight",), "normal", std=1.0),
    InitRule(("**.bias",), "zeros"),
    InitRule(("**",), "ones", shape="vector"),  # the norms' gains
    InitRule(("**",), "fan_in", scale=0.33, shape="matrix"),
)


def _first_match(name: str, p: torch.Tensor, rules: tuple[Any, ...] | list[Any]) -> Any | None:
    for rule in rules:
        if _fits(rule.shape, p) and any(glob_to_regex(pat).match(name) for pat in rule.patterns):
            return rule
    return None


def _unmatched(names: list[str], what: str) -> ValueError:
    shown = ", ".join(names[:5]) + (f", ... ({len(names)} in all)" if len(names) > 5 else "")
    return ValueError(f"no {what} rule matches parameter(s) {shown}; add a rule (a last pattern '**' takes the rest)")


def select_groups(model: nn.Module, rules: tuple[GroupRule, ...] | list[GroupRule]) -> list[dict[str, Any]]:
    """One optimizer group per rule that took a parameter, in rule order: ``{"group": name,
    "optimizer": ..., "params": [...], "names": [...], **settings}``. Tied parameters count once."""
    taken: dict[str, list[tuple[str, nn.Parameter]]] = {r.name: [] for r in rules}
    missing = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        rule = _first_match(name, p, rules)
        if rule is None:
            missing.append(name)
        else:
            taken[rule.name].append((name, p))
    if missing:
        raise _unmatched(missing, "optimizer group")
    return [{"group": r.name, "optimizer": r.optimizer, "params": [p for _, p in taken[r.name]],
             "names": [n for n, _ in taken[r.name]], **r.settings} for r in rules if taken[r.name]]


def wsd_lr(step: int, *, lr: float, steps: int, warmup: int = 0, decay_frac: float = 0.7, min_lr: float = 0.0) -> float:
    """Warmup-stable-decay learning rate for optimizer step ``step`` (0-based) of ``steps``.

    Linear warmup ``lr * (step + 1) / (warmup + 1)`` for ``step < warmup`` (as ``lr_at``); then ``lr``
    while ``step / steps < 1 - decay_frac``; then a linear decay
    ``min_lr + (lr - min_lr) * (1 - step / steps) / decay_frac``, which reaches ``min_lr`` at
    ``step = steps``. With warmup 0, decay_frac 0.7 and min_lr 0 this is the speedrun's
    stable-then-decay schedule; decay_frac 0 is a constant lr after warmup.
    """
    if step < warmup:
        return lr * (step + 1) / (warmup + 1)
    progress = step / steps
    if decay_frac <= 0.0 or progress < 1.0 - decay_frac:
        return lr
    return min_lr + (lr - min_lr) * max(0.0, 1.0 - progress) / decay_frac


@torch.no_grad()
def apply_init_rules(model: nn.Module, rules: tuple[InitRule, ...] | list[InitRule], *, seed: int | None = None) -> None:
    """Initialise every parameter of ``model`` by the first rule matching it (all must match).

    Random values are drawn in float32 (a bf16 table gets the rounded float32 draw), from the
    global generator or from ``seed``."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    plan = [(name, p, _first_match(name, p, rules)) for name, p in model.named_parameters()]
    missing = [name for name, _, rule in plan if rule is None]
    if missing:
        raise _unmatched(missing, "init")
    for _, p, rule in plan:
        if p.is_meta:
            continue
        if rule.init in ("zeros", "ones"):
            p.fill_(0.0 if rule.init == "zeros" else 1.0)
            continue
        std = rule.std if rule.init == "normal" else math.sqrt(rule.scale / p.shape[-1])
        draw = torch.empty(p.shape, dtype=torch.float32).normal_(0.0, std, generator=gen)
        p.copy_(draw)


def make_optimizers(groups: list[dict[str, Any]], *, muon: dict[str, Any] | None = None) -> list[torch.optim.Optimizer]:
    """``torch.optim.Muon`` over the ``muon`` groups (``muon`` settings: by default the simple
    baseline's Newton-Schulz, momentum 0.95, Nesterov, the update scaled by sqrt(max(1, rows/cols)))
    and ``torch.optim.AdamW`` over the ``adamw`` groups (fused on CUDA). Each group keeps its
    ``group`` name, ``names`` and ``initial_lr`` (the schedule scales it)."""
    if not hasattr(torch.optim, "Muon"):
        raise RuntimeError(f"torch {torch.__version__} has no torch.optim.Muon (torch 2.9 and later have it)")
    out: list[torch.optim.Optimizer] = []
    by_kind: dict[str, list[dict[str, Any]]] = {"muon": [], "adamw": []}
    for g in groups:
        if g["optimizer"] == "muon":
            flat = [n for n, p in zip(g["names"], g["params"]) if p.ndim != 2]
            if flat:
                raise ValueError(f"Muon takes 2-D matrices only; group {g['group']!r} holds {', '.join(flat[:5])}")
        by_kind[g["optimizer"]].append({k: v for k, v in g.items() if k != "optimizer"} | {"initial_lr": g["lr"]})
    if by_kind["muon"]:
        kw = {"momentum": 0.95, "nesterov": True, "adjust_lr_fn": "original", **MUON_NS_SIMPLE, **(muon or {})}
        out.append(torch.optim.Muon(by_kind["muon"], **kw))
    if by_kind["adamw"]:
        on_cuda = any(p.is_cuda for g in by_kind["adamw"] for p in g["params"])
        out.append(torch.optim.AdamW(by_kind["adamw"], **({"fused": True} if on_cuda else {})))
    return out


def describe_optimizers(optimizers: list[torch.optim.Optimizer]) -> list[str]:
    """One line per group: its name, optimizer, lr, weight decay, tensors and parameters."""
    lines = []
    for opt in optimizers:
        for g in opt.param_groups:
            n = sum(p.numel() for p in g["params"])
            lines.append(f"{g['group']}: {type(opt).__name__} lr {g['initial_lr']:g}, weight decay "
                         f"{g['weight_decay']:g}, {len(g['params'])} tensors, {n:,} parameters")
    return lines
