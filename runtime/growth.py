"""Developmental growth: train a small model, grow the blueprint, keep what it learned.

    g = grow(cm, stage=1)          # cm compiled with stage=0; g.model is stage 1 with cm's weights
    g.names["trunk.3.attn.qkv.weight"]  # -> "trunk.1.attn.qkv.weight" (where: start, 2 -> 4 layers)

A blueprint's ``growth:`` list holds stages; stage N sets ``growth[N].params`` over ``params``
and lasts ``until`` a training step (or ``until_tokens``); the last stage has no bound. Entering
stage N+1 builds the new stage's model, copies every surviving tensor by its (renamed) path,
and initialises the new block instances per the stage's ``grow`` operator:

  zero_init    new instances init normally, then the output projection of every residual
               branch is zeroed: exactly function-preserving for pre-norm residual blocks.
  mask         new instances init normally; each residual branch is multiplied by a scalar
               ``growth_mask`` buffer (0 at growth, ramped to 1 over ``ramp_steps``, then
               removed from the graph): exactly function-preserving at growth (MSG).
  stack        new instances are copies of the trained stack (G_stack): new layer L + j copies
               layer j mod L. Changes the function.
  interpolate  a copy of layer i goes right after layer i. Changes the function.

Only depth grows (the repeat count of block nodes); a stage that changes the shape of a
surviving tensor (width, heads, context, vocabulary) is refused with a located error.

``GrowthTrainer`` is the ``Trainer`` that grows the model in place when a stage boundary
passes, carries AdamW state over by parameter name, re-warms the learning rate, and records
``stage`` and ``growth_history`` in ``trainer_state.json``.
"""

from __future__ import annotations

import json
import math
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from physlm_graph._errors import PhysLMError
from physlm_graph._ir import Ref, Resolved

from .train import Trainer, vocab_overrides

__all__ = [
    "GrowthError",
    "Growth",
    "grow",
    "check_schedule",
    "stage_at",
    "depth_plan",
    "residual_adds",
    "zero_output_projections",
    "mask_residuals",
    "set_mask",
    "unmask_residuals",
    "carry_optimizer_state",
    "GrowthTrainer",
    "trainer_class",
    "MASK_BUFFER",
]

MASK_BUFFER = "growth_mask"
OPERATORS = ("zero_init", "stack", "interpolate", "mask")


class GrowthError(PhysLMError):
    """A growth schedule, or one growth step, cannot be carried out."""

    stage = "growth"


# ---------------------------------------------------------------- the schedule


def _stages(cm: Any) -> list[Any]:
    return list(cm.resolved.spec.growth)


def _raw_stage(cm: Any, i: int) -> dict[str, Any]:
    raw = (cm.blueprint.get("growth") or [])[i]
    return raw if isinstance(raw, dict) else {}


def _loc(cm: Any, *path: Any) -> Any:
    return cm.resolved.doc.loc(("growth",) + path)


