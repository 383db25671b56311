"""Self-speculative decoding on the decode engine's static caches.

    spec = SpeculativeEngine(cm, batch=1, max_len=288, draft_exit="trunk.1", draft_len=4, compile=True)
    ids = spec.generate([prompt], max_new_tokens=256)       # full depth's greedy tokens
    spec.stats.acceptance, spec.stats.tokens_per_round

The scheme is ``runtime/speculative.py``'s (LayerSkip: the layers up to an exit and its head
draft ``k`` tokens, the rest of the model verifies them in one chunk, the longest agreeing prefix
plus full depth's own next token is kept), run on a ``DecodeEngine``'s buffers
(``components/_static_cache.py``) instead of caches that grow and are cut back:

- a *round* is one function of fixed shapes: ``k + 1`` one-token draft steps through the draft
  segments (each writes its keys at ``pos + j`` in place), one ``k + 1``-token verification
  through the remaining segments (writing at ``pos .. pos + k``), the acceptance count ``a``
  (the minimum over rows, so every row advances alike), the next pending token and
  ``pos += a + 1``, all on the device. On CUDA it is compiled and captured as one CUDA graph, as
  the engine's one-token step is; each round is one replay and one host sync (reading ``a``);
- rolling back rejected drafts is free for keys and values: the rows past the new position are
  stale, the length mask hides them, and the next round overwrites them before a query can see
  them (sliding windows too: the mask, not the buffer, is windowed);
- a fixed-size recurrent state (an SSM's, a gated conv's) cannot be cut back, so the round
  snapshots it first; when a draft is rejected the state is restored and the ``a + 1`` kept
  tokens are run again at full depth (one more chunk, only in rounds with a rejection);
- nodes the engine keeps off its static path (their caches grow) are refused here;
  ``generate_speculative_static`` then runs ``speculative.generate_self_speculative`` and says so
  once on stderr, as it does past the model's context (which that path handles by re-prefilling).

Greedy only (sampling would need speculative rejection sampling). The output equals full depth's
greedy decoding (``generate(..., temperature=0)``) token for token, up to floating-point ties.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, fx

from physlm_graph._context import decoding
from physlm_graph._errors import PhysLMError

from .checkpoint import model_context
from .decode_engine import DecodeEngine, _say_once, checked_prompts, static_plan
from .generate import NonFiniteLogits, _not_incremental, nonfinite_parameter, prompt_tensor, sampling_target
from .speculative import SelfSpeculativeDecoder, SpeculativeStats, _nonfinite, generate_self_speculative

__all__ = ["SpeculativeEngine", "generate_speculative_static"]


class SpeculativeEngine:
    """Greedy self-speculative decoding of ``batch`` rows of at most ``max_len`` positions on a
    ``DecodeEngine``'s static buffers (see the module doc). ``draft_exit``: an exit point's name or
    index, shallowest first (default the shallowest); ``draft_len``: tokens drafted per round.
    ``stats`` (a ``speculative.SpeculativeStats``) describes the last ``generate`` call."""

    def __init__(self, model: Any, *, batch: int, max_len: int, draft_exit: str | int | None = None,
                 draft_len: int = 4, device: str | torch.device | None = None, compile: bool = False,
                 cuda_graph: bool | None = None, prefill_chunk: int = 256, vocab_limit: int | None = None) -> None:
        cm, self.vocab_limit = sampling_target(model, device, vocab_limit)  # drafts and picks only ids below it
        spec = SelfSpeculativeDecoder(cm, draft_exit=draft_exit, draft_len=draft_len)  # checks exits, k
        unstatic = static_plan(cm)[1] if not _not_incremental(cm) else []
        if unstatic:
            raise PhysLMError("self-speculative decoding on the engine needs every node on its static path; these "
                              f"keep caches that grow: {', '.join(unstatic)}",
                              fix="decode without --compile (runtime.speculative.generate_self_speculative)")
        self.engine = eng = DecodeEngine(cm, batch=batch, max_len=max_len, device=device,
                                         cuda_graph=False, prefill_chunk=prefill_chunk, vocab_limit=self.vocab_limit)
        self.cut, self.e, self.k, self.handoff = spec.cut, spec.e, draft_len, spec.handoff
        self.stats = spec.stats
        self.batch, self.max_len, self.device = batch, max_len, eng.device
        on_cuda = self.device.type == "cuda"
        if cuda_graph and not on_cuda:
            raise PhysLMError("cuda_graph=True needs a CUDA device",
                              fix="leave cuda_graph unset: the engine captures the round where it can")
        self.cuda_graph = on_cuda if cuda_graph is None else cuda_graph
        self.compiled = compile
        if compile and not on_cuda:
            _say_once(f"decode engine: on {self.device.type} the speculative round runs eagerly "
                      "(compile and CUDA graphs need CUDA)")
        self._round_k = self._device_round
        if compile and on_cuda:  # one compiled function per k; only k = draft_len is ever captured
            self._round_k = torch.compile(self._device_round, dynamic=False)  # type: ignore[assignment]
        self.full = torch.zeros(batch, draft_len + 1, dtype=torch.long, device=self.device)  # (B, k+1)
        self.fed = torch.zeros(batch, draft_len + 1, dtype=torch.long, device=self.device)  # (B, k+1)
        self.acc = torch.zeros((), dtype=torch.long, device=self.device)  # a, drafts kept this round
        self._snaps: list[list[Tensor]] = []  # the fixed states at the round's start
        self._state_ids: list[int] | None = None  # which state buffers the snapshots (and a capture) follow
        self._graph: torch.cuda.CUDAGraph | None = None

    # -- the pieces --------------------------------------------------------------------------

    def _run(self, piece: Any, env: dict[fx.Node, Any]) -> None:
        env.update(zip(piece.outputs, piece.module.forward(*[env[a] for a in piece.inputs])))

    def _prefill(self, ids: Tensor, lengths: Tensor) -> Tensor:
        """The right-padded prompts (B, L) at full depth through the segments, in chunks; the
        logits (B, V) at each row's last token. Checks that what crosses the draft exit has a
        sequence axis (the rounds concatenate the drafted rows along it)."""
        eng, cut = self.engine, self.cut
        eng.ctx.clear()
        B, L = ids.shape
        last = lengths - 1  # (B,)
        out = None
        with decoding(eng.ctx):
            for a in range(0, L, eng.prefill_chunk):
                b = min(a + eng.prefill_chunk, L)
                eng.static.begin(torch.full((B,), a, dtype=torch.long, device=self.device), b - a)
                eng.ctx.offset = a
                env: dict[fx.Node, Any] = {cut.placeholder: ids[:, a:b]}
                for seg in cut.segments:
                    self._run(seg, env)
                if b - a > 1:
                    self._check_handoff(env, b - a)
                logits = env[cut.final][..., : self.vocab_limit]  # (B, T, V): the tokenizer's ids
                here = logits[torch.arange(B, device=self.device), (last - a).clamp(0, b - a - 1)]  # (B, V)
                inside = ((last >= a) & (last < b))[:, None]  # (B, 1)
                out = here if out is None else torch.where(inside, here, out)
        eng._adopt_states()
        bufs = [b for _, group, _ in eng._states.values() for b in group]
        if [id(b) for b in bufs] != self._state_ids:  # new state memory: new snapshots, and a new capture
            self._state_ids = [id(b) for b in bufs]
            self._snaps = [[t.clone() for t in group] for _, group, _ in eng._states.values()]
            self._graph = None
        return out

    def _check_handoff(self, env: dict[fx.Node, Any], T: int) -> None:
        for b in self.handoff:
            v = env[b]
            if b is not self.cut.placeholder and not (isinstance(v, Tensor) and v.dim() >= 2 and v.size(1) == T):
                shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
                raise PhysLMError(f"self-speculative decoding cannot cut the graph at {b.name!r}: its value {shape} "
                                  f"has no sequence axis at dim 1 (chunk length {T})",
                                  fix="place exits where only per-position tensors cross (block outputs)")

    def _device_round(self, k: int) -> None:
        """One round from the pending token ``tok`` at ``pos``, drafting ``k`` tokens: fixed shapes,
        every value read from a device buffer, no host sync (a test traces it as one graph).
        Leaves full depth's picks in ``full[:, :k+1]``, the kept draft count in ``acc``, the fed
        tokens in ``fed[:, :k+1]``, and ``tok``/``pos`` set for the next round."""
        eng, cut, e = self.engine, self.cut, self.e
        for (_, bufs, _), snap in zip(eng._states.values(), self._snaps):
            for b, s in zip(bufs, snap):
                s.copy_(b)
        x = eng.tok  # (B, 1)
        rows: list[list[Any]] = []
        drafts: list[Tensor] = []
        with decoding(eng.ctx):
            for j in range(k + 1):  # draft rows pos .. pos + k; the last one only feeds the verifier
                eng.static.begin(eng.pos + j, 1)
                env: dict[fx.Node, Any] = {cut.placeholder: x}
                for s in range(e + 1):
                    self._run(cut.segments[s], env)
                rows.append([env[b] for b in self.handoff])
                if j < k:
                    self._run(cut.heads[e], env)
                    x = env[cut.exit_logits[e]][:, -1, : self.vocab_limit].argmax(-1, keepdim=True)  # (B, 1)
                    drafts.append(x)
            chunk: dict[fx.Node, Any] = {b: torch.cat([r[i] for r in rows], dim=1) if k else rows[0][i]
                                         for i, b in enumerate(self.handoff)}
            eng.static.begin(eng.pos, k + 1)
            for s in range(e + 1, len(cut.segments)):
                self._run(cut.segments[s], chunk)
        logits = chunk[cut.final][..., : self.vocab_limit]  # (B, k+1, V)
        full = logits.argmax(-1)  # (B, k+1): full depth's pick after each row
        eng.bad |= _nonfinite(logits)
        fed = torch.cat([eng.tok, *drafts], dim=1)  # (B, k+1)
        if k:
            agree = (full[:, :k] == fed[:, 1:]).long().cumprod(dim=1)  # (B, k): 1 while the drafts agree
            a = agree.sum(dim=1).min()  # every row keeps as many as the worst row
        else:
            a = torch.zeros((), dtype=torch.long, device=self.device)
        self.fed[:, : k + 1].copy_(fed)
        self.full[:, : k + 1].copy_(full)
        self.acc.copy_(a)
        eng.tok.copy_(full.gather(1, a.view(1, 1).expand(full.size(0), 1)))  # (B, 1): full depth's next token
        eng.pos += a + 1
        eng._keep_states()

    def _redo_states(self, a: int, offset: int) -> None:
        """After a round that rejected a draft: restore the fixed states of the round's start and
        run the ``a + 1`` kept tokens again at full depth, so each state has seen exactly them."""
        eng = self.engine
        for (_, bufs, _), snap in zip(eng._states.values(), self._snaps):
            for b, s in zip(bufs, snap):
                b.copy_(s)
        eng.static.begin(eng.pos - (a + 1), a + 1)
        eng.ctx.offset = offset
        with decoding(eng.ctx):
            env: dict[fx.Node, Any] = {self.cut.placeholder: self.fed[:, : a + 1]}
            for seg in self.cut.segments:
                self._run(seg, env)
        eng._keep_states()

    def _capture(self) -> None:
        """Record ``_device_round(k)`` as a CUDA graph (after warm-up rounds on a side stream, which
        also compile it), restoring the buffers the warm-up rounds changed."""
        eng = self.engine
        fixed = (eng.tok, eng.pos, eng.bad)
        saved = [t.clone() for t in fixed]
        saved_states = [[b.clone() for b in bufs] for _, bufs, _ in eng._states.values()]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):  # each from the same position: no round writes past max_len
                for t, s in zip(fixed, saved):
                    t.copy_(s)
                self._round_k(self.k)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self._round_k(self.k)
            self._graph = graph
        except RuntimeError as err:
            self.cuda_graph = False
            _say_once(f"decode engine: the speculative round could not be captured as a CUDA graph "
                      f"({str(err).splitlines()[0][:160]}); it runs eagerly")
        finally:
            for t, s in zip(fixed, saved):
                t.copy_(s)
            for (_, bufs, _), olds in zip(eng._states.values(), saved_states):
                for b, s in zip(bufs, olds):
                    b.copy_(s)

    # -- generation ----------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]] | Tensor, *, max_new_tokens: int, eos_id: int | None = None,
                 on_token: Callable[[list[int]], None] | None = None) -> list[list[int]]:
        """Continue each prompt greedily (lengths may differ unless a node carries a state);
        returns prompt + new ids per row, all rows as long as each other, stopping after the step
        at which every row has emitted ``eos_id``. ``on_token`` receives each step's ids."""
        eng = self.engine
        rows, lengths = checked_prompts(prompts, self.batch, self.max_len, max_new_tokens, "SpeculativeEngine")
        if len(set(lengths)) > 1 and self._snaps_needed():
            raise PhysLMError("prompts of different lengths cannot share fixed-state (recurrent) nodes",
                              fix="generate each prompt on its own (batch 1)")
        ids = torch.tensor([r + [r[-1]] * (max(lengths) - len(r)) for r in rows], dtype=torch.long, device=self.device)
        lens = torch.tensor(lengths, dtype=torch.long, device=self.device)
        was_training = eng.module.training
        eng.module.eval()
        try:
            new = self._decode(ids, lens, max_new_tokens, eos_id, on_token)
        finally:
            eng.module.train(was_training)
        return [r + n for r, n in zip(rows, new)]

    def _snaps_needed(self) -> bool:
        return "state" in self.engine.plan.values()

    def _decode(self, ids: Tensor, lens: Tensor, n: int, eos_id: int | None,
                on_token: Callable[[list[int]], None] | None) -> list[list[int]]:
        eng, B = self.engine, self.batch
        old = self.stats
        self.stats = st = SpeculativeStats(draft_exit=old.draft_exit, draft_layers=old.draft_layers,
                                           full_layers=old.full_layers, draft_len=old.draft_len)
        eng.bad.zero_()
        first = self._prefill(ids, lens)  # (B, V)
        eng.bad |= ~torch.isfinite(first.max(dim=-1).values)
        eng.tok.copy_(first.argmax(dim=-1, keepdim=True))
        eng.pos.copy_(lens)
        offset, top = int(ids.shape[1]), int(lens.max())  # the chunk offset; the largest row's pending position
        out: list[list[int]] = [[] for _ in range(B)]
        ended = [False] * B

        def emit(step: list[int]) -> bool:
            """One step's ids (one per row); True when decoding is over."""
            nonlocal ended
            for r, t in zip(out, step):
                r.append(t)
            if on_token is not None:
                on_token(step)
            if eos_id is not None:
                ended = [e or t == eos_id for e, t in zip(ended, step)]
            return len(out[0]) >= n or all(ended) and eos_id is not None

        head = torch.cat([eng.tok, eng.bad.long()[:, None]], dim=1).tolist()  # one sync
        if any(r[1] for r in head):
            raise NonFiniteLogits(nonfinite_parameter(eng.module))
        done = emit([r[0] for r in head])
        if self.cuda_graph and not done and self._graph is None and top + self.k < self.max_len:
            self._capture()
        while not done:
            k = min(self.k, self.max_len - 1 - top)  # the round writes positions pos .. pos + k
            eng.ctx.offset = offset
            if k == self.k and self._graph is not None and self.cuda_graph:
                self._graph.replay()
            elif k == self.k:
                self._round_k(k)
            else:
                self._device_round(k)  # only near max_len: eagerly, not compiled for a new k
            host = torch.cat([self.full[:, : k + 1], self.acc.expand(B, 1), eng.bad.long()[:, None]], 1).tolist()
            if any(r[k + 2] for r in host):  # the round's one sync
                raise NonFiniteLogits(nonfinite_parameter(eng.module))
            a = host[0][k + 1]
            if a < k and self._snaps_needed():
                self._redo_states(a, offset)
            offset += a + 1
            top += a + 1
            st.rounds += 1
            st.drafted += k
            st.accepted += a
            st.layer_rows += (k + 1) * st.full_layers  # every row runs the draft layers, then the rest
            if a < k and self._snaps_needed():
                st.layer_rows += (a + 1) * st.full_layers  # the kept rows again, for the states
            for t in range(a + 1):
                st.tokens += 1
                done = emit([r[t] for r in host])
                if done:
                    break
            st.per_round.append(t + 1)  # the tokens it emitted (a last round may keep fewer than a + 1)
        return out


