"""Stage 3, validate: each node's component and parameters (its pydantic model), its ports,
its ties, causality, and the graph (networkx: cycles, dangling inputs, unused nodes).

Every problem is collected; one ``ValidateError`` lists them all.
"""

from __future__ import annotations

import difflib
from typing import Any

import networkx as nx
from pydantic import ValidationError

from physlm_graph._errors import Diagnostic, ValidateError
from physlm_graph._ir import Ref, Resolved
from physlm_graph._load import Document
from physlm_graph._registry import REGISTRY, ComponentInfo

__all__ = ["validate", "Checked", "topo_order", "check_file_kind"]

Checked = dict[str, Any]  # node path -> its checked params model


# ---------------------------------------------------------------- the kind of file


def check_file_kind(doc: Document) -> None:
    """A study file (``study:`` at the top, no ``nodes``) given where a blueprint belongs is
    said to be one, with the command that runs it."""
    data = doc.data
    if isinstance(data, dict) and "study" in data and "nodes" not in data:
        target = doc.file if doc.file and not doc.file.startswith("<") else "STUDY.yaml"
        raise ValidateError(Diagnostic(
            "this is an ablation study file, not a blueprint", loc=doc.loc(("study",)),
            fix=f"run it with `physlm-graph ablate {target} --out DIR`; `validate`, `build` and `train` take blueprints"))


# ---------------------------------------------------------------- nodes


def _param_errors(exc: ValidationError, node: Any, res: Resolved, info: ComponentInfo) -> list[Diagnostic]:
    out = []
    fields = list(info.params.model_fields)
    extras = [str(e["loc"][0]) for e in exc.errors() if e["type"] == "extra_forbidden" and e["loc"]]
    for e in exc.errors():
        if e["type"] == "missing" and e["loc"] and difflib.get_close_matches(str(e["loc"][0]), extras, n=1):
            continue  # reported once, as the misspelt key with "did you mean"

        loc = tuple(x for x in e["loc"] if isinstance(x, (str, int)))
        key = loc[0] if loc else None
        where = res.doc.loc(node.src + ((key,) if key is not None else ()))
        if e["type"] == "extra_forbidden":
            near = difflib.get_close_matches(str(key), fields, n=3)
            fix = f"did you mean {', '.join(near)}?" if near else f"{info.name} takes: {', '.join(fields) or 'no parameters'}"
            out.append(Diagnostic(f"{info.name} has no parameter {key!r}", loc=where, node=node.path, fix=fix))
        elif e["type"] == "missing":
            out.append(Diagnostic(f"{info.name} needs parameter {key!r}", loc=where, node=node.path,
                                  fix=_field_doc(info, str(key))))
        else:
            got = e.get("input")
            msg = e["msg"]
            if msg.startswith("Value error, "):
                msg = msg[len("Value error, "):]
            label = f"{key}: " if key is not None else ""
            out.append(Diagnostic(f"{label}{msg}", loc=where, node=node.path,
                                  got=repr(got) if not isinstance(got, dict) else None,
                                  expected=None))
    return out


def _field_doc(info: ComponentInfo, key: str) -> str | None:
    f = info.params.model_fields.get(key)
    return f"{key}: {f.description}" if f is not None and f.description else None


def _source_ports(res: Resolved, ref: Ref) -> tuple[str, ...] | None:
    if ref.node in res.inputs:
        return ("out",)
    node = res.nodes.get(ref.node)
    if node is None:
        return None
    info = REGISTRY.get(node.use)
    return info.outputs if info is not None else None


def topo_order(res: Resolved) -> list[str]:
    g = nx.DiGraph()
    g.add_nodes_from(res.nodes)
    for path, node in res.nodes.items():
        for _, ref in node.inputs:
            if ref.node in res.nodes:
                g.add_edge(ref.node, path)
    order = {p: i for i, p in enumerate(res.nodes)}
    return list(nx.lexicographical_topological_sort(g, key=lambda p: order[p]))


