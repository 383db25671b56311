"""Does growing pay? A 2 -> 4 -> 6 layer baby GPT against a fixed 6-layer one, same tokens.

Both runs train nanoGPT's shakespeare_char model (``blueprints/baby-gpt.yaml``) with the same
seed, data, batch and step count; the grown run follows a growth schedule (2 layers for the
first quarter of the steps, 4 for the second, 6 for the second half) through
``Trainer`` (its growth part). For each run the table shows the final validation loss, the training
FLOPs spent (3 x the report's forward FLOPs per token x tokens, summed stage by stage), and
for each run the FLOPs it had spent at the first evaluation where its validation loss
reached the fixed run's final loss, also as a fraction of all the fixed run's FLOPs
(goal: <= 75%; "not reached" when it never gets there within the budget).

    python benchmarks/growth.py                       # the baby GPT of nanoGPT (use a GPU)
    python benchmarks/growth.py --small               # a CPU smoke run: 64 wide, 300 steps
    python benchmarks/growth.py --grow zero_init stack mask
    python benchmarks/growth.py --small --steps 16000 --grow stack --bounds 0.1,0.2 --seed 1   # issue #7's setting
    python benchmarks/growth.py ... --runs fixed > f.txt; python benchmarks/growth.py ... --runs grown > g.txt
    cat f.txt g.txt > seed1.txt; python benchmarks/growth.py ... --from-log seed1.txt seed2.txt ...

``benchmarks/growth_seeds.sh`` runs several seeds that way, side by side on one GPU. Runs on CUDA when available (bf16 autocast there, as ``physlm-graph train`` does), else CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled
from physlm_graph import compile_blueprint  # noqa: E402
from physlm_graph.runtime.growth import stage_at  # noqa: E402
from physlm_graph.runtime.train import Trainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BLUEPRINT = ROOT / "blueprints" / "baby-gpt.yaml"
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare" / "input.txt"

# nanoGPT shakespeare_char (6L/6H/384d, ctx 256, batch 64, 5000 iters) and a CPU-sized variant
FULL = dict(params={"dim": 384, "heads": 6, "context": 256, "dropout": 0.2},
            train=dict(steps=5000, batch_size=64, seq_len=256, eval_every=250, eval_iters=200, warmup=100))
SMALL = dict(params={"dim": 64, "heads": 4, "context": 64, "dropout": 0.0},
             train=dict(steps=300, batch_size=8, seq_len=64, eval_every=25, eval_iters=8, warmup=20))


def schedule(steps: int, op: str, depths: tuple[int, ...] = (2, 4, 6),
             fractions: tuple[float, float] = (0.25, 0.5)) -> list[dict[str, Any]]:
    """2 layers up to fractions[0] of the steps (a quarter by default), 4 up to fractions[1] (half), then 6."""
    bounds = [max(1, round(steps * fractions[0])), max(2, round(steps * fractions[1]))]
    stages: list[dict[str, Any]] = [{"until": bounds[0], "params": {"layers": depths[0]}}]
    stages.append({"until": bounds[1], "params": {"layers": depths[1]}, "grow": op})
    stages.append({"params": {"layers": depths[2]}, "grow": op})
    if op == "mask":
        for st in stages[1:]:
            st["ramp_steps"] = max(1, steps // 50)
    return stages


def overrides(size: dict[str, Any], growth: list[dict[str, Any]] | None) -> dict[str, Any]:
    out: dict[str, Any] = {f"params.{k}": v for k, v in size["params"].items()}
    out["params.layers"] = 6
    out["train.seq_len"] = size["train"]["seq_len"]  # shape inference samples this length
    out["params.vocab"] = 65  # tinyshakespeare's characters: the report's FLOPs match the trained model
    if growth is not None:
        out["growth"] = growth
    return out


def flops_per_step(ov: dict[str, Any], steps: int, tokens_per_step: int) -> list[float]:
    """Training FLOPs of each step (3 x forward FLOPs/token x tokens), following the stages."""
    if "growth" not in ov:
        fpt = compile_blueprint(BLUEPRINT, overrides=ov, build=False).flops_per_token
        return [3.0 * fpt * tokens_per_step] * steps
    cm = compile_blueprint(BLUEPRINT, overrides=ov, build=False, stage=0)
    per_stage = [compile_blueprint(BLUEPRINT, overrides=ov, build=False, stage=i).flops_per_token
                 for i in range(len(ov["growth"]))]
    return [3.0 * per_stage[stage_at(cm, s, s * tokens_per_step)] * tokens_per_step for s in range(steps)]


def run(name: str, cls: type, ov: dict[str, Any], size: dict[str, Any], data: Path, device: str, out: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    trainer = cls(BLUEPRINT, data=str(data), overrides=ov, out_dir=out / name, device=device, progress=False,
                  log_every=size["train"]["eval_every"], **size["train"])
    result = trainer.fit()
    metrics = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    curve = [(m["step"], m["val_loss"]) for m in metrics if "val_loss" in m]
    flops = flops_per_step(ov, size["train"]["steps"], trainer.tokens_per_step)
    return {"name": name, "params": result["params"], "tokens": result["tokens_seen"], "val_loss": result["val_loss"],
            "curve": curve, "flops": sum(flops), "cum_flops": [sum(flops[:s]) for s, _ in curve],
            "wall_s": time.perf_counter() - t0}


def reach(grown: dict[str, Any], target: float) -> float | None:
    """FLOPs the grown run had spent at its first evaluation with val loss <= target."""
    for (_, loss), spent in zip(grown["curve"], grown["cum_flops"]):
        if loss <= target:
            return spent
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="a CPU smoke run (64 wide, 300 steps)")
    ap.add_argument("--steps", type=int, default=None, help="training steps of each run")
    ap.add_argument("--grow", nargs="+", default=["zero_init"], choices=["zero_init", "stack", "interpolate", "mask"])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    ap.add_argument("--seed", type=int, default=None, help="train.seed of every run (default: the blueprint's)")
    ap.add_argument("--bounds", default="0.25,0.5", metavar="F1,F2",
                    help="fractions of the steps where the 2-layer and the 4-layer stages end (default 0.25,0.5)")
    ap.add_argument("--runs", nargs="+", default=["fixed", "grown"], choices=["fixed", "grown"],
                    help="which runs to train (default both); one alone prints its evaluations and no table, so "
                         "the two can run as separate processes and their outputs be joined for --from-log")
    ap.add_argument("--from-log", type=Path, nargs="+", default=None, metavar="LOG",
                    help="train nothing: read the evaluations of growth.py outputs (each the fixed run, then one "
                         "grown run, --grow/--bounds/--steps/--small as it ran), even one cut short after the fixed "
                         "run, and say when the grown run first reached the fixed run's final loss; with several "
                         "(one per seed), also the median and mean and the same measure on the seed-averaged curves")
    args = ap.parse_args(argv)
    try:
        fractions = tuple(float(f) for f in args.bounds.split(","))
    except ValueError:
        fractions = ()
    if len(fractions) != 2 or not 0 < fractions[0] < fractions[1] < 1:
        ap.error(f"--bounds takes two fractions 0 < F1 < F2 < 1, not {args.bounds!r}")
    size = {k: dict(v) for k, v in (SMALL if args.small else FULL).items()}
    if args.steps:
        size["train"]["steps"] = args.steps
    if args.seed is not None:
        size["train"]["seed"] = args.seed
    if not args.data.is_file():
        print(f"no data at {args.data}; pass --data PATH to tinyshakespeare's input.txt", file=sys.stderr)
        return 2
    if args.from_log is not None:
        return from_log(args.from_log, size, args.grow[0], fractions)
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device)
    try:
        kind = torch.device(device).type
    except RuntimeError:
        ap.error(f"--device: {device!r} is not a torch device (auto, cpu, cuda, cuda:N)")
    if kind == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {device}: this torch sees no CUDA GPU")
    if device == "cpu":
        torch.set_num_threads(min(4, torch.get_num_threads()))
    steps = size["train"]["steps"]
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        rows = [run("fixed-6", Trainer, overrides(size, None), size, args.data, device, out)] \
            if "fixed" in args.runs else []
        for op in args.grow if "grown" in args.runs else []:
            name = f"grown-2-4-6-{op}" + ("" if args.bounds == "0.25,0.5" else f"@{args.bounds}")
            rows.append(run(name, Trainer, overrides(size, schedule(steps, op, fractions=fractions)), size,
                            args.data, device, out))
    if "fixed" not in args.runs or len(rows) < 2:
        print("one kind of run only: no table (join the outputs, fixed first, and read them with --from-log)")
        return 0
    fixed = rows[0]
    best = min(v for _, v in fixed["curve"])
    for r in rows:
        r["flops_to_fixed_loss"] = reach(r, fixed["val_loss"])
        r["best_val_loss"] = min(v for _, v in r["curve"])
        r["flops_to_fixed_best"] = reach(r, best)
    print_table(rows, device=device, small=args.small, steps=steps)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


def read_log(path: Path) -> list[list[tuple[int, float]]]:
    """The evaluations ("step N: ... val loss X") of each run ("train ..." starts one) in a saved output."""
    import re

    runs: list[list[tuple[int, float]]] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("train "):
            runs.append([])
        m = re.match(r"step (\d+): train loss [\d.]+, val loss ([\d.]+)", line)
        if m and runs:
            runs[-1].append((int(m.group(1)), float(m.group(2))))
    return runs


def first_at(curve: list[tuple[int, float]], target: float) -> int | None:
    return next((step for step, loss in curve if loss <= target), None)


def from_log(paths: list[Path], size: dict[str, Any], op: str, fractions: tuple[float, float]) -> int:
    """Reach figures from saved outputs: the evaluations of the fixed run (complete) and of the grown
    run (to where it got), with the same FLOPs accounting; for several outputs (seeds), a summary."""
    import statistics

    steps = size["train"]["steps"]
    tokens = size["train"]["batch_size"] * size["train"]["seq_len"]
    fixed_flops = flops_per_step(overrides(size, None), steps, tokens)
    grown_flops = flops_per_step(overrides(size, schedule(steps, op, fractions=fractions)), steps, tokens)
    total = sum(fixed_flops)
    fracs: list[float | None] = []
    complete: list[list[list[tuple[int, float]]]] = []
    for path in paths:
        if not path.is_file():
            print(f"no log at {path}", file=sys.stderr)
            return 2
        runs = read_log(path)
        if len(runs) < 2 or not runs[0] or runs[0][-1][0] != steps:
            print(f"{path}: needs a complete fixed run of {steps} steps and a grown run after it", file=sys.stderr)
            return 2
        target, last = runs[0][-1][1], runs[1][-1][0]
        if last == steps:
            complete.append(runs[:2])
        print(f"{path.name}: fixed run final val loss {target:.4f}; grown run evaluated up to step {last} of {steps}")
        step = first_at(runs[1], target)
        if step is None:
            fracs.append(None)
            print(f"grown run not at or below it by step {last} ({sum(grown_flops[:last]) / total:.0%} "
                  "of the fixed run's FLOPs)")
            continue
        spent = sum(grown_flops[:step])
        fracs.append(spent / total)
        print(f"grown run first at or below it at step {step} (val loss {dict(runs[1])[step]:.4f}): {spent:.3g} "
              f"FLOPs = {spent / total:.0%} of the fixed run's {total:.3g}")
    if len(paths) > 1:
        known = [f for f in fracs if f is not None]
        print(f"{len(paths)} outputs: " + ", ".join("not reached" if f is None else f"{f:.0%}" for f in fracs)
              + (f"; median {statistics.median(known):.1%}, mean {statistics.mean(known):.1%} of the reached"
                 if known else "; none reached"))
        same = len({tuple(s for s, _ in r[0]) + tuple(s for s, _ in r[1]) for r in complete}) == 1
        if len(complete) > 1 and same:
            # the seed-averaged curves: one target and one crossing, less evaluation noise than each seed's
            mean_fixed = [(s, statistics.mean(r[0][i][1] for r in complete)) for i, (s, _) in enumerate(complete[0][0])]
            mean_grown = [(s, statistics.mean(r[1][i][1] for r in complete)) for i, (s, _) in enumerate(complete[0][1])]
            target = mean_fixed[-1][1]
            step = first_at(mean_grown, target)
            reached = "never" if step is None else (
                f"at step {step}: {sum(grown_flops[:step]) / total:.1%} of the fixed run's FLOPs")
            print(f"seed-averaged curves of the {len(complete)} complete outputs: fixed final val loss {target:.4f}, "
                  f"grown final {mean_grown[-1][1]:.4f}; the grown curve first at or below the fixed final {reached}")
    return 0


def print_table(rows: list[dict[str, Any]], *, device: str, small: bool, steps: int) -> None:
    from rich.console import Console
    from rich.table import Table

    fixed = rows[0]
    title = (f"growth vs fixed depth, tiny Shakespeare chars, {steps} steps, {rows[0]['tokens']:,} tokens each, "
             f"on {device}" + (" (CPU smoke run: --small)" if small else ""))
    t = Table(title=title, title_justify="left")
    for c in ("run", "final params", "final val loss", "train FLOPs", "FLOPs to fixed's final loss", "fraction", "wall s (with setup)"):
        t.add_column(c, justify="left" if c == "run" else "right")
    for r in rows:
        if r["flops_to_fixed_loss"] is None:
            to, frac = "not reached", f"> {r['flops'] / fixed['flops']:.0%}"
        else:
            to, frac = f"{r['flops_to_fixed_loss']:.3g}", f"{r['flops_to_fixed_loss'] / fixed['flops']:.0%}"
        t.add_row(r["name"], f"{r['params']:,}", f"{r['val_loss']:.4f}", f"{r['flops']:.3g}", to, frac, f"{r['wall_s']:.0f}")
    Console(width=140).print(t)
    print("goal: the grown run reaches the fixed run's final validation loss with <= 75% of its FLOPs")
    own = fixed["flops_to_fixed_loss"]
    if own is not None and own < fixed["flops"]:
        print(f"note: the fixed run itself first reached its final loss at {own / fixed['flops']:.0%} of its FLOPs "
              "(later evaluations did not improve on it); the fraction column is against all of its FLOPs")
    best = fixed["best_val_loss"]
    print(f"against the fixed run's best validation loss ({best:.4f}; a fairer target when the fixed run overfits "
          "and its final loss is far above its best):")
    for r in rows:
        got = r["flops_to_fixed_best"]
        if got is None:
            print(f"  {r['name']}: best {r['best_val_loss']:.4f}, never reached {best:.4f}")
        else:
            print(f"  {r['name']}: best {r['best_val_loss']:.4f}, reached {best:.4f} after {got:.3g} FLOPs "
                  f"= {got / fixed['flops_to_fixed_best']:.0%} of what the fixed run needed to get there")
    fixed_curve = ", ".join(f"{s}: {v:.4f}" for s, v in fixed["curve"][-6:])
    print(f"fixed run's last evaluations (step: val loss): {fixed_curve}")
    for r in rows[1:]:
        print(f"{r['name']} last evaluations: " + ", ".join(f"{s}: {v:.4f}" for s, v in r["curve"][-6:]))


if __name__ == "__main__":
    raise SystemExit(main())
