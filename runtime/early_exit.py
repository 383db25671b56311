"""Early exit: exit losses for training, exit rules, and a segment executor that decodes with exits.

    extra, terms = exit_losses(cm, out, y)                  # Trainer.compute_loss adds these
    ids, stats = generate_with_exits(cm, prompt, max_new_tokens=200, threshold=0.9)
    stats.mean_layers, stats.full_layers                    # layers used per token vs full depth

The compiler gives every exit point a readout in the graph (``exit_logits``; see
``docs/early-exit.md``): shared exits call the final norm and head again, ``own`` exits have
``exits.<i>.norm``/``exits.<i>.head`` modules, saved in checkpoints like any other weight.

Data-dependent control flow lives here, not in the fx graph. ``SegmentExecutor`` cuts the
GraphModule into segments, one per exit (the nodes needed for that exit's hidden state that
no earlier segment computes) plus the final one, each a small GraphModule sharing the model's
submodules, and runs them in turn, stopping at the first exit whose rule fires.

The KV caches of the layers a token skips are filled in one of two ways (``kv_fill``):

- ``"lazy"`` (default, exact): the token's state at its exit waits in a queue, and the next
  token that reaches a skipped segment runs it on the waiting rows and itself in one chunk (the
  KV caches take the rows in position order). The caches hold exactly what the full-depth model
  would have written, so perplexity under the policy measured by a full forward
  (``policy_logits``) is the perplexity generation sees; but no layer compute is saved, only
  batched.
- ``"propagate"`` (CALM's state propagation, approximate): the skipped layers' keys and values
  are computed from the exit hidden state: for every ``attention.causal`` node in the skipped
  segments, only the nodes between the layer input and the attention (the pre-norm) and the K/V
  rows of its ``qkv`` projection run, on the exit state. Layer compute is saved; later tokens
  attend to approximate K/V. Blueprints whose skipped segments hold another cached component
  (an SSM state, a memory) fall back to lazy, with a warning and ``stats.kv_note``.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, fx
from torch.nn import functional as F

from physlm_graph._context import DecodeContext, decoding
from physlm_graph._errors import PhysLMError

__all__ = [
    "RULES",
    "exit_score",
    "exit_fires",
    "never_fires",
    "exit_points",
    "exit_depths",
    "exit_loss_weights",
    "exit_losses",
    "policy_logits",
    "ExitScorer",
    "SegmentExecutor",
    "ExitStats",
    "KV_FILLS",
    "generate_with_exits",
]

RULES: tuple[str, ...] = ("top1", "margin", "entropy", "saturation")
KV_FILLS: tuple[str, ...] = ("lazy", "propagate")  # how skipped layers' KV caches are filled
IGNORE = -100


# ---------------------------------------------------------------- exit rules


def exit_score(rule: str, logits: Tensor, hidden: Tensor | None = None, prev_hidden: Tensor | None = None) -> Tensor:
    """The confidence the rule measures, one value per position (``logits`` (..., V) -> (...)).

    top1: the largest softmax probability. margin: top-1 minus top-2 probability (CALM).
    entropy: the softmax entropy in nats (low is confident). saturation: the cosine between
    this exit's hidden state and the previous exit's (CALM's state propagation test); the first
    exit has no previous state and scores -inf (it never exits under this rule).
    """
    if rule == "saturation":
        if hidden is None:
            raise PhysLMError("the saturation rule needs the exit's hidden state")
        if prev_hidden is None:
            return torch.full(hidden.shape[:-1], float("-inf"), device=hidden.device)
        return F.cosine_similarity(hidden.float(), prev_hidden.float(), dim=-1)
    # The same ops as the decode-time test (_fires_now), so both decide alike at the boundary.
    if rule == "entropy":
        logp = logits.float().log_softmax(dim=-1)  # (..., V)
        return -(logp.exp() * logp).sum(dim=-1)
    probs = logits.float().softmax(dim=-1)  # (..., V)
    if rule == "top1":
        return probs.amax(dim=-1)
    if rule == "margin":
        top = probs.topk(2, dim=-1).values.double()  # (..., 2)
        return top[..., 0] - top[..., 1]
    raise PhysLMError(f"unknown exit rule {rule!r}", expected=", ".join(RULES))


def exit_fires(rule: str, threshold: float, score: Tensor) -> Tensor:
    """Where the rule says "exit": score >= threshold, or entropy <= threshold (compared in float64)."""
    score = score.double()
    return score <= threshold if rule == "entropy" else score >= threshold


def never_fires(rule: str) -> float:
    """A threshold with which ``rule`` never exits (for full-depth baselines and tests)."""
    return -1.0 if rule == "entropy" else 2.0


def _fires_now(rule: str, threshold: float, logits: Tensor, hidden: Tensor, prev: Tensor | None) -> bool:
    """``exit_fires(...).all()`` for one decode step, in as few ops as possible (it runs at every
    exit of every token) and one transfer to the host."""
    if rule == "saturation":
        if prev is None:
            return False
        return min(F.cosine_similarity(hidden.float(), prev.float(), dim=-1).tolist()) >= threshold
    if rule == "entropy":
        logp = logits.float().log_softmax(dim=-1)
        return max((-(logp.exp() * logp).sum(dim=-1)).tolist()) <= threshold
    probs = logits.float().softmax(dim=-1)
    if rule == "top1":
        return min(probs.amax(dim=-1).tolist()) >= threshold
    top = probs.topk(2, dim=-1).values.tolist()  # [[p1, p2], ...]
    return min(a - b for a, b in top) >= threshold


def _check_rule(rule: str, threshold: float) -> None:
    if rule not in RULES:
        raise PhysLMError(f"unknown exit rule {rule!r}", expected=", ".join(RULES), got=rule,
                          fix="use top1, margin, entropy or saturation")
    if not math.isfinite(threshold):
        raise PhysLMError(f"the exit threshold must be a finite number, got {threshold}")


# ---------------------------------------------------------------- where the exits are


def exit_points(cm: Any) -> list[str]:
    """The model's exit points (block-instance or node paths), shallowest first, or an error
    when it has none."""
    if not cm.resolved.exit_points:
        raise PhysLMError(f"the blueprint {cm.name!r} declares no exits",
                          fix="add an exits: section, e.g. exits: {every: 2, block: trunk}; see docs/early-exit.md")
    return list(_outputs(cm.module)["exit_hidden"])


def _outputs(gm: fx.GraphModule) -> dict[str, Any]:
    out = next(n for n in gm.graph.nodes if n.op == "output")
    return out.args[0]


def _closure(node: fx.Node, seen: set[fx.Node] | None = None) -> set[fx.Node]:
    """``node`` and every node it depends on."""
    seen = set() if seen is None else seen
    stack = [node]
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return seen


def _safe_name(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text)


def _layer_nodes(cm: Any) -> dict[str, fx.Node]:
    """Each layer (a top-level repeated block instance, ``trunk.3``) and the fx node of its output."""
    gm, res = cm.module, cm.resolved
    by_name = {n.name: n for n in gm.graph.nodes}
    by_target = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    instances = [p for ps in res.instances.values() for p in ps]
    top = [p for p in instances if not any(p.startswith(q + ".") for q in instances)]
    layers: dict[str, fx.Node] = {}
    for p in top:
        outs = res.instance_outputs.get(p) or {}
        ref = next(iter(outs.values()), None)
        if ref is None:
            continue
        node = by_target.get(ref.node) or by_name.get(_safe_name(ref.node))
        if node is not None:
            layers[p] = node
    return layers


def exit_depths(cm: Any) -> tuple[dict[str, int], int]:
    """Layers (top-level block instances) computed at each exit point, and at the final head."""
    gm = cm.module
    outs = _outputs(gm)
    layers = _layer_nodes(cm)
    depths = {}
    for p, h in outs.get("exit_hidden", {}).items():
        need = _closure(h)
        depths[p] = sum(1 for n in layers.values() if n in need)
    need = _closure(outs["logits"])
    return depths, sum(1 for n in layers.values() if n in need)


# ---------------------------------------------------------------- training


def exit_loss_weights(cm: Any) -> dict[str, float]:
    """Each exit loss's weight: ``exits.weight`` times uniform (1/n), depth (PABEE: d_i / sum d),
    or the blueprint's list as given."""
    ex = cm.resolved.spec.exits
    exit_points(cm)
    points = list(cm.resolved.exit_points)  # a weighting list follows the blueprint's order
    if isinstance(ex.weighting, list):
        w = [float(v) for v in ex.weighting]
    elif ex.weighting == "uniform":
        w = [1.0 / len(points)] * len(points)
    else:
        depths, _ = exit_depths(cm)
        d = [max(depths.get(p, 0), 1) for p in points]
        w = [di / sum(d) for di in d]
    return {p: ex.weight * wi for p, wi in zip(points, w)}


def exit_losses(cm: Any, out: dict[str, Any], y: Tensor,
                weights: dict[str, float] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """The weighted sum of the exits' cross-entropies, and each unweighted one as ``exit/<point>/ce``.
    ``weights``: ``exit_loss_weights(cm)``, when the caller keeps them."""
    weights = exit_loss_weights(cm) if weights is None else weights
    logits = out.get("exit_logits")
    if not logits:
        raise PhysLMError("the model output has no exit_logits although the blueprint declares exits",
                          fix="recompile the blueprint with this version of physlm-graph")
    total = torch.zeros((), device=y.device)
    parts: dict[str, Tensor] = {}
    for p, w in weights.items():
        lg = logits[p]
        ce = F.cross_entropy(lg.reshape(-1, lg.size(-1)).float(), y.reshape(-1), ignore_index=IGNORE)
        parts[f"exit/{p}/ce"] = ce
        total = total + w * ce
    return total, parts


# ---------------------------------------------------------------- the policy on whole sequences


def policy_logits(out: dict[str, Any], rule: str, threshold: float) -> tuple[Tensor, Tensor]:
    """Teacher-forced exits: per position, the logits of the first exit whose rule fires (else the
    final logits), and the index of that exit (len(exits) for the final head). (B, T, V), (B, T)."""
    final = out["logits"]
    chosen = final.clone()
    where = torch.full(final.shape[:-1], len(out.get("exit_logits", {})), dtype=torch.long, device=final.device)
    undecided = torch.ones(final.shape[:-1], dtype=torch.bool, device=final.device)
    prev = None
    hidden = out.get("exit_hidden", {})
    for i, (p, lg) in enumerate(out.get("exit_logits", {}).items()):
        h = hidden.get(p)
        fire = exit_fires(rule, threshold, exit_score(rule, lg, h, prev)) & undecided  # (B, T)
        chosen = torch.where(fire[..., None], lg.to(chosen.dtype), chosen)
        where = torch.where(fire, torch.full_like(where, i), where)
        undecided &= ~fire
        prev = h
    return chosen, where


class ExitScorer:
    """``score_batch`` for ``evaluate``: cross-entropy under the exit policy, counting layers used."""

    def __init__(self, cm: Any, *, threshold: float, rule: str | None = None) -> None:
        points = exit_points(cm)
        self.rule = rule or cm.resolved.spec.exits.rule
        self.threshold = threshold
        _check_rule(self.rule, threshold)
        depths, self.full_layers = exit_depths(cm)
        self.points = points
        self.layer_of = torch.tensor([depths[p] for p in points] + [self.full_layers], dtype=torch.float64)
        self.counts = torch.zeros(len(points) + 1, dtype=torch.long)

    @torch.no_grad()
    def __call__(self, module: torch.nn.Module, x: Tensor, y: Tensor) -> tuple[float, int]:
        logits, where = policy_logits(module(x), self.rule, self.threshold)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1), ignore_index=IGNORE,
                               reduction="sum")
        scored = y != IGNORE
        self.counts += torch.bincount(where[scored].cpu(), minlength=len(self.points) + 1)
        return float(loss), int(scored.sum())

    def report(self) -> dict[str, Any]:
        n = int(self.counts.sum())
        mean = float((self.counts.double() * self.layer_of).sum() / max(n, 1))
        return {"exit_rule": self.rule, "exit_threshold": self.threshold, "mean_layers": mean,
                "full_layers": self.full_layers,
                "exit_counts": {p: int(c) for p, c in zip(self.points + ["final"], self.counts.tolist())}}


