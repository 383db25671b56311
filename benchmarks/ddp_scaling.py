"""Data-parallel scaling: tokens/s of `physlm-graph train` on 1 GPU and on N GPUs (DDP through
torchrun), the same blueprint and per-GPU batch, in one run. Goal on 2 H200s: >= 1.85x.

    python benchmarks/ddp_scaling.py --data TEXT --tokenizer TOKENIZER [--gpus 2] [--steps 60]

tokens/s is read from each run's metrics.jsonl (global tokens over all ranks), the median of
the logged records after the first --skip steps (compilation and warm-up).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(n: int, args: argparse.Namespace, out: Path) -> float:
    cmd = [sys.executable, "-m", "physlm_graph", "train", str(ROOT / args.blueprint), "--data", args.data,
           "--tokenizer", args.tokenizer, "--steps", str(args.steps), "--batch-size", str(args.batch),
           "--out", str(out), "--no-progress", "--set", "train.eval_every=100000", "--set", "train.log_every=5",
           "--set", "train.eval_iters=1", "--set", f"train.seq_len={args.seq}"]
    if args.compile:
        cmd.append("--compile")
    if n > 1:
        cmd += ["--gpus", str(n)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stdout[-2000:], proc.stderr[-4000:])
        raise SystemExit(f"{n}-GPU run failed")
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    tps = [r["tokens_per_s"] for r in recs if r["step"] > args.skip and "tokens_per_s" in r]
    return statistics.median(tps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--tokenizer", default="bytes")
    ap.add_argument("--blueprint", default="blueprints/gpt2-124m.yaml")
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--skip", type=int, default=20)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args()
    import torch

    tmp = Path(tempfile.mkdtemp(prefix="ddp-"))
    one = run(1, args, tmp / "gpu1")
    many = run(args.gpus, args, tmp / f"gpu{args.gpus}")
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"{args.blueprint}, per-GPU batch {args.batch} x {args.seq}, {args.steps} steps "
          f"(median after step {args.skip}), compile={args.compile}, {name}, torch {torch.__version__}")
    print()
    print("| GPUs | tokens/s | speedup |")
    print("|---:|---:|---:|")
    print(f"| 1 | {one:,.0f} | 1.00x |")
    print(f"| {args.gpus} | {many:,.0f} | {many / one:.2f}x |")
    print()
    print(f"goal: >= 1.85x on 2 GPUs: {'ok' if many / one >= 1.85 else 'FAIL'}")


if __name__ == "__main__":
    main()
