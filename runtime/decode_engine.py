"""The decode engine: generation with preallocated buffers and a one-token step of fixed shapes.

    engine = DecodeEngine(cm, batch=1, max_len=288, compile=True)   # on a GPU
    ids = engine.generate([prompt], max_new_tokens=256, temperature=0)

What it does differently from ``generate.generate`` (whose greedy output it reproduces):

- every attention node writes its keys and values in place into buffers of ``max_len``
  positions (``components/_static_cache.py``) and attends over the whole buffer through a
  length mask; position embeddings read a position tensor, one row per sequence, so prompts
  of different lengths decode in one batch (right-padded: a pad's stale key is overwritten
  before any query can see it);
- nodes with a fixed-size state (an SSM's conv window and state, an LSTM's (h, c)) have it copied
  back into the same tensors after every step;
- the prompt runs in chunks of ``prefill_chunk`` tokens (eagerly);
- the one-token step (forward, the greedy pick, the position advance) touches only those
  buffers, so on CUDA it is captured once as a CUDA graph (after ``torch.compile`` with
  ``compile=True``) and each token is one replay, with no host sync: EOS, non-finite logits and
  streaming are looked at every ``check_every`` tokens;
- sampling (temperature, top-k, top-p) runs on the device: the exponential race
  ``argmax(p / E)``, E ~ Exp(1), draws from p without ``multinomial``'s host round trip.

A node whose decode the engine cannot do with static buffers (its cache grows, or it reads the
position as a Python int) keeps its own state in the decode context as before; the step then
runs uncaptured, and that is said once on stderr. Without CUDA the same static path runs eagerly,
which is how the CPU tests compare it with ``generate.generate`` and with full recomputation.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, fx
from torch.utils import _pytree as pytree

from physlm_graph._context import decoding
from physlm_graph._errors import PhysLMError
from physlm_graph._registry import REGISTRY
from physlm_graph.components._static_cache import StaticCache, StaticDecodeContext

from .checkpoint import model_context
from .generate import (NonFiniteLogits, _logit_nodes, _not_incremental, check_sampling, filter_top, sampling_target,
                       generate, nonfinite_parameter, prompt_tensor)

__all__ = ["DecodeEngine", "generate_static", "static_plan", "sample_on_device", "logits_only"]

# Components that know the static protocol (they read ``static_cache()``).
_STATIC = frozenset({"attention.causal", "embed.learned_position", "embed.rope"})
# "cached" components whose whole decode state has a fixed size and that read the decode
# context's offset only to tell a first chunk from a later one: their state is copied back.
# (memory.episodic is not one: its store is rebound to a new tensor by each forward that writes,
# which a captured step would not follow.)
_FIXED_STATE = frozenset({"ssm.ssd", "ssm.gated_conv"})


def static_plan(cm: Any) -> tuple[dict[str, str], list[str]]:
    """How each node the logits depend on decodes in the engine (``stateless``, ``static`` or
    ``state``), and the nodes it cannot run with static buffers (as ``path (component)``)."""
    plan: dict[str, str] = {}
    other: list[str] = []
    for path in _logit_nodes(cm):
        use = cm.resolved.nodes[path].use
        info = REGISTRY.get(use)
        kind = info.decode_kind(cm.checked[path]) if info is not None else "none"
        if kind == "stateless":
            plan[path] = "stateless"
        elif use in _STATIC:
            plan[path] = "static"
        elif kind == "recurrent" or use in _FIXED_STATE:
            plan[path] = "state"
        else:
            other.append(f"{path} ({use})")
    return plan, other


def logits_only(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` without the nodes only its other outputs need (exit heads and exit states, auxiliary
    outputs): a GraphModule sharing ``gm``'s submodules whose output is ``{"logits": ...}``, so
    decoding runs no head it does not read; ``gm`` itself when it outputs nothing else."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    result = out.args[0]
    if not isinstance(result, dict) or "logits" not in result or set(result) == {"logits"}:
        return gm
    graph = fx.Graph()
    remap: dict[fx.Node, fx.Node] = {}
    graph.graph_copy(gm.graph, remap, return_output_node=False)
    graph.output({"logits": remap[result["logits"]]})
    pruned = fx.GraphModule(gm, graph)
    if not pruned.graph.eliminate_dead_code():
        return gm  # the other outputs read nothing the logits do not (an empty ``aux``)
    pruned.recompile()
    return pruned


def sample_on_device(logits: Tensor, *, temperature: float, top_k: int | None, top_p: float | None,
                     generator: torch.Generator | None) -> Tensor:
    """One token per row of ``logits`` (B, V), with no host sync: greedy for ``temperature=0``,
    else top-k / top-p filtering (``generate.filter_top``, as ``sample_next``), then the exponential race."""
    if temperature == 0:
        return logits.argmax(dim=-1)  # (B,)
    logits = filter_top(logits.float() / temperature, top_k=top_k, top_p=top_p)  # (B, V)
    probs = logits.softmax(dim=-1)  # (B, V)
    race = torch.empty_like(probs).exponential_(generator=generator)  # E ~ Exp(1)
    return (probs / race).argmax(dim=-1)  # (B,): row b picks v with probability probs[b, v]



def checked_prompts(prompts: list[list[int]] | Tensor, batch: int, max_len: int, max_new_tokens: int,
                    engine: str) -> tuple[list[list[int]], list[int]]:
    """The prompts as id lists and their lengths, checked against an engine of ``batch`` rows and
    ``max_len`` positions (``engine``: its class, named in the fix)."""
    rows = [list(map(int, r)) for r in (prompts.tolist() if isinstance(prompts, Tensor) else prompts)]
    if len(rows) != batch:
        raise PhysLMError(f"the engine was built for batch {batch}, got {len(rows)} prompts",
                          fix=f"build a {engine} with batch={len(rows)}")
    if any(not r for r in rows):
        raise PhysLMError("a prompt is empty", fix="give at least one token (e.g. a newline)")
    if max_new_tokens < 1:
        raise PhysLMError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    lengths = [len(r) for r in rows]
    if max(lengths) + max_new_tokens > max_len:
        raise PhysLMError(f"prompt ({max(lengths)}) + max_new_tokens ({max_new_tokens}) is more than the "
                          f"engine's max_len {max_len}", fix="build the engine with a larger max_len")
    return rows, lengths

class DecodeEngine:
    """Static-buffer generation for ``batch`` rows of at most ``max_len`` tokens (prompt + new)."""

    def __init__(self, model: Any, *, batch: int, max_len: int, device: str | torch.device | None = None,
                 compile: bool = False, cuda_graph: bool | None = None, prefill_chunk: int = 256,
                 check_every: int = 16, vocab_limit: int | None = None,
                 compile_options: dict[str, Any] | None = None, attention: str = "sdpa") -> None:
        cm, self.vocab_limit = sampling_target(model, device, vocab_limit)  # picks only ids below it
        if _not_incremental(cm):
            raise PhysLMError(f"the decode engine needs every node to decode incrementally; these cannot: "
                              f"{', '.join(_not_incremental(cm))}", fix="use generate() without the engine")
        context = model_context(cm)
        if context is not None and max_len > context:
            raise PhysLMError(f"max_len {max_len} is longer than the model's context {context}",
                              fix=f"generate at most {context} tokens in all (prompt + new)")
        if batch < 1 or max_len < 2 or prefill_chunk < 1 or check_every < 1:
            raise PhysLMError(f"batch, prefill_chunk and check_every must be >= 1 and max_len >= 2; got batch={batch}, "
                              f"max_len={max_len}, prefill_chunk={prefill_chunk}, check_every={check_every}")
        self.cm = cm
        self.module = logits_only(cm.module).eval()
        self.device = next(self.module.parameters()).device if device is None else torch.device(device)
        self.module.to(self.device)
        self.batch, self.max_len = batch, max_len
        self.prefill_chunk, self.check_every = prefill_chunk, check_every
        self.plan, self.unstatic = static_plan(cm)
        if self.unstatic:
            _say_once(f"decode engine: {', '.join(self.unstatic)} cannot decode with preallocated buffers; they keep "
                      "their own caches and the step runs uncaptured (rows must share one prompt length)")
        on_cuda = self.device.type == "cuda"
        if cuda_graph and (not on_cuda or self.unstatic):
            raise PhysLMError("cuda_graph=True needs a CUDA device and every node on the static path"
                              + (f" ({', '.join(self.unstatic)} are not)" if self.unstatic else ""),
                              fix="leave cuda_graph unset: the engine captures the step where it can")
        self.cuda_graph = (on_cuda if cuda_graph is None else cuda_graph) and not self.unstatic
        if compile and not on_cuda:
            _say_once(f"decode engine: on {self.device.type} the step runs eagerly (compile and CUDA graphs need CUDA)")
        self.static = StaticCache(batch=batch, max_len=max_len, device=self.device, attention=attention)
        self.ctx = StaticDecodeContext(self.static)
        self.compiled = compile
        if compile and on_cuda and not self.unstatic:  # the whole step: the mask and the pick fuse too
            # (with nodes off the static path a cache grows each token: nothing to compile once)
            self._device_step = torch.compile(self._device_step, dynamic=False,  # type: ignore[method-assign]
                                              options=compile_options)
        self._offset = 0
        new = lambda dtype: torch.zeros(batch, dtype=dtype, device=self.device)  # noqa: E731
        self.tok = new(torch.long).view(batch, 1)  # (B, 1): the token each row feeds next
        self.pos = new(torch.long)  # (B,): the position that token sits at
        self.bad = new(torch.bool)  # (B,): a row's logits were not finite at some step
        self.logits: Tensor | None = None  # (B, V): the last step's logits (stochastic sampling reads them)
        self._states: dict[int, tuple[torch.nn.Module, list[Tensor], Any]] = {}
        self._graphs: dict[bool, torch.cuda.CUDAGraph] = {}  # greedy or not -> the captured step

    # -- the pieces --------------------------------------------------------------------------

    def _run(self, tokens: Tensor) -> Tensor:
        with decoding(self.ctx):
            return self.module(tokens)["logits"]  # (B, T, V)

    def _keep_states(self) -> None:
        """Copy each fixed-state node's new state into the tensors it had after the prefill, so
        that a captured step always reads and writes the same memory."""
        for mod, bufs, spec in self._states.values():
            leaves = pytree.tree_flatten(self.ctx.get(mod))[0]
            for b, t in zip(bufs, leaves):
                if t.shape != b.shape:
                    raise PhysLMError(f"the decode state of {type(mod).__name__} changed shape {tuple(b.shape)} -> "
                                      f"{tuple(t.shape)}, so it cannot live in fixed buffers",
                                      fix="use generate() without the engine")
                if t is not b:
                    b.copy_(t)
            self.ctx.set(mod, pytree.tree_unflatten(bufs, spec))

    def _adopt_states(self) -> None:
        """After a prefill: take each stateful module's state as its buffers (copied into the old
        buffers when they fit, so a captured graph stays valid)."""
        found = {}
        for mod in self.module.modules():
            state = self.ctx.get(mod)
            if state is None:
                continue
            leaves, spec = pytree.tree_flatten(state)
            if not leaves or not all(isinstance(t, Tensor) for t in leaves):
                if self.unstatic:
                    continue  # a node off the static path, with its own cache
                raise PhysLMError(f"the decode state of {type(mod).__name__} is not a set of tensors, so the engine "
                                  "cannot keep it in fixed buffers", fix="use generate() without the engine")
            old = self._states.get(id(mod))
            if old is not None and [b.shape for b in old[1]] == [t.shape for t in leaves]:
                for b, t in zip(old[1], leaves):
                    b.copy_(t)
                bufs = old[1]
            else:
                bufs = [t.clone() for t in leaves]
                self._graphs.clear()  # new memory: a captured step would read the old
            found[id(mod)] = (mod, bufs, spec)
            self.ctx.set(mod, pytree.tree_unflatten(bufs, spec))
        self._states = found

    def _step(self, greedy: bool) -> None:
        """One token for every row: feed ``tok`` at ``pos``; greedy also writes the pick to ``tok``."""
        self.ctx.offset = self._offset  # nodes off the static path read the position as an int
        self._device_step(greedy)

    def _device_step(self, greedy: bool) -> None:
        """The step's tensor work: fixed shapes, every value read from a device buffer, no host
        sync (the test traces it as one graph)."""
        self.static.begin(self.pos, 1)
        logits = self._run(self.tok)[:, -1, : self.vocab_limit]  # (B, V): the real ids of a padded vocabulary
        self._keep_states()
        top, pick = logits.max(dim=-1)  # NaN, +inf, or -inf everywhere show in the max
        self.bad |= ~torch.isfinite(top)
        if greedy:
            self.tok.copy_(pick[:, None])
        elif self.logits is None or self.logits.shape != logits.shape:
            self.logits = logits.clone()  # the sampler reads them after the step
        else:
            self.logits.copy_(logits)
        self.pos += 1

    def _capture(self, greedy: bool) -> None:
        """Record ``_step`` as a CUDA graph (after warm-up runs on a side stream, which also
        compile it), restoring the buffers the warm-up steps changed."""
        saved = [t.clone() for t in (self.tok, self.pos, self.bad)]
        saved_states = [[b.clone() for b in bufs] for _, bufs, _ in self._states.values()]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                self._step(greedy)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self._step(greedy)
            self._graphs[greedy] = graph
        except RuntimeError as err:  # a node that syncs with the host (a data-dependent shape) cannot be captured
            self.cuda_graph = False
            _say_once(f"decode engine: the step could not be captured as a CUDA graph ({str(err).splitlines()[0][:160]}); "
                      "it runs eagerly")
        finally:
            for t, s in zip((self.tok, self.pos, self.bad), saved):
                t.copy_(s)
            for (_, bufs, _), olds in zip(self._states.values(), saved_states):
                for b, s in zip(bufs, olds):
                    b.copy_(s)
        # the warm-up wrote keys at the saved positions; they are overwritten before they are seen

    def _prefill(self, ids: Tensor, lengths: Tensor) -> Tensor:
        """Run the right-padded prompts (B, L) in chunks; the logits (B, V) at each row's last token."""
        self.ctx.clear()
        B, L = ids.shape
        last = lengths - 1  # (B,)
        out = None
        for a in range(0, L, self.prefill_chunk):
            b = min(a + self.prefill_chunk, L)
            self.static.begin(torch.full((B,), a, dtype=torch.long, device=self.device), b - a)
            self.ctx.offset = a
            logits = self._run(ids[:, a:b])  # (B, T, V): the prefill runs eagerly
            idx = (last - a).clamp(0, b - a - 1)  # (B,)
            here = logits[torch.arange(B, device=self.device), idx]  # (B, V)
            inside = ((last >= a) & (last < b))[:, None]  # (B, 1)
            out = here if out is None else torch.where(inside, here, out)
        self._adopt_states()
        return out[:, : self.vocab_limit]

    # -- generation ----------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]] | Tensor, *, max_new_tokens: int, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 eos_id: int | None = None, on_token: Callable[[list[int]], None] | None = None) -> list[list[int]]:
        """Continue each prompt (a list of id lists, lengths may differ, or a (B, T) tensor);
        returns prompt + new ids per row, every row as long as the others (as ``generate.generate``
        does). With ``eos_id`` generation stops after the step at which every row has emitted it.
        ``on_token`` receives each step's ids, in bursts of ``check_every`` steps."""
        rows, lengths = checked_prompts(prompts, self.batch, self.max_len, max_new_tokens, "DecodeEngine")
        if len(set(lengths)) > 1 and (self.unstatic or self._has_state_nodes()):
            raise PhysLMError("prompts of different lengths need every stateful node on static buffers; "
                              f"this model has {', '.join(self.unstatic) or 'fixed-state (recurrent) nodes'}",
                              fix="generate each prompt on its own (batch 1)")
        greedy = temperature == 0
        gen = torch.Generator(self.device).manual_seed(seed) if seed is not None else None
        ids = torch.tensor([r + [r[-1]] * (max(lengths) - len(r)) for r in rows], dtype=torch.long, device=self.device)
        lens = torch.tensor(lengths, dtype=torch.long, device=self.device)
        was_training = self.module.training
        self.module.eval()
        try:
            new = self._decode(ids, lens, max_new_tokens, greedy, temperature, top_k, top_p, gen, eos_id, on_token)
        finally:
            self.module.train(was_training)
        return [r + n for r, n in zip(rows, new)]

    def _has_state_nodes(self) -> bool:
        return "state" in self.plan.values()

    def _decode(self, ids, lens, n, greedy, temperature, top_k, top_p, gen, eos_id, on_token) -> list[list[int]]:
        self.bad.zero_()
        first = self._prefill(ids, lens)  # (B, V)
        self.bad |= ~torch.isfinite(first.max(dim=-1).values)
        self.tok.copy_(sample_on_device(first, temperature=temperature, top_k=top_k, top_p=top_p,
                                        generator=gen)[:, None])
        self.pos.copy_(lens)
        self._offset = int(ids.shape[1])
        out = torch.empty(self.batch, n, dtype=torch.long, device=self.device)  # (B, n)
        out[:, 0] = self.tok[:, 0]
        use_graph = self.cuda_graph and n > 1
        if use_graph and greedy not in self._graphs:
            self._capture(greedy)
            use_graph = self.cuda_graph
        ended = [False] * self.batch
        kept, shown = n, 0
        watch = eos_id is not None or on_token is not None  # else one look at the end is enough
        for i in range(1, n + 1):
            if watch and i % self.check_every == 0 or i == n:  # the only host syncs: every check_every tokens
                if bool(self.bad.any()):
                    raise NonFiniteLogits(nonfinite_parameter(self.module))
                for step in zip(*out[:, shown:i].tolist()):  # each step's ids, one per row
                    shown += 1
                    if on_token is not None:
                        on_token(list(step))
                    if eos_id is not None:
                        ended = [e or t == eos_id for e, t in zip(ended, step)]
                        if all(ended):
                            kept = shown
                            break
                if kept < n or i == n:
                    break
            if use_graph:
                self._graphs[greedy].replay()
            else:
                self._step(greedy)
            self._offset += 1
            if not greedy:
                self.tok.copy_(sample_on_device(self.logits, temperature=temperature, top_k=top_k, top_p=top_p,
                                                generator=gen)[:, None])
            out[:, i] = self.tok[:, 0]
        return out[:, :kept].tolist()


