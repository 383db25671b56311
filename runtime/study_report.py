"""A study's table: one metric per run, its statistics per variant, and the written reports.

The metric (``METRICS``) is read from each run's ``done.json``:

- ``final``: the run's last validation loss;
- ``best``: its lowest validation loss;
- ``loss_at_flops``: its validation loss at the study's common FLOPs, the smallest training
  FLOPs any run reached (``flops_per_token x tokens``), linearly interpolated between the
  evaluations around it; every run is compared at the same compute;
- ``flops_to_baseline``: the training FLOPs at which its validation curve first reaches the
  baseline variant's mean final loss (interpolated); undefined for a run that never gets there.

For each variant: mean, sample std and the t-based 95% interval over its seeds; against the
baseline variant the difference of means, Welch's two-sided p-value and the seeds per variant
that a test at 0.05 would need to resolve the observed difference with power 0.8
(``runtime/stats.py``). With one seed the std, interval and p-value are undefined and say so.
FLOPs are the final model's ``flops_per_token`` (a growing model's earlier stages cost less).
"""

from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path
from typing import Any

from .stats import Summary, seeds_needed, summarize, welch

__all__ = ["METRICS", "run_metric", "aggregate", "write_reports", "plot_curves", "CSV_FIELDS", "RUN_FIELDS"]

METRICS = {
    "final": "final validation loss",
    "best": "best validation loss",
    "loss_at_flops": "validation loss at equal training FLOPs",
    "flops_to_baseline": "training FLOPs to reach the baseline's final loss",
}


def _flops_curve(r: dict[str, Any]) -> list[tuple[float, float]]:
    """(training FLOPs, validation loss) at each evaluation of a run."""
    return [(tok * r["flops_per_token"], loss) for _step, tok, loss in r.get("curve") or []]


def _loss_at(curve: list[tuple[float, float]], flops: float) -> float:
    for (f0, l0), (f1, l1) in zip(curve, curve[1:]):
        if f0 <= flops <= f1:
            return l0 if f1 == f0 else l0 + (l1 - l0) * (flops - f0) / (f1 - f0)
    return curve[-1][1] if curve and curve[-1][0] == flops else math.nan


def _flops_to(curve: list[tuple[float, float]], target: float) -> float:
    prev = None
    for f, loss in curve:
        if loss <= target:
            if prev is None or prev[1] == loss:
                return f
            return prev[0] + (f - prev[0]) * (prev[1] - target) / (prev[1] - loss)
        prev = (f, loss)
    return math.nan


def run_metric(metric: str, r: dict[str, Any], *, common_flops: float, target: float) -> float:
    """One run's value of ``metric`` (nan when undefined for it)."""
    if metric == "final":
        return math.nan if r["val_loss"] is None else float(r["val_loss"])
    if metric == "best":
        return math.nan if r["best_val_loss"] is None else float(r["best_val_loss"])
    if metric == "loss_at_flops":
        return _loss_at(_flops_curve(r), common_flops)
    if metric == "flops_to_baseline":
        return _flops_to(_flops_curve(r), target)
    raise ValueError(f"unknown metric {metric!r}")


def _stages(history: list[dict[str, Any]]) -> str:
    """A run's growth in a few words: ``0 -> 1 @20 -> 2 @40`` (stage and the step it began)."""
    return " -> ".join(["0"] + [f"{h['stage']} @{h['step']}" for h in history]) if history else ""


def _finite(xs: list[float]) -> list[float]:
    return [x for x in xs if not math.isnan(x)]