def check_schedule(cm: Any) -> None:
    """Every stage but the last has one bound, the last has none, bounds of a kind increase,
    and no stage sets an option its operator would ignore."""
    stages = _stages(cm)
    if not stages:
        raise GrowthError("the blueprint has no `growth` stages", loc=_loc(cm), fix="add `growth:` stages")
    last_steps = last_tokens = 0
    for i, st in enumerate(stages):
        raw = _raw_stage(cm, i)
        bound = st.until if st.until is not None else st.until_tokens
        if i == len(stages) - 1:
            if bound is not None:
                key = "until" if st.until is not None else "until_tokens"
                raise GrowthError(f"the last growth stage ({i}) has `{key}`: it lasts to the end of training",
                                  loc=_loc(cm, i, key), fix=f"drop `{key}` from the last stage")
        elif bound is None:
            raise GrowthError(f"growth stage {i} has no end", loc=_loc(cm, i),
                              fix="give every stage but the last `until: STEP` or `until_tokens: N`")
        if st.until is not None:
            if st.until <= last_steps:
                raise GrowthError(f"growth stage {i} ends at step {st.until}, not after the previous stage's {last_steps}",
                                  loc=_loc(cm, i, "until"), fix="stage bounds must increase")
            last_steps = st.until
        if st.until_tokens is not None:
            if st.until_tokens <= last_tokens:
                raise GrowthError(f"growth stage {i} ends at {st.until_tokens} tokens, not after the previous stage's "
                                  f"{last_tokens}", loc=_loc(cm, i, "until_tokens"), fix="stage bounds must increase")
            last_tokens = st.until_tokens
        if i == 0:
            given = sorted({"grow", "where", "ramp_steps", "rewarmup"} & set(raw))
            if given:
                raise GrowthError(f"growth stage 0 sets `{given[0]}`, but stage 0 is where training starts: nothing grows "
                                  "into it", loc=_loc(cm, 0, given[0]), fix=f"move `{given[0]}` to the stage it grows into")
            continue
        if "ramp_steps" in raw and st.grow != "mask":
            raise GrowthError(f"growth stage {i}: `ramp_steps` is used by `grow: mask` only, this stage grows by {st.grow}",
                              loc=_loc(cm, i, "ramp_steps"), fix="drop `ramp_steps`, or use `grow: mask`")
        if st.grow == "interpolate" and "where" in raw:
            raise GrowthError(f"growth stage {i}: `interpolate` puts each copy right after its source; `where` does not apply",
                              loc=_loc(cm, i, "where"), fix="drop `where`, or use another operator")
        if st.grow == "stack" and st.where != "end":
            raise GrowthError(f"growth stage {i}: `stack` copies the trained stack on top of itself, so `where` must be end",
                              loc=_loc(cm, i, "where"), expected="end", got=repr(st.where),
                              fix="drop `where`, or use zero_init/mask to place new layers elsewhere")


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


def _insert_after(n: int, k: int) -> list[int]:
    """For k new layers spread among n old ones: the old index each goes after (-1: before all)."""
    if n == 0:
        return [-1] * k
    return [math.ceil((j + 1) * n / k) - 1 for j in range(k)]


def depth_plan(n: int, m: int, grow_op: str, where: Any) -> tuple[dict[int, int], dict[int, int | None]]:
    """Old index -> new index for surviving layers, and new index -> source old index (None:
    freshly initialised) for new layers, when a block node grows from n to m instances."""
    k = m - n
    if grow_op == "stack":
        return {i: i for i in range(n)}, {n + j: (j % n if n else None) for j in range(k)}
    if grow_op == "interpolate" or where == "interleave":
        after = _insert_after(n, k)
        order: list[tuple[str, int]] = [("new", j) for j in range(k) if after[j] < 0]
        for i in range(n):
            order.append(("old", i))
            order += [("new", j) for j in range(k) if after[j] == i]
        old = {i: pos for pos, (kind, i) in enumerate(order) if kind == "old"}
        src = None if grow_op != "interpolate" else after
        new = {pos: (src[j] if src is not None and src[j] >= 0 else None) for pos, (kind, j) in enumerate(order) if kind == "new"}
        return old, new
    if where == "end":
        return {i: i for i in range(n)}, {n + j: None for j in range(k)}
    if where == "start":
        return {i: i + k for i in range(n)}, {j: None for j in range(k)}
    positions = sorted(where)
    rest = [p for p in range(m) if p not in set(positions)]
    return {i: p for i, p in enumerate(rest)}, {p: None for p in positions}


def _check_indices(cm: Any, i: int, where: Any, n: int, m: int, block: str) -> None:
    if not isinstance(where, list):
        return
    k = m - n
    bad = [p for p in where if not 0 <= p < m]
    if len(where) != k or len(set(where)) != len(where) or bad:
        why = (f"{bad[0]} is outside 0..{m - 1}" if bad else "indices repeat" if len(set(where)) != len(where)
               else f"{len(where)} given")
        raise GrowthError(f"growth stage {i}: `where` must list the {k} new positions of {block!r} ({n} -> {m} layers): {why}",
                          loc=_loc(cm, i, "where"), expected=f"{k} distinct indices in 0..{m - 1}", got=repr(where))


# ---------------------------------------------------------------- residual branches


