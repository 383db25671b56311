"""``physlm-graph plot RUN_DIR... -o curves.png``: training and validation loss curves of runs.

Reads each run's ``metrics.jsonl`` (one JSON object per logged step: ``step``, ``loss`` and,
at evaluations, ``val_loss``). A resumed run appends to the file, so a step seen twice keeps its
last record. Drawn with matplotlib (the Agg backend: no display needed).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from physlm_graph._errors import Loc, PhysLMError, RuntimeDataError

__all__ = ["read_metrics", "plot_runs", "add_commands"]


def read_metrics(run: str | Path) -> dict[str, list[tuple[int, float]]]:
    """``{"loss": [(step, value)], "val_loss": [...]}`` of one run folder (or a metrics.jsonl file)."""
    path = Path(run)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise RuntimeDataError("no metrics.jsonl here", loc=Loc(file=str(path)),
                               fix="pass a run folder written by `physlm-graph train --out`")
    by_step: dict[int, dict[str, Any]] = {}
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as err:
            if i == len(path.read_text(encoding="utf-8").splitlines()):
                continue  # a run killed mid-write leaves a cut last line: skip it
            raise RuntimeDataError(f"not JSON: {err}", loc=Loc(file=str(path), line=i),
                                   fix="the metrics file is damaged; remove the bad line") from None
        if isinstance(rec, dict) and isinstance(rec.get("step"), int):
            by_step[rec["step"]] = rec
    curves: dict[str, list[tuple[int, float]]] = {"loss": [], "val_loss": []}
    for step in sorted(by_step):
        for key in curves:
            v = by_step[step].get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                curves[key].append((step, float(v)))
    return curves


def plot_runs(runs: list[str | Path], out: str | Path, *, log_y: bool = False) -> dict[str, Any]:
    """Draw every run's train (line) and validation (dots) loss into one picture; returns a summary."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PhysLMError("`plot` needs matplotlib, which is not installed", fix="pip install matplotlib") from None
    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=110)
    summary = {}
    for i, run in enumerate(runs):
        curves = read_metrics(run)
        name = Path(run).name if Path(run).is_dir() else Path(run).parent.name
        colour = f"C{i % 10}"
        if curves["loss"]:
            ax.plot(*zip(*curves["loss"]), color=colour, lw=1.2, alpha=0.8, label=f"{name} train")
        if curves["val_loss"]:
            ax.plot(*zip(*curves["val_loss"]), "o-", color=colour, ms=4, lw=1.8, label=f"{name} val")
        summary[str(run)] = {"train_points": len(curves["loss"]), "val_points": len(curves["val_loss"]),
                             "last_train": curves["loss"][-1][1] if curves["loss"] else None,
                             "best_val": min(v for _, v in curves["val_loss"]) if curves["val_loss"] else None}
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(str(out))
    plt.close(fig)
    return summary


def cmd_plot(args: Any) -> int:
    import sys

    summary = plot_runs(args.runs, args.output, log_y=args.log)
    if args.json:
        print(json.dumps({"output": args.output, "runs": summary}, indent=2))
    else:
        print(f"wrote {args.output} ({len(summary)} runs)", file=sys.stderr)
    return 0


def add_commands(sub: Any) -> None:
    p = sub.add_parser("plot", help="draw training and validation loss curves of runs (metrics.jsonl)")
    p.add_argument("runs", nargs="+", help="run folders (or metrics.jsonl files)")
    from physlm_graph._cliargs import output_file

    p.add_argument("-o", "--output", required=True, type=output_file(".png", ".svg", ".pdf"),
                   help="curves.png (or .svg, .pdf)")
    p.add_argument("--log", action="store_true", help="logarithmic loss axis")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_plot)
