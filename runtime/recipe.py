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

The blueprint's ``train:`` section carries the same pieces: ``train.optimizers`` (groups),
``train.init_rules``, ``schedule: wsd``; ``rules_from_config`` and ``init_rules_from_config`` turn
them into rules, and the trainer builds its optimizers from them (``runtime/step.py``'s ``group_optimizers``). A pattern that
matches no parameter, a parameter two groups claim and a trainable parameter no group takes are
each a ``RecipeError`` naming the parameter and the rule (``runtime/plan.py`` locates it in the file).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from physlm_graph._resolve import glob_to_regex

__all__ = ["GroupRule", "InitRule", "RecipeError", "SPEEDRUN_GROUPS", "SPEEDRUN_INIT", "select_groups", "wsd_lr",
           "lr_factor", "apply_init_rules", "make_optimizers", "describe_optimizers", "OptimizerSet",
           "rules_from_config", "init_rules_from_config", "MUON_NS_SIMPLE", "ADAMW_DEFAULTS", "MUON_DEFAULTS"]

Shape = Literal["any", "matrix", "vector"]

# The Newton-Schulz iteration of the speedrun's simple baseline: X <- a X + (b A + c A^2) X with
# A = X X^T, (a, b, c) = (2, -1.5, 0.5), 12 steps, in bf16 (torch's default is a tuned quintic, 5 steps).
MUON_NS_SIMPLE = {"ns_coefficients": (2.0, -1.5, 0.5), "ns_steps": 12}
# a group's settings left out in ``train.optimizers``
MUON_DEFAULTS = {"momentum": 0.95, "nesterov": True, **MUON_NS_SIMPLE, "split": 1}
ADAMW_DEFAULTS = {"betas": (0.9, 0.95), "eps": 1e-8}


class RecipeError(ValueError):
    """A rule that cannot apply to the model: ``rule`` is its index in the list (None: the list
    as a whole), ``key`` the rule's key at fault, ``fix`` what to do."""

    def __init__(self, message: str, *, rule: int | None = None, key: str = "params", fix: str | None = None) -> None:
        super().__init__(message)
        self.rule, self.key, self.fix = rule, key, fix


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

# The optimization track's tuned settings (issue 26) for blueprints/speedrun-track3.yaml's names
# (the file's train.optimizers says the same). The fused q, k, v projection is split in three so
# Muon updates it as the program's three separate projections.
SPEEDRUN_GROUPS = (
    GroupRule("qkv", ("trunk.*.attn.qkv.weight",), "muon", {"lr": 0.025, "weight_decay": 0.05, "split": 3}),
    GroupRule("blocks", ("trunk.*.attn.proj.weight", "trunk.*.mlp.*.weight"), "muon",
              {"lr": 0.025, "weight_decay": 0.05}, shape="matrix"),
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


def _matches(rule: Any, name: str, p: torch.Tensor) -> bool:
    return _fits(rule.shape, p) and any(glob_to_regex(pat).match(name) for pat in rule.patterns)


def _near(patterns: tuple[str, ...], names: list[str]) -> str:
    """``did you mean ...?`` for patterns that match no parameter: the closest names, numbers as ``*``."""
    import re

    shapes = list(dict.fromkeys(re.sub(r"\.\d+(?=\.|$)", ".*", n) for n in names))
    near = list(dict.fromkeys(n for pat in patterns for n in difflib.get_close_matches(pat, shapes, n=2, cutoff=0.5)))
    if near:
        return "did you mean " + ", ".join(repr(n) for n in near) + "?"
    return "the parameters are named like " + ", ".join(repr(n) for n in shapes[:4])


def _listed(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f", ... ({len(names)} in all)" if len(names) > 5 else "")


def _check_rules_take(rules: tuple[Any, ...] | list[Any], taken: list[list[str]], params: list[tuple[str, torch.Tensor]],
                      what: str) -> None:
    """A rule that takes no parameter is an error: its patterns match no name, or the shape filter
    (or, for init, earlier rules) leaves nothing."""
    names = [n for n, _ in params]
    for i, (rule, got) in enumerate(zip(rules, taken)):
        if got:
            continue
        by_name = [n for n, _ in params if any(glob_to_regex(pat).match(n) for pat in rule.patterns)]
        label = f"{what} {getattr(rule, 'name', i)!r}" if hasattr(rule, "name") else f"{what} {i}"
        if not by_name:
            raise RecipeError(f"{label}: params {list(rule.patterns)} match no parameter", rule=i,
                              fix=_near(rule.patterns, names))
        if rule.shape != "any" and not any(_fits(rule.shape, p) for n, p in params if n in by_name):
            raise RecipeError(f"{label}: params {list(rule.patterns)} match {_listed(by_name)}, but no {rule.shape}",
                              rule=i, key="shape", fix="drop `shape`, or change the patterns")
        raise RecipeError(f"{label} takes no parameter: earlier rules took {_listed(by_name)}", rule=i,
                          fix="remove the rule, or put it before the rules that take its parameters")


def select_groups(model: nn.Module, rules: tuple[GroupRule, ...] | list[GroupRule]) -> list[dict[str, Any]]:
    """One optimizer group per rule, in rule order: ``{"group": name, "optimizer": ..., "params": [...],
    "names": [...], **settings}``. Every trainable parameter must match exactly one rule; a rule
    that matches none is an error too. Tied parameters count once."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    taken: list[list[str]] = [[] for _ in rules]
    missing = []
    for name, p in params:
        hits = [i for i, rule in enumerate(rules) if _matches(rule, name, p)]
        if not hits:
            missing.append(name)
        elif len(hits) > 1:
            both = " and ".join(repr(rules[i].name) for i in hits)
            raise RecipeError(f"parameter {name} is in two optimizer groups: {both}", rule=hits[1],
                              fix="narrow the patterns (or `shape`) so each parameter is in one group")
        else:
            taken[hits[0]].append(name)
    _check_rules_take(rules, taken, params, "optimizer group")
    if missing:
        raise RecipeError(f"no optimizer group takes parameter(s) {_listed(missing)}",
                          fix="add a group for them (a last group with params ['**'] takes the rest)")
    by_name = dict(params)
    groups = []
    for index, (rule, names) in enumerate(zip(rules, taken)):
        if rule.optimizer == "muon":
            k = int(rule.settings.get("split", 1))
            bad = [n for n in names if by_name[n].ndim != 2 or by_name[n].shape[0] % k]
            if bad:
                shapes = ", ".join(f"{n} {tuple(by_name[n].shape)}" for n in bad[:5]) + (
                    f", ... ({len(bad)} in all)" if len(bad) > 5 else "")
                need = "2-D matrices" + (f" whose rows split into {k} equal blocks" if k > 1 else "")
                raise RecipeError(f"optimizer group {rule.name!r}: Muon takes {need}; it holds {shapes}",
                                  rule=index, key="shape" if k == 1 else "split",
                                  fix="add `shape: matrix`, or give these parameters an adamw group")
        groups.append({"group": rule.name, "optimizer": rule.optimizer, "params": [by_name[n] for n in names],
                       "names": names, **rule.settings})
    return groups


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


def lr_factor(step: int, *, schedule: str, steps: int, warmup: int, decay_frac: float | None) -> float:
    """The factor on each group's own lr at ``step`` when ``train.optimizers`` sets the groups: the
    schedule run at peak 1 down to its default floor (0.1 for cosine and linear, 0 for wsd)."""
    from .optim import lr_at

    if schedule == "wsd":
        return wsd_lr(step, lr=1.0, steps=steps, warmup=warmup, decay_frac=0.7 if decay_frac is None else decay_frac)
    return lr_at(step, lr=1.0, min_lr=None, warmup=warmup, steps=steps, schedule=schedule)  # type: ignore[arg-type]


@torch.no_grad()
def apply_init_rules(model: nn.Module, rules: tuple[InitRule, ...] | list[InitRule], *, seed: int | None = None,
                     complete: bool = True, only: set[str] | None = None) -> list[str]:
    """Initialise the parameters of ``model`` by the first rule matching each; a rule that takes
    no parameter is an error, and so is a parameter no rule takes when ``complete`` (else it keeps
    its init). Returns the names no rule took. With ``only`` the rules are matched against every
    parameter but only the named ones are drawn (the fresh layers of a grown model).

    Random values are drawn in float32 (a bf16 table gets the rounded float32 draw), in parameter
    order, from the global generator or from ``seed``."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    params = list(model.named_parameters())
    plan = [(name, p, next((i for i, r in enumerate(rules) if _matches(r, name, p)), None)) for name, p in params]
    missing = [name for name, _, i in plan if i is None]
    if missing and complete:
        raise RecipeError(f"no init rule takes parameter(s) {_listed(missing)}",
                          fix="add a rule for them (a last rule with params ['**'] takes the rest)")
    _check_rules_take(rules, [[n for n, _, i in plan if i == k] for k in range(len(rules))], params, "init rule")
    for name, p, i in plan:
        if i is None or p.is_meta or (only is not None and name not in only):
            continue
        rule = rules[i]
        if rule.init in ("zeros", "ones"):
            p.fill_(0.0 if rule.init == "zeros" else 1.0)
            continue
        std = rule.std if rule.init == "normal" else math.sqrt(rule.scale / p.shape[-1])
        draw = torch.empty(p.shape, dtype=torch.float32).normal_(0.0, std, generator=gen)
        p.copy_(draw)
    return missing


def init_rule_takes(model: nn.Module, rules: tuple[InitRule, ...] | list[InitRule]) -> list[list[str]]:
    """The parameter names each init rule takes (the first rule matching a parameter takes it)."""
    taken: list[list[str]] = [[] for _ in rules]
    for name, p in model.named_parameters():
        i = next((i for i, r in enumerate(rules) if _matches(r, name, p)), None)
        if i is not None:
            taken[i].append(name)
    return taken


def rules_from_config(groups: list[Any]) -> list[GroupRule]:
    """``train.optimizers`` (``OptimizerGroupDoc`` items) as rules, each setting filled in."""
    out = []
    for g in groups:
        keys = MUON_DEFAULTS if g.optimizer == "muon" else ADAMW_DEFAULTS
        settings = {"lr": g.lr, "weight_decay": g.weight_decay}
        settings |= {k: (getattr(g, k) if getattr(g, k) is not None else v) for k, v in keys.items()}
        out.append(GroupRule(g.name, tuple(g.params), g.optimizer, settings, shape=g.shape))
    return out


def init_rules_from_config(rules: list[Any]) -> list[InitRule]:
    """``train.init_rules`` (``InitRuleDoc`` items) as rules."""
    return [InitRule(tuple(r.params), r.init, std=1.0 if r.std is None else r.std,
                     scale=1.0 if r.scale is None else r.scale, shape=r.shape) for r in rules]


def make_optimizers(groups: list[dict[str, Any]], *, muon: dict[str, Any] | None = None) -> list[torch.optim.Optimizer]:
    """The optimizers over ``select_groups``'s groups: ``torch.optim.Muon`` over the Muon groups
    (``muon`` settings over each group's; by default the simple baseline's Newton-Schulz, momentum
    0.95, Nesterov, the update scaled by sqrt(max(1, rows/cols)), decoupled weight decay), our own
    ``runtime/muon.py`` for groups that split their matrices or where torch has no Muon, and one
    ``torch.optim.AdamW`` over the AdamW groups (fused on CUDA). Each group keeps its ``group``
    name, ``names`` and ``initial_lr`` (the schedule scales it)."""
    from .muon import Muon

    torch_muon, own_muon, adamw = [], [], []
    for g in groups:
        kind = g["optimizer"]
        g = {k: v for k, v in g.items() if k != "optimizer"} | {"initial_lr": g["lr"]}
        if kind == "adamw":
            adamw.append(g)
            continue
        g = {**MUON_DEFAULTS, **g, **(muon or {})}
        flat = [n for n, p in zip(g["names"], g["params"]) if p.ndim != 2]
        if flat:
            raise RecipeError(f"Muon takes 2-D matrices only; group {g['group']!r} holds {', '.join(flat[:5])}")
        split = g.pop("split")
        if split == 1 and hasattr(torch.optim, "Muon"):
            torch_muon.append(g | {"adjust_lr_fn": "original"})
        else:
            own_muon.append(g | {"split": split})
    out: list[torch.optim.Optimizer] = []
    if torch_muon:
        out.append(torch.optim.Muon(torch_muon))
    if own_muon:
        out.append(Muon(own_muon))
    if adamw:
        on_cuda = any(p.is_cuda for g in adamw for p in g["params"])
        out.append(torch.optim.AdamW(adamw, **({"fused": True} if on_cuda else {})))
    return out


def describe_optimizers(optimizers: Any) -> list[str]:
    """One line per group: its name, optimizer, lr, weight decay, tensors and parameters."""
    lines = []
    for opt in getattr(optimizers, "optimizers", optimizers):
        kind = f"torch.optim.{type(opt).__name__}" if type(opt).__module__.startswith("torch.") else "runtime.muon.Muon"
        for g in opt.param_groups:
            n = sum(p.numel() for p in g["params"])
            split = f", split {g['split']}" if g.get("split", 1) > 1 else ""
            lines.append(f"{g['group']}: {kind} lr {g['initial_lr']:g}, weight decay {g['weight_decay']:g}{split}, "
                         f"{len(g['params'])} tensors, {n:,} parameters")
    return lines


class _States(MutableMapping):
    """The per-parameter state of several optimizers as one mapping (parameter -> state)."""

    def __init__(self, owner: "OptimizerSet") -> None:
        self.owner = owner

    def _of(self, p: torch.Tensor) -> torch.optim.Optimizer:
        for opt in self.owner.optimizers:
            if any(q is p for g in opt.param_groups for q in g["params"]):
                return opt
        raise KeyError("the parameter is in no optimizer of this set")

    def __getitem__(self, p: torch.Tensor) -> Any:
        for opt in self.owner.optimizers:
            if p in opt.state:
                return opt.state[p]
        raise KeyError(p)

    def __setitem__(self, p: torch.Tensor, value: Any) -> None:
        self._of(p).state[p] = value

    def __delitem__(self, p: torch.Tensor) -> None:
        del self._of(p).state[p]

    def __iter__(self) -> Iterator[torch.Tensor]:
        for opt in self.owner.optimizers:
            yield from opt.state

    def __len__(self) -> int:
        return sum(len(opt.state) for opt in self.owner.optimizers)


class OptimizerSet:
    """Several optimizers driven as one (the trainer's ``optimizer``): ``param_groups`` lists every
    group in order, ``step``/``zero_grad`` reach each, and ``state_dict`` numbers the parameters
    across all of them, so a checkpoint saves and restores every optimizer's state by name.
    ``found_inf`` and ``grad_scale`` (the fused AdamW's hooks) are handed to the fused optimizers
    only; the others step regardless (``runtime/step.py``'s ``deferred`` says when that is safe)."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self.optimizers = list(optimizers)
        self.found_inf: torch.Tensor | None = None
        self.grad_scale: torch.Tensor | None = None
        self.state = _States(self)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for opt in self.optimizers:
            if not all(g.get("fused") for g in opt.param_groups):  # found_inf and grad_scale are fused AdamW's
                opt.step()
                continue
            opt.found_inf, opt.grad_scale = self.found_inf, self.grad_scale  # type: ignore[attr-defined]
            try:
                opt.step()
            finally:
                opt.found_inf = opt.grad_scale = None  # type: ignore[attr-defined]

    def state_dict(self) -> dict[str, Any]:
        state: dict[int, Any] = {}
        groups: list[dict[str, Any]] = []
        offset = 0
        for opt in self.optimizers:
            sd = opt.state_dict()
            state.update({offset + i: st for i, st in sd["state"].items()})
            groups += [{**g, "params": [offset + i for i in g["params"]]} for g in sd["param_groups"]]
            offset += sum(len(g["params"]) for g in opt.param_groups)
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        groups = list(sd["param_groups"])
        if len(groups) != len(self.param_groups):
            raise ValueError(f"the state has {len(groups)} param groups, the optimizers {len(self.param_groups)}")
        for saved, now in zip(groups, self.param_groups):
            if saved.get("group") != now.get("group") or set(saved) != set(now):
                raise ValueError(f"group {saved.get('group')!r} was saved with other settings "
                                 f"({', '.join(sorted(set(saved) ^ set(now)))}) than group {now.get('group')!r} has: "
                                 "the optimizers changed")
        offset = 0
        for opt in self.optimizers:
            mine, groups = groups[:len(opt.param_groups)], groups[len(opt.param_groups):]
            n = sum(len(g["params"]) for g in opt.param_groups)
            opt.load_state_dict({
                "state": {i - offset: st for i, st in sd["state"].items() if offset <= i < offset + n},
                "param_groups": [{**g, "params": [i - offset for i in g["params"]]} for g in mine]})
            offset += n