def residual_adds(res: Resolved, instance: str) -> list[tuple[str, int, list[int]]]:
    """The residual adds of a block instance: (add path, index of the skip input, indices of
    the branch inputs). The stream starts at the instance's inputs (nodes outside it); an
    ``add`` with exactly one input on the stream continues it. Raises if the instance's output
    is not on the stream (a post-norm block, say), where no branch-zeroing keeps the function."""
    from physlm_graph._validate import topo_order

    inside = {p for p in res.nodes if p.startswith(instance + ".")}
    stream: set[str] = set()
    adds = []
    node = None
    for path in topo_order(res):
        if path not in inside or res.nodes[path].use != "add":
            continue
        node = res.nodes[path]
        on = [j for j, (_, r) in enumerate(node.inputs) if r.node not in inside or r.node in stream]
        if len(on) > 1:
            raise GrowthError(f"{path}: cannot tell the residual stream from the branch (inputs "
                              f"{', '.join(str(r) for _, r in node.inputs)} all carry the stream)",
                              loc=res.doc.loc(node.src), node=path,
                              fix="write the block as x + branch(x) (pre-norm), or grow with stack/interpolate")
        if len(on) == 1:
            adds.append((path, on[0], [j for j in range(len(node.inputs)) if j != on[0]]))
            stream.add(path)
    outs = list((res.instance_outputs.get(instance) or {}).values())
    off = [r for r in outs if r.node in inside and r.node not in stream]
    if not adds or off:
        what = f"its output {off[0]} is not the residual stream" if off else "it has no residual add"
        first = next((res.nodes[p] for p in sorted(inside)), None)
        raise GrowthError(f"block instance {instance!r} is not a pre-norm residual block: {what}",
                          loc=res.doc.loc(first.src) if first else None, node=instance,
                          fix="zero_init and mask need x + branch(norm(x)) blocks; grow with stack or interpolate")
    return adds


def _projection(module: nn.Module, width: int) -> list[tuple[str, torch.Tensor]]:
    """A component's output projection: its last ``nn.Linear`` (in module order) with
    ``out_features == width`` (weight and bias); else its last own 2-D parameter of shape
    ``(width, ...)`` outside any Linear or Embedding (F.linear's (out, in) layout)."""
    linears = [(n, m) for n, m in module.named_modules() if isinstance(m, nn.Linear) and m.out_features == width]
    if linears:
        n, m = linears[-1]
        pre = f"{n}." if n else ""
        return [(pre + pn, p) for pn, p in m.named_parameters(recurse=False)]
    owned = {f"{n}.{pn}" if n else pn for n, m in module.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))
             for pn, _ in m.named_parameters(recurse=False)}
    raw = [(n, p) for n, p in module.named_parameters() if n not in owned and p.ndim == 2 and p.shape[0] == width]
    return raw[-1:]


def _zero_branch(cm: Any, ref: Ref, stream: set[str], width: int, out: list[str], depth: int = 0) -> None:
    res = cm.resolved
    node = res.nodes[ref.node]
    from physlm_graph._registry import REGISTRY

    info = REGISTRY.get(node.use)
    module = cm.module.get_submodule(ref.node) if info is not None and info.function is None else None
    if module is not None and any(True for _ in module.parameters()):
        proj = _projection(module, width)
        if not proj:
            raise GrowthError(f"zero_init: {node.use} has no output projection to zero: no nn.Linear with "
                              f"out_features {width} and no 2-D parameter of shape ({width}, ...)",
                              loc=res.doc.loc(node.src), node=ref.node,
                              fix="grow with `mask` (exact for any branch) or stack/interpolate")
        with torch.no_grad():
            for name, p in proj:
                p.zero_()
                out.append(f"{ref.node}.{name}")
        return
    ins = [r for _, r in node.inputs if r.node in res.nodes and r.node not in stream]
    if node.use == "add":
        for r in ins:
            _zero_branch(cm, r, stream, width, out, depth + 1)
        return
    if ins and depth < 64 and (node.use == "mul" or len(node.inputs) == 1):
        _zero_branch(cm, ins[-1], stream, width, out, depth + 1)  # a product is zero when one factor is
        return
    raise GrowthError(f"zero_init: cannot find the output projection of the branch ending at {ref.node} ({node.use})",
                      loc=res.doc.loc(node.src), node=ref.node, fix="grow with `mask`, or with stack/interpolate")


