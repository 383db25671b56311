"""Data-parallel scaling: tokens/s of `physlm-graph train` on 1 GPU and on N GPUs (DDP through
torchrun), the same blueprint and per-GPU batch, in one run. Goal on 2 H200s: >= 1.85x.

    python benchmarks/ddp_scaling.py --data TEXT --tokenizer TOKENIZER [--gpus 2] [--steps 60] [--batch N]
        [--configs default accum2:accumulate=2 bf16:ddp_reduce_dtype=bfloat16 fsdp:strategy=fsdp ...]

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


# settings that change only how the N-GPU run communicates; the 1-GPU baseline ignores them
COMM_ONLY = ("strategy", "ddp_bucket_mb", "ddp_bucket_view", "ddp_reduce_dtype")


def parse_config(text: str) -> tuple[str, dict[str, str]]:
    """``label`` or ``label:key=value,key=value`` (train keys, strategy=fsdp, or env.NAME=VALUE);
    a malformed one stops the script with the config named."""
    label, _, rest = text.partition(":")
    sets = {}
    for kv in filter(None, rest.split(",")):
        key, eq, value = kv.partition("=")
        if not eq or not key or key == "env.":
            sys.exit(f"ddp_scaling.py: --configs {text!r}: {kv!r} is not key=value (or env.NAME=VALUE)")
        sets[key] = value
    return label, sets


def blueprint_batch(path: Path) -> str:
    """The blueprint's own train.batch_size, for the header ("blueprint's" if it has none)."""
    import yaml

    train = (yaml.safe_load(path.read_text()) or {}).get("train") or {}
    return f"{train['batch_size']} (the blueprint's)" if "batch_size" in train else "the blueprint's"


def run(n: int, args: argparse.Namespace, sets: dict[str, str], out: Path) -> float | str:
    cmd = [sys.executable, "-m", "physlm_graph", "train", str(ROOT / args.blueprint), "--data", args.data,
           "--tokenizer", args.tokenizer, "--steps", str(args.steps),
           *(["--batch-size", str(args.batch)] if args.batch else []), "--out", str(out), "--no-progress", "--set", "train.eval_every=100000", "--set", "train.log_every=5",
           "--set", "train.eval_iters=1", "--set", f"train.seq_len={args.seq}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for k, v in sets.items():
        if k.startswith("env."):
            env[k[4:]] = v
        else:
            cmd += ["--strategy", v] if k == "strategy" else ["--set", f"train.{k}={v}"]
    if args.compile:
        cmd.append("--compile")
    if n > 1:
        cmd += ["--gpus", str(n)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stdout[-2000:], proc.stderr[-4000:], flush=True)
        return f"{n}-GPU run failed (exit {proc.returncode})"
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
    ap.add_argument("--batch", type=int, default=None,
                    help="per-GPU batch (default: the blueprint's train.batch_size, 32 for gpt2-124m.yaml)")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--repeats", type=int, default=1, help="run everything this many times; report medians")
    ap.add_argument("--configs", nargs="+", default=["default"],
                    help="runs to compare, each LABEL or LABEL:key=value,... with train keys (accumulate=2, "
                         "ddp_bucket_mb=100, ddp_bucket_view=false), strategy=fsdp, or env.NAME=VALUE (an "
                         "environment variable of the N-GPU run, e.g. env.NCCL_ALGO=Ring); the 1-GPU "
                         "baseline is run once per distinct set of non-communication keys")
    args = ap.parse_args()
    import torch

    tmp = Path(tempfile.mkdtemp(prefix="ddp-"))
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    batch = args.batch or blueprint_batch(ROOT / args.blueprint)
    print(f"{args.blueprint}, per-GPU batch {batch} x {args.seq}, {args.steps} steps "
          f"(median after step {args.skip}), compile={args.compile}, {args.repeats} repeat(s), {name}, "
          f"torch {torch.__version__}", flush=True)
    configs = []  # (label, settings text, sets, key of the 1-GPU baseline it needs)
    for text in args.configs:
        label, sets = parse_config(text)
        configs.append((label, text.partition(":")[2] or "-", sets,
                        tuple(sorted((k, v) for k, v in sets.items() if k not in COMM_ONLY and not k.startswith("env.")))))
    ones: dict[tuple, list[float | str]] = {}
    manys: dict[int, list[float | str]] = {}
    for r in range(args.repeats):  # repeats alternate 1-GPU and N-GPU runs, so drift hits both
        done: set[tuple] = set()
        for i, (label, _, sets, key) in enumerate(configs):
            if key not in done:
                done.add(key)
                ones.setdefault(key, []).append(run(1, args, dict(key), tmp / f"gpu1-{len(done)}-r{r}"))
            manys.setdefault(i, []).append(run(args.gpus, args, sets, tmp / f"gpu{args.gpus}-{i}-r{r}"))
            print(f"  repeat {r + 1}, {label}: 1 GPU {ones[key][-1]}, {args.gpus} GPUs {manys[i][-1]}", flush=True)

    def med(xs: list[float | str]) -> float | str:
        fails = [x for x in xs if isinstance(x, str)]
        return fails[0] if fails else statistics.median(xs)  # type: ignore[arg-type]

    rows = [(label, settings, med(ones[key]), med(manys[i])) for i, (label, settings, _, key) in enumerate(configs)]
    print()
    print(f"| run | settings | 1 GPU tokens/s | {args.gpus} GPUs tokens/s | speedup |")
    print("|---|---|---:|---:|---:|")
    for label, settings, one, many in rows:
        if isinstance(one, str) or isinstance(many, str):
            print(f"| {label} | {settings} | {one if isinstance(one, str) else f'{one:,.0f}'} | "
                  f"{many if isinstance(many, str) else f'{many:,.0f}'} | - |")
        else:
            ok = "ok" if args.gpus != 2 or many / one >= 1.85 else "below 1.85x"
            print(f"| {label} | {settings} | {one:,.0f} | {many:,.0f} | {many / one:.3f}x ({ok}) |")
    print()
    print("goal: >= 1.85x on 2 GPUs")


if __name__ == "__main__":
    main()
