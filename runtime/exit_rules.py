"""Early exit, the parts training and scoring use: exit rules, where the exits are, the exit
losses, and the exit policy on whole sequences (``ExitScorer`` for ``evaluate``).

See ``runtime/early_exit.py`` for the whole feature and ``docs/early-exit.md``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, fx
from torch.nn import functional as F

from physlm_graph._errors import PhysLMError

__all__ = ["RULES", "IGNORE", "exit_score", "exit_fires", "never_fires", "exit_points", "exit_depths",
           "exit_loss_weights", "exit_losses", "policy_logits", "ExitScorer"]

RULES: tuple[str, ...] = ("top1", "margin", "entropy", "saturation")
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