def aggregate(runs: Any, results: list[dict[str, Any]], *, metric: str = "final",
              baseline: str | None = None) -> list[dict[str, Any]]:
    """One row per variant: the study's usual columns and the statistics of ``metric``."""
    baseline = baseline or runs.study.variants[0].name
    base_runs = [r for r in results if r["variant"] == baseline]
    target = statistics.fmean(_finite([r["val_loss"] if r["val_loss"] is not None else math.nan for r in base_runs]
                                      ) or [math.nan])
    reached = [r["tokens"] * r["flops_per_token"] for r in results]
    common = min(reached) if reached else math.nan
    values = {v.name: [run_metric(metric, r, common_flops=common, target=target)
                       for r in results if r["variant"] == v.name] for v in runs.study.variants}
    base_vals = _finite(values[baseline])
    base_sum = summarize(base_vals)
    rows = []
    for v in runs.study.variants:
        rs = [r for r in results if r["variant"] == v.name]
        vals = _finite(values[v.name])
        s = summarize(vals)
        losses = summarize(_finite([r["val_loss"] if r["val_loss"] is not None else math.nan for r in rs]))
        row: dict[str, Any] = {
            "variant": v.name, "seeds": len(rs), "expected_seeds": len(runs.study.seeds),
            "params": rs[0]["params"] if rs else runs.variants[v.name].model.num_params,
            "flops_per_token": rs[0]["flops_per_token"] if rs else runs.variants[v.name].model.flops_per_token,
            "steps": rs[0]["steps"] if rs else runs.steps[v.name], "tokens": rs[0]["tokens"] if rs else 0,
            "val_loss_mean": losses.mean, "val_loss_std": losses.std,
            "perplexity": (math.nan if math.isnan(losses.mean) else math.exp(losses.mean) if losses.mean < 700
                           else float("inf")),
            "tokens_per_s": statistics.fmean(r["tokens_per_s"] for r in rs) if rs else math.nan,
            "peak_memory_mb": max(r["peak_memory_bytes"] for r in rs) / 2**20 if rs else math.nan,
            "peak_memory_kind": rs[0]["peak_memory_kind"] if rs else "",
            "diff": runs.variants[v.name].diff, "growth": _stages(rs[0].get("growth_history") or []) if rs else "",
            "metric": metric, "n": s.n, "mean": s.mean, "std": s.std, "ci95_low": s.ci_low, "ci95_high": s.ci_high,
            "summary": s, "baseline": v.name == baseline,
        }
        if v.name == baseline:
            row.update(diff_vs_baseline=None, p_value=None, seeds_needed=None)
        else:
            w = welch(base_vals, vals)
            need = (seeds_needed(w.diff, base_sum.std, s.std)
                    if base_sum.std is not None and s.std is not None and not math.isnan(w.diff) else None)
            row.update(diff_vs_baseline=w.diff if s.n and base_sum.n else None, p_value=w.p_value, seeds_needed=need)
        rows.append(row)
    return rows


CSV_FIELDS = ("variant", "seeds", "params", "flops_per_token", "steps", "tokens", "metric", "n", "mean", "std",
              "ci95_low", "ci95_high", "diff_vs_baseline", "p_value", "seeds_needed", "val_loss_mean", "val_loss_std",
              "perplexity", "tokens_per_s", "peak_memory_mb", "growth", "diff")
RUN_FIELDS = ("variant", "seed", "key", "params", "steps", "tokens", "val_loss", "best_val_loss", "wall_s",
              "tokens_per_s", "peak_memory_bytes", "device", "resumed", "growth", "blueprint_hash", "git_commit",
              "package_version", "torch_version")


def _csv_value(v: Any) -> Any:
    """Undefined numbers are empty cells (not 0, not nan)."""
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else v


