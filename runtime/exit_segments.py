"""Early-exit decoding, the cut: a model's GraphModule cut into segments, one per exit (the
nodes needed for that exit's hidden state that no earlier segment computes) plus the final one,
each a small GraphModule sharing the model's submodules; and, for ``kv_fill="propagate"``, the
pieces that fill skipped layers' attention caches from an exit's hidden state.
"""

from __future__ import annotations

import weakref
from typing import Any

from torch import Tensor, fx
from torch.nn import functional as F

from physlm_graph._errors import PhysLMError

from .exit_rules import _closure, _layer_nodes, _outputs, _safe_name, exit_depths

__all__ = ["cut_for"]


class _Piece:
    """Some nodes of the model as a GraphModule of their own (generated Python, sharing the
    model's submodules): ``inputs`` are the outside nodes they read, ``outputs`` those of theirs
    that something outside reads."""

    def __init__(self, module: fx.GraphModule, inputs: list[fx.Node], outputs: list[fx.Node]) -> None:
        self.module, self.inputs, self.outputs = module, inputs, outputs

    @classmethod
    def cut(cls, root: fx.GraphModule, nodes: list[fx.Node]) -> _Piece:
        members = set(nodes)
        graph = fx.Graph()
        remap: dict[fx.Node, fx.Node] = {}
        inputs: list[fx.Node] = []
        for n in nodes:
            for a in n.all_input_nodes:
                if a not in members and a not in remap:
                    remap[a] = graph.placeholder(_safe_name(f"in_{a.name}"))
                    inputs.append(a)
            remap[n] = graph.node_copy(n, lambda a: remap[a])
        outputs = [n for n in nodes if any(u not in members for u in n.users)]
        graph.output(tuple(remap[n] for n in outputs))
        return cls(fx.GraphModule(root, graph), inputs, outputs)


class _Cut:
    """The segments and exit heads of one graph (see ``SegmentExecutor``)."""

    def __init__(self, cm: Any) -> None:
        gm = cm.module
        self.graph = gm.graph
        if len([n for n in gm.graph.nodes if n.op == "placeholder"]) != 1:
            raise PhysLMError("early-exit generation needs a model with one input (tokens)",
                              fix="generate with the plain runtime.generate")
        outs = _outputs(gm)
        self.points = list(outs["exit_hidden"])  # shallowest first
        self.hidden = [outs["exit_hidden"][p] for p in self.points]
        self.exit_logits = [outs["exit_logits"][p] for p in self.points]
        self.final = outs["logits"]
        covered: set[fx.Node] = set()
        segments: list[set[fx.Node]] = []
        for h in self.hidden + [self.final]:
            seg = _closure(h) - covered
            covered |= seg
            segments.append(seg)
        self.seg_nodes = segments
        self.segments = [_Piece.cut(gm, [n for n in gm.graph.nodes if n in seg and n.op != "placeholder"])
                         for seg in segments]
        self.heads = [_Piece.cut(gm, [n for n in gm.graph.nodes if n in _closure(lg) - _closure(h)])
                      for h, lg in zip(self.hidden, self.exit_logits)]
        self.boundary = [seg.inputs for seg in self.segments]
        later = {a for bs in self.boundary for a in bs}
        self.keep = [[n for n in seg.outputs if n in later] for seg in self.segments]
        depths, full = exit_depths(cm)
        self.depths = [depths[p] for p in self.points] + [full]
        self.seg_layers = [self.depths[0]] + [b - a for a, b in zip(self.depths, self.depths[1:])]
        self.placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
        # the residual stream: layer outputs and exit states (propagate feeds the exit state there)
        self.stream = set(_layer_nodes(cm).values()) | set(self.hidden)
        self.uses = {path: node.use for path, node in cm.resolved.nodes.items()}
        self.kv_plans: list[_Piece] | str | None = None  # propagate: one K/V filler per exit, or why not