def zero_output_projections(cm: Any, instance: str) -> list[str]:
    """Zero the output projection of every residual branch of a block instance (in place);
    returns the zeroed parameter names."""
    res = cm.resolved
    adds = residual_adds(res, instance)
    stream = {p for p, _, _ in adds}
    zeroed: list[str] = []
    for path, _, branches in adds:
        width = int(cm.inferred.specs[path][0].shape[-1])
        for j in branches:
            _zero_branch(cm, res.nodes[path].inputs[j][1], stream, width, zeroed)
    return zeroed


def _fx_node(gm: fx.GraphModule, path: str) -> fx.Node:
    name = "".join(c if c.isalnum() else "_" for c in path)
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.name == name:
            return n
    raise GrowthError(f"the fx graph has no node for {path!r} (looked for {name!r})",
                      fix="this is a bug in physlm-graph's fx build or a pass that renamed nodes")


def mask_residuals(cm: Any, instances: list[str]) -> list[str]:
    """Patch ``cm.module`` so each residual add of the given instances reads ``x + m * branch``,
    ``m`` a scalar buffer ``<instance>.growth_mask`` (non-persistent, starts at 0). Returns the
    patched add paths."""
    gm = cm.module
    patched = []
    for inst in instances:
        holder = gm.get_submodule(inst)
        dev = next((t.device for t in holder.parameters()), torch.device("cpu"))
        holder.register_buffer(MASK_BUFFER, torch.zeros((), device=dev), persistent=False)
        for path, _, branches in residual_adds(cm.resolved, inst):
            add = _fx_node(gm, path)
            args = list(add.args)
            with gm.graph.inserting_before(add):
                m = gm.graph.get_attr(f"{inst}.{MASK_BUFFER}")
                m.meta["physlm_growth_mask"] = True
                for j in branches:
                    args[j] = gm.graph.call_function(operator.mul, (m, args[j]))
                    args[j].meta["physlm_growth_mask"] = True
            add.args = tuple(args)
            patched.append(path)
    gm.graph.lint()
    gm.recompile()
    return patched


def set_mask(gm: fx.GraphModule, instances: list[str], value: float) -> None:
    for inst in instances:
        getattr(gm.get_submodule(inst), MASK_BUFFER).fill_(value)


def unmask_residuals(gm: fx.GraphModule) -> int:
    """Remove every growth mask from the graph (once it is 1 it is inert); returns how many
    multiplications were removed."""
    removed = 0
    for n in list(gm.graph.nodes):
        if n.meta.get("physlm_growth_mask") and n.op == "call_function":
            n.replace_all_uses_with(n.args[1])
            gm.graph.erase_node(n)
            removed += 1
    for n in list(gm.graph.nodes):
        if n.meta.get("physlm_growth_mask") and n.op == "get_attr":
            inst = n.target.rsplit(".", 1)[0]
            gm.graph.erase_node(n)
            holder = gm.get_submodule(inst)
            if MASK_BUFFER in holder._buffers:
                del holder._buffers[MASK_BUFFER]
    gm.graph.lint()
    gm.recompile()
    return removed


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
    zeroed: list[str] = field(default_factory=list)
    masked: list[str] = field(default_factory=list)

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
        _check_indices(cm, stage, st.where, n, m, block)
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


