"""The trainer of this checkout against the trainer of another revision, side by side in one run.

Both trees run the same ``physlm-graph train`` command (same blueprint, data, steps, compile
mode) in turn, A B A B ..., each in a fresh process importing its own tree; tokens/s is the
median over the log intervals after the first two (which hold the compilation). The table
gives each round and the ratio this/other, so a change in the trainer's structure that costs
speed shows up as a ratio below 1.

    git archive COMMIT | tar -x -C /tmp/old
    python benchmarks/trainer_revisions.py --other /tmp/old --data input.txt --tokenizer gpt2 [--rounds 2]
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


def run_once(tree: Path, args: argparse.Namespace, out: Path) -> tuple[float, float | None, float | None]:
    """(median tokens/s, final train loss, last validation loss) of one training run in ``tree``."""
    blueprint = tree / "blueprints" / args.blueprint
    cmd = [sys.executable, "-m", "physlm_graph", "train", str(blueprint), "--data", args.data, "--steps", str(args.steps),
           "--out", str(out), "--no-progress", "--compile", "--set", "train.log_every=10", "--set", "train.eval_iters=20"]
    if args.tokenizer:
        cmd += ["--tokenizer", args.tokenizer]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, env=env, cwd=tree, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n")
        sys.exit(f"trainer_revisions.py: the run in {tree} failed (exit {proc.returncode})")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    tps = [r["tokens_per_s"] for r in records if "tokens_per_s" in r][2:]
    if not tps:
        sys.exit("trainer_revisions.py: too few log intervals; raise --steps")
    vals = [r["val_loss"] for r in records if r.get("val_loss") is not None]
    losses = [r["loss"] for r in records if "loss" in r and "tokens_per_s" in r]
    return statistics.median(tps), (losses[-1] if losses else None), (vals[-1] if vals else None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--other", required=True, help="a checkout of the revision to compare against")
    ap.add_argument("--blueprint", default="gpt2-124m.yaml", help="a file under each tree's blueprints/")
    ap.add_argument("--data", required=True)
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    other = Path(args.other).resolve()
    if not (other / "physlm_graph" / "__init__.py").is_file():
        sys.exit(f"trainer_revisions.py: --other {other} is not a physlm-graph checkout")
    args.data = str(Path(args.data).resolve())
    if args.tokenizer and Path(args.tokenizer).is_dir():
        args.tokenizer = str(Path(args.tokenizer).resolve())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, tree in (("other", other), ("this", ROOT)):
                tps, loss, val = run_once(tree, args, Path(tmp) / f"{name}{r}")
                print(f"round {r} {name}: {tps:,.0f} tokens/s, final train loss {loss}, last val {val}", flush=True)
                rows.append((r, name, tps, loss, val))
    print()
    print(f"blueprint {args.blueprint}, {args.steps} steps, --compile; other = {other}")
    print()
    print("| round | this tokens/s | other tokens/s | this/other | this val loss | other val loss |")
    print("|---:|---:|---:|---:|---:|---:|")
    ratios = []
    for r in range(args.rounds):
        t = next(x for x in rows if x[0] == r and x[1] == "this")
        o = next(x for x in rows if x[0] == r and x[1] == "other")
        ratios.append(t[2] / o[2])
        fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        print(f"| {r} | {t[2]:,.0f} | {o[2]:,.0f} | {t[2] / o[2]:.3f} | {fmt(t[4])} | {fmt(o[4])} |")
    print(f"\nmedian ratio this/other: {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
