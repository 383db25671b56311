"""Text generation: sampling with a KV cache, or by recomputing the context each step.

    ids = generate(load_checkpoint("runs/baby"), tok.encode("ROMEO:"), max_new_tokens=200)

With ``use_cache="auto"`` the cache is used when every node of the graph can decode
incrementally (its component's decode kind is ``stateless``, ``cached`` or ``recurrent``;
nodes that only feed a loss are not counted): the prompt is run
once inside a ``DecodeContext`` and then one token per step, ``ctx.offset`` advanced by each
chunk's length. Otherwise every step runs the whole (cropped) context. When the sequence
outgrows the model's context, the cache is reset and the last ``context`` tokens are run
again, so both paths see exactly the same tokens and greedy decoding agrees between them.

``decode_engine.generate_static`` is the fast path on the same models (preallocated caches, a
CUDA-graph step); its greedy output equals this one's.

A padded vocabulary (``params.vocab`` above the tokenizer's size, kept as the blueprint wrote it)
has logits for ids no token uses. Only the first ``vocab_limit`` logits are sampled from (greedy
included): by default the size of a checkpoint's tokenizer; for a bare ``CompiledModel`` pass it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from physlm_graph._context import DecodeContext, decoding
from physlm_graph._errors import PhysLMError
from physlm_graph._registry import REGISTRY

from .checkpoint import Checkpoint, load_checkpoint, model_context

__all__ = ["generate", "can_cache", "check_sampling", "sample_next", "filter_top", "NonFiniteLogits", "sampling_target"]


class NonFiniteLogits(PhysLMError):
    """The model produced NaN or +inf logits (or -inf everywhere): nothing can be sampled from them."""

    stage = "generate"

    def __init__(self, where: str | None = None) -> None:
        super().__init__("the model's logits are not finite (NaN or inf), so no token can be chosen"
                         + (f": {where}" if where else ""),
                         fix="use another checkpoint (a run folder's best/), or retrain it with a lower learning rate")


def nonfinite_parameter(module: torch.nn.Module) -> str | None:
    """The first parameter or buffer holding NaN or inf, with how much of it does, else None."""
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        if t.is_floating_point() and t.numel():
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                return f"weight {name} holds {bad:,} NaN/inf values of {t.numel():,}"
    return None


_INCREMENTAL = ("stateless", "cached", "recurrent")


def _logit_nodes(cm: Any) -> list[str]:
    """The nodes the ``logits`` output depends on (all nodes if the graph has no such output):
    a node that only feeds a loss (a regulariser) is not run for its value during generation."""
    out = cm.resolved.outputs.get("logits")
    if out is None:
        return list(cm.resolved.nodes)
    seen: set[str] = set()
    todo = [out.node]
    while todo:
        path = todo.pop()
        node = cm.resolved.nodes.get(path)
        if node is None or path in seen:
            continue
        seen.add(path)
        todo.extend(ref.node for _, ref in node.inputs)
    return [p for p in cm.resolved.nodes if p in seen]


def _not_incremental(cm: Any) -> list[str]:
    return sorted({cm.resolved.nodes[p].use for p in _logit_nodes(cm)
                   if (info := REGISTRY.get(cm.resolved.nodes[p].use)) is None
                   or info.decode_kind(cm.checked[p]) not in _INCREMENTAL})


def can_cache(cm: Any) -> bool:
    """True when every node the logits depend on decodes incrementally (decode kind
    ``stateless``, ``cached`` or ``recurrent``)."""
    return not _not_incremental(cm)


def sampling_target(model_or_ckpt: Any, device: str | torch.device | None = None,
                    vocab_limit: int | None = None) -> tuple[Any, int | None]:
    """The CompiledModel to sample from, and how many of its logits are real ids (None: all).

    ``vocab_limit`` as given, else the tokenizer's size of a checkpoint (or checkpoint path) whose
    model has more logits than its tokenizer has ids (a padded vocabulary); a bare CompiledModel
    knows no tokenizer, so all its logits count unless ``vocab_limit`` is given."""
    from .checkpoint import model_vocab

    ck = model_or_ckpt
    if isinstance(ck, (str, os.PathLike)):
        ck = load_checkpoint(Path(ck), device=device or "cpu")
    if isinstance(ck, Checkpoint):
        cm = ck.model
        if vocab_limit is None and ck.tokenizer is not None:
            vocab_limit = ck.tokenizer.vocab_size
    elif hasattr(ck, "resolved") and hasattr(ck, "module"):
        cm = ck
    else:
        raise TypeError(f"generate() takes a CompiledModel, a Checkpoint or a checkpoint path, got {type(ck).__name__}")
    total = model_vocab(cm)
    if vocab_limit is not None and total is not None:
        if not 1 <= vocab_limit <= total:
            raise PhysLMError(f"vocab_limit {vocab_limit} is outside 1..{total}, the model's logits",
                              fix="pass the tokenizer's size (at most the model's vocabulary), or leave it out")
        if vocab_limit == total:
            vocab_limit = None
    return cm, vocab_limit


def filter_top(logits: Tensor, *, top_k: int | None, top_p: float | None) -> Tensor:
    """``logits`` (B, V) with all but the ``top_k`` largest, then all past the smallest prefix whose
    probability reaches ``top_p`` (always at least one), set to -inf. No host sync."""
    if top_k is not None and top_k < logits.size(-1):
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs > top_p  # keep the smallest prefix reaching top_p
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits


def sample_next(
    logits: Tensor,
    seen: Tensor,
    *,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    repetition_penalty: float,
    generator: torch.Generator | None,
) -> Tensor:
    """Pick the next token of each row from ``logits`` (B, V); ``seen`` (B, S) is the sequence so far."""
    if bool(logits.isnan().any() | logits.isposinf().any() | logits.isneginf().all(dim=-1).any()):
        raise NonFiniteLogits()  # -inf alone is a masked id (a padded vocabulary), not a fault
    logits = logits.float().clone()  # (B, V)
    if repetition_penalty != 1.0:  # CTRL (Keskar et al. 2019): shrink the logits of seen tokens
        prev = logits.gather(1, seen)  # (B, S)
        logits.scatter_(1, seen, torch.where(prev > 0, prev / repetition_penalty, prev * repetition_penalty))
    if temperature == 0:
        return logits.argmax(dim=-1)  # (B,)
    logits = filter_top(logits / temperature, top_k=top_k, top_p=top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)  # (B,)


@torch.inference_mode()
def generate(
    model_or_ckpt: Any,
    prompt_ids: list[int] | Tensor,
    *,
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
    use_cache: bool | Literal["auto"] = "auto",
    eos_id: int | None = None,
    on_token: Callable[[list[int]], None] | None = None,
    device: str | torch.device | None = None,
    vocab_limit: int | None = None,
) -> list[int] | Tensor:
    """Continue ``prompt_ids``; returns prompt + new ids (a list for a list or 1-D prompt, else (B, T + n)).

    ``temperature=0`` is greedy. ``top_k``/``top_p`` filter before sampling, ``repetition_penalty``
    > 1 discourages tokens already in the sequence. ``seed`` makes sampling reproducible.
    ``eos_id`` stops when every row has emitted it; ``on_token`` receives each step's new ids.
    ``vocab_limit``: sample only ids below it (see the module docstring; default from a checkpoint).
    """
    check_sampling(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
                   max_new_tokens=max_new_tokens)
    cm, limit = sampling_target(model_or_ckpt, device, vocab_limit)
    module = cm.module
    dev = next(module.parameters()).device if device is None else torch.device(device)
    module.to(dev)
    ids, flat = prompt_tensor(prompt_ids, dev)
    cached = can_cache(cm) if use_cache == "auto" else bool(use_cache)
    if cached and not can_cache(cm):
        bad = _not_incremental(cm)
        raise PhysLMError(f"use_cache=True, but these components cannot decode incrementally: {', '.join(bad)}",
                          fix="use use_cache='auto' or False")
    context = model_context(cm) or 1 << 62
    gen = torch.Generator(dev).manual_seed(seed) if seed is not None else None
    pick = lambda logits: sample_next(  # noqa: E731  (only the tokenizer's ids of a padded vocabulary)
        logits[:, :limit], ids, temperature=temperature, top_k=top_k, top_p=top_p,
        repetition_penalty=repetition_penalty, generator=gen)
    was_training = module.training
    module.eval()
    try:
        if cached:
            ids = _run_cached(module, ids, max_new_tokens, context, pick, eos_id, on_token)
        else:
            ids = _run_full(module, ids, max_new_tokens, context, pick, eos_id, on_token)
    except NonFiniteLogits:
        raise NonFiniteLogits(nonfinite_parameter(module)) from None
    finally:
        module.train(was_training)
    return ids[0].tolist() if flat else ids


def check_sampling(*, temperature: float, top_k: int | None, top_p: float | None, repetition_penalty: float,
                   max_new_tokens: int) -> None:
    """Refuse sampling options out of range (the engine and ``generate`` share these checks)."""
    if temperature < 0:
        raise PhysLMError(f"temperature must be >= 0, got {temperature}", fix="use 0 for greedy decoding")
    if top_k is not None and top_k < 1:
        raise PhysLMError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise PhysLMError(f"top_p must be in (0, 1], got {top_p}")
    if repetition_penalty <= 0:
        raise PhysLMError(f"repetition_penalty must be > 0, got {repetition_penalty}", fix="use 1.0 for none")
    if max_new_tokens < 1:
        raise PhysLMError(f"max_new_tokens must be >= 1, got {max_new_tokens}")


def prompt_tensor(prompt_ids: list[int] | Tensor, device: torch.device) -> tuple[Tensor, bool]:
    """The prompt as (B, T) long ids on ``device``, and whether it came flat (a list or 1-D),
    which is how the result is returned; an empty prompt is an error."""
    flat = not isinstance(prompt_ids, Tensor) or prompt_ids.dim() == 1
    ids = torch.as_tensor(prompt_ids, dtype=torch.long, device=device).reshape(1, -1) if flat \
        else prompt_ids.to(device).long()
    if ids.size(1) == 0:
        raise PhysLMError("the prompt is empty", fix="give at least one token (e.g. a newline)")
    return ids, flat


def _last_logits(module: torch.nn.Module, x: Tensor) -> Tensor:
    return module(x)["logits"][:, -1, :]  # (B, V)


def _done(ids: Tensor, start: int, eos_id: int | None) -> bool:
    return eos_id is not None and bool((ids[:, start:] == eos_id).any(dim=1).all())


def _run_full(module, ids, n, context, pick, eos_id, on_token) -> Tensor:
    start = ids.size(1)
    for _ in range(n):
        nxt = pick(_last_logits(module, ids[:, -context:]))  # (B,)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        if on_token is not None:
            on_token(nxt.tolist())
        if _done(ids, start, eos_id):
            break
    return ids


def _run_cached(module, ids, n, context, pick, eos_id, on_token) -> Tensor:
    start = ids.size(1)
    ctx = DecodeContext()
    with decoding(ctx):
        window = ids[:, -context:]
        logits = _last_logits(module, window)
        ctx.offset = window.size(1)
        for i in range(n):
            nxt = pick(logits)  # (B,)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            if on_token is not None:
                on_token(nxt.tolist())
            if i == n - 1 or _done(ids, start, eos_id):
                break
            if ctx.offset + 1 > context:  # the next position does not fit: crop and re-prefill
                ctx.clear()
                window = ids[:, -context:]
                logits = _last_logits(module, window)
                ctx.offset = window.size(1)
            else:
                logits = _last_logits(module, nxt[:, None])
                ctx.offset += 1
    return ids
