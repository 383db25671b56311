"""``diff`` and ``ablate``: compare two compiled models; train and tabulate a study."""

from __future__ import annotations

import argparse
import json
from typing import Any

__all__ = ["add_commands", "cmd_diff", "cmd_ablate"]


def cmd_diff(args: argparse.Namespace) -> int:
    """Exit 0 when the two compiled models are identical, 1 when they differ."""
    from physlm_graph._diff import diff_blueprints, diff_tables

    d = diff_blueprints(args.a, args.b, overrides=list(args.set or []) or None)
    if args.json:
        print(json.dumps(d.to_json(), indent=2, default=str))
    else:
        from physlm_graph.cli import console as _console

        con = _console()
        if d.identical:
            con.print(f"identical: {d.a_name} and {d.b_name} compile to the same model "
                      f"({d.params[0]:,} params, graph {d.a_hash} / {d.b_hash})")
        else:
            for t in diff_tables(d):
                con.print(t)
    return 0 if d.identical else 1


def cmd_ablate(args: argparse.Namespace) -> int:
    from physlm_graph.cli import console as _console
    from physlm_graph.runtime.study import run_study

    res = run_study(args.study, out=args.out, device=args.device, progress=not args.json and not args.no_progress,
                    console=_console(stderr=True))
    if args.json:
        print(json.dumps(res, indent=2, default=str))
        return 0
    from rich.table import Table

    t = Table(title=f"study {res['study']} ({res['ran']} run, {res['skipped']} reused)", title_justify="left")
    for c in ("variant", "params", "val loss", "ppl", "tok/s", "peak MB", "diff vs base"):
        t.add_column(c, justify="left" if c in ("variant", "diff vs base") else "right")
    for r in res["variants"]:
        t.add_row(r["variant"], f"{r['params']:,}", f"{r['val_loss_mean']:.4f} ± {r['val_loss_std']:.4f}",
                  f"{r['perplexity']:.2f}", f"{r['tokens_per_s']:,.0f}", f"{r['peak_memory_mb']:,.0f}", r["diff"])
    con = _console()
    con.print(t)
    con.print(f"wrote {res['files']['md']}, {res['files']['csv']}, {res['files']['png']}")
    return 0


def add_commands(sub: Any) -> None:
    from physlm_graph._cliargs import device

    d = sub.add_parser("diff", help="what changed between two compiled models (exit 1 when they differ)")
    d.add_argument("a", metavar="A.yaml")
    d.add_argument("b", metavar="B.yaml")
    d.add_argument("--set", action="append", metavar="PATH=VALUE", help="override a value in both (repeatable)")
    d.add_argument("--json", action="store_true")
    d.set_defaults(fn=cmd_diff)

    a = sub.add_parser("ablate", help="train every variant x seed of a study; write results.md/csv/png")
    a.add_argument("study", metavar="STUDY.yaml")
    a.add_argument("--out", default=None, help="output folder (default runs/ablate/STUDY)")
    a.add_argument("--device", type=device, default="auto", help="auto (CUDA when present; one process per GPU), cpu, cuda, cuda:N")
    a.add_argument("--no-progress", action="store_true", help="no progress bars")
    a.add_argument("--json", action="store_true")
    a.set_defaults(fn=cmd_ablate)
