"""The LM head + cross-entropy alone, forward + backward, on one GPU: inductor's compiled
``F.cross_entropy(F.linear(h, W), y)`` against ``linear_cross_entropy`` (the fused, chunked
head + loss of ``components/head/_linear_ce.py``) at several chunk sizes, in the same run.

GPT-2's shape by default: 32 x 1024 tokens, width 768, vocab 50304, bf16 autocast. Times are
CUDA-event medians of interleaved repetitions; the table also gives each fused variant's loss and
gradient differences from the compiled reference (both bf16, so differences of bf16 rounding).

    python benchmarks/linear_ce.py [--tokens 32768] [--dim 768] [--vocab 50304] [--chunks 256,512,1024,4096]
        [--limit 50257]

``--limit L`` adds the head as the trainer runs GPT-2 (``train.vocab_multiple``: 50304 rows, the
first 50257 real ids, ``head.lm``'s ``logit_limit``): the fused head + loss with that limit beside
the one without, and in the loss-only table the kernel on rows of the padded width given the real
ids as its row length (before commit 6cadcfe) against the padded width with -inf past the ids.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
from torch.nn import functional as F

from _bench import kernel_times
from physlm_graph.components.head import _linear_ce
from physlm_graph.components.head._linear_ce import default_chunk, linear_cross_entropy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=50304)
    ap.add_argument("--chunks", default="256,512,1024,4096")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--limit", type=int, default=None, help="also time the fused head with only the first LIMIT ids real")
    ap.add_argument("--profile", action="store_true", help="also list the GPU kernels of one step of each variant")
    args = ap.parse_args()
    try:
        chunks = [int(c) for c in args.chunks.split(",")]
    except ValueError:
        ap.error(f"--chunks takes a comma list of row counts, not {args.chunks!r}")
    if any(c < 1 for c in chunks) or min(args.tokens, args.dim, args.vocab, args.reps) < 1:
        ap.error("--chunks, --tokens, --dim, --vocab and --reps must be positive")
    if args.limit is not None and not 1 <= args.limit <= args.vocab:
        ap.error(f"--limit takes 1..{args.vocab} (--vocab), not {args.limit}")
    if not torch.cuda.is_available():
        sys.exit("linear_ce.py: needs a CUDA GPU (none found); nothing to time")
    dev = "cuda"
    torch.manual_seed(0)
    h = torch.randn(args.tokens, args.dim, device=dev, requires_grad=True)
    w = (0.02 * torch.randn(args.vocab, args.dim, device=dev)).requires_grad_()
    y = torch.randint(0, args.limit or args.vocab, (args.tokens,), device=dev)

    @torch.compile
    def compiled(h, w, y):
        return F.cross_entropy(F.linear(h, w), y)

    def run(fn):
        h.grad = w.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fn(h, w, y)
        loss.backward()
        return loss.detach().float(), h.grad, w.grad

    variants = {"compiled F.cross_entropy(F.linear)": compiled}
    auto = default_chunk(args.tokens, args.vocab, 2)
    for c in chunks:
        variants[f"fused, chunk {c}" + (" (default)" if c == auto else "")] = (
            lambda c: lambda h, w, y: linear_cross_entropy(h, w, y, chunk=c))(c)
    refs = {None: run(compiled)}
    limited: set[str] = set()
    if args.limit is not None:
        pad = torch.arange(args.vocab, device=dev) >= args.limit

        @torch.compile
        def compiled_limited(h, w, y):  # the padded ids as -inf logits
            return F.cross_entropy(F.linear(h, w).float().masked_fill(pad, float("-inf")), y)

        refs[args.limit] = run(compiled_limited)
        name = f"fused, chunk {auto} (default), first {args.limit} ids real"
        variants[name] = lambda h, w, y: linear_cross_entropy(h, w, y, chunk=auto, limit=args.limit)
        limited.add(name)
    diffs = {}
    for name, fn in variants.items():
        for _ in range(3):
            out = run(fn)
        ref = refs[args.limit if name in limited else None]
        diffs[name] = (abs(float(out[0] - ref[0])),
                       float((out[1] - ref[1]).abs().max() / ref[1].abs().max()),
                       float((out[2] - ref[2]).abs().max() / ref[2].abs().max()))
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.reps):
        for name, fn in variants.items():
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            run(fn)
            b.record()
            torch.cuda.synchronize()
            times[name].append(a.elapsed_time(b))
    base = statistics.median(times["compiled F.cross_entropy(F.linear)"])
    flops = 6 * args.tokens * args.dim * args.vocab
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}; N {args.tokens}, D {args.dim}, "
          f"V {args.vocab}, bf16 autocast, forward + backward, median of {args.reps}")
    print()
    print("| variant | ms | vs compiled | matmul TFLOP/s | loss diff | dh max rel diff | dW max rel diff |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, ts in times.items():
        ms = statistics.median(ts)
        d = diffs[name]
        print(f"| {name} | {ms:.2f} | {ms / base:.2f}x | {flops / ms / 1e9:.0f} | {d[0]:.1e} | {d[1]:.1e} | {d[2]:.1e} |")
    if args.profile:
        for name, fn in variants.items():
            rows = kernel_times(lambda: run(fn))
            print(f"\n{name}: {sum(r[0] for r in rows):.2f} ms of kernels")
            for ms, calls, key in rows[:8]:
                print(f"  {ms:7.3f} ms  {calls:4d} x  {key[:90]}")
    loss_only(args)


def loss_only(args) -> None:
    """The loss alone on given bf16 logits: inductor's log-softmax forward + backward against the
    fused kernel's one launch over all rows (loss and gradient in place), and the bytes each moves."""
    torch.manual_seed(1)
    logits = (3 * torch.randn(args.tokens, args.vocab, device="cuda")).bfloat16().requires_grad_()
    y = torch.randint(0, args.limit or args.vocab, (args.tokens,), device="cuda")

    @torch.compile
    def ce(lg, y):
        return F.cross_entropy(lg.float(), y)

    buf = logits.detach().clone()
    losses = torch.empty(args.tokens, device="cuda")
    scale = torch.full((1,), 1.0 / args.tokens, device="cuda")

    def compiled():
        logits.grad = None
        ce(logits, y).backward()

    def fused():
        buf.copy_(logits.detach())  # timed too: subtracted below with a copy-only run
        _linear_ce.ce_rows(buf, y, losses, scale, args.vocab)

    def copy_only():
        buf.copy_(logits.detach())

    fns = {"compiled log-softmax fwd + bwd": compiled, "fused kernel (+ a copy)": fused, "the copy alone": copy_only}
    if args.limit is not None:
        lim = args.limit

        def rows_of_ids():  # before commit 6cadcfe: the real ids as the row length
            buf.copy_(logits.detach())
            _linear_ce.ce_rows(buf, y, losses, scale, lim)

        def padded_rows():  # now: the padded width, -inf past the real ids
            buf.copy_(logits.detach())
            buf[:, lim:].fill_(float("-inf"))
            _linear_ce.ce_rows(buf, y, losses, scale, args.vocab, n_ids=lim)

        fns[f"kernel, row length {lim} (+ a copy)"] = rows_of_ids
        fns[f"kernel, row length {args.vocab}, -inf past {lim} (+ a copy and the fill)"] = padded_rows
    for fn in fns.values():
        for _ in range(3):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(args.reps):
        for name, fn in fns.items():
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times[name].append(a.elapsed_time(b))
    med = {k: statistics.median(v) for k, v in times.items()}
    gb = args.tokens * args.vocab * 2 / 1e9
    kernel = med["fused kernel (+ a copy)"] - med["the copy alone"]
    print()
    print(f"the loss alone on bf16 logits ({gb:.2f} GB): ms, median of {args.reps}")
    print()
    print("| what | ms | GB/s per pass over the logits |")
    print("|---|---:|---:|")
    for k, v in med.items():
        print(f"| {k} | {v:.2f} | |")
    print(f"| fused kernel alone (difference) | {kernel:.2f} | {gb / kernel * 1e3:.0f} |")
    for k in list(med)[3:]:
        alone = med[k] - med["the copy alone"]
        print(f"| {k.split(' (+')[0]} alone (difference) | {alone:.2f} | {gb / alone * 1e3:.0f} |")


if __name__ == "__main__":
    main()