# -- the one-call API ------------------------------------------------------------------------------

_SPEC: weakref.WeakKeyDictionary[torch.nn.Module, SpeculativeEngine] = weakref.WeakKeyDictionary()


def _spec_for(cm: Any, batch: int, need: int, context: int | None, compile: bool, draft_exit: str | int | None,
              draft_len: int, vocab_limit: int | None = None) -> SpeculativeEngine:
    """A cached speculative engine for ``batch`` rows of ``need`` positions (max_len rounded up to
    64, so that a similar prompt reuses the captured round)."""
    max_len = -(-need // 64) * 64
    if context is not None:
        max_len = min(max_len, context)
    dev = next(cm.module.parameters()).device
    old = _SPEC.get(cm.module)
    if old is not None and old.batch == batch and old.max_len >= need and old.compiled == compile \
            and old.device == dev and old.k == draft_len and old.stats.draft_exit == _exit_name(cm, draft_exit) \
            and old.vocab_limit == vocab_limit:
        return old
    spec = SpeculativeEngine(cm, batch=batch, max_len=max_len, draft_exit=draft_exit, draft_len=draft_len,
                             compile=compile, vocab_limit=vocab_limit)
    _SPEC[cm.module] = spec
    return spec


def _exit_name(cm: Any, draft_exit: str | int | None) -> str:
    from .early_exit import exit_points
    from .speculative import _draft_index

    points = exit_points(cm)
    return points[_draft_index(points, draft_exit)]


@torch.inference_mode()
def generate_speculative_static(
    model_or_ckpt: Any,
    prompt_ids: list[int] | Tensor,
    *,
    max_new_tokens: int,
    draft_exit: str | int | None = None,
    draft_len: int = 4,
    eos_id: int | None = None,
    on_token: Callable[[list[int]], None] | None = None,
    device: str | torch.device | None = None,
    compile: bool = True,
    vocab_limit: int | None = None,
) -> tuple[list[int] | Tensor, SpeculativeStats]:
    """``speculative.generate_self_speculative`` on the decode engine: the same arguments, the same
    greedy output (full depth's) and stats. ``prompt_ids``: a list or 1-D tensor (returns a list)
    or a (B, T) tensor (returns (B, T + n)). Where the engine cannot serve the call (a node off its
    static path, more tokens than the model's context) it runs ``generate_self_speculative`` and
    says why once on stderr. ``vocab_limit``: draft and pick only ids below it (default: a
    checkpoint's tokenizer size), as ``generate``'s."""
    cm, vocab_limit = sampling_target(model_or_ckpt, device, vocab_limit)
    dev = next(cm.module.parameters()).device if device is None else torch.device(device)
    cm.module.to(dev)
    ids, flat = prompt_tensor(prompt_ids, dev)
    if max_new_tokens < 1:
        raise PhysLMError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    context = model_context(cm)
    need = ids.size(1) + max_new_tokens + draft_len  # rounds near the end still draft k ahead
    plan_ok = not _not_incremental(cm)
    unstatic = static_plan(cm)[1] if plan_ok else []
    fits = context is None or ids.size(1) + max_new_tokens <= context
    why = ("nodes that cannot decode incrementally" if not plan_ok
           else f"nodes off its static path ({', '.join(unstatic)})" if unstatic
           else f"{ids.size(1) + max_new_tokens} tokens, more than the context {context}" if not fits else None)
    if why is not None:
        _say_once(f"decode engine: self-speculative decoding with {why} runs without the engine")
        return generate_self_speculative(cm, prompt_ids, max_new_tokens=max_new_tokens, draft_exit=draft_exit,
                                         draft_len=draft_len, eos_id=eos_id, on_token=on_token, vocab_limit=vocab_limit)
    if context is not None:
        need = min(need, context)
    spec = _spec_for(cm, ids.size(0), need, context, compile, draft_exit, draft_len, vocab_limit)
    out = spec.generate(ids, max_new_tokens=max_new_tokens, eos_id=eos_id, on_token=on_token)
    result = out[0] if flat else torch.tensor(out, dtype=torch.long, device=dev)
    return result, spec.stats


