"""Self-speculative greedy decoding with a model's own early exit (LayerSkip's scheme).

The first layers and one exit head *draft* ``k`` tokens one at a time; the remaining layers
then *verify* all of them in one chunk, as a batch of ``k + 1`` rows. The longest prefix of the
draft that the full model would also have picked is kept, plus the full model's own next token,
so every emitted token is full depth's greedy choice: the output is the full model's greedy
decoding (up to floating-point ties), and its perplexity is full depth's. The saving comes from
running the deep layers once per ``k + 1`` rows instead of once per token; it pays when the draft
exit agrees with the full model often (acceptance) and the deep layers are costly per call
(decoding at batch 1 is dominated by per-layer launch and dispatch costs, not by rows).

Caches stay exact: the rows of rejected draft tokens are cut from every cache after each
verification (``truncate_decode_state`` on each cached component; ``attention.causal`` has
one). Components whose decode state cannot be cut back (an SSM's running state) are refused
with a clear error. Full depth's logits are checked as ``generate`` checks them: NaN or +inf
(or -inf everywhere) stops decoding with ``NonFiniteLogits`` naming the first non-finite weight;
the check shares the round's one host synchronisation.

The graph is cut with the same segments and exit heads as ``early_exit.SegmentExecutor``: the
draft runs segments ``0 .. e`` and exit head ``e``; the verification runs segments ``e+1 ..``
on the drafted rows' boundary values, concatenated along the sequence axis.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, fx

from physlm_graph import PhysLMError
from physlm_graph._context import DecodeContext, decoding

from .early_exit import cut_for, exit_points
from .generate import NonFiniteLogits

__all__ = ["SpeculativeStats", "SelfSpeculativeDecoder", "generate_self_speculative"]


@dataclass
class SpeculativeStats:
    """What one self-speculative decoding did."""

    draft_exit: str
    draft_layers: int
    full_layers: int
    draft_len: int
    tokens: int = 0  # emitted tokens after the prefill's first
    rounds: int = 0  # draft + verify rounds
    drafted: int = 0  # draft tokens proposed
    accepted: int = 0  # draft tokens the full model agreed with
    layer_rows: int = 0  # layer-rows run after the prefill: draft rows x draft layers + verified rows x the rest
    per_round: list[int] = field(default_factory=list)  # tokens emitted by each round

    @property
    def acceptance(self) -> float:
        return self.accepted / max(self.drafted, 1)

    @property
    def tokens_per_round(self) -> float:
        return sum(self.per_round) / max(len(self.per_round), 1)

    @property
    def layers_run_per_token(self) -> float:
        return self.layer_rows / max(self.tokens, 1)

    def as_dict(self) -> dict[str, Any]:
        return {"draft_exit": self.draft_exit, "draft_layers": self.draft_layers, "full_layers": self.full_layers,
                "draft_len": self.draft_len, "tokens": self.tokens, "rounds": self.rounds,
                "acceptance": self.acceptance, "tokens_per_round": self.tokens_per_round,
                "layers_run_per_token": self.layers_run_per_token}


def _draft_index(points: list[str], draft_exit: str | int | None) -> int:
    if draft_exit is None:
        return 0
    if isinstance(draft_exit, int):
        if not 0 <= draft_exit < len(points):
            raise PhysLMError(f"draft exit index {draft_exit} is out of range", expected=f"0 .. {len(points) - 1}",
                              got=str(draft_exit), fix=f"the exits are, shallowest first: {', '.join(points)}")
        return draft_exit
    if draft_exit not in points:
        raise PhysLMError(f"no exit after {draft_exit!r}", expected=", ".join(points), got=draft_exit,
                          fix="name one of the blueprint's exit points (physlm-graph build shows them)")
    return points.index(draft_exit)


class SelfSpeculativeDecoder:
    """Greedy self-speculative decoding of a compiled model with exits (see the module doc).

    ``draft_exit``: the exit that drafts (an exit point's name or index, shallowest first;
    default the shallowest); ``draft_len``: tokens drafted per round (k >= 1).
    """

    def __init__(self, cm: Any, *, draft_exit: str | int | None = None, draft_len: int = 4,
                 vocab_limit: int | None = None) -> None:
        if draft_len < 1:
            raise PhysLMError(f"draft_len must be at least 1, got {draft_len}", fix="draft 2 to 6 tokens per round")
        self.cm = cm
        points = exit_points(cm)  # an error when the blueprint declares none
        self.gm = cm.module
        self.cut = cut = cut_for(cm)
        self.e = _draft_index(points, draft_exit)
        self.k = draft_len
        self.vocab_limit = vocab_limit  # drafts and picks only ids below it (a padded vocabulary)
        # what the verifying segments read from the drafting ones (and the tokens)
        later = {b for bs in cut.boundary[self.e + 1 :] for b in bs}
        self.handoff: list[fx.Node] = [n for n in self.gm.graph.nodes if n in later and
                                       (n is cut.placeholder or any(n in cut.seg_nodes[s] for s in range(self.e + 1)))]
        self.ctx = DecodeContext()
        depths = cut.depths
        self.stats = SpeculativeStats(draft_exit=points[self.e], draft_layers=depths[self.e], full_layers=depths[-1],
                                      draft_len=draft_len)
        self._cached: list[torch.nn.Module] | None = None

    # -- pieces
    def _run(self, s_piece: Any, env: dict[fx.Node, Any]) -> None:
        env.update(zip(s_piece.outputs, s_piece.module.forward(*[env[a] for a in s_piece.inputs])))

    def _cached_modules(self) -> list[torch.nn.Module]:
        """The modules holding decode state (seen after a prefill), each able to cut it back."""
        if self._cached is None:
            mods = [(name, m) for name, m in self.gm.named_modules() if self.ctx.get(m) is not None]
            bad = [name for name, m in mods if not callable(getattr(m, "truncate_decode_state", None))]
            if bad:
                raise PhysLMError(
                    "self-speculative decoding must cut rejected draft rows out of every decode cache, but "
                    f"{', '.join(bad)} keep(s) state that cannot be cut back",
                    fix="decode with early exit (--exit-threshold) or without exits; only components with "
                        "truncatable caches (attention.causal) can verify drafts")
            self._cached = [m for _, m in mods]
        return self._cached

    def _truncate(self, length: int) -> None:
        for m in self._cached_modules():
            self.ctx.set(m, m.truncate_decode_state(self.ctx.get(m), length))

    # -- decoding
    @torch.inference_mode()
    def prefill(self, tokens: Tensor) -> Tensor:
        """Run a prompt chunk (B, T) at full depth, filling every cache; full depth's logits at
        its last position (B, V)."""
        self.ctx.clear()
        env: dict[fx.Node, Any] = {self.cut.placeholder: tokens}
        with decoding(self.ctx):
            for seg in self.cut.segments:
                self._run(seg, env)
        T = tokens.size(1)
        for b in self.handoff:
            v = env[b]
            if T > 1 and b is not self.cut.placeholder and not (isinstance(v, Tensor) and v.dim() >= 2 and v.size(1) == T):
                shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
                raise PhysLMError(f"self-speculative decoding cannot cut the graph at {b.name!r}: its value {shape} "
                                  f"has no sequence axis at dim 1 (chunk length {T})",
                                  fix="place exits where only per-position tensors cross (block outputs)")
        self.ctx.offset = T
        self._cached_modules()
        return env[self.cut.final][:, -1]

    @torch.inference_mode()
    def round(self, token: Tensor, k: int) -> Tensor:
        """One draft + verify round from the pending ``token`` (B, 1) at position ``ctx.offset``,
        drafting ``k >= 0`` tokens. Returns the emitted tokens (B, a + 1): the ``a`` accepted
        drafts and full depth's next token; afterwards the caches hold exactly the rows of the
        pending token and the accepted drafts, and the last emitted token is the new pending one."""
        cut, e = self.cut, self.e
        pos = self.ctx.offset
        rows: list[dict[fx.Node, Any]] = []
        drafts: list[Tensor] = []
        x = token
        with decoding(self.ctx):
            for j in range(k + 1):  # draft rows pos .. pos + k; the last one only feeds the verifier
                env: dict[fx.Node, Any] = {cut.placeholder: x}
                self.ctx.offset = pos + j
                for s in range(e + 1):
                    self._run(cut.segments[s], env)
                rows.append({b: env[b] for b in self.handoff})
                if j < k:
                    self._run(cut.heads[e], env)
                    logits = env[cut.exit_logits[e]][:, -1, : self.vocab_limit]  # (B, V): the tokenizer's ids
                    x = logits.argmax(-1, keepdim=True)  # (B, 1), stays on the device
                    drafts.append(x)
            chunk: dict[fx.Node, Any] = {b: torch.cat([r[b] for r in rows], dim=1) for b in self.handoff}
            self.ctx.offset = pos
            for s in range(e + 1, len(cut.segments)):
                self._run(cut.segments[s], chunk)
        full = chunk[cut.final][..., : self.vocab_limit].argmax(-1)  # (B, k + 1): full depth's choice after each row
        bad = _nonfinite(chunk[cut.final]).long()
        if k:
            d = torch.cat(drafts, dim=1)  # (B, k)
            accepted = (full[:, :k] == d).long().cumprod(dim=1).sum(dim=1).min()
        else:
            accepted = torch.zeros((), dtype=torch.long, device=full.device)
        a, nonfinite = torch.stack([accepted, bad]).tolist()  # the one sync of the round
        if nonfinite:
            raise NonFiniteLogits()
        self._truncate(pos + a + 1)
        self.ctx.offset = pos + a + 1
        st = self.stats
        st.rounds += 1
        st.drafted += k
        st.accepted += a
        st.layer_rows += (k + 1) * st.full_layers  # every row runs the draft layers, then the rest
        st.per_round.append(a + 1)
        return full[:, : a + 1]


def _nonfinite(logits: Tensor) -> Tensor:
    """Whether ``logits`` (..., V) hold NaN or +inf, or a row of -inf only (``sample_next``'s test;
    -inf alone is a masked id of a padded vocabulary), as a 0-d bool tensor (no sync)."""
    return logits.isnan().any() | logits.isposinf().any() | logits.isneginf().all(dim=-1).any()


def _checked(logits: Tensor) -> Tensor:
    if bool(_nonfinite(logits)):
        raise NonFiniteLogits()
    return logits


def generate_self_speculative(
    cm: Any,
    prompt_ids: list[int] | Tensor,
    *,
    max_new_tokens: int,
    draft_exit: str | int | None = None,
    draft_len: int = 4,
    eos_id: int | None = None,
    on_token: Callable[[list[int]], None] | None = None,
    vocab_limit: int | None = None,
) -> tuple[list[int] | Tensor, SpeculativeStats]:
    """Greedy decoding with self-speculation (see the module doc): the same tokens as
    ``generate(..., temperature=0)`` up to floating-point ties. Returns the ids (as ``generate``
    does: a list for a 1-D prompt, else (B, T)) and the stats. Past the model's context the
    cache is cleared and the last ``context`` tokens are run again at full depth. ``vocab_limit``:
    draft and pick only ids below it (a padded vocabulary's tokenizer size, as ``generate``'s)."""
    from .checkpoint import model_context
    from .generate import _done, can_cache, nonfinite_parameter, prompt_tensor

    if not can_cache(cm):
        raise PhysLMError("self-speculative decoding needs incremental decoding, but some components cannot decode "
                          "incrementally", fix="generate without exits (runtime.generate with use_cache=False)")
    dec = SelfSpeculativeDecoder(cm, draft_exit=draft_exit, draft_len=draft_len, vocab_limit=vocab_limit)
    module = cm.module
    dev = next(module.parameters()).device
    ids, flat = prompt_tensor(prompt_ids, dev)
    context = model_context(cm) or 1 << 62
    start = ids.size(1)
    was_training = module.training
    module.eval()

    def emit(new: Tensor) -> bool:
        """Append tokens one by one as ``generate`` would; True when decoding is over."""
        nonlocal ids
        for t in range(new.size(1)):
            ids = torch.cat([ids, new[:, t : t + 1]], dim=1)
            if on_token is not None:
                on_token(new[:, t].tolist())
            if ids.size(1) - start >= max_new_tokens:
                return True
            if _done(ids, start, eos_id):
                return True
        return False

    try:
        with torch.inference_mode():
            if max_new_tokens <= 0:
                return (ids[0].tolist() if flat else ids), dec.stats
            done = emit(_checked(dec.prefill(ids[:, -context:]))[..., :vocab_limit].argmax(-1, keepdim=True))
            while not done:
                if dec.ctx.offset + 1 > context:  # the pending token has no position left: re-prefill
                    done = emit(_checked(dec.prefill(ids[:, -context:]))[..., :vocab_limit].argmax(-1, keepdim=True))
                    continue
                remaining = max_new_tokens - (ids.size(1) - start)
                k = max(0, min(dec.k, context - 1 - dec.ctx.offset, remaining - 1))
                new = dec.round(ids[:, -1:], k)
                dec.stats.tokens += new.size(1)
                done = emit(new)
    except NonFiniteLogits:
        raise NonFiniteLogits(nonfinite_parameter(module)) from None
    finally:
        module.train(was_training)
    return (ids[0].tolist() if flat else ids), dec.stats
