"""``physlm-graph viz``: the compiled graph as a self-contained HTML page or an SVG picture.

Nothing is fetched: the page's CSS, script and SVG are written inline here, so it opens offline
and can be mailed. The HTML lists the graph in order with one collapsible ``<details>`` per
block instance (``trunk.3``); each node card shows its component, output shape(s), parameter
count, FLOPs per token, its parameters and links to its inputs. Above it, the same graph is
drawn as an SVG (layered: a node sits one row below its deepest input).
"""

from __future__ import annotations

import hashlib
import html
import json
from pathlib import Path
from typing import Any

__all__ = ["render_html", "render_svg", "layout", "node_colour"]

BOX_W, BOX_H, GAP_X, GAP_Y, PAD = 210, 58, 26, 34, 20
PALETTE = {  # one colour per component family; others get a stable colour from their name
    "embed": "#4e79a7", "attention": "#e15759", "ffn": "#59a14f", "norm": "#f28e2b", "head": "#b07aa1",
    "op": "#9c9c9c", "ssm": "#76b7b2", "moe": "#edc948", "memory": "#ff9da7", "misc": "#bab0ac",
}


def node_colour(use: str) -> str:
    fam = "op" if "." not in use else use.split(".")[0]
    if fam in PALETTE:
        return PALETTE[fam]
    h = int(hashlib.sha256(fam.encode()).hexdigest()[:6], 16)
    return f"hsl({h % 360}, 55%, 52%)"


def _fmt(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def _nodes(cm: Any) -> list[dict[str, Any]]:
    """One entry per node, in graph order: what the pictures show."""
    reports = {r.path: r for r in cm.report}
    out = []
    for path, spec in cm.resolved.nodes.items():
        r = reports.get(path)
        out.append({
            "path": path, "use": spec.use, "instance": spec.instance,
            "inputs": [(str(ref), ref.node) for _, ref in spec.inputs],
            "shapes": [s if p == "out" else f"{p}: {s}" for p, s in (r.out_shapes if r else [])],
            "params": r.params if r else 0, "flops": r.flops_per_token if r else 0.0,
            "tied_to": r.tied_to if r else None,
            "kwargs": {k: v for k, v in sorted(spec.params.items())},
        })
    return out


def layout(cm: Any) -> dict[str, tuple[int, int]]:
    """(row, column) of every node and graph input: row = 1 + the deepest input's row."""
    rows: dict[str, int] = {name: 0 for name in cm.resolved.inputs}
    for path, spec in cm.resolved.nodes.items():  # nodes come in dependency order
        rows[path] = 1 + max((rows.get(ref.node, 0) for _, ref in spec.inputs), default=0)
    cols: dict[int, int] = {}
    pos = {}
    for name, row in rows.items():
        pos[name] = (row, cols.get(row, 0))
        cols[row] = cols.get(row, 0) + 1
    return pos


def render_svg(cm: Any) -> str:
    """The graph as a standalone SVG: boxes (component, shape, params) and edges."""
    nodes = {n["path"]: n for n in _nodes(cm)}
    pos = layout(cm)
    width = PAD * 2 + max(c for _, c in pos.values()) * (BOX_W + GAP_X) + BOX_W
    height = PAD * 2 + max(r for r, _ in pos.values()) * (BOX_H + GAP_Y) + BOX_H + 30

    def xy(name: str) -> tuple[int, int]:
        r, c = pos[name]
        return PAD + c * (BOX_W + GAP_X), PAD + 30 + r * (BOX_H + GAP_Y)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
             '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="6" markerHeight="6" '
             'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#888"/></marker></defs>',
             f'<text x="{PAD}" y="{PAD + 4}" font-size="14" font-weight="bold">{html.escape(cm.name)} '
             f'({cm.num_params:,} params, graph {cm.hash})</text>']
    # block instances: a band behind their rows
    spans: dict[str, list[int]] = {}
    for p, n in nodes.items():
        if n["instance"]:
            spans.setdefault(n["instance"], []).append(pos[p][0])
    for inst, rs in spans.items():
        y0 = PAD + 30 + min(rs) * (BOX_H + GAP_Y) - 8
        y1 = PAD + 30 + max(rs) * (BOX_H + GAP_Y) + BOX_H + 8
        parts.append(f'<rect class="block" x="4" y="{y0}" width="{width - 8}" height="{y1 - y0}" rx="8" '
                     f'fill="#f3f3f8" stroke="#c8c8dc"/><text x="{width - 10}" y="{y0 + 13}" text-anchor="end" '
                     f'fill="#667">{html.escape(inst)}</text>')
    for p, n in nodes.items():
        x1, y1 = xy(p)
        for _, base in n["inputs"]:
            if base not in pos:
                continue
            x0, y0 = xy(base)
            parts.append(f'<path d="M{x0 + BOX_W / 2},{y0 + BOX_H} C{x0 + BOX_W / 2},{y0 + BOX_H + 20} '
                         f'{x1 + BOX_W / 2},{y1 - 20} {x1 + BOX_W / 2},{y1}" fill="none" stroke="#888" '
                         f'marker-end="url(#arrow)"/>')
    for name in cm.resolved.inputs:
        x, y = xy(name)
        parts.append(f'<rect x="{x}" y="{y}" width="{BOX_W}" height="{BOX_H}" rx="6" fill="#fff" stroke="#333" '
                     f'stroke-dasharray="4 3"/><text x="{x + 8}" y="{y + 22}" font-weight="bold">{html.escape(name)}'
                     f'</text><text x="{x + 8}" y="{y + 40}">input {html.escape(str(list(cm.resolved.inputs[name])))}</text>')
    for p, n in nodes.items():
        x, y = xy(p)
        col = node_colour(n["use"])
        shape = "; ".join(n["shapes"])
        parts.append(
            f'<g class="node" data-path="{html.escape(p)}"><title>{html.escape(p)}: {html.escape(n["use"])} '
            f'{html.escape(json.dumps(n["kwargs"], default=str))}</title>'
            f'<rect x="{x}" y="{y}" width="{BOX_W}" height="{BOX_H}" rx="6" fill="{col}" stroke="#333"/>'
            f'<text x="{x + 8}" y="{y + 15}" fill="#fff" font-weight="bold">{html.escape(p[-30:])}</text>'
            f'<text x="{x + 8}" y="{y + 30}" fill="#fff">{html.escape(n["use"])}</text>'
            f'<text x="{x + 8}" y="{y + 45}" fill="#fff">{html.escape(shape[:34])}  {_fmt(n["params"])}</text></g>')
    parts.append("</svg>")
    return "\n".join(parts)