def _num(v: float | None, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "undefined"
    return f"{v:.{digits}g}" if abs(v) >= 1e5 else f"{v:.{digits}f}"


def _cell(s: Summary) -> str:
    if s.n == 0:
        return "no runs"
    if s.std is None:
        return f"{_num(s.mean)} (1 seed: std, CI undefined)"
    return f"{_num(s.mean)} ± {_num(s.std)} [{_num(s.ci_low)}, {_num(s.ci_high)}]"


def _p(p: float | None) -> str:
    return "undefined" if p is None else f"{p:.2g}" if p >= 1e-4 else "<1e-4"


def write_reports(runs: Any, table: list[dict[str, Any]], results: list[dict[str, Any]], *,
                  missing: list[str] = ()) -> None:
    """results.csv, runs.csv, results.md and curves.png in the study's folder."""
    out = runs.out
    with open(out / "results.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows({k: _csv_value(v) for k, v in r.items()} for r in table)
    with open(out / "runs.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=RUN_FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows({**(r.get("provenance") or {}), **r, "growth": _stages(r.get("growth_history") or [])}
                    for r in results)
    (out / "results.md").write_text("\n".join(_markdown(runs, table, results, missing)), encoding="utf-8")


def _markdown(runs: Any, table: list[dict[str, Any]], results: list[dict[str, Any]], missing: list[str]) -> list[str]:
    s = runs.study
    steps = sorted(set(runs.steps.values()))
    budget = (f"{s.budget.steps} steps" if s.budget is not None and s.budget.steps else
              f"{s.budget.tokens:,} tokens ({', '.join(map(str, steps))} steps)" if s.budget is not None else
              f"each blueprint's train.steps ({', '.join(map(str, steps))})")
    data = sorted({v.data for v in runs.variants.values()})
    toks = sorted({v.tokenizer for v in runs.variants.values()})
    metric = table[0]["metric"]
    base = next(r["variant"] for r in table if r["baseline"])
    lines = [f"# Ablation study: {s.study}", ""]
    if s.about:
        lines += [s.about.strip(), ""]
    lines += [f"Base `{s.base}`; data `{'`, `'.join(data)}`, tokenizer `{'`, `'.join(toks)}`; budget {budget} per "
              f"run; seeds {', '.join(map(str, s.seeds))}. The metric is the {METRICS[metric]} (`{metric}`): "
              "mean ± sample std [t-based 95% interval] over seeds. Against the baseline "
              f"`{base}`: the difference of means, Welch's two-sided p-value, and the seeds per variant a test at "
              "0.05 needs to resolve that difference with power 0.8. Perplexity is exp(mean final loss). Peak memory "
              f"is {table[0]['peak_memory_kind'] or 'not measured'}.", ""]
    if missing:
        lines += [f"**Incomplete** (tabulated with --allow-missing): {len(missing)} run(s) missing or failed: "
                  f"{', '.join(missing)}.", ""]
    grows = any(r["growth"] for r in table)
    head = (f"| variant | seeds | params | FLOPs/token | {metric} | diff vs {base} | p | seeds needed | perplexity "
            "| tokens/s | peak MB |" + (" growth |" if grows else ""))
    lines += [head + " diff vs base |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
              + ("---|" if grows else "") + "---|"]
    finite = [r["mean"] for r in table if r["n"] and not math.isnan(r["mean"])]
    best = min(finite, default=None)
    for r in table:
        cell = _cell(r["summary"])
        if best is not None and r["mean"] == best and metric != "flops_to_baseline":
            cell = f"**{cell}**"
        diff = "baseline" if r["baseline"] else _num(r["diff_vs_baseline"])
        need = "" if r["baseline"] else ("undefined" if r["seeds_needed"] is None else str(r["seeds_needed"]))
        seeds = f"{r['seeds']}" + (f" of {r['expected_seeds']}" if r["seeds"] != r["expected_seeds"] else "")
        lines.append(f"| {r['variant']} | {seeds} | {r['params']:,} | {r['flops_per_token']:,.0f} | {cell} | {diff} | "
                     f"{'' if r['baseline'] else _p(r['p_value'])} | {need} | {r['perplexity']:.2f} | "
                     f"{r['tokens_per_s']:,.0f} | {r['peak_memory_mb']:,.0f} | "
                     + (f"{r['growth'] or '-'} | " if grows else "") + f"{r['diff'].replace('|', '/')} |")
    if grows:
        lines += ["", "Growth: the stage each run grew into and the step it began (`0 -> 1 @20`); params are "
                      "those of the last stage."]
    curves = {r["variant"]: [x["curve"] for x in results if x["variant"] == r["variant"]] for r in table}
    try:
        plot_curves(runs.out / "curves.png", curves, title=f"{s.study}: validation loss")
        lines += ["", "![validation curves](curves.png)", "",
                  "Curves: mean over seeds, the band its t-based 95% interval (where there are 2 or more seeds).", ""]
    except ImportError:
        lines += ["", "curves.png was not written: matplotlib is not installed "
                  "(`pip install matplotlib`); the curves are in each run's done.json.", ""]
    return lines


def _band(curves: list[list[list[float]]]) -> tuple[list[float], list[Summary]]:
    """At each token count evaluated by every seed: the summary over seeds."""
    by_tok: dict[float, list[float]] = {}
    for c in curves:
        for _step, tok, loss in c:
            by_tok.setdefault(tok, []).append(loss)
    xs = sorted(t for t, v in by_tok.items() if len(v) == len(curves))
    return xs, [summarize(by_tok[t]) for t in xs]


def plot_curves(path: Path, curves: dict[str, list[list[list[float]]]], *, title: str) -> None:
    """Validation loss against training tokens: per variant the mean and its 95% band (matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for name, cs in curves.items():
        xs, ss = _band(cs)
        if not xs:
            continue
        (line,) = ax.plot(xs, [s.mean for s in ss], marker="o" if len(xs) < 20 else None, label=name)
        if all(s.std is not None for s in ss):
            ax.fill_between(xs, [s.ci_low for s in ss], [s.ci_high for s in ss], color=line.get_color(), alpha=0.2)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation loss (mean over seeds, 95% CI)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
