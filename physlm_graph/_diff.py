"""Model-level diffs: what changed between two *compiled* models, not between two texts.

    d = diff_blueprints("holographic-v2.yaml", "holographic-v2-fixed.yaml")
    d.identical, d.summary(), d.to_json()

Two blueprints that spell the same graph differently (a value moved into ``params``, an
``extends`` instead of a copy) diff as identical. The comparison runs on the canonical
expanded graph (``CompiledModel.graph``: per node its component, inputs and parameters) and
on the shape report (``CompiledModel.report``: output shapes, parameter counts, FLOPs/token).
Per node it says whether the node was added, removed, or changed, and how: component
(``use``), inputs (rewired), parameters (old -> new, ``tie`` and ``allow_leak`` included),
output shapes, and the parameter and FLOPs/token deltas. Outputs, losses and exits are
compared too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

__all__ = ["NodeChange", "ModelDiff", "diff_models", "diff_blueprints", "diff_tables"]

_MISSING = "<unset>"


@dataclass
class NodeChange:
    """One node that differs: ``kind`` is ``added``, ``removed`` or ``changed``."""

    path: str
    kind: str
    use: tuple[str | None, str | None]  # (old, new); None where the node does not exist
    inputs: tuple[list[Any] | None, list[Any] | None] | None = None  # set when rewired
    params: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # name -> (old, new)
    shapes: tuple[dict[str, str], dict[str, str]] | None = None  # set when output shapes differ
    params_count: tuple[int, int] = (0, 0)
    flops: tuple[float, float] = (0.0, 0.0)

    @property
    def rewired(self) -> bool:
        return self.inputs is not None

    @property
    def params_delta(self) -> int:
        return self.params_count[1] - self.params_count[0]

    @property
    def flops_delta(self) -> float:
        return self.flops[1] - self.flops[0]

    def describe(self) -> str:
        """One line: what changed in this node."""
        if self.kind == "added":
            return f"added {self.use[1]}"
        if self.kind == "removed":
            return f"removed {self.use[0]}"
        parts = []
        if self.use[0] != self.use[1]:
            parts.append(f"use: {self.use[0]} -> {self.use[1]}")
        if self.inputs is not None:
            parts.append(f"in: {_short(self.inputs[0])} -> {_short(self.inputs[1])}")
        for k, (old, new) in self.params.items():
            parts.append(f"{k}: {_short(old)} -> {_short(new)}")
        if self.shapes is not None:
            parts.append(f"shape: {_shape_text(self.shapes[0])} -> {_shape_text(self.shapes[1])}")
        return "; ".join(parts) or "report only"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"node": self.path, "kind": self.kind, "use": list(self.use)}
        if self.inputs is not None:
            out["in"] = {"old": self.inputs[0], "new": self.inputs[1]}
        if self.params:
            out["params"] = {k: {"old": _jsonable(o), "new": _jsonable(n)} for k, (o, n) in self.params.items()}
        if self.shapes is not None:
            out["shapes"] = {"old": self.shapes[0], "new": self.shapes[1]}
        out["param_count"] = {"old": self.params_count[0], "new": self.params_count[1], "delta": self.params_delta}
        out["flops_per_token"] = {"old": self.flops[0], "new": self.flops[1], "delta": self.flops_delta}
        return out


@dataclass
class ModelDiff:
    """The difference between model A and model B."""

    a_name: str
    b_name: str
    a_hash: str
    b_hash: str
    nodes: list[NodeChange]
    params: tuple[int, int]
    flops: tuple[float, float]
    sections: dict[str, dict[str, tuple[Any, Any]]] = field(default_factory=dict)  # outputs/losses/exits

    @property
    def identical(self) -> bool:
        return not self.nodes and not self.sections and self.params[0] == self.params[1]

    def count(self, kind: str) -> int:
        return sum(1 for n in self.nodes if n.kind == kind)

    def summary(self) -> str:
        """A short line for tables: counts of node changes and the parameter delta."""
        if self.identical:
            return "identical"
        bits = [f"{self.count(k)} {k}" for k in ("changed", "added", "removed") if self.count(k)]
        rewired = sum(1 for n in self.nodes if n.rewired)
        if rewired:
            bits.append(f"{rewired} rewired")
        for sec, items in self.sections.items():
            bits.append(f"{sec}: {', '.join(sorted(items))}")
        delta = self.params[1] - self.params[0]
        bits.append(f"params {delta:+,}")
        return "; ".join(bits)

    def to_json(self) -> dict[str, Any]:
        return {
            "a": {"name": self.a_name, "hash": self.a_hash, "params": self.params[0], "flops_per_token": self.flops[0]},
            "b": {"name": self.b_name, "hash": self.b_hash, "params": self.params[1], "flops_per_token": self.flops[1]},
            "identical": self.identical,
            "summary": self.summary(),
            "params_delta": self.params[1] - self.params[0],
            "flops_per_token_delta": self.flops[1] - self.flops[0],
            "nodes": [n.to_json() for n in self.nodes],
            "sections": {s: {k: {"old": _jsonable(o), "new": _jsonable(n)} for k, (o, n) in v.items()}
                         for s, v in self.sections.items()},
        }


def _jsonable(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, list):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    return v


def _short(v: Any, limit: int = 60) -> str:
    if v is None:
        return _MISSING
    if isinstance(v, list):
        text = "[" + ", ".join(_short(x, limit) for x in v) + "]"
    elif isinstance(v, dict):
        text = "{" + ", ".join(f"{k}: {_short(x, limit)}" for k, x in v.items()) + "}"
    else:
        text = str(v)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _shape_text(shapes: dict[str, str]) -> str:
    return ", ".join(s if p == "out" else f"{p}: {s}" for p, s in shapes.items()) or "-"


_META = ("use", "in")


def _node_change(path: str, a: dict[str, Any] | None, b: dict[str, Any] | None, ra: Any, rb: Any) -> NodeChange | None:
    count = (ra.params if ra else 0, rb.params if rb else 0)
    flops = (float(ra.flops_per_token) if ra else 0.0, float(rb.flops_per_token) if rb else 0.0)
    shapes_a = {p: str(s) for p, s in ra.out_shapes} if ra else {}
    shapes_b = {p: str(s) for p, s in rb.out_shapes} if rb else {}
    if a is None or b is None:
        kind = "added" if a is None else "removed"
        return NodeChange(path, kind, (a and a["use"], b and b["use"]), params_count=count, flops=flops,
                          shapes=(shapes_a, shapes_b))
    ch = NodeChange(path, "changed", (a["use"], b["use"]), params_count=count, flops=flops)
    if a.get("in") != b.get("in"):
        ch.inputs = (a.get("in"), b.get("in"))
    for k in sorted((set(a) | set(b)) - set(_META)):
        if a.get(k) != b.get(k):
            ch.params[k] = (a.get(k), b.get(k))
    if shapes_a != shapes_b:
        ch.shapes = (shapes_a, shapes_b)
    if ch.use[0] == ch.use[1] and ch.inputs is None and not ch.params and ch.shapes is None and count[0] == count[1]:
        return None
    return ch


def _effective(cm: Any) -> dict[str, dict[str, Any]]:
    """Per node: component, inputs, and *every* parameter value (defaults filled in from the
    checked parameter model), so ``mode: fixed`` written out equals ``fixed`` by default."""
    out = {}
    for path, entry in cm.graph["nodes"].items():
        node = dict(entry)
        checked = cm.checked.get(path) if hasattr(cm.checked, "get") else None
        if checked is not None and hasattr(checked, "model_dump"):
            node.update(checked.model_dump(mode="json"))
        out[path] = node
    return out


def diff_models(a: Any, b: Any) -> ModelDiff:
    """Diff two ``CompiledModel`` objects (their checked graphs and reports)."""
    ga, gb = _effective(a), _effective(b)
    rep_a = {r.path: r for r in a.report}
    rep_b = {r.path: r for r in b.report}
    order = list(ga) + [p for p in gb if p not in ga]
    nodes = []
    for path in order:
        ch = _node_change(path, ga.get(path), gb.get(path), rep_a.get(path), rep_b.get(path))
        if ch is not None:
            nodes.append(ch)
    sections: dict[str, dict[str, tuple[Any, Any]]] = {}
    for sec in ("inputs", "outputs", "losses", "exits"):
        sa, sb = a.graph.get(sec) or {}, b.graph.get(sec) or {}
        if not isinstance(sa, dict) or not isinstance(sb, dict):
            if sa != sb:
                sections[sec] = {"*": (sa, sb)}
            continue
        changed = {k: (sa.get(k), sb.get(k)) for k in sorted(set(sa) | set(sb)) if sa.get(k) != sb.get(k)}
        if changed:
            sections[sec] = changed
    return ModelDiff(a.name, b.name, a.hash, b.hash, nodes, (a.num_params, b.num_params),
                     (float(a.flops_per_token), float(b.flops_per_token)), sections)


def diff_blueprints(a: Any, b: Any, *, overrides: dict[str, Any] | list[str] | None = None) -> ModelDiff:
    """Compile two blueprints on the meta device (no weights) and diff them."""
    from physlm_graph._compile import compile_blueprint

    ca = compile_blueprint(a, overrides=overrides, device="meta", build=False)
    cb = compile_blueprint(b, overrides=overrides, device="meta", build=False)
    return diff_models(ca, cb)


# ---------------------------------------------------------------------------- tables
_INDEX = re.compile(r"(?<=\.)\d+(?=\.|$)")


def _group_key(ch: NodeChange) -> tuple[str, str]:
    """Instances of one block line that changed the same way collapse into one row."""
    return _INDEX.sub("*", ch.path), ch.kind + "|" + ch.describe() + f"|{ch.params_count}|{ch.flops}"


def _grouped(nodes: list[NodeChange]) -> list[tuple[str, list[NodeChange]]]:
    groups: dict[tuple[str, str], list[NodeChange]] = {}
    for ch in nodes:
        groups.setdefault(_group_key(ch), []).append(ch)
    out = []
    for (pattern, _), members in groups.items():
        label = members[0].path if len(members) == 1 else f"{pattern} (x{len(members)})"
        out.append((label, members))
    return out


def _fmt_delta(n: float, flops: bool = False) -> str:
    if n == 0:
        return "0"
    if flops:
        sign = "+" if n > 0 else "-"
        a = abs(n)
        for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
            if a >= div:
                return f"{sign}{a / div:.2f}{unit}"
        return f"{sign}{a:.0f}"
    return f"{int(n):+,}"


def diff_tables(d: ModelDiff) -> list[Any]:
    """Rich renderables: the node table, other sections, and the totals."""
    from rich.markup import escape
    from rich.table import Table

    out: list[Any] = []
    if d.nodes:
        t = Table(title=f"{d.a_name} ({d.a_hash}) -> {d.b_name} ({d.b_hash})", title_justify="left")
        for c in ("node", "change", "component", "what changed", "params delta", "FLOPs/token delta"):
            t.add_column(c, justify="right" if "delta" in c else "left", overflow="fold")
        for label, members in _grouped(d.nodes):
            ch = members[0]
            n = len(members)
            comp = ch.use[0] if ch.use[0] == ch.use[1] else f"{ch.use[0] or '-'} -> {ch.use[1] or '-'}"
            kind = ch.kind + (" (rewired)" if ch.rewired else "")
            t.add_row(escape(label), kind, escape(comp), escape(ch.describe()),
                      _fmt_delta(ch.params_delta * n), _fmt_delta(ch.flops_delta * n, flops=True))
        out.append(t)
    if d.sections:
        s = Table(title="outputs, losses, exits", title_justify="left")
        for c in ("section", "name", "old", "new"):
            s.add_column(c, overflow="fold")
        for sec, items in d.sections.items():
            for k, (old, new) in items.items():
                s.add_row(sec, escape(k), escape(_short(old, 80)), escape(_short(new, 80)))
        out.append(s)
    tot = Table(title="totals", title_justify="left")
    for c in ("", "A", "B", "delta"):
        tot.add_column(c, justify="right" if c else "left")
    tot.add_row("params", f"{d.params[0]:,}", f"{d.params[1]:,}", _fmt_delta(d.params[1] - d.params[0]))
    tot.add_row("FLOPs/token", f"{d.flops[0]:,.0f}", f"{d.flops[1]:,.0f}", _fmt_delta(d.flops[1] - d.flops[0], flops=True))
    tot.add_row("nodes", "", "", f"{d.count('changed')} changed, {d.count('added')} added, {d.count('removed')} removed")
    out.append(tot)
    return out