CSS = """
body{font-family:system-ui,sans-serif;margin:16px;color:#222;background:#fafafa}
h1{font-size:20px;margin:0 0 4px} .meta{color:#555;margin-bottom:10px}
button{margin-right:6px} .diagram{overflow:auto;border:1px solid #ddd;background:#fff;margin:10px 0}
details.block{border:1px solid #c8c8dc;border-radius:8px;margin:6px 0;padding:4px 8px;background:#f3f3f8}
details.block>summary{cursor:pointer;font-weight:600}
.node{display:inline-block;vertical-align:top;width:250px;margin:4px;padding:6px 8px;border-radius:6px;
 color:#fff;box-shadow:0 1px 2px rgba(0,0,0,.25)} .node b{display:block} .node .kw{font-size:11px;opacity:.95}
.node a{color:#fff} .node .shape{font-family:monospace} .node:target{outline:3px solid #000}
"""

JS = """
function setAll(open){document.querySelectorAll('details.block').forEach(function(d){d.open=open;});}
"""


def _card(n: dict[str, Any]) -> str:
    ins = ", ".join(f'<a href="#n-{html.escape(node)}">{html.escape(s)}</a>' for s, node in n["inputs"])
    kw = ", ".join(f"{html.escape(k)}={html.escape(json.dumps(v, default=str))}" for k, v in n["kwargs"].items())
    tied = f" (tied to {html.escape(n['tied_to'])})" if n["tied_to"] else ""
    return (f'<div class="node" id="n-{html.escape(n["path"])}" style="background:{node_colour(n["use"])}">'
            f'<b>{html.escape(n["path"])}</b><span class="use">{html.escape(n["use"])}</span><br>'
            f'<span class="shape">{html.escape("; ".join(n["shapes"]))}</span><br>'
            f'{n["params"]:,} params{tied} · {_fmt(n["flops"])} FLOPs/token<br>'
            f'<span class="kw">{kw or "no parameters"}</span><br><span class="kw">in: {ins or "-"}</span></div>')


def render_html(cm: Any) -> str:
    """A self-contained page: header, the SVG diagram, and the node cards with collapsible blocks."""
    body: list[str] = []
    nodes = _nodes(cm)
    i = 0
    while i < len(nodes):
        inst = nodes[i]["instance"]
        if inst is None:
            body.append(_card(nodes[i]))
            i += 1
            continue
        group = []
        while i < len(nodes) and nodes[i]["instance"] == inst:
            group.append(nodes[i])
            i += 1
        params = sum(n["params"] for n in group)
        body.append(f'<details class="block" open><summary>{html.escape(inst)} · {len(group)} nodes · '
                    f'{params:,} params</summary>{"".join(_card(n) for n in group)}</details>')
    title = html.escape(cm.name)
    return (f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{title}</title><style>{CSS}</style>'
            f'<script>{JS}</script></head><body><h1>{title}</h1><div class="meta">{cm.num_params:,} parameters · '
            f'{_fmt(cm.flops_per_token)} FLOPs/token · graph {cm.hash} · {len(nodes)} nodes</div>'
            f'<button onclick="setAll(true)">expand all blocks</button>'
            f'<button onclick="setAll(false)">collapse all blocks</button>'
            f'<details class="diagram-wrap"><summary>diagram</summary><div class="diagram">{render_svg(cm)}</div>'
            f'</details><div id="graph">{"".join(body)}</div></body></html>\n')