def grow(cm: Any, stage: int, *, seed: int = 0) -> Growth:
    """Grow ``cm`` (compiled at stage ``stage - 1``) into ``stage``: build the new stage from
    ``cm.blueprint``, copy every surviving tensor by its renamed path, initialise the new block
    instances per the stage's operator. The new module is on ``cm.module``'s device."""
    from physlm_graph._compile import compile_blueprint

    here = cm.resolved.stage
    if here is None:
        raise GrowthError("the model was compiled without a growth stage", fix="compile it with stage=N")
    if stage != here + 1:
        raise GrowthError(f"growth goes one stage at a time: the model is at stage {here}, asked for {stage}",
                          expected=str(here + 1), got=str(stage))
    check_schedule(cm)
    st = _stages(cm)[stage]
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
    g = Growth(model=new_cm, stage=stage, grow=st.grow, names=names, copied=copied, new_instances=sorted(fresh),
               renamed={k: v for k, v in moves.items() if k != v})
    if st.grow == "zero_init":
        for inst in g.new_instances:
            g.zeroed += zero_output_projections(new_cm, inst)
    device = next((t.device for t in cm.module.parameters()), torch.device("cpu"))
    new_cm.module.to(device)
    if st.grow == "mask":
        g.masked = mask_residuals(new_cm, g.new_instances)
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


# ---------------------------------------------------------------- the trainer


def trainer_class(source: Any, overrides: Any = None) -> type[Trainer]:
    """``GrowthTrainer`` when the blueprint (with ``extends`` and overrides merged) has growth
    stages, else ``Trainer``: what ``train()`` and ``physlm-graph train`` run."""
    from physlm_graph._load import load_document
    from physlm_graph._merge import apply_overrides, merge_extends

    data = apply_overrides(merge_extends(load_document(source)), overrides).data
    return GrowthTrainer if data.get("growth") else Trainer


def _describe_stage(st: Any) -> str:
    sets = ", ".join(f"{k}={v}" for k, v in st.params.items()) or "base params"
    end = (f"step {st.until}" if st.until is not None else f"{st.until_tokens:,} tokens" if st.until_tokens is not None
           else "the end")
    return f"{sets} until {end}"


