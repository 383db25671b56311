"""What ``zero_init`` and ``mask`` need of the block instances a growth stage adds, checked at
compile time on meta: a pre-norm residual block (``x + branch(norm(x))``), and for zero_init
an output projection in every branch whose zeroing silences it (docs/growth.md, "zero_init:
which weights are zeroed")."""

from __future__ import annotations

from typing import Any

from torch import nn

from physlm_graph._errors import Diagnostic
from physlm_graph._ir import Inferred, Ref, Resolved

__all__ = ["residual_adds", "output_projection", "new_instance_errors"]

_NOT_RESIDUAL_FIX = "zero_init and mask need x + branch(norm(x)) blocks; grow with stack or interpolate"


def residual_adds(res: Resolved, instance: str) -> tuple[list[tuple[str, int, list[int]]], list[Diagnostic]]:
    """The residual adds of a block instance: (add path, index of the skip input, indices of the
    branch inputs), and why the instance is not a pre-norm residual block ([] when it is). The
    stream starts at the instance's inputs (nodes outside it); an ``add`` with exactly one input
    on the stream continues it; the instance's output must be on the stream."""
    from physlm_graph._validate import topo_order

    inside = {p for p in res.nodes if p.startswith(instance + ".")}
    stream: set[str] = set()
    adds = []
    for path in topo_order(res):
        node = res.nodes[path]
        if path not in inside or node.use != "add":
            continue
        on = [j for j, (_, r) in enumerate(node.inputs) if r.node not in inside or r.node in stream]
        if len(on) > 1:
            return [], [Diagnostic(f"cannot tell the residual stream from the branch (inputs "
                                   f"{', '.join(str(r) for _, r in node.inputs)} all carry the stream)",
                                   loc=res.doc.loc(node.src), node=path,
                                   fix="write the block as x + branch(x) (pre-norm), or grow with stack/interpolate")]
        if len(on) == 1:
            adds.append((path, on[0], [j for j in range(len(node.inputs)) if j != on[0]]))
            stream.add(path)
    outs = list((res.instance_outputs.get(instance) or {}).values())
    off = [r for r in outs if r.node in inside and r.node not in stream]
    if adds and not off:
        return adds, []
    what = f"its output {off[0]} is not the residual stream" if off else "it has no residual add"
    first = next((res.nodes[p] for p in sorted(inside)), None)
    src = first.src if first else ()
    if src[:1] == ("blocks",):
        src = src[:2] + ("out",)  # the block's `out`, where the stream should end
    return [], [Diagnostic(f"block instance {instance!r} is not a pre-norm residual block: {what}",
                           loc=res.doc.loc(src) if first else None, node=instance, fix=_NOT_RESIDUAL_FIX)]


def output_projection(module: nn.Module, width: int) -> list[str]:
    """The parameter names of a component's output projection: its last ``nn.Linear`` (in module
    order) with ``out_features == width`` (weight and bias); else its last own 2-D parameter of
    shape ``(width, ...)`` outside any Linear or Embedding (F.linear's (out, in) layout)."""
    linears = [(n, m) for n, m in module.named_modules() if isinstance(m, nn.Linear) and m.out_features == width]
    if linears:
        n, m = linears[-1]
        return [(f"{n}." if n else "") + pn for pn, _ in m.named_parameters(recurse=False)]
    owned = {f"{n}.{pn}" if n else pn for n, m in module.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))
             for pn, _ in m.named_parameters(recurse=False)}
    raw = [n for n, p in module.named_parameters() if n not in owned and p.ndim == 2 and p.shape[0] == width]
    return raw[-1:]


def _branch_errors(res: Resolved, modules: dict[str, nn.Module], ref: Ref, stream: set[str], width: int,
                   depth: int = 0) -> list[Diagnostic]:
    """Why zeroing would not silence the branch ending at ``ref`` ([] when it would): the walk
    ``runtime.growth`` makes to zero it, on meta modules."""
    from physlm_graph._registry import REGISTRY

    node = res.nodes[ref.node]
    info = REGISTRY.get(node.use)
    module = modules.get(ref.node)
    if module is not None and any(True for _ in module.parameters()):
        if output_projection(module, width):
            return []
        return [Diagnostic(f"zero_init: {node.use} has no output projection to zero: no nn.Linear with "
                           f"out_features {width} and no 2-D parameter of shape ({width}, ...)",
                           loc=res.doc.loc(node.src), node=ref.node,
                           fix="grow with `mask` (exact for any branch) or stack/interpolate")]
    ins = [r for _, r in node.inputs if r.node in res.nodes and r.node not in stream]
    if node.use == "add":
        return [d for r in ins for d in _branch_errors(res, modules, r, stream, width, depth + 1)]
    if ins and depth < 64 and (node.use == "mul" or len(node.inputs) == 1) and info is not None:
        return _branch_errors(res, modules, ins[-1], stream, width, depth + 1)  # a product is zero when one factor is
    return [Diagnostic(f"zero_init: cannot find the output projection of the branch ending at {ref.node} ({node.use})",
                       loc=res.doc.loc(node.src), node=ref.node, fix="grow with `mask`, or with stack/interpolate")]


def new_instance_errors(inf: Inferred, checked: Any, grow: str, instances: list[str]) -> list[Diagnostic]:
    """Why ``grow`` (zero_init or mask) cannot keep the function when it adds ``instances`` to
    the stage ``inf``: the first new instance is checked (they share their block's wiring)."""
    from physlm_graph._infer import build_modules
    from physlm_graph._validate import topo_order

    res = inf.resolved
    for inst in instances[:1]:
        adds, errors = residual_adds(res, inst)
        if errors or grow != "zero_init":
            return errors
        order = [p for p in topo_order(res) if p.startswith(inst + ".")]
        modules = build_modules(res, checked, inf.specs, "meta", order)
        stream = {p for p, _, _ in adds}
        for path, _, branches in adds:
            width = int(inf.specs[path][0].shape[-1])
            for j in branches:
                errors += _branch_errors(res, modules, res.nodes[path].inputs[j][1], stream, width)
        return errors
    return []