# ---------------------------------------------------------------- the segment executor


@dataclass
class ExitStats:
    """What a generation with exits did: per-exit token counts and layers."""

    points: list[str]
    depths: list[int]  # layers at each exit, then at the final head
    counts: list[int] = field(default_factory=list)  # tokens predicted at each exit, then final
    layer_rows: int = 0  # layers run x rows, deferred completions included
    tokens: int = 0
    kv_fill: str = "lazy"  # how skipped layers' caches were filled: lazy | propagate
    kv_rows: int = 0  # K/V-only projections (propagate) x rows
    kv_note: str | None = None  # why propagate fell back to lazy

    @property
    def full_layers(self) -> int:
        return self.depths[-1]

    @property
    def mean_layers(self) -> float:
        """Mean layers a token's prediction waited for (the latency path)."""
        return sum(c * d for c, d in zip(self.counts, self.depths)) / max(sum(self.counts), 1)

    @property
    def layers_run_per_token(self) -> float:
        """Layers actually run per decoded token, counting the deferred completions of skipped ones
        (lazy); with ``propagate`` the skipped layers' K/V-only projections are not counted (see
        ``kv_rows``)."""
        return self.layer_rows / max(self.tokens, 1)

    def as_dict(self) -> dict[str, Any]:
        d = {"mean_layers": self.mean_layers, "full_layers": self.full_layers,
             "layers_run_per_token": self.layers_run_per_token, "kv_fill": self.kv_fill,
             "exit_counts": dict(zip(self.points + ["final"], self.counts))}
        if self.kv_fill == "propagate":
            d["kv_fills_per_token"] = self.kv_rows / max(self.tokens, 1)
        if self.kv_note:
            d["kv_note"] = self.kv_note
        return d


