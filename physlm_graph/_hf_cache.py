"""``PhysLMCache``: the components' own decode state behind transformers' ``Cache`` interface.

A physlm graph has no attention-mask or position input: every component sees a batch whose rows
start at the same position, and position-dependent components read ``DecodeContext.offset``.
A left-padded batch is therefore run as *groups*: the rows with the same number of leading pad
tokens form one group, which runs without its padding, in its own ``DecodeContext``. Each group
sees exactly what a batch of its unpadded prompts would see, so a padded row gives the logits
its prompt gives alone, for every kind of component (KV caches, recurrent states, positions).
An unpadded batch is one group.

The cache holds one ``DecodeContext`` per group (what each component keeps there is the
component's business: ``components/_decode_cache.py``, ``attention.causal``'s KV pairs, an SSM
state), the last ``context`` real tokens of each group (to run the window again once a row
outgrows the model's context, as ``physlm_graph.runtime.generate`` does), and how many columns
(padding included) transformers has fed so far, which is what ``get_seq_length`` reports.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from transformers.cache_utils import Cache

from physlm_graph._context import DecodeContext, decoding
from physlm_graph._errors import PhysLMError

__all__ = ["PhysLMCache", "as_cache", "check_positions", "padding_of", "run_groups"]


@dataclass
class _Group:
    """Rows sharing their left padding: one decode context, one stream of real tokens."""

    rows: Tensor  # (b,) long: the batch rows of the group
    pad: int  # leading pad columns of these rows
    ctx: DecodeContext = field(default_factory=DecodeContext)
    tokens: Tensor | None = None  # (b, <= context) the last real tokens run, for a re-run past the context


class PhysLMCache(Cache):
    """The decode state of a ``PhysLMForCausalLM``: ``past_key_values`` (``cache``) in and out.

    Made by the model on the first call with ``use_cache=True`` (or passed in empty); hold on to
    the one the model returns and pass it back with the next tokens only. ``get_seq_length()``
    counts the columns fed so far, padding included. Not compileable (it holds Python state per
    component); beam search and assisted decoding, which reorder or crop caches, are refused.
    """

    def __init__(self) -> None:
        super().__init__(layers=[])
        self.groups: list[_Group] | None = None
        self.batch = -1
        self.seen = 0  # columns fed, padding included
        self.skipped = 0  # columns of an over-long prompt dropped before the first run (generate's window)
        self.windowed = False  # some group has been re-run from a window: positions restart

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.skipped + self.seen

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    @property
    def batch_size(self) -> int:
        return self.batch

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return False

    def reset(self) -> None:
        self.groups, self.batch, self.seen, self.skipped, self.windowed = None, -1, 0, 0, False

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0:
            raise _unsupported("cropping (assisted or speculative decoding)")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise _unsupported("reordering rows (beam search)")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise _unsupported("selecting rows")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise _unsupported("repeating rows")

    def __repr__(self) -> str:
        groups = [] if self.groups is None else [(g.pad, len(g.rows), g.ctx.offset) for g in self.groups]
        return f"PhysLMCache(seen={self.seen}, groups(pad, rows, offset)={groups})"


def _unsupported(what: str) -> PhysLMError:
    return PhysLMError(f"PhysLMCache does not support {what}: the components' decode state is not a list of "
                       "key/value tensors", fix="generate with use_cache=False (every step recomputes), or "
                       "use greedy or sampled decoding (num_beams=1) without an assistant model")


def padding_of(mask: Tensor) -> tuple[Tensor, Tensor]:
    """Leading and trailing zeros of each row of a 2-D 0/1 mask, checked to be one run of ones.

    A row may be left-padded (zeros, then ones) or right-padded (ones, then zeros); zeros between
    ones would mean a hole in the sequence, which no component can skip."""
    m = mask.bool()
    L = m.size(1)
    n = m.sum(1)  # (B,)
    lead = (m.long().cumsum(1) == 0).sum(1)  # zeros before the first one
    trail = (m.flip(1).long().cumsum(1) == 0).sum(1)  # zeros after the last one
    empty = n == 0
    if bool(empty.any()):
        row = int(empty.nonzero()[0])
        raise PhysLMError(f"attention_mask row {row} is all zeros: the row holds no token",
                          fix="drop empty rows from the batch")
    holes = (lead + n + trail) != L
    if bool(holes.any()):
        row = int(holes.nonzero()[0])
        raise PhysLMError(f"attention_mask row {row} has zeros between ones ({m[row].int().tolist()}): only left "
                          "or right padding is supported", fix="pad each row at one end (tokenizer padding_side)")
    return lead, trail


def _warn_window(context: int) -> None:
    warnings.warn(f"a row is longer than the model's context of {context} tokens: it continues from its last "
                  f"{context} tokens, run again (as physlm-graph generate does)", stacklevel=4)


def run_groups(module: torch.nn.Module, input_ids: Tensor, lead: Tensor, *, cache: PhysLMCache | None,
               context: int | None) -> Tensor:
    """Logits (B, T, V) of ``input_ids`` (B, T) whose rows start after ``lead`` pad columns.

    Without a cache, the rows of each padding group run as one plain forward (positions from 0).
    With one, each group's new tokens run in its decode context; a group whose stream would pass
    ``context`` runs its last ``context`` tokens again from a cleared context (with a warning).
    Logits at pad columns are 0."""
    B, T = input_ids.shape
    if cache is not None and cache.groups is None:
        cache.groups = [_Group(rows=(lead == p).nonzero().flatten(), pad=int(p)) for p in lead.unique().tolist()]
        cache.batch = B
    groups = cache.groups if cache is not None else [_Group(rows=(lead == p).nonzero().flatten(), pad=int(p))
                                                     for p in lead.unique().tolist()]
    first = cache is None or cache.seen == 0
    if len(groups) == 1 and (not first or groups[0].pad == 0):  # every row alike: no gather, no scatter
        return _run_group(module, groups[0], input_ids, cache, context)
    out: Tensor | None = None
    for g in groups:
        start = g.pad - (cache.seen if cache is not None else 0)  # pad columns still in this chunk
        x = input_ids[g.rows, max(start, 0):]  # (b, t)
        logits = _run_group(module, g, x, cache, context)  # (b, t, V)
        if out is None:
            out = logits.new_zeros(B, T, logits.size(-1))
        out[g.rows, T - x.size(1):] = logits
    assert out is not None
    return out


def _run_group(module: torch.nn.Module, g: _Group, x: Tensor, cache: PhysLMCache | None,
               context: int | None) -> Tensor:
    t = x.size(1)
    if t == 0:
        raise PhysLMError("a row of the batch has no tokens in this call (padding only)",
                          fix="pass at least one real token per row")
    if context is not None and t > context:
        raise PhysLMError(f"{t} tokens in one call, more than the model's context of {context}: they are not "
                          "cropped", fix=f"pass at most {context} tokens per row (tokenizer truncation=True, "
                          f"max_length={context}); generate() continues past the context by itself")
    if cache is None:
        return module(x)["logits"]  # (b, t, V)
    if context is not None and g.ctx.offset + t > context:  # the stream outgrows the context: run the window
        _warn_window(context)
        cache.windowed = True
        window = torch.cat([g.tokens, x], dim=1)[:, -context:] if g.tokens is not None else x
        g.ctx.clear()
        with decoding(g.ctx):
            logits = module(window)["logits"][:, -t:]
        g.ctx.offset = window.size(1)
        g.tokens = window
        return logits
    with decoding(g.ctx):
        logits = module(x)["logits"]  # (b, t, V)
    g.ctx.offset += t
    if context is not None:
        g.tokens = (x if g.tokens is None else torch.cat([g.tokens, x], dim=1))[:, -context:]
    return logits


def check_positions(position_ids: Tensor, lead: Tensor, past: int) -> None:
    """``position_ids`` (B, T) must number each row's real tokens from 0, as the graph does
    (transformers' generate derives them from the mask: ``cumsum - 1``); pad columns are free."""
    B, T = position_ids.shape
    col = torch.arange(past, past + T, device=position_ids.device)[None, :]  # (1, T) absolute column
    want = col - lead[:, None].to(position_ids.device)  # (B, T)
    real = want >= 0
    bad = real & (position_ids != want)
    if bool(bad.any()):
        row = int(bad.any(1).nonzero()[0])
        raise PhysLMError(f"position_ids row {row} is {position_ids[row].tolist()}, but the model numbers a row's "
                          f"real tokens from 0: {[int(v) if r else '-' for v, r in zip(want[row], real[row])]} "
                          "('-': padding)", fix="leave position_ids out (they follow from attention_mask), or "
                          "pass the real tokens' positions counted from 0")


def as_cache(value: Any) -> PhysLMCache | None:
    """The ``PhysLMCache`` a caller passed: ours, or an empty transformers cache (replaced)."""
    if value is None or isinstance(value, PhysLMCache):
        return value
    if isinstance(value, Cache) and value.get_seq_length() == 0:
        return PhysLMCache()
    raise PhysLMError(f"past_key_values is a {type(value).__name__} holding {_length(value)} positions; a "
                      "PhysLMForCausalLM continues only from the PhysLMCache it returned",
                      fix="pass the cache from the previous call's output (out.past_key_values), or none")


def _length(value: Any) -> str:
    try:
        return str(value.get_seq_length())
    except Exception:  # a legacy tuple of tuples or anything else
        return "some"