def _causal_kv(module: Any, x: Tensor, rope: Tensor | None = None) -> None:
    """Append to an ``attention.causal`` module's decode cache the keys and values of ``x``
    (B, T, D) only: the K/V rows of its fused ``qkv`` projection, rope on the keys. The same
    ops as ``CausalSelfAttention.forward`` up to ``_extend_cache`` (tested against it), without
    the queries, the attention and the output projection."""
    from physlm_graph.components._rope import apply_rope

    B, T, _ = x.shape
    H, Hkv, hd = module.num_heads, module.num_kv_heads, module.head_dim
    w, b = module.qkv.weight[H * hd :], module.qkv.bias  # (2 H_kv hd, D)
    kv = F.linear(x, w, None if b is None else b[H * hd :])  # (B, T, 2 H_kv hd)
    k, v = kv.split([Hkv * hd, Hkv * hd], dim=-1)
    k = k.view(B, T, Hkv, hd).transpose(1, 2)  # (B, H_kv, T, hd)
    v = v.view(B, T, Hkv, hd).transpose(1, 2)
    k = module.norm_qk(k, "k")
    if rope is not None:
        k = apply_rope(k, rope)
    module._extend_cache(k, v)


def _is_causal_attention(gm: fx.GraphModule, cut: _Cut, n: fx.Node) -> bool:
    from physlm_graph.components.attention.causal import CausalSelfAttention

    if n.op != "call_module" or cut.uses.get(n.target, "attention.causal") != "attention.causal":
        return False
    return type(gm.get_submodule(n.target)) is CausalSelfAttention


def _kv_plan(gm: fx.GraphModule, cut: _Cut, s: int, stateful: set[fx.Node]) -> _Piece | str:
    """For a token that exits after segment s: a piece that reads the exit hidden state (and
    the values of segments <= s it needs) and appends K/V computed from it to every
    ``attention.causal`` cache in the later segments; or why that cannot be done."""
    skipped = set().union(*cut.seg_nodes[s + 1 :])
    h = cut.hidden[s]
    subst = {n for n in cut.stream if n in skipped} | {h}
    attns = [n for n in gm.graph.nodes if n in skipped and _is_causal_attention(gm, cut, n)]
    others = [n.name for n in gm.graph.nodes if n in skipped and n in stateful and n not in attns]
    if others:
        return f"the skipped layers hold cached components other than attention.causal ({', '.join(others)})"
    copy: set[fx.Node] = set()
    outside: set[fx.Node] = set()
    stack = [a for n in attns for a in n.all_input_nodes]
    while stack:
        u = stack.pop()
        if u in subst or u in copy or u in outside:
            continue
        if u not in skipped:
            outside.add(u)
            continue
        if u in attns or u in stateful:
            return f"the K/V path of an attention.causal node runs through the cached node {u.name!r}"
        copy.add(u)
        stack.extend(u.all_input_nodes)
    graph = fx.Graph()
    state = graph.placeholder("exit_state")
    inputs = [h] + [n for n in gm.graph.nodes if n in outside and n is not h]
    remap: dict[fx.Node, fx.Node] = {h: state}
    for n in inputs[1:]:
        remap[n] = graph.placeholder(_safe_name(f"in_{n.name}"))

    def arg(a: fx.Node) -> fx.Node:
        return state if a in subst else remap[a]

    for n in gm.graph.nodes:
        if n in copy:
            remap[n] = graph.node_copy(n, arg)
        elif n in attns:
            graph.call_function(_causal_kv, (graph.get_attr(n.target), *fx.map_arg(n.args, arg)),
                                fx.map_arg(n.kwargs, arg))
    graph.output(())
    piece = _Piece(fx.GraphModule(gm, graph), inputs, [])
    piece.kv_layers = len(attns)  # type: ignore[attr-defined]
    return piece


_CUTS: weakref.WeakKeyDictionary[fx.GraphModule, _Cut] = weakref.WeakKeyDictionary()


def cut_for(cm: Any) -> _Cut:
    """The segments and exit heads of ``cm``'s graph, cut once per graph and cached."""
    gm = cm.module
    cut = _CUTS.get(gm)
    if cut is None or cut.graph is not gm.graph:  # the cut depends on the graph only
        cut = _CUTS[gm] = _Cut(cm)
    return cut
