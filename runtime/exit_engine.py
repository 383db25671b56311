"""Early-exit decoding on the decode engine's static caches.

    ids, stats = generate_with_exits_static(cm, prompt, max_new_tokens=200, threshold=0.9)

``exit_decode.SegmentExecutor`` with the engine's preallocated key/value buffers
(``components/_static_cache.py``) in place of caches that grow by a ``torch.cat`` per token:
before each segment runs, the chunk's positions (and so its length mask) are set from the
decode offset and the chunk's length, and every attention writes its keys in place there. The
rest is the executor's: the same exits, rules, ``lazy`` and ``propagate`` fills, and the same
tokens as ``generate_with_exits``.

Whether a token exits is decided on the host after every exit head, so a step's shape and
control flow depend on the data: it is not compiled or captured as a CUDA graph (the one-token
step of ``DecodeEngine`` and the round of ``speculative_engine`` are). What it saves over the
executor on growing caches is the copy of every cache each token. Nodes the engine keeps off its
static path are refused; ``generate_with_exits_static`` then runs ``generate_with_exits`` and
says so once on stderr.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, fx

from physlm_graph._errors import PhysLMError
from physlm_graph.components._static_cache import StaticCache, StaticDecodeContext

from .checkpoint import model_context
from .decode_engine import _say_once, static_plan
from .exit_decode import ExitStats, SegmentExecutor, generate_with_exits
from .exit_segments import _Piece
from .generate import _not_incremental

__all__ = ["StaticSegmentExecutor", "generate_with_exits_static"]


class StaticSegmentExecutor(SegmentExecutor):
    """``SegmentExecutor`` on static key/value buffers of ``max_len`` positions (made for the
    batch of the first prompt, again when the batch changes)."""

    def __init__(self, cm: Any, *, max_len: int, rule: str | None = None, threshold: float | None = None,
                 kv_fill: str = "lazy") -> None:
        super().__init__(cm, rule=rule, threshold=threshold, kv_fill=kv_fill)
        plan, unstatic = static_plan(cm)
        if unstatic:
            raise PhysLMError("early exit on the engine needs every node on its static path; these keep caches "
                              f"that grow: {', '.join(unstatic)}", fix="decode without --compile")
        context = model_context(cm)
        if context is not None and max_len > context:
            raise PhysLMError(f"max_len {max_len} is longer than the model's context {context}",
                              fix=f"generate at most {context} tokens in all (prompt + new)")
        self.max_len = max_len
        self.static: StaticCache | None = None

    def _run(self, piece: _Piece, env: dict[fx.Node, Any]) -> None:
        args = [env[a] for a in piece.inputs]
        T = next((v.size(1) for v in args if isinstance(v, Tensor) and v.dim() >= 2), None)
        if T is not None and any(piece is seg for seg in self.cut.segments):  # (exit heads hold no cache)
            self._begin(T)  # the chunk sits at offset .. offset + T - 1 in every row
        env.update(zip(piece.outputs, piece.module.forward(*args)))

    def _begin(self, T: int) -> None:
        assert self.static is not None
        if self.ctx.offset + T > self.max_len:
            raise PhysLMError(f"positions {self.ctx.offset}..{self.ctx.offset + T - 1} do not fit the engine's "
                              f"max_len {self.max_len}", fix="build the executor with a larger max_len")
        start = torch.full((self.static.batch,), self.ctx.offset, dtype=torch.long, device=self.static.device)
        self.static.begin(start, T)

    def _propagate(self, pos: int, s: int, env: dict[fx.Node, Any]) -> None:
        self.ctx.offset = pos
        self._begin(1)  # the exiting row's keys, written at its position in the skipped layers
        super()._propagate(pos, s, env)

    @torch.inference_mode()
    def prefill(self, tokens: Tensor) -> Tensor:
        B = tokens.size(0)
        if self.static is None or self.static.batch != B or self.static.device != tokens.device:
            self.static = StaticCache(batch=B, max_len=self.max_len, device=tokens.device)
            self.ctx = StaticDecodeContext(self.static)
        return super().prefill(tokens)


def generate_with_exits_static(
    cm: Any,
    prompt_ids: list[int] | Tensor,
    *,
    max_new_tokens: int,
    **kw: Any,
) -> tuple[list[int] | Tensor, ExitStats]:
    """``generate_with_exits`` (the same keyword arguments and results) on static buffers of
    prompt + ``max_new_tokens`` positions (at most the model's context: past it, the executor
    re-prefills the last ``context`` tokens, as ``generate`` does). Where the engine
    cannot serve the call (a node off its static path, one that cannot decode incrementally) it
    runs ``generate_with_exits`` and says why once on stderr."""
    why = None
    if _not_incremental(cm):
        why = "nodes that cannot decode incrementally"
    elif static_plan(cm)[1]:
        why = f"nodes off its static path ({', '.join(static_plan(cm)[1])})"
    if why is not None:
        _say_once(f"decode engine: early exit with {why} runs without the engine")
        return generate_with_exits(cm, prompt_ids, max_new_tokens=max_new_tokens, **kw)
    length = (len(prompt_ids) if not isinstance(prompt_ids, Tensor) or prompt_ids.dim() == 1
              else prompt_ids.size(1))
    context = model_context(cm)
    max_len = length + max_new_tokens if context is None else min(context, length + max_new_tokens)

    if next(cm.module.parameters()).is_cuda:
        _say_once("decode engine: early exit decides on the host after every exit head, so its steps are not "
                  "captured; on a GPU this is slower than full depth on the engine (an H100, 2026-12-07: 0.11x). "
                  "For speed with full depth's tokens use --speculate K")

    def executor(cm: Any, **opts: Any) -> SegmentExecutor:
        return StaticSegmentExecutor(cm, max_len=max_len, **opts)

    return generate_with_exits(cm, prompt_ids, max_new_tokens=max_new_tokens, executor=executor, **kw)
