"""The speedrun baseline trained by the trainer against the program written by hand, on one device.

    python benchmarks/speedrun_speed.py                # one GPU: the program's sizes, bf16, compiled
    python benchmarks/speedrun_speed.py --smoke        # CPU: a tiny model, float32, to check the script
    python benchmarks/speedrun_speed.py --steps 30 --profile 2   # and where each side's GPU time goes

(a) Step time: ``blueprints/speedrun-track3.yaml`` through ``Trainer.fit`` (the code path of
``physlm-graph train``: its train section's Muon and AdamW groups, init rules, wsd schedule and
summed loss; micro-batches of 64 x 1024 tokens, 8 a step, bf16 autocast, torch.compile) against
``benchmarks/_handspeedrun.py`` (the program: its model compiled, its Muon's update compiled, the
loss summed over the micro-batches). Each side runs ``--steps`` steps; ms/step is the median over
the steps after ``--warmup`` (which hold the compilation), read for the trainer from its
``metrics.jsonl`` (logged every step) and for the hand loop from the host clock around each step
(the device synchronised). The ratio is trainer / hand (goal <= 1.02).

(b) Losses: both start from the same weights (the trainer's plan builds the model and its init
rules; the hand model takes a copy) and read the same batches (``Trainer.make_batches``: the
trainer's own batches from the start, the shard in order as the blueprint's ``data_order:
sequential`` says), so their per-step training losses compare; the table gives the largest
absolute difference over the run, and the step where it happens.

Data: random token ids (uniform over the vocabulary, ``--tokens`` of them, seed 0) written as a
token shard in a temporary folder, with a character tokenizer of as many symbols as the model has
ids (50,304; 512 for the smoke, whose model is that small), so the random ids reach every row of
the table on both sides (nothing is downloaded; no data set is needed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _handspeedrun import HandSpeedrun, hand_optimizers, hand_step, load_blueprint_state  # noqa: E402

from physlm_graph.runtime.plan import make_plan  # noqa: E402
from physlm_graph.runtime.shards import write_shard  # noqa: E402
from physlm_graph.runtime.tokenizers import CharTokenizer  # noqa: E402
from physlm_graph.runtime.train import Trainer  # noqa: E402

BLUEPRINT = ROOT / "blueprints" / "speedrun-track3.yaml"
SMOKE = {"params.vocab": 512, "params.layers": 2, "params.dim": 64, "params.head_dim": 32, "params.context": 32,
         "train.seq_len": 32}


def make_data(folder: Path, *, vocab: int, tokens: int) -> tuple[Path, Path]:
    """A shard of ``tokens`` random ids below ``vocab`` and a tokenizer of exactly ``vocab`` symbols."""
    ids = np.random.default_rng(0).integers(0, vocab, tokens, dtype=np.int64)
    shard = write_shard(folder / "random_train_000.bin", ids)
    tok = folder / "tokenizer"
    CharTokenizer.from_text("".join(chr(256 + i) for i in range(vocab))).save(tok)
    return shard, tok


def run_trainer(args: argparse.Namespace, out: Path, shard: Path, tok: Path, opts: dict) -> tuple[Trainer, list[dict]]:
    t = Trainer(BLUEPRINT, out_dir=out, data=str(shard), tokenizer=str(tok), steps=args.steps, progress=False,
                log_every=1, eval_every=args.steps, eval_iters=1, save_every=args.steps, **opts)
    t.fit()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return t, rows


def profile_steps(step_fn, n: int, device: torch.device) -> dict:
    """``n`` calls of ``step_fn`` under torch.profiler: wall and GPU time per step, the part of the
    GPU time launched inside optimizer steps (torch's ``Optimizer.step#...`` ranges), and the
    kernels by total time (on CPU: the outermost aten operations and their CPU time)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for _ in range(n):
            step_fn()
        if cuda:
            torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / n
    events = prof.events()
    if cuda:
        work = [(e.name, e.device_time) for e in events if e.device_type.name == "CUDA"]
        opt = sum(e.device_time_total for e in events if e.name.startswith("Optimizer.step#") and
                  not (e.cpu_parent and e.cpu_parent.name.startswith("Optimizer.step#")))
    else:
        work = [(e.name, e.cpu_time_total) for e in events if e.name.startswith("aten::") and e.cpu_parent is None]
        opt = sum(e.cpu_time_total for e in events if e.name.startswith("Optimizer.step#") and
                  not (e.cpu_parent and e.cpu_parent.name.startswith("Optimizer.step#")))
    by: dict[str, float] = {}
    for name, us in work:
        by[name] = by.get(name, 0.0) + us
    busy = sum(by.values()) / 1e3 / n if cuda else wall * 1e3  # on CPU the host does the work: its wall time
    return dict(wall_ms=wall * 1e3, busy_ms=busy, opt_ms=opt / 1e3 / n,
                launches=len(work) / n, top=sorted(by.items(), key=lambda kv: -kv[1])[:10])


def print_profiles(profiles: dict[str, dict], n: int) -> None:
    print(f"\nprofile, {n} steps of each side (per step):\n")
    print("| | wall ms | GPU busy ms | in optimizer steps ms | rest ms | operations |")
    print("|---|---:|---:|---:|---:|---:|")
    for side, p in profiles.items():
        print(f"| {side} | {p['wall_ms']:.1f} | {p['busy_ms']:.1f} | {p['opt_ms']:.1f} | "
              f"{p['busy_ms'] - p['opt_ms']:.1f} | {p['launches']:,.0f} |")
    for side, p in profiles.items():
        print(f"\n{side}: the operations that take most time (ms per step)")
        for name, us in p["top"]:
            print(f"  {us / 1e3 / n:9.2f}  {name[:100]}")


def run_hand(args: argparse.Namespace, t: Trainer, start: dict[str, torch.Tensor], dims: dict) -> tuple[list[float], list[float]]:
    dev, cfg = t.device, t.cfg
    hand = HandSpeedrun(**dims).to(dev)
    load_blueprint_state(hand, {k: v.to(dev) for k, v in start.items()})
    opts = hand_optimizers(hand, compiled=bool(cfg.compile))
    fwd = torch.compile(hand.loss, dynamic=False) if cfg.compile else hand.loss
    batches = t.make_batches()  # the trainer's batches from the start (train.data_order)
    tokens = cfg.batch_size * t.seq_len * cfg.accumulate
    bf16 = cfg.dtype == "bfloat16"

    def loss_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # the forward under autocast, as the trainer's
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            return fwd(x, y)

    losses, times = [], []
    for step in range(args.steps):
        t0 = time.perf_counter()
        total = hand_step(hand, opts, batches, step=step, steps=args.steps, accumulate=cfg.accumulate, loss_fn=loss_fn)
        losses.append(float(total) / tokens)  # the host waits for the step
        times.append(time.perf_counter() - t0)
    if args.profile:
        mid = args.steps // 2
        args.profiles["hand-written program"] = profile_steps(
            lambda: hand_step(hand, opts, batches, step=mid, steps=args.steps, accumulate=cfg.accumulate,
                              loss_fn=loss_fn), args.profile, dev)
    return losses, times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU, a tiny model, float32, no compile")
    ap.add_argument("--steps", type=int, default=None, help="steps of each side (default 100; smoke 8)")
    ap.add_argument("--warmup", type=int, default=None, help="steps left out of the timing (default 10; smoke 2)")
    ap.add_argument("--tokens", type=int, default=None, help="random ids in the shard (default 20M; smoke 50,000)")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="after the timing, profile N more steps of each side: GPU time in and out of the optimizers")
    args = ap.parse_args()
    args.profiles = {}
    smoke = args.smoke or not torch.cuda.is_available()
    if not args.smoke and smoke:
        print("no CUDA device: running --smoke")
    args.steps = args.steps or (8 if smoke else 100)
    args.warmup = args.warmup if args.warmup is not None else (2 if smoke else 10)
    args.tokens = args.tokens or (50_000 if smoke else 20_000_000)
    vocab = 512 if smoke else 50304
    if smoke:
        torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
        opts = dict(overrides=SMOKE, device="cpu", compile=False, dtype="float32", batch_size=2, accumulate=3)
        dims = dict(vocab=vocab, dim=64, layers=2, head_dim=32)
    else:
        opts = dict(device="cuda")  # the blueprint's train section: 64 x 1024, accumulate 8, bf16, compile
        dims = dict(vocab=vocab)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        shard, tok = make_data(folder, vocab=vocab, tokens=args.tokens)
        # the trainer's first weights: its plan builds the model (seeded, init rules) as the trainer will
        plan = make_plan(BLUEPRINT, overrides=opts.get("overrides"), steps=args.steps)
        cm, _ = plan.model(vocab=vocab)  # the blueprint's vocabulary (SMOKE: 512), the tokenizer's size
        start = {k: v.detach().clone() for k, v in cm.module.state_dict().items()}
        del cm, plan
        t0 = time.perf_counter()
        t, rows = run_trainer(args, folder / "run", shard, tok, opts)
        t_trainer = time.perf_counter() - t0
        timed = slice(args.warmup, args.steps - 1)  # the last logged step holds an evaluation and a save
        ours_ms = statistics.median(t.tokens_per_step / r["tokens_per_s"] for r in rows[timed]) * 1e3
        print(f"trainer: {ours_ms:.1f} ms/step, {t.tokens_per_step / ours_ms * 1e3:,.0f} tokens/s "
              f"({t_trainer:.0f} s with compilation); the hand-written program next", flush=True)
        if args.profile:  # more steps of the trained model, from the middle of the schedule
            args.profiles["blueprint, Trainer.fit"] = profile_steps(
                lambda: t.resolve(t.train_step(args.steps // 2)), args.profile, t.device)
        t.model.cpu()
        del t.optimizer, t.wrapped, t.forward, t.forward_loss
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        t0 = time.perf_counter()
        hand_losses, hand_times = run_hand(args, t, start, dims)
        t_hand = time.perf_counter() - t0

    tokens = t.tokens_per_step
    hand_ms = statistics.median(hand_times[timed]) * 1e3
    ours_losses = [r["loss"] for r in rows]
    diffs = [abs(a - b) for a, b in zip(ours_losses, hand_losses)]
    worst = max(range(len(diffs)), key=diffs.__getitem__)
    dev = torch.cuda.get_device_name() if t.device.type == "cuda" else "CPU"
    print(f"\nspeedrun-track3, {dev}, torch {torch.__version__}; {t.dtype_name}, compile {t.cfg.compile}; "
          f"{tokens:,} tokens/step ({t.cfg.batch_size} x {t.seq_len} x {t.cfg.accumulate}); random tokens; "
          f"{args.steps} steps each, timed after {args.warmup}; wall {t_trainer:.0f} s + {t_hand:.0f} s\n")
    print("| | ms/step | tokens/s | ratio (ms) | loss step 1 | loss last |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| blueprint, Trainer.fit | {ours_ms:.1f} | {tokens / ours_ms * 1e3:,.0f} | {ours_ms / hand_ms:.3f} | "
          f"{ours_losses[0]:.4f} | {ours_losses[-1]:.4f} |")
    print(f"| hand-written program | {hand_ms:.1f} | {tokens / hand_ms * 1e3:,.0f} | 1.000 | "
          f"{hand_losses[0]:.4f} | {hand_losses[-1]:.4f} |")
    print(f"\nlosses over {len(diffs)} steps: max |trainer - hand| = {diffs[worst]:.3g} at step {worst + 1}; "
          f"mean {statistics.mean(diffs):.3g}")
    if args.profiles:
        print_profiles(args.profiles, args.profile)


if __name__ == "__main__":
    main()
