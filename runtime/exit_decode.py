"""Early-exit decoding, the executor: ``SegmentExecutor`` runs the segments of
``runtime/exit_segments.py`` one decode step at a time, stopping at the first exit whose rule
fires, and ``generate_with_exits`` generates with it (see ``runtime/early_exit.py``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, fx

from physlm_graph._context import DecodeContext, decoding
from physlm_graph._errors import PhysLMError

from .exit_rules import _check_rule, _fires_now, exit_points
from .exit_segments import _kv_plan, _Piece, cut_for

__all__ = ["KV_FILLS", "ExitStats", "SegmentExecutor", "generate_with_exits"]

KV_FILLS: tuple[str, ...] = ("lazy", "propagate")  # how skipped layers' KV caches are filled



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
    executor: Callable[..., SegmentExecutor] | None = None,
    vocab_limit: int | None = None,
) -> tuple[list[int] | Tensor, ExitStats]:
    """Generate with the KV cache, exiting per token by the blueprint's rule (or ``rule``) at
    ``threshold`` (default: the blueprint's); returns the ids (as ``generate`` does) and the stats.
    ``kv_fill``: ``"lazy"`` completes skipped layers exactly, later; ``"propagate"`` fills their
    K/V from the exit state (CALM; saves compute, approximate). ``executor``: what builds the
    executor from ``(cm, rule=, threshold=, kv_fill=)`` (default ``SegmentExecutor``;
    ``exit_engine.generate_with_exits_static`` passes one on the decode engine's static caches).
    ``vocab_limit``: pick only ids below it (a padded vocabulary's tokenizer size, as ``generate``'s).

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
    ex = (executor or SegmentExecutor)(cm, rule=rule, threshold=threshold, kv_fill=kv_fill)
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
                nxt = sample_next(logits[:, :vocab_limit], ids, temperature=temperature, top_k=top_k, top_p=top_p,
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