class GrowthTrainer(Trainer):
    """A ``Trainer`` that follows the blueprint's growth schedule.

    Before each step it grows the model when the current stage's bound has passed
    (``until`` steps or ``until_tokens``), rebuilds the optimizer carrying state by name,
    re-warms the learning rate for ``rewarmup`` steps, and ramps ``mask`` growth in. On resume
    the model is rebuilt at the recorded stage (and a running mask ramp re-applied).
    ``check_growth`` compares the fp32 logits before and after each zero_init/mask growth on the
    first 16 validation tokens and stops with a GrowthError if they differ by more than 1e-4.
    """

    def __init__(self, *args: Any, check_growth: bool = True, **kw: Any) -> None:
        super().__init__(*args, **kw)
        if self.dist.enabled and self.strategy == "fsdp":
            raise GrowthError("growth under FSDP is not supported: the sharded weights cannot be copied into the "
                              "grown model", fix="train growth schedules with --strategy ddp (the default)")
        self.check_growth = check_growth
        self.stage = 0
        self.history: list[dict[str, Any]] = []

    # -- construction ------------------------------------------------------------
    def _resume_state(self) -> dict[str, Any]:
        path = getattr(self, "resume_from_path", None)
        if path is None or not (path / "trainer_state.json").is_file():
            return {}
        return json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))

    def build_model(self) -> Any:
        """The model at stage 0, or at the stage the checkpoint being resumed records."""
        from physlm_graph._compile import compile_blueprint

        from .checkpoint import model_vocab

        check_schedule(self.base)
        state = self._resume_state()
        self.stage = int(state.get("stage") or 0)
        self.history = list(state.get("growth_history") or [])
        vocab = self.tokenizer.vocab_size
        extra, notes = vocab_overrides(self.base.blueprint, vocab, self.cfg.vocab_multiple)
        overrides = {**dict(self.overrides), **extra}
        self.notes.extend(notes)
        cm = compile_blueprint(self.source, overrides=overrides, stage=self.stage, seed=self.cfg.seed, device="cpu")
        mv = model_vocab(cm)
        if mv is not None and mv < vocab:
            raise GrowthError(f"the tokenizer has {vocab} tokens but the model's logits cover {mv}",
                              fix=f"add `vocab: {vocab}` to params and use ${{vocab}} in the embedding and head")
        self.notes.append("growth: " + " -> ".join(_describe_stage(st) for st in _stages(cm))
                          + (f" (resuming in stage {self.stage})" if self.stage else ""))
        return cm

    def restore(self, folder: Any) -> None:
        super().restore(folder)
        last = self.history[-1] if self.history else None
        if last and last["grow"] == "mask" and self.step < last["step"] + last["ramp_steps"]:
            mask_residuals(self.cm, last["new_instances"])
            self.set_model(self.cm)

    # -- growing -----------------------------------------------------------------
    def _boundary_passed(self) -> bool:
        stages = _stages(self.cm)
        if self.stage >= len(stages) - 1:
            return False
        st = stages[self.stage]
        return (st.until is not None and self.step >= st.until) or (
            st.until_tokens is not None and self.tokens_seen >= st.until_tokens)

    @torch.no_grad()
    def _logits_probe(self, module: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        was = module.training
        module.eval()
        out = module(tokens)["logits"].float()
        module.train(was)
        return out

    def grow_now(self) -> Growth:
        """Enter the next stage now (the loop calls this when a boundary passes)."""
        old_cm, old_opt = self.cm, self.optimizer
        g = grow(old_cm, self.stage + 1, seed=self.cfg.seed + self.stage + 1)
        if self.check_growth and g.grow in ("zero_init", "mask"):
            probe = self.val_tokens[: min(16, self.seq_len)].astype("int64")
            tokens = torch.from_numpy(probe).to(self.device).reshape(1, -1)
            diff = float((self._logits_probe(old_cm.module, tokens) - self._logits_probe(g.model.module, tokens)).abs().max())
            if not diff <= 1e-4:
                raise GrowthError(f"growth into stage {g.stage} by {g.grow} changed the logits by {diff:.3g}",
                                  loc=_loc(old_cm, g.stage, "grow"),
                                  fix="a component in the new blocks is not zeroed by its output projection, or holds "
                                  "state; use grow: mask, or check_growth=False to accept it")
        self.set_model(g.model)
        self.optimizer = self.build_optimizer()
        carried = carry_optimizer_state(old_opt, self.optimizer, g.names)
        st = _stages(self.cm)[g.stage]
        self.stage = g.stage
        self.history.append({**g.record(), "step": self.step, "tokens": self.tokens_seen, "rewarmup": st.rewarmup,
                             "ramp_steps": st.ramp_steps if g.grow == "mask" else 0, "optimizer_carried": len(carried),
                             "zeroed": len(g.zeroed)})
        self.console.print(f"[bold]grew[/] into stage {g.stage} at step {self.step} ({g.grow}): "
                           f"{old_cm.num_params:,} -> {g.model.num_params:,} params, new {', '.join(g.new_instances)}")
        return g

    def _mask_value(self, step: int) -> float | None:
        last = self.history[-1] if self.history else None
        if not last or last["grow"] != "mask" or MASK_BUFFER not in getattr(
                self.model.get_submodule(last["new_instances"][0]), "_buffers", {}):
            return None
        return min(1.0, (step - last["step"]) / last["ramp_steps"])

    def lr_at(self, step: int) -> float:
        """The schedule's learning rate, times a linear re-warmup ``(s - g + 1) / (rewarmup + 1)``
        for the ``rewarmup`` steps after the last growth at step g."""
        lr = super().lr_at(step)
        last = self.history[-1] if self.history else None
        if last and last.get("rewarmup") and step - last["step"] < last["rewarmup"]:
            lr *= (step - last["step"] + 1) / (last["rewarmup"] + 1)
        return lr

    def train_step(self, step: int) -> dict[str, Any]:
        while self._boundary_passed():
            self.grow_now()
        m = self._mask_value(step)
        if m is not None:
            if m >= 1.0:
                unmask_residuals(self.model)
                self.set_model(self.cm)
            else:
                set_mask(self.model, self.history[-1]["new_instances"], m)
        record = super().train_step(step)
        record["stage"] = self.stage
        return record

    def trainer_state(self) -> dict[str, Any]:
        state = super().trainer_state()
        state["stage"] = state["growth_stage"] = self.stage
        state["growth_history"] = self.history
        return state