def _check_node(res: Resolved, path: str, checked: Checked, errors: list[Diagnostic]) -> None:
    node = res.nodes[path]
    info = REGISTRY.get(node.use)
    if info is None:
        near = REGISTRY.suggest(node.use, extra=list(res.spec.blocks))
        errors.append(Diagnostic(
            f"unknown component {node.use!r}", loc=res.doc.loc(node.src + ("use",)), node=path,
            fix=f"did you mean {', '.join(near)}?" if near else "`physlm-graph components` lists them"))
        return
    try:
        checked[path] = info.params.model_validate(node.params)
    except ValidationError as exc:
        errors.extend(_param_errors(exc, node, res, info))
    # ports
    named = [p for p, _ in node.inputs if p is not None]
    positional = [r for p, r in node.inputs if p is None]
    if named and positional:
        errors.append(Diagnostic("`in` mixes named ports and positional inputs", loc=res.doc.loc(node.src + ("in",)), node=path))
    for p in named:
        if p not in info.inputs:
            near = difflib.get_close_matches(p, list(info.inputs), n=3)
            errors.append(Diagnostic(
                f"{info.name} has no input port {p!r}", loc=res.doc.loc(node.src + ("in", p)), node=path,
                fix=f"did you mean {', '.join(near)}?" if near else f"its ports: {', '.join(info.inputs)}"))
    if not info.variadic:
        if len(positional) > len(info.inputs):
            errors.append(Diagnostic(
                f"{info.name} takes {len(info.inputs)} input(s) ({', '.join(info.inputs)})",
                loc=res.doc.loc(node.src + ("in",)), node=path, expected=str(len(info.inputs)), got=str(len(positional))))
        given = set(named) | set(info.inputs[: len(positional)])
        missing = [p for p in info.inputs if p not in given and p not in info.optional_inputs]
        if missing:
            errors.append(Diagnostic(
                f"input port {missing[0]!r} of {info.name} is not connected", loc=res.doc.loc(node.src), node=path,
                fix=f"add `in: {{{', '.join(f'{m}: <node>' for m in info.inputs)}}}`"))
    elif not positional:
        errors.append(Diagnostic(f"{info.name} needs at least one input", loc=res.doc.loc(node.src), node=path))
    # sources and their ports
    for i, (p, ref) in enumerate(node.inputs):
        where = res.doc.loc(node.src + ("in",) + ((p,) if p else (i,) if len(node.inputs) > 1 else ()))
        ports = _source_ports(res, ref)
        if ports is None:
            continue  # the source's own error (unknown component) is reported at the source
        if ref.port is not None and ref.port not in ports:
            near = difflib.get_close_matches(ref.port, list(ports), n=3)
            errors.append(Diagnostic(
                f"{ref.node!r} has no output port {ref.port!r}", loc=where, node=path,
                fix=f"did you mean {', '.join(near)}?" if near else f"its ports: {', '.join(ports)}"))
    # ties
    if node.tie is not None:
        where = res.doc.loc(node.src + ("tie",))
        target = res.nodes.get(node.tie)
        tinfo = REGISTRY.get(target.use) if target is not None else None
        if target is None:
            near = difflib.get_close_matches(node.tie, list(res.nodes), n=3)
            errors.append(Diagnostic(f"`tie` names unknown node {node.tie!r}", loc=where, node=path,
                                     fix=f"did you mean {', '.join(near)}?" if near else None))
        elif info.tie_param is None:
            errors.append(Diagnostic(f"{info.name} has no weight that can be tied", loc=where, node=path))
        elif tinfo is not None and tinfo.tie_param is None:
            errors.append(Diagnostic(f"{node.tie!r} ({tinfo.name}) has no weight that can be tied", loc=where, node=path))
    # causality
    if path in checked and res.spec.causal and not info.is_causal(checked[path]) and not node.allow_leak:
        mode = getattr(checked[path], "mode", None)
        errors.append(Diagnostic(
            f"{info.name}{f' (mode {mode})' if mode else ''} sees future tokens, which a causal LM must not",
            loc=res.doc.loc(node.src + (("mode",) if "mode" in node.params else ("use",))), node=path,
            fix="use mode: fixed, or set `allow_leak: true` on the node to reproduce the leak on purpose"))


# ---------------------------------------------------------------- outputs and losses

_LOGITS_USERS = "`train`, `eval`, `generate`, early exits and the Hugging Face loader read outputs.logits"