# -- the one-call API ------------------------------------------------------------------------------

_SAID: set[str] = set()
_ENGINES: weakref.WeakKeyDictionary[torch.nn.Module, DecodeEngine] = weakref.WeakKeyDictionary()


def _say_once(message: str) -> None:
    if message not in _SAID:
        _SAID.add(message)
        print(message, file=sys.stderr)


def _engine_for(cm: Any, batch: int, need: int, context: int | None, compile: bool, check_every: int,
                vocab_limit: int | None = None) -> DecodeEngine:
    """A cached engine that fits ``batch`` rows of ``need`` tokens (its max_len rounded up to 64
    positions, so the next prompt of about the same size reuses the captured step)."""
    max_len = -(-need // 64) * 64
    if context is not None:
        max_len = min(max_len, context)
    dev = next(cm.module.parameters()).device
    old = _ENGINES.get(cm.module)
    if old is not None and old.batch == batch and old.max_len >= need and old.compiled == compile \
            and old.device == dev and old.check_every == check_every and old.vocab_limit == vocab_limit:
        return old
    engine = DecodeEngine(cm, batch=batch, max_len=max_len, compile=compile, check_every=check_every,
                          vocab_limit=vocab_limit)
    _ENGINES[cm.module] = engine
    return engine


@torch.inference_mode()
def generate_static(
    model_or_ckpt: Any,
    prompt_ids: list[int] | list[list[int]] | Tensor,
    *,
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
    eos_id: int | None = None,
    on_token: Callable[[list[int]], None] | None = None,
    device: str | torch.device | None = None,
    compile: bool = True,
    check_every: int = 16,
    vocab_limit: int | None = None,
) -> list[int] | list[list[int]] | Tensor:
    """``generate.generate`` on the decode engine; the same arguments and the same greedy output.

    ``prompt_ids``: a list or 1-D tensor (returns a list), a (B, T) tensor (returns (B, T + n)),
    or a list of id lists of any lengths (returns a list of lists, row b = prompt b + n new ids).
    ``compile``: on CUDA, ``torch.compile`` the step before it is captured. Where the engine
    cannot serve a call (a repetition penalty, a node that cannot decode incrementally, more
    tokens than the model's context) it runs ``generate.generate`` and says so once on stderr.
    Sampling draws from the same distribution as ``generate`` but a seed gives other samples.
    """
    check_sampling(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
                   max_new_tokens=max_new_tokens)
    cm, limit = sampling_target(model_or_ckpt, device, vocab_limit)
    dev = next(cm.module.parameters()).device if device is None else torch.device(device)
    cm.module.to(dev)
    ragged = isinstance(prompt_ids, list) and bool(prompt_ids) and isinstance(prompt_ids[0], (list, tuple))
    if ragged:
        rows = [list(map(int, r)) for r in prompt_ids]
        if any(not r for r in rows):
            raise PhysLMError("a prompt is empty", fix="give at least one token (e.g. a newline)")
    else:
        ids, flat = prompt_tensor(prompt_ids, dev)
        rows = ids.tolist()
    context = model_context(cm)
    need = max(map(len, rows)) + max_new_tokens
    why = ("a repetition penalty" if repetition_penalty != 1.0
           else f"nodes that cannot decode incrementally ({', '.join(_not_incremental(cm))})" if _not_incremental(cm)
           else f"{need} tokens, more than the context {context}" if context is not None and need > context else None)
    if why is not None:
        _say_once(f"decode engine: {why}; generating without it")
        kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                  repetition_penalty=repetition_penalty, seed=seed, eos_id=eos_id, on_token=on_token, device=dev,
                  vocab_limit=limit)
        if ragged:
            return [generate(cm, r, **kw) for r in rows]
        return generate(cm, prompt_ids, **kw)
    sample = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    plan, unstatic = static_plan(cm)
    if len(set(map(len, rows))) > 1 and (unstatic or "state" in plan.values()):
        # a padded prompt would disturb a carried state: one row at a time, cut where all have ended
        outs = [_engine_for(cm, 1, len(r) + max_new_tokens, context, compile, check_every, limit)
                .generate([r], **sample)[0] for r in rows]
        new = [o[len(r):] for o, r in zip(outs, rows)]
        kept = _first_all_ended(new, eos_id)
        for step in zip(*(n[:kept] for n in new)):
            if on_token is not None:
                on_token(list(step))
        out = [r + n[:kept] for r, n in zip(rows, new)]
    else:
        engine = _engine_for(cm, len(rows), need, context, compile, check_every, limit)
        out = engine.generate(rows, eos_id=eos_id, on_token=on_token, **sample)
    if ragged:
        return out
    return out[0] if flat else torch.tensor(out, dtype=torch.long, device=dev)


def _first_all_ended(new: list[list[int]], eos_id: int | None) -> int:
    """How many steps ``generate`` keeps: up to the one at which every row has emitted ``eos_id``."""
    n = len(new[0])
    if eos_id is None:
        return n
    ends = [r.index(eos_id) + 1 if eos_id in r else n for r in new]
    return max(ends)
