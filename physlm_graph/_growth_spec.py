"""The growth schedule, checked at compile time: every rule of docs/growth.md.

A blueprint's ``growth:`` list is a promise about training: stage N+1 is stage N with more
block instances, nothing else. ``check_growth`` keeps that promise before step 0, so
``validate`` and ``build`` refuse what ``train`` would refuse at a stage boundary:

- the schedule itself (bounds, which options each stage may set);
- each stage compiled on meta (resolve, validate, shape inference: no weights), and every
  pair of consecutive stages compared: repeat counts only go up, ``where`` names the new
  positions, and every tensor of stage N lives on in stage N+1 (renamed where layers moved)
  with the same shape, while stage N+1 adds tensors only inside its new block instances.

The result, one ``GrowthPhase`` per stage, is what the runtime needs (``cm.growth_stages``):
bounds, operator, layer and parameter counts, and how instances move and where new ones
come from. In code a growth stage is a *phase* where compiler stages are near.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from typing import Any

from physlm_graph._errors import Diagnostic, PhysLMError, ValidateError
from physlm_graph._growth_ops import depth_plan  # one placement rule for the check and for growing
from physlm_graph._growth_residual import new_instance_errors
from physlm_graph._ir import Inferred
from physlm_graph._load import Document

__all__ = ["GrowthPhase", "check_growth", "depth_plan"]

_GROWING_KEYS = ("grow", "where", "ramp_steps", "rewarmup")
_CACHE: dict[str, list["GrowthPhase"]] = {}
_CACHE_SIZE = 32


@dataclass(frozen=True)
class GrowthPhase:
    """One growth stage as compiled: its bound, how the model grows into it, its size, and
    (from stage 1) the instance moves and new instances relative to the stage before."""

    index: int
    until: int | None
    until_tokens: int | None
    grow: str
    where: Any
    ramp_steps: int
    rewarmup: int
    params_set: dict[str, Any]
    instances: dict[str, int]  # repeated block node -> its repeat count in this stage
    layers: int  # block instances in all
    num_params: int
    flops_per_token: float
    moved: dict[str, str] = field(default_factory=dict)  # old instance -> new instance (all survivors)
    new_instances: dict[str, str | None] = field(default_factory=dict)  # new instance -> copied-from (None: fresh)


# ---------------------------------------------------------------- the schedule


def _raw(doc: Document, i: int) -> dict[str, Any]:
    raw = (doc.data.get("growth") or [])[i]
    return raw if isinstance(raw, dict) else {}


def _err(doc: Document, message: str, *path: Any, **kw: Any) -> Diagnostic:
    return Diagnostic(message, loc=doc.loc(("growth",) + path), **kw)


def _schedule_errors(doc: Document, stages: list[Any]) -> list[Diagnostic]:
    """Every stage but the last has one bound, the last has none, bounds of a kind increase,
    and no stage sets an option its operator would ignore."""
    errors = []
    last_steps = last_tokens = 0
    for i, st in enumerate(stages):
        raw = _raw(doc, i)
        bound = st.until if st.until is not None else st.until_tokens
        if i == len(stages) - 1:
            if bound is not None:
                key = "until" if st.until is not None else "until_tokens"
                errors.append(_err(doc, f"the last growth stage ({i}) has `{key}`: it lasts to the end of training",
                                   i, key, fix=f"drop `{key}` from the last stage"))
        elif bound is None:
            errors.append(_err(doc, f"growth stage {i} has no end", i,
                               fix="give every stage but the last `until: STEP` or `until_tokens: N`"))
        if st.until is not None:
            if st.until <= last_steps:
                errors.append(_err(doc, f"growth stage {i} ends at step {st.until}, not after the previous stage's "
                                   f"{last_steps}", i, "until", fix="stage bounds must increase"))
            last_steps = st.until
        if st.until_tokens is not None:
            if st.until_tokens <= last_tokens:
                errors.append(_err(doc, f"growth stage {i} ends at {st.until_tokens} tokens, not after the previous "
                                   f"stage's {last_tokens}", i, "until_tokens", fix="stage bounds must increase"))
            last_tokens = st.until_tokens
        if i == 0:
            given = [k for k in _GROWING_KEYS if k in raw]
            if given:
                errors.append(_err(doc, f"growth stage 0 sets `{given[0]}`, but stage 0 is where training starts: "
                                   "nothing grows into it", 0, given[0],
                                   fix=f"move `{given[0]}` to the stage it grows into"))
            continue
        if "ramp_steps" in raw and st.grow != "mask":
            errors.append(_err(doc, f"growth stage {i}: `ramp_steps` is used by `grow: mask` only, this stage grows "
                               f"by {st.grow}", i, "ramp_steps", fix="drop `ramp_steps`, or use `grow: mask`"))
        if st.grow == "interpolate" and "where" in raw:
            errors.append(_err(doc, f"growth stage {i}: `interpolate` puts each copy right after its source; `where` "
                               "does not apply", i, "where", fix="drop `where`, or use another operator"))
        if st.grow == "stack" and st.where != "end":
            errors.append(_err(doc, f"growth stage {i}: `stack` copies the trained stack on top of itself, so `where` "
                               "must be end", i, "where", expected="end", got=repr(st.where),
                               fix="drop `where`, or use zero_init/mask to place new layers elsewhere"))
    return errors


# ---------------------------------------------------------------- each stage on meta


def _infer_stage(doc: Document, i: int) -> tuple[Inferred, Any]:
    """Stage ``i`` through resolve, validate and shape inference (the inferred stage and its
    checked params); its errors say which stage."""
    from physlm_graph._infer import infer_shapes
    from physlm_graph._resolve import resolve
    from physlm_graph._validate import validate

    try:
        res = resolve(doc, stage=i)
        checked = validate(res)
        return infer_shapes(res, checked), checked
    except PhysLMError as exc:
        diags = [d if d.message.startswith(f"growth stage {i}") else replace(d, message=f"growth stage {i}: {d.message}")
                 for d in exc.diagnostics]
        raise type(exc)(diags) from None


def _tensor_shapes(inf: Inferred) -> dict[str, tuple[int, ...]]:
    """Every tensor of the built model (parameters and persistent buffers) by name: the nodes'
    and, with ``exits.head: own``, the exits' copies of the final norm and head."""
    from physlm_graph._resolve import exit_heads

    shapes = dict(inf.tensor_shapes)
    res = inf.resolved
    if res.exit_points and res.spec.exits is not None:
        plan, _ = exit_heads(res.spec, res.nodes, res.outputs)
        if plan is not None and plan.own:
            for i in range(len(res.exit_points)):
                for part, node in (("norm", plan.norm), ("head", plan.head)):
                    if node is None:
                        continue
                    for name, shape in inf.tensor_shapes.items():
                        if name.startswith(node + "."):
                            shapes[f"exits.{i}.{part}.{name[len(node) + 1:]}"] = shape
    return shapes