def _check_port(res: Resolved, ref: Ref, src: tuple, what: str, errors: list[Diagnostic]) -> None:
    ports = _source_ports(res, ref)
    if ports is not None and ref.port is not None and ref.port not in ports:
        near = difflib.get_close_matches(ref.port, list(ports), n=3)
        errors.append(Diagnostic(
            f"{what}: {ref.node!r} has no output port {ref.port!r}", loc=res.doc.loc(src),
            fix=f"did you mean {ref.node}.{near[0]}?" if near else f"its ports: {', '.join(ports)}"))


def _check_outputs(res: Resolved, errors: list[Diagnostic]) -> None:
    """``outputs`` names ``logits`` (a causal LM's next-token scores), and every output and
    every loss source names a port its node has."""
    if "logits" not in res.spec.outputs:
        have = ", ".join(res.spec.outputs) or "none"
        errors.append(Diagnostic(
            f"outputs has no `logits` (it has {have}): {_LOGITS_USERS}", loc=res.doc.loc(("outputs",)),
            fix="name the LM head's node: outputs: {logits: head}"))
    for name, ref in res.outputs.items():
        _check_port(res, ref, ("outputs", name), f"output {name!r}", errors)
    for loss in res.losses:
        for ref in loss.refs:
            _check_port(res, ref, loss.src + ("from",), f"loss {loss.name!r}", errors)


# ---------------------------------------------------------------- the whole graph


def validate(res: Resolved) -> Checked:
    errors: list[Diagnostic] = []
    checked: Checked = {}
    _check_outputs(res, errors)
    for name, symbols in res.inputs.items():
        for i, sym in enumerate(symbols):
            if sym not in ("batch", "seq") and not (sym.isascii() and sym.isdigit() and int(sym) > 0):
                errors.append(Diagnostic(f"graph input {name!r}: axis {sym!r} is neither batch, seq nor a size",
                                         loc=res.doc.loc(("inputs", name, i)), fix="e.g. tokens: [batch, seq]"))
    for path in res.nodes:
        _check_node(res, path, checked, errors)
    # the graph
    g = nx.DiGraph()
    g.add_nodes_from(res.nodes)
    g.add_nodes_from(res.inputs)
    for path, node in res.nodes.items():
        for _, ref in node.inputs:
            g.add_edge(ref.node, path)
    try:
        cycle = nx.find_cycle(g)
        names = [u for u, _ in cycle] + [cycle[0][0]]
        first = res.nodes[cycle[0][1]]
        errors.append(Diagnostic(f"the graph has a cycle: {' -> '.join(names)}", loc=res.doc.loc(first.src + ("in",)),
                                 node=cycle[0][1], fix="a node cannot depend on its own output"))
    except nx.NetworkXNoCycle:
        pass
    sinks = {r.node for r in res.outputs.values()}
    sinks |= {r.node for loss in res.losses for r in loss.refs}
    for p in res.exit_points:
        sinks |= {r.node for r in res.instance_outputs.get(p, {}).values()} | ({p} if p in res.nodes else set())
    used = set(sinks)
    for s in sinks:
        if s in g:
            used |= nx.ancestors(g, s)
    for path, node in res.nodes.items():
        if path not in used:
            errors.append(Diagnostic(f"node {path!r} is not used by any output or loss", loc=res.doc.loc(node.src),
                                     node=path, fix="wire it into the graph, or remove it"))
    for k in res.inputs:
        if k not in used:
            errors.append(Diagnostic(f"graph input {k!r} is never used", loc=res.doc.loc(("inputs", k))))
    if errors:
        raise ValidateError(_without_consequences(errors))
    return checked


def _without_consequences(errors: list[Diagnostic]) -> list[Diagnostic]:
    """Drop "not used" errors when a node lacks an input: its sources are unused because of it,
    so the cause is reported once instead of once per node upstream of it."""
    causes = ("is not connected", "needs at least one input")
    if not any(c in d.message for d in errors for c in causes):
        return errors
    return [d for d in errors if not (d.message.endswith("is not used by any output or loss")
                                      or (d.message.startswith("graph input") and d.message.endswith("is never used")))]
