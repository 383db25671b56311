"""The trainer's own speed: ``physlm-graph train`` runs of one blueprint under several settings,
one after another in one script, each read back from its ``metrics.jsonl``.

A setting is a list of NAME=VALUE items: environment variables (``PHYSLM_FUSED_GELU=0``: the
MLP's GELU as its own kernels; ``PHYSLM_SYNC_STEPS=1``: the host checks every step's loss, as
before commit 519d9b4) or, when NAME has a dot, blueprint overrides given to ``--set``
(``train.vocab_multiple=1``: the tokenizer's vocabulary unpadded). Tokens/s is the median over the log intervals after the first two (which hold the
compilation); the table gives each setting's ratio to the first.

    python benchmarks/train_speed.py --data input.txt --tokenizer gpt2 [--blueprint blueprints/gpt2-124m.yaml]
        [--steps 80] [--settings "PHYSLM_FUSED_GELU=0 PHYSLM_SYNC_STEPS=1;PHYSLM_SYNC_STEPS=1;"] [-- extra train args]
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
DEFAULT_SETTINGS = "PHYSLM_FUSED_GELU=0 PHYSLM_SYNC_STEPS=1;PHYSLM_SYNC_STEPS=1;"


def parse_setting(text: str) -> tuple[dict[str, str], list[str]]:
    """(environment variables, --set arguments) of one setting."""
    env, sets = {}, []
    for item in text.split():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"train_speed.py: --settings: {item!r} is not NAME=VALUE")
        if "." in key:
            sets += ["--set", item]
        else:
            env[key] = value
    return env, sets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blueprint", default=str(ROOT / "blueprints" / "gpt2-124m.yaml"))
    ap.add_argument("--data", required=True)
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--settings", default=DEFAULT_SETTINGS,
                    help="';'-separated settings, each a space-separated list of NAME=VALUE environment variables or "
                         "dotted blueprint overrides ('' is the defaults)")
    args, extra = ap.parse_known_args()
    extra = [a for a in extra if a != "--"]
    settings = [parse_setting(s) for s in args.settings.split(";")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (env, sets) in enumerate(settings):
            out = Path(tmp) / f"run{i}"
            cmd = [sys.executable, "-m", "physlm_graph", "train", args.blueprint, "--data", args.data,
                   "--steps", str(args.steps), "--out", str(out), "--compile", "--no-progress",
                   "--set", "train.log_every=10", "--set", "train.eval_iters=20", *sets, *extra]
            if args.tokenizer:
                cmd += ["--tokenizer", args.tokenizer]
            label = " ".join([f"{k}={v}" for k, v in env.items()] + sets[1::2]) or "defaults"
            print(f"== {label}: {' '.join(cmd[1:])}", flush=True)
            proc = subprocess.run(cmd, env={**os.environ, **env}, cwd=ROOT, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n")
                sys.exit(f"train_speed.py: the run '{label}' failed (exit {proc.returncode})")
            records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            tps = [r["tokens_per_s"] for r in records if "tokens_per_s" in r][2:]
            if not tps:
                sys.exit(f"train_speed.py: the run '{label}' logged too few intervals; raise --steps")
            vals = [r["val_loss"] for r in records if r.get("val_loss") is not None]
            print("   step: train loss (log interval) / validation loss: " + ", ".join(
                f"{r['step']}: {r['loss']:.4f} / {r['val_loss']:.4f}" for r in records if r.get("val_loss") is not None),
                flush=True)
            rows.append((label, statistics.median(tps), records[-1].get("loss"), vals[-1] if vals else None))
    print()
    print(f"blueprint {Path(args.blueprint).name}, {args.steps} steps, --compile {' '.join(extra)}")
    print()
    print("| setting | tokens/s (median of log intervals) | vs first | final train loss | last validation loss |")
    print("|---|---:|---:|---:|---:|")
    for label, tps, loss, val in rows:
        val_text = "-" if val is None else f"{val:.4f}"
        print(f"| {label} | {tps:,.0f} | {tps / rows[0][1]:.3f}x | {loss:.4f} | {val_text} |")


if __name__ == "__main__":
    main()