@dataclass
class _Pending:
    """Consecutive positions waiting for segments after ``done``: their boundary values."""

    start: int  # absolute position of the first row
    length: int
    done: int  # the last segment run on them
    values: dict[fx.Node, Tensor]


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


class SegmentExecutor:
    """Runs a compiled model with exits one decode step at a time, segment by segment.

    Segment i (i < number of exits) holds the nodes needed for exit i's hidden state that no
    earlier segment holds; the last segment the rest of what the final logits need. A segment
    reads earlier segments' values through its *boundary* (e.g. the previous layer's output,
    a rope table); waiting rows keep their boundary values, sliced along the sequence axis.
    """

    def __init__(self, cm: Any, *, rule: str | None = None, threshold: float | None = None,
                 kv_fill: str = "lazy") -> None:
        if kv_fill not in KV_FILLS:
            raise PhysLMError(f"unknown kv_fill {kv_fill!r}", expected=", ".join(KV_FILLS), got=str(kv_fill),
                              fix="use lazy (exact) or propagate (CALM: skipped layers' K/V from the exit state)")
        self.cm = cm
        exit_points(cm)  # an error when the blueprint declares none
        ex = cm.resolved.spec.exits
        self.rule = rule or ex.rule
        self.threshold = ex.threshold if threshold is None else threshold
        _check_rule(self.rule, self.threshold)
        self.gm = cm.module
        self.cut = cut = cut_for(cm)
        self.points, self.depths = cut.points, cut.depths
        self.ctx = DecodeContext()
        self.pending: list[_Pending] = []
        self.kv_fill = kv_fill
        self.stats = ExitStats(points=self.points, depths=self.depths, counts=[0] * (len(self.points) + 1),
                               kv_fill=kv_fill)

    def _run(self, piece: _Piece, env: dict[fx.Node, Any]) -> None:
        env.update(zip(piece.outputs, piece.module.forward(*[env[a] for a in piece.inputs])))

    def _decide(self, i: int, env: dict[fx.Node, Any], prev: Tensor | None) -> tuple[Tensor, bool]:
        self._run(self.cut.heads[i], env)
        logits = env[self.cut.exit_logits[i]][:, -1]  # (B, V)
        return logits, _fires_now(self.rule, self.threshold, logits, env[self.cut.hidden[i]][:, -1], prev)

    # -- decoding
    def reset(self) -> None:
        self.ctx.clear()
        self.pending = []

    @torch.inference_mode()
    def prefill(self, tokens: Tensor) -> Tensor:
        """Run a prompt chunk at full depth (filling every cache); the last position's logits
        under the exit policy (B, V)."""
        self.reset()
        T = tokens.size(1)
        with decoding(self.ctx):
            env: dict[fx.Node, Any] = {self.cut.placeholder: tokens}
            for seg in self.cut.segments:
                self._run(seg, env)
        if T > 1:
            self._check_sequence_axis(env, T)
        if self.kv_fill == "propagate":
            self._plan_propagation()
        self.ctx.offset = T
        prev = None
        for i in range(len(self.points)):
            self._run(self.cut.heads[i], env)
            lg = env[self.cut.exit_logits[i]][:, -1]
            h = env[self.cut.hidden[i]][:, -1]
            if _fires_now(self.rule, self.threshold, lg, h, prev):
                self.stats.counts[i] += 1
                return lg
            prev = h
        self.stats.counts[-1] += 1
        return env[self.cut.final][:, -1]

    def _plan_propagation(self) -> None:
        """Build (once per graph) the K/V fillers for ``propagate``, or fall back to lazy. Which
        components keep state is seen in the decode context the full-depth prompt filled."""
        cut = self.cut
        if cut.kv_plans is None:
            stateful = {n for seg in cut.seg_nodes for n in seg if n.op == "call_module"
                        and self.ctx.get(self.gm.get_submodule(n.target)) is not None}
            plans = [_kv_plan(self.gm, cut, s, stateful) for s in range(len(self.points))]
            why = next((p for p in plans if isinstance(p, str)), None)
            cut.kv_plans = why if why is not None else plans
        if isinstance(cut.kv_plans, str):
            note = f"kv_fill='propagate' falls back to 'lazy': {cut.kv_plans}"
            warnings.warn(note, stacklevel=3)
            self.kv_fill = self.stats.kv_fill = "lazy"
            self.stats.kv_note = note

    def _propagate(self, pos: int, s: int, env: dict[fx.Node, Any]) -> None:
        """The current row exited after segment s: fill the later segments' attention caches with
        K/V computed from its exit hidden state (CALM's state propagation)."""
        piece = self.cut.kv_plans[s]  # type: ignore[index]
        self.ctx.offset = pos
        piece.module.forward(*[env[a] for a in piece.inputs])
        self.stats.kv_rows += piece.kv_layers

    def _check_sequence_axis(self, env: dict[fx.Node, Any], T: int) -> None:
        for bs in self.cut.boundary:
            for b in bs:
                v = env.get(b)
                if b.op != "placeholder" and not (isinstance(v, Tensor) and v.dim() >= 2 and v.size(1) == T):
                    shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
                    raise PhysLMError(f"early-exit generation cannot cut the graph at {b.name!r}: its value {shape} "
                                      f"has no sequence axis at dim 1 (chunk length {T})",
                                      fix="place exits where only per-position tensors cross (block outputs)")

    @torch.inference_mode()
    def step(self, token: Tensor) -> Tensor:
        """Decode one position (``token`` (B, 1)); the logits (B, V) of the exit that took it."""
        pos = self.ctx.offset
        env: dict[fx.Node, Any] = {self.cut.placeholder: token}
        prev = None
        n_exits = len(self.points)
        with decoding(self.ctx):
            for s in range(n_exits + 1):
                self._run_segment(s, env, pos)
                if s == n_exits:
                    self.stats.counts[-1] += 1
                    logits = env[self.cut.final][:, -1]
                    break
                logits, fire = self._decide(s, env, prev)
                if fire:
                    self.stats.counts[s] += 1
                    if self.kv_fill == "propagate":
                        self._propagate(pos, s, env)
                    else:
                        self._wait(pos, s, env)
                    break
                prev = env[self.cut.hidden[s]][:, -1]
        self.ctx.offset = pos + 1
        self.stats.tokens += 1
        return logits

    def _run_segment(self, s: int, env: dict[fx.Node, Any], pos: int) -> None:
        """Run segment s on the rows waiting for it (oldest first) and the current row."""
        waiting = [g for g in self.pending if g.done == s - 1] if s > 0 else []
        self.stats.layer_rows += (sum(g.length for g in waiting) + 1) * self.cut.seg_layers[s]
        if not waiting:
            self.ctx.offset = pos
            self._run(self.cut.segments[s], env)
            return
        chunk: dict[fx.Node, Any] = {b: torch.cat([g.values[b] for g in waiting] + [env[b]], dim=1)
                                     for b in self.cut.boundary[s]}  # (B, rows, ...) each
        self.ctx.offset = waiting[0].start
        self._run(self.cut.segments[s], chunk)
        for n in self.cut.segments[s].outputs:  # the current row is the chunk's last
            v = chunk[n]
            env[n] = v[:, -1:] if isinstance(v, Tensor) and v.dim() >= 2 else v
        at = 0
        for g in waiting:  # the waiting rows keep what later segments read
            for n in self.cut.keep[s]:
                g.values[n] = chunk[n][:, at : at + g.length]
            at += g.length
            g.done = s
        self.pending = [g for g in self.pending if g.done < len(self.points)]
        self._merge()

    def _wait(self, pos: int, s: int, env: dict[fx.Node, Any]) -> None:
        """The current row exited after segment s: keep its values for the segments it skipped."""
        need = {b for bs in self.cut.boundary[s + 1 :] for b in bs}
        values = {b: env[b] for b in need if b in env}
        self.pending.append(_Pending(start=pos, length=1, done=s, values=values))
        self._merge()

    def _merge(self) -> None:
        """Join neighbouring groups at the same depth (fewer, longer concatenations)."""
        merged: list[_Pending] = []
        for g in self.pending:
            last = merged[-1] if merged else None
            if last is not None and last.done == g.done and last.start + last.length == g.start \
                    and set(last.values) == set(g.values):
                last.values = {k: torch.cat([last.values[k], g.values[k]], dim=1) for k in last.values}
                last.length += g.length
            else:
                merged.append(g)
        self.pending = merged


