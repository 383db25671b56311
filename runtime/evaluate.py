"""Perplexity over a whole text with strided windows (each token scored exactly once).

    report = evaluate("runs/baby", "data/valid.txt", seq_len=256, stride=128)
    report["perplexity"], report["tokens_per_s"], report["peak_memory_bytes"]

Windows of ``seq_len`` tokens start every ``stride`` tokens; in each, only the targets no
earlier window scored count, so every target after the first window is predicted with at
least ``seq_len - stride`` tokens of context (Hugging Face's strided perplexity). ``stride``
defaults to ``seq_len`` (disjoint windows, the fastest and the most pessimistic).

Per-token losses go through ``score_batch``; early-exit evaluation will override that one
method (exits, thresholds) and report extra fields, leaving the loop as it is.

A model with NaN or inf weights is refused before any window is scored (naming the first such
weight), and a window whose loss comes out NaN or inf stops the evaluation: a perplexity of nan
is not a measurement.
"""

from __future__ import annotations

import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from physlm_graph._errors import PhysLMError, RuntimeDataError

from .checkpoint import Checkpoint, load_checkpoint, model_context
from .data import load_text, strided_windows, window_batch

__all__ = ["evaluate", "score_batch", "peak_memory_bytes", "NonFiniteScore"]

IGNORE = -100


class NonFiniteScore(PhysLMError):
    """The model's weights or its loss on the text are NaN or inf: there is no loss to report."""

    stage = "eval"

    def __init__(self, what: str) -> None:
        super().__init__(f"{what}, so the loss cannot be measured",
                         fix="use another checkpoint (a run folder's best/), or retrain it with a lower learning rate")


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA ``max_memory_allocated``, else the process's peak resident set size."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # bytes on macOS, KiB on Linux


def score_batch(module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
    """Summed cross-entropy (nats) over the scored targets of one batch, and their count."""
    logits = module(x)["logits"]  # (N, T, V)
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1), ignore_index=IGNORE,
                           reduction="sum")
    return float(loss), int((y != IGNORE).sum())


@torch.inference_mode()
def evaluate(
    ckpt: str | os.PathLike[str] | Checkpoint,
    data: str | os.PathLike[str],
    *,
    seq_len: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    exit_threshold: float | None = None,
    exit_rule: str | None = None,
) -> dict[str, Any]:
    """Loss, perplexity, bits per byte, tokens/s and peak memory of a checkpoint on a text.

    With ``exit_threshold`` each position is scored with the logits of the first early exit whose
    rule (``exit_rule``, default the blueprint's) fires, and the report adds the mean layers used
    (``runtime/early_exit.py``)."""
    dev = torch.device("cuda" if str(device) == "auto" and torch.cuda.is_available() else
                       ("cpu" if str(device) == "auto" else device))
    ck = ckpt if isinstance(ckpt, Checkpoint) else load_checkpoint(Path(ckpt), device=dev)
    module = ck.model.module.to(dev).eval()
    from .generate import nonfinite_parameter

    bad = nonfinite_parameter(module)
    if bad is not None:
        raise NonFiniteScore(f"the model's weights are not finite (NaN or inf): {bad}")
    if ck.tokenizer is None:
        raise RuntimeDataError("the checkpoint holds no tokenizer, so the text cannot be encoded",
                               fix="evaluate a checkpoint written by `physlm-graph train`")
    text = load_text(data)
    tokens = torch.tensor(ck.tokenizer.encode(text), dtype=torch.long).numpy()
    context = model_context(ck.model)
    T = seq_len or context or 1024
    if context is not None and T > context:
        raise RuntimeDataError(f"seq_len {T} is longer than the model's context {context}", fix=f"use --seq-len {context} or less")
    if T < 1 or batch_size < 1 or (stride is not None and not 1 <= stride <= T):
        bad = ("--seq-len", T, "a positive integer") if T < 1 else ("--batch-size", batch_size, "a positive integer") \
            if batch_size < 1 else ("--stride", stride, f"between 1 and the window length {T}")
        raise RuntimeDataError(f"{bad[0]} {bad[1]}: expected {bad[2]}",
                               fix=f"pass {bad[0]} {T if bad[0] == '--stride' else 8}, or leave it out for the default")
    windows = strided_windows(tokens, T, stride or T)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    scorer = score_batch
    if exit_threshold is not None:
        from .early_exit import ExitScorer

        scorer = ExitScorer(ck.model, threshold=exit_threshold, rule=exit_rule)
    elif exit_rule is not None:
        from physlm_graph._errors import PhysLMError

        raise PhysLMError("an exit rule was given without an exit threshold", fix="add --exit-threshold T")
    nll, count = 0.0, 0
    t0 = time.perf_counter()
    for i in range(0, len(windows), batch_size):
        x, y = window_batch(tokens, windows[i : i + batch_size], ignore_index=IGNORE, device=dev)  # (N, T) each
        s, n = scorer(module, x, y)
        if not math.isfinite(s):
            raise NonFiniteScore(f"the loss on the windows from token {windows[i].start:,} is {s} (the logits are "
                                 "not finite)")
        nll, count = nll + s, count + n
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - t0
    loss = nll / max(count, 1)
    n_bytes = len(text.encode("utf-8"))
    report = {
        "checkpoint": str(ck.path),
        "data": str(data),
        "loss": loss,
        "perplexity": math.exp(loss) if loss < 700 else float("inf"),
        "bits_per_byte": nll / math.log(2) / n_bytes,  # every target but the first token is scored
        "tokens_scored": count,
        "windows": len(windows),
        "seq_len": T,
        "stride": stride or T,
        "seconds": seconds,
        "tokens_per_s": sum(w.length for w in windows) / max(seconds, 1e-9),
        "peak_memory_bytes": peak_memory_bytes(dev),
        "device": str(dev),
    }
    if exit_threshold is not None:
        report.update(scorer.report())
    return report
