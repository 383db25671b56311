"""Developmental growth: train a small model, grow the blueprint, keep what it learned.

    g = grow(cm, stage=1)          # cm compiled with stage=0; g.model is stage 1 with cm's weights
    g.names["trunk.3.attn.qkv.weight"]  # -> "trunk.1.attn.qkv.weight" (where: start, 2 -> 4 layers)

A blueprint's ``growth:`` list holds stages; stage N sets ``growth[N].params`` over ``params``
and lasts ``until`` a training step (or ``until_tokens``); the last stage has no bound. Entering
stage N+1 builds the new stage's model, copies every surviving tensor by its (renamed) path,
and lets the stage's ``grow`` operator place and initialise the new block instances. The
operators (zero_init, mask, stack, interpolate) are registered in
``physlm_graph._growth_ops.GROWTH_OPS`` with the model transformations they use.

Only depth grows (the repeat count of block nodes); a stage that changes the shape of a
surviving tensor (width, heads, context, vocabulary) is refused with a located error.

The trainer's growth part (``runtime/growth_part.py``) calls ``grow`` when a stage boundary
passes and carries the optimizer state over with ``carry_optimizer_state``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from physlm_graph._growth_ops import (
    MASK_BUFFER,
    GrowthError,
    depth_plan,
    growth_op,
    mask_residuals,
    residual_adds,
    set_mask,
    unmask_residuals,
    zero_output_projections,
)

__all__ = [
    "GrowthError",
    "Growth",
    "grow",
    "stage_at",
    "describe_stage",
    "depth_plan",
    "residual_adds",
    "zero_output_projections",
    "mask_residuals",
    "set_mask",
    "unmask_residuals",
    "carry_optimizer_state",
    "MASK_BUFFER",
]


# ---------------------------------------------------------------- the schedule


def _stages(cm: Any) -> list[Any]:
    return list(cm.resolved.spec.growth)


def _raw_stage(cm: Any, i: int) -> dict[str, Any]:
    raw = (cm.blueprint.get("growth") or [])[i]
    return raw if isinstance(raw, dict) else {}


def _loc(cm: Any, *path: Any) -> Any:
    return cm.resolved.doc.loc(("growth",) + path)


def stage_at(cm: Any, step: int, tokens: int) -> int:
    """The stage a run is in after ``step`` optimizer steps and ``tokens`` training tokens."""
    stages = _stages(cm)
    for i, st in enumerate(stages[:-1]):
        if st.until is not None and step < st.until:
            return i
        if st.until_tokens is not None and tokens < st.until_tokens:
            return i
    return len(stages) - 1


# ---------------------------------------------------------------- depth plans


# ---------------------------------------------------------------- one growth step


@dataclass
class Growth:
    """One growth step: the new model (weights set), what moved where, what is new."""

    model: Any  # the new stage's CompiledModel
    stage: int
    grow: str
    names: dict[str, str]  # new tensor name -> old tensor name, for every surviving tensor
    copied: dict[str, str]  # new tensor name -> old source tensor name (stack, interpolate)
    new_instances: list[str]
    renamed: dict[str, str]  # old instance path -> new instance path (only those that moved)
    prepared: list[str] = field(default_factory=list)  # what the operator changed: zeroed tensors, masked adds

    def record(self) -> dict[str, Any]:
        return {"stage": self.stage, "grow": self.grow, "new_instances": self.new_instances, "renamed": self.renamed,
                "params": self.model.num_params, "hash": self.model.hash}


def _prefix_map(cm: Any, new_cm: Any, stage: int, st: Any) -> tuple[dict[str, str], dict[str, str | None]]:
    """Old instance -> new instance, and new instance -> source old instance (None: fresh)."""
    old_inst, new_inst = cm.resolved.instances, new_cm.resolved.instances
    moves: dict[str, str] = {}
    fresh: dict[str, str | None] = {}
    for block, paths in new_inst.items():
        before = old_inst.get(block, [])
        n, m = len(before), len(paths)
        if m < n:
            raise GrowthError(f"growth stage {stage} shrinks {block!r} from {n} to {m} instances; growth only adds",
                              loc=_loc(cm, stage, "params"), fix="stages must not lower a repeat count")
        if m == n:
            continue
        old_to_new, new_src = depth_plan(n, m, st.grow, st.where)
        for i, j in old_to_new.items():
            moves[f"{block}.{i}"] = f"{block}.{j}"
        for j, s in new_src.items():
            fresh[f"{block}.{j}"] = None if s is None else f"{block}.{s}"
    return moves, fresh


def _rename(name: str, moves: dict[str, str]) -> str:
    parts = name.split(".")
    for k in range(len(parts) - 1, 0, -1):
        head = ".".join(parts[:k])
        if head in moves:
            return ".".join([moves[head]] + parts[k:])
    return name


def _under(name: str, prefixes: dict[str, Any]) -> str | None:
    parts = name.split(".")
    for k in range(len(parts) - 1, 0, -1):
        if ".".join(parts[:k]) in prefixes:
            return ".".join(parts[:k])
    return None


def grow(cm: Any, stage: int, *, seed: int = 0,
         init_fresh: Callable[[nn.Module, set[str]], Any] | None = None) -> Growth:
    """Grow ``cm`` (compiled at stage ``stage - 1``) into ``stage``: build the new stage from
    ``cm.blueprint``, copy every surviving tensor by its renamed path, initialise the new block
    instances per the stage's operator. ``init_fresh(module, names)`` re-initialises the fresh
    parameters (those of new instances copied from none: ``train.init_rules``) before the operator
    prepares them, so a function-preserving operator still has the last word. The new module is
    on ``cm.module``'s device."""
    from physlm_graph._compile import compile_blueprint

    here = cm.resolved.stage
    if here is None:
        raise GrowthError("the model was compiled without a growth stage", fix="compile it with stage=N")
    if stage != here + 1:
        raise GrowthError(f"growth goes one stage at a time: the model is at stage {here}, asked for {stage}",
                          expected=str(here + 1), got=str(stage))
    st = _stages(cm)[stage]  # the schedule's rules were checked when the blueprint compiled
    with torch.random.fork_rng(devices=[]):  # the build seeds torch; keep the training stream intact
        new_cm = compile_blueprint(cm.blueprint, stage=stage, seed=seed, device="cpu")
    new_cm.resolved.doc = cm.resolved.doc  # positions of the source file for later errors
    moves, fresh = _prefix_map(cm, new_cm, stage, st)
    given = sorted({"grow", "where", "ramp_steps"} & set(_raw_stage(cm, stage)))
    if not fresh and given:
        raise GrowthError(f"growth stage {stage} adds no layers, so `{given[0]}` does not apply",
                          loc=_loc(cm, stage, given[0]), fix=f"drop `{given[0]}`, or raise a repeat count in this stage")
    old_sd, new_sd = cm.module.state_dict(), new_cm.module.state_dict()
    names: dict[str, str] = {}
    copied: dict[str, str] = {}
    inverse = {v: k for k, v in moves.items()}
    for key, t in new_sd.items():
        inst = _under(key, fresh)
        if inst is not None:
            src = fresh[inst]
            if src is not None:
                copied[key] = src + key[len(inst):]
            continue
        old = _rename(key, inverse)
        if old not in old_sd:
            raise GrowthError(f"growth stage {stage} adds {key!r} outside the grown block instances",
                              loc=_loc(cm, stage, "params"), node=key,
                              fix="a stage may only raise repeat counts (and change shape-free params like dropout)")
        names[key] = old
    for key, old in {**names, **copied}.items():
        a, b = old_sd.get(old), new_sd[key]
        if a is None or a.shape != b.shape:
            got = "missing" if a is None else f"{list(a.shape)} -> {list(b.shape)}"
            raise GrowthError(f"growth stage {stage} changes its shape ({got}): `{st.grow}` grows depth only (the repeat "
                              "count of block nodes), not width, heads, context or vocabulary",
                              loc=_loc(cm, stage, "params"), node=key,
                              fix="change only repeat counts (e.g. layers) between stages; set widths in `params`")
    lost = sorted(set(old_sd) - set(names.values()))
    if lost:
        raise GrowthError(f"growth stage {stage} drops {lost[0]}" + (f" and {len(lost) - 1} more" if len(lost) > 1 else ""),
                          loc=_loc(cm, stage, "params"), fix="growth only adds; stages must not remove nodes")
    with torch.no_grad():
        for key, old in {**names, **copied}.items():
            new_sd[key].copy_(old_sd[old])
        if init_fresh is not None:
            fresh_params = {n for n, _ in new_cm.module.named_parameters()
                            if (inst := _under(n, fresh)) is not None and fresh[inst] is None}
            if fresh_params:
                init_fresh(new_cm.module, fresh_params)
    g = Growth(model=new_cm, stage=stage, grow=st.grow, names=names, copied=copied, new_instances=sorted(fresh),
               renamed={k: v for k, v in moves.items() if k != v})
    device = next((t.device for t in cm.module.parameters()), torch.device("cpu"))
    new_cm.module.to(device)
    op = growth_op(st.grow)
    if op.prepare is not None and g.new_instances:
        g.prepared = op.prepare(new_cm, g.new_instances)
    return g


# ---------------------------------------------------------------- the optimizer


def _named(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for g in opt.param_groups:
        names = g.get("names")
        if names is None:
            raise GrowthError("the optimizer's param groups carry no `names`",
                              fix="build it with physlm_graph.runtime.optim.make_optimizer")
        out.update(zip(names, g["params"]))
    return out


def carry_optimizer_state(old: torch.optim.Optimizer, new: torch.optim.Optimizer, names: dict[str, str]) -> list[str]:
    """Copy per-parameter state (exp_avg, exp_avg_sq, step) from ``old`` to ``new`` for every
    surviving parameter (``names``: new name -> old name); new parameters start fresh.
    Returns the names that were carried."""
    old_p, carried = _named(old), []
    for name, p in _named(new).items():
        src = old_p.get(names.get(name, ""))
        if src is None or src not in old.state:
            continue
        new.state[p] = {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in old.state[src].items()}
        carried.append(name)
    return carried


def describe_stage(st: Any) -> str:
    sets = ", ".join(f"{k}={v}" for k, v in st.params.items()) or "base params"
    end = (f"step {st.until}" if st.until is not None else f"{st.until_tokens:,} tokens" if st.until_tokens is not None
           else "the end")
    return f"{sets} until {end}"