def generate_with_exits(
    cm: Any,
    prompt_ids: list[int] | Tensor,
    *,
    max_new_tokens: int,
    threshold: float | None = None,
    rule: str | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
    eos_id: int | None = None,
    on_token: Callable[[list[int]], None] | None = None,
    kv_fill: str = "lazy",
) -> tuple[list[int] | Tensor, ExitStats]:
    """Generate with the KV cache, exiting per token by the blueprint's rule (or ``rule``) at
    ``threshold`` (default: the blueprint's); returns the ids (as ``generate`` does) and the stats.
    ``kv_fill``: ``"lazy"`` completes skipped layers exactly, later; ``"propagate"`` fills their
    K/V from the exit state (CALM; saves compute, approximate).

    A batch exits only where every row's rule fires. Past the model's context the cache is
    cleared and the last ``context`` tokens are run again at full depth, as ``generate`` does.
    """
    from .checkpoint import model_context
    from .generate import _done, can_cache, prompt_tensor, sample_next

    if temperature < 0:
        raise PhysLMError(f"temperature must be >= 0, got {temperature}", fix="use 0 for greedy decoding")
    if not can_cache(cm):
        raise PhysLMError("early-exit generation needs incremental decoding, but some components cannot decode "
                          "incrementally", fix="generate without exits (runtime.generate with use_cache=False)")
    ex = SegmentExecutor(cm, rule=rule, threshold=threshold, kv_fill=kv_fill)
    module = cm.module
    dev = next(module.parameters()).device
    ids, flat = prompt_tensor(prompt_ids, dev)
    context = model_context(cm) or 1 << 62
    gen = torch.Generator(dev).manual_seed(seed) if seed is not None else None
    start = ids.size(1)
    was_training = module.training
    module.eval()
    try:
        with torch.inference_mode():
            logits = ex.prefill(ids[:, -context:])
            for i in range(max_new_tokens):
                nxt = sample_next(logits, ids, temperature=temperature, top_k=top_k, top_p=top_p,
                                  repetition_penalty=repetition_penalty, generator=gen)  # (B,)
                ids = torch.cat([ids, nxt[:, None]], dim=1)
                if on_token is not None:
                    on_token(nxt.tolist())
                if i == max_new_tokens - 1 or _done(ids, start, eos_id):
                    break
                if ex.ctx.offset + 1 > context:
                    logits = ex.prefill(ids[:, -context:])
                else:
                    logits = ex.step(nxt[:, None])
    finally:
        module.train(was_training)
    return (ids[0].tolist() if flat else ids), ex.stats