def _longest_prefix(name: str, prefixes: dict[str, Any]) -> str | None:
    parts = name.split(".")
    for k in range(len(parts) - 1, 0, -1):
        if ".".join(parts[:k]) in prefixes:
            return ".".join(parts[:k])
    return None


def _rename(name: str, moves: dict[str, str]) -> str:
    head = _longest_prefix(name, moves)
    return name if head is None else moves[head] + name[len(head):]


def _more(k: int) -> str:
    return "" if k <= 0 else f" (and {k} more tensor{'s' if k > 1 else ''})"


def _pair_errors(doc: Document, i: int, st: Any, old: Inferred, new: Inferred, checked: Any,
                 ) -> tuple[list[Diagnostic], dict[str, str], dict[str, str | None]]:
    """Stage ``i`` against stage ``i - 1``: repeat counts and ``where``, the new instances
    (zero_init, mask), the options that need new layers, surviving tensors."""
    errors, moves, fresh = _plan_instances(doc, i, st, old, new)
    if errors:
        return errors, moves, fresh
    if st.grow in ("zero_init", "mask"):
        errors += new_instance_errors(new, checked, st.grow, list(fresh))
    given = [k for k in ("grow", "where", "ramp_steps") if k in _raw(doc, i)]
    if not fresh and given:
        errors.append(_err(doc, f"growth stage {i} adds no layers, so `{given[0]}` does not apply", i, given[0],
                           fix=f"drop `{given[0]}`, or raise a repeat count in this stage"))
    return errors + _tensor_errors(doc, i, st, old, new, moves, fresh), moves, fresh


def _plan_instances(doc: Document, i: int, st: Any, old: Inferred, new: Inferred,
                    ) -> tuple[list[Diagnostic], dict[str, str], dict[str, str | None]]:
    """Each repeated block's instances from stage ``i - 1`` to ``i``: old -> new instance for
    the survivors, new instance -> its source (None: fresh) for the new ones."""
    errors: list[Diagnostic] = []
    moves: dict[str, str] = {}
    fresh: dict[str, str | None] = {}
    old_inst, new_inst = old.resolved.instances, new.resolved.instances
    for block, paths in new_inst.items():
        n, m = len(old_inst.get(block, [])), len(paths)
        if m < n:
            errors.append(_err(doc, f"growth stage {i} shrinks {block!r} from {n} to {m} instances; growth only adds",
                               i, "params", fix="stages must not lower a repeat count"))
            continue
        if m == n:
            moves.update({f"{block}.{j}": f"{block}.{j}" for j in range(n)})
            continue
        if isinstance(st.where, list):
            k = m - n
            bad = [p for p in st.where if not 0 <= p < m]
            if len(st.where) != k or len(set(st.where)) != len(st.where) or bad:
                why = (f"{bad[0]} is outside 0..{m - 1}" if bad else "indices repeat"
                       if len(set(st.where)) != len(st.where) else f"{len(st.where)} given")
                errors.append(_err(doc, f"growth stage {i}: `where` must list the {k} new positions of {block!r} "
                                   f"({n} -> {m} layers): {why}", i, "where",
                                   expected=f"{k} distinct indices in 0..{m - 1}", got=repr(st.where)))
                continue
        old_to_new, new_src = depth_plan(n, m, st.grow, st.where)
        moves.update({f"{block}.{a}": f"{block}.{b}" for a, b in old_to_new.items()})
        fresh.update({f"{block}.{j}": None if s is None else f"{block}.{s}" for j, s in new_src.items()})
    return errors, moves, fresh


