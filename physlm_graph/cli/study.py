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
    from physlm_graph.runtime.study import Execution, run_study

    exe = Execution(backend=args.backend, device=args.device, workers=args.workers, address=args.address,
                    cpus_per_run=args.cpus_per_run, gpus_per_run=args.gpus_per_run, max_retries=args.max_retries)
    res = run_study(args.study, out=args.out, progress=not args.json and not args.no_progress,
                    console=_console(stderr=True), execution=exe, metric=args.metric,
                    allow_missing=args.allow_missing, trackers=tuple(args.tracker or ()))
    if args.json:
        print(json.dumps(res, indent=2, default=str))
        return 0
    from rich.table import Table

    from physlm_graph.runtime.study_report import METRICS
    from physlm_graph.runtime.stats import Summary

    t = Table(title=f"study {res['study']} ({res['ran']} run, {res['skipped']} reused); {METRICS[res['metric']]}",
              title_justify="left")
    for c in ("variant", "seeds", "params", "mean ± std", "95% CI", f"diff vs {res['baseline']}", "p", "seeds needed",
              "diff vs base"):
        t.add_column(c, justify="left" if c in ("variant", "diff vs base") else "right")
    for r in res["variants"]:
        s = Summary(r["n"], r["mean"], r["std"], r["ci95_low"], r["ci95_high"])
        spread = "undefined (1 seed)" if r["n"] == 1 else f"± {r['std']:.4g}" if r["std"] is not None else "no runs"
        ci = f"{s.ci_low:.4g} to {s.ci_high:.4g}" if s.ci_low is not None else "undefined"
        p = "" if r["baseline"] else "undefined" if r["p_value"] is None else f"{r['p_value']:.2g}"
        need = "" if r["baseline"] else "undefined" if r["seeds_needed"] is None else str(r["seeds_needed"])
        diff = "baseline" if r["baseline"] else "undefined" if r["diff_vs_baseline"] is None else f"{r['diff_vs_baseline']:+.4g}"
        t.add_row(r["variant"], str(r["seeds"]), f"{r['params']:,}", f"{r['mean']:.4g} {spread}", ci, diff, p, need,
                  r["diff"])
    con = _console()
    con.print(t)
    if res["missing"]:
        con.print(f"[yellow]incomplete: {len(res['missing'])} run(s) missing: {'; '.join(res['missing'])}[/]")
    con.print(f"wrote {res['files']['md']}, {res['files']['csv']}, {res['files']['png']}")
    return 0


def add_commands(sub: Any) -> None:
    from physlm_graph._cliargs import device, nonnegative_float, nonnegative_int, positive_float, positive_int

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
    a.add_argument("--backend", choices=("local", "ray"), default="local",
                   help="local: this machine (in process, or --workers processes); ray: one Ray task per run")
    a.add_argument("--address", default=None, help="ray: the cluster's address (default: start a local Ray instance)")
    a.add_argument("--workers", type=positive_int, default=None,
                   help="local: worker processes (default: one per visible GPU, else runs in this process)")
    a.add_argument("--cpus-per-run", type=positive_float, default=1.0, help="ray: CPUs each run declares (default 1)")
    a.add_argument("--gpus-per-run", type=nonnegative_float, default=None,
                   help="ray: GPUs each run declares (default 1 with --device cuda, else 0); above 1, DDP in the task")
    a.add_argument("--max-retries", type=nonnegative_int, default=3, help="ray: retries of a run whose worker died (default 3)")
    a.add_argument("--metric", choices=("final", "best", "loss_at_flops", "flops_to_baseline"), default="final",
                   help="what the table compares (default: final validation loss)")
    a.add_argument("--allow-missing", action="store_true",
                   help="tabulate the runs that finished even when some are missing or failed")
    a.add_argument("--tracker", action="append", choices=("tensorboard", "wandb", "mlflow"),
                   help="send each finished run to an experiment tracker (repeatable; none by default)")
    a.add_argument("--no-progress", action="store_true", help="no progress bars")
    a.add_argument("--json", action="store_true")
    a.set_defaults(fn=cmd_ablate)
