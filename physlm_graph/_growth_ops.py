"""Growth operators: how a model grows from one growth stage's depth to the next.

    op = GROWTH_OPS["zero_init"]       # name, doc, exact, options, place, prepare
    old_to_new, new_src = depth_plan(2, 4, "stack", "end")   # {0: 0, 1: 1}, {2: 0, 3: 1}

Each operator is registered by name with a one-line doc (``growth_op_names()`` and
``growth_op_lines()`` give the list the docs and error messages show), like components and
passes. An operator says

- ``place(n, m, where)``: where the n surviving layers of a block node go when it grows to m
  instances (old index -> new index), and for each new layer the old layer it copies (None:
  freshly initialised);
- ``prepare(cm, new_instances)``: what it does to the grown model after the surviving weights
  and copies are in (zero output projections, insert masks); returns the names it changed;
- ``exact``: whether the grown model computes the same function at the moment of growth (the
  trainer then checks the logits);
- ``options``: the stage keys it reads besides ``params`` and the bounds (``where``,
  ``ramp_steps``).

The functions here transform a ``CompiledModel`` and its GraphModule; they do not train. The
runtime's growth step (``physlm_graph.runtime.growth.grow``) builds the next stage, copies the
weights and calls the operator.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from physlm_graph._errors import PhysLMError
from physlm_graph._ir import Ref, Resolved

__all__ = [
    "GrowthError",
    "GrowthOp",
    "GROWTH_OPS",
    "register_growth_op",
    "growth_op",
    "growth_op_names",
    "growth_op_lines",
    "depth_plan",
    "residual_adds",
    "zero_output_projections",
    "mask_residuals",
    "set_mask",
    "unmask_residuals",
    "MASK_BUFFER",
]

MASK_BUFFER = "growth_mask"


class GrowthError(PhysLMError):
    """A growth schedule, or one growth step, cannot be carried out."""

    stage = "growth"


Placement = tuple[dict[int, int], dict[int, "int | None"]]


@dataclass(frozen=True)
class GrowthOp:
    """A growth operator (see the module docstring)."""

    name: str
    doc: str
    exact: bool
    place: Callable[[int, int, Any], Placement]
    prepare: Callable[[Any, list[str]], list[str]] | None = None
    options: tuple[str, ...] = ()


GROWTH_OPS: dict[str, GrowthOp] = {}


def register_growth_op(name: str, *, doc: str, exact: bool, place: Callable[[int, int, Any], Placement],
                       prepare: Callable[[Any, list[str]], list[str]] | None = None,
                       options: tuple[str, ...] = ()) -> GrowthOp:
    """Add an operator under ``name`` (a second registration of a name is an error)."""
    if name in GROWTH_OPS:
        raise GrowthError(f"growth operator {name!r} is registered twice", fix="give the new operator another name")
    op = GROWTH_OPS[name] = GrowthOp(name=name, doc=doc, exact=exact, place=place, prepare=prepare, options=options)
    return op


def growth_op_names() -> tuple[str, ...]:
    """The registered operator names, in registration order."""
    return tuple(GROWTH_OPS)


def growth_op_lines() -> list[str]:
    """``name: doc`` for each operator (for docs and ``--help``)."""
    return [f"{op.name}: {op.doc}" for op in GROWTH_OPS.values()]


def growth_op(name: str) -> GrowthOp:
    """The operator registered as ``name``, or an error listing the registered ones."""
    op = GROWTH_OPS.get(name)
    if op is None:
        raise GrowthError(f"unknown growth operator {name!r}", expected=", ".join(GROWTH_OPS), got=repr(name),
                          fix=f"use one of {', '.join(GROWTH_OPS)}")
    return op


# ---------------------------------------------------------------- placements


def _insert_after(n: int, k: int) -> list[int]:
    """For k new layers spread among n old ones: the old index each goes after (-1: before all)."""
    if n == 0:
        return [-1] * k
    return [math.ceil((j + 1) * n / k) - 1 for j in range(k)]


def _spread(n: int, m: int, copy: bool) -> Placement:
    """New layers spread evenly among the old ones; with ``copy`` each copies the layer it follows."""
    k = m - n
    after = _insert_after(n, k)
    order: list[tuple[str, int]] = [("new", j) for j in range(k) if after[j] < 0]
    for i in range(n):
        order.append(("old", i))
        order += [("new", j) for j in range(k) if after[j] == i]
    old = {i: pos for pos, (kind, i) in enumerate(order) if kind == "old"}
    new = {pos: (after[j] if copy and after[j] >= 0 else None) for pos, (kind, j) in enumerate(order) if kind == "new"}
    return old, new


def _place_fresh(n: int, m: int, where: Any) -> Placement:
    """Fresh layers at ``where``: end, start, interleave, or a list of their new indices."""
    k = m - n
    if where == "interleave":
        return _spread(n, m, copy=False)
    if where == "end":
        return {i: i for i in range(n)}, {n + j: None for j in range(k)}
    if where == "start":
        return {i: i + k for i in range(n)}, {j: None for j in range(k)}
    positions = sorted(where)
    rest = [p for p in range(m) if p not in set(positions)]
    return {i: p for i, p in enumerate(rest)}, {p: None for p in positions}


def _place_stack(n: int, m: int, where: Any) -> Placement:
    """New layer n + j copies layer j mod n (the trained stack on top of itself)."""
    return {i: i for i in range(n)}, {n + j: (j % n if n else None) for j in range(m - n)}


def _place_interpolate(n: int, m: int, where: Any) -> Placement:
    """A copy of layer i right after layer i."""
    return _spread(n, m, copy=True)


def depth_plan(n: int, m: int, grow_op: str, where: Any) -> Placement:
    """Old index -> new index for surviving layers, and new index -> source old index (None:
    freshly initialised) for new layers, when a block node grows from n to m instances."""
    return growth_op(grow_op).place(n, m, where)


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




# ---------------------------------------------------------------- the operators


def _prepare_zero(cm: Any, instances: list[str]) -> list[str]:
    return [name for inst in instances for name in zero_output_projections(cm, inst)]


register_growth_op("zero_init", exact=True, place=_place_fresh, prepare=_prepare_zero, options=("where",),
                   doc="new layers init normally, then each residual branch's output projection is zeroed "
                   "(function-preserving for pre-norm residual blocks)")
register_growth_op("mask", exact=True, place=_place_fresh, prepare=mask_residuals, options=("where", "ramp_steps"),
                   doc="each new residual branch is scaled by a mask ramped from 0 to 1 over ramp_steps, then "
                   "removed (function-preserving at growth)")
register_growth_op("stack", exact=False, place=_place_stack,
                   doc="new layer L + j copies trained layer j mod L (G_stack; changes the function)")
register_growth_op("interpolate", exact=False, place=_place_interpolate,
                   doc="a copy of layer i goes right after layer i (changes the function)")