def _tensor_errors(doc: Document, i: int, st: Any, old: Inferred, new: Inferred, moves: dict[str, str],
                   fresh: dict[str, str | None]) -> list[Diagnostic]:
    """Every tensor of stage ``i - 1`` lives on in stage ``i`` (renamed per ``moves``) with its
    shape; stage ``i`` adds tensors only inside its new instances."""
    errors: list[Diagnostic] = []
    old_sd, new_sd = _tensor_shapes(old), _tensor_shapes(new)
    inverse = {b: a for a, b in moves.items()}
    sources: dict[str, str] = {}  # new tensor -> the old tensor it is copied from
    outside: list[str] = []
    for key in new_sd:
        inst = _longest_prefix(key, fresh)
        if inst is not None:
            if fresh[inst] is not None:
                sources[key] = fresh[inst] + key[len(inst):]  # type: ignore[operator]
            continue
        before = _rename(key, inverse)
        if before in old_sd:
            sources[key] = before
        else:
            outside.append(key)
    if outside:
        errors.append(_err(doc, f"growth stage {i} adds {outside[0]!r} outside the grown block instances"
                           + _more(len(outside) - 1),
                           i, "params", node=outside[0],
                           fix="a stage may only raise repeat counts (and change shape-free params like dropout)"))
    changed = [(k, o) for k, o in sources.items() if old_sd.get(o) != new_sd[k]]
    if changed:
        key, before = changed[0]
        got = "missing" if before not in old_sd else f"{list(old_sd[before])} -> {list(new_sd[key])}"
        errors.append(_err(doc, f"growth stage {i} changes its shape ({got}): `{st.grow}` grows depth only (the repeat "
                           "count of block nodes), not width, heads, context or vocabulary"
                           + _more(len(changed) - 1),
                           i, "params", node=key,
                           fix="change only repeat counts (e.g. layers) between stages; set widths in `params`"))
    kept = {o for k, o in sources.items() if _longest_prefix(k, fresh) is None}
    lost = sorted(set(old_sd) - kept)
    if lost:
        errors.append(_err(doc, f"growth stage {i} drops {lost[0]}" + _more(len(lost) - 1), i, "params",
                           fix="growth only adds; stages must not remove nodes or their tensors"))
    return errors


# ---------------------------------------------------------------- the whole check


def _key(doc: Document) -> str:
    return hashlib.sha256(json.dumps(doc.data, sort_keys=True, default=str).encode()).hexdigest()


def _phase(i: int, st: Any, inf: Inferred, moves: dict[str, str], fresh: dict[str, str | None]) -> GrowthPhase:
    instances = {b: len(p) for b, p in inf.resolved.instances.items()}
    return GrowthPhase(index=i, until=st.until, until_tokens=st.until_tokens, grow=st.grow, where=st.where,
                       ramp_steps=st.ramp_steps, rewarmup=st.rewarmup, params_set=dict(st.params),
                       instances=instances, layers=sum(instances.values()), num_params=inf.total_params,
                       flops_per_token=inf.flops_per_token, moved=moves, new_instances=fresh)


def check_growth(doc: Document, stages: list[Any]) -> list[GrowthPhase]:
    """Check the growth schedule of the merged document ``doc`` (``stages``: its checked
    ``growth`` entries) and return one ``GrowthPhase`` per stage; [] without growth.
    Raises a located ``ValidateError`` listing every broken rule (a stage that does not
    compile raises that stage's own errors). Results are cached by the document's content."""
    if not stages:
        return []
    key = _key(doc)
    if key in _CACHE:
        return _CACHE[key]
    errors = _schedule_errors(doc, stages)
    if errors:
        raise ValidateError(errors)
    compiled = [_infer_stage(doc, i) for i in range(len(stages))]
    inferred = [inf for inf, _ in compiled]
    phases = [_phase(0, stages[0], inferred[0], {}, {})]
    for i in range(1, len(stages)):
        errs, moves, fresh = _pair_errors(doc, i, stages[i], inferred[i - 1], inferred[i], compiled[i][1])
        errors += errs
        phases.append(_phase(i, stages[i], inferred[i], moves, fresh))
    if errors:
        raise ValidateError(errors)
    if len(_CACHE) >= _CACHE_SIZE:
        _CACHE.pop(next(iter(_CACHE)))
    _CACHE[key] = phases
    return phases
