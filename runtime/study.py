"""Running an ablation study: every variant x seed trained by ``train()``, then the reports.

    physlm-graph ablate examples/ablations/ngt.yaml --out runs/ngt-study

The study file and its variants come from ``physlm_graph._study`` (``StudySpec``). Each run goes
through ``physlm_graph.runtime.train.train``, the entry of ``physlm-graph train``, so growth
grows, exits are trained and extensions apply exactly as there.

**Runs are keyed by their definition**: the variant's merged blueprint (with the study's
overrides), the steps, the data (path and size), the tokenizer, the seed and the study's
``train:`` options, hashed (``run_key``). A run lives in ``OUT/runs/VARIANT/seedN/`` with its
definition in ``run.json`` and, once finished, its result in ``done.json``. Invoked again, the
study reuses a finished run whose definition is unchanged, resumes an unfinished one from its
``last`` checkpoint, and when the definition changed moves the old folder aside
(``seedN.old-KEY``, never deleted) and trains afresh; the reports read only runs of the current
definitions. The device is not part of a definition.

Runs go one after another, or one worker process per GPU when several are visible
(``python -m physlm_graph.runtime.study STUDY --out DIR --run VARIANT SEED``). Outputs:
``results.md``, ``results.csv`` (one row per variant), ``runs.csv`` (one per run) and
``curves.png`` (validation loss against tokens, mean over seeds).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from physlm_graph._errors import Loc, PhysLMError
from physlm_graph._study import StudyError, StudySpec, load_study

__all__ = ["StudyRuns", "run_study", "run_one", "run_key", "aggregate", "write_reports"]


# ---------------------------------------------------------------------------- definitions
def _data_identity(spec: str) -> dict[str, Any]:
    """The data as a definition sees it: the spec, and for local text its size in bytes."""
    p = Path(spec).expanduser()
    if spec.startswith("hf:") or not p.exists():
        return {"spec": spec}
    if p.is_file():
        return {"spec": str(p.resolve()), "bytes": p.stat().st_size}
    return {"spec": str(p.resolve()), "bytes": sum(f.stat().st_size for f in p.rglob("*") if f.is_file())}


def run_key(definition: dict[str, Any]) -> str:
    """A run's key: 16 hex digits of the SHA-256 of its definition (canonical JSON)."""
    text = json.dumps(definition, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _changes(old: dict[str, Any], new: dict[str, Any]) -> str:
    """What differs between two definitions, in a few words (``steps 30 -> 45``, ``blueprint``)."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if a == b:
            continue
        short = all(isinstance(x, (int, float, str, type(None))) for x in (a, b)) and len(f"{a}{b}") < 60
        out.append(f"{k} {a} -> {b}" if short else k)
    return ", ".join(out) or "its definition"


class StudyRuns:
    """The runs of a study: each one's steps, definition and folder."""

    def __init__(self, spec: StudySpec, out: Path) -> None:
        self.spec, self.study, self.out = spec, spec.study, out
        self.variants = spec.variants
        self.steps = {name: self._steps(v.model) for name, v in spec.variants.items()}

    def _steps(self, cm: Any) -> int:
        from physlm_graph._schema import TrainConfig

        from .checkpoint import model_context

        b = self.study.budget
        cfg = TrainConfig.model_validate({**cm.train_config.model_dump(), **self.study.train})
        if b is None:
            return cfg.steps
        if b.steps is not None:
            return b.steps
        seq = cfg.seq_len or model_context(cm)
        if seq is None:
            raise StudyError("budget.tokens needs a sequence length", loc=Loc(file=self.spec.file),
                             fix="set train.seq_len in the study")
        return max(1, math.ceil(b.tokens / (cfg.batch_size * seq * cfg.accumulate)))

    def runs(self) -> list[tuple[str, int]]:
        return self.spec.runs()

    def run_dir(self, name: str, seed: int) -> Path:
        return self.out / "runs" / name / f"seed{seed}"

    def definition(self, name: str, seed: int) -> dict[str, Any]:
        v = self.variants[name]
        blueprint = {k: x for k, x in v.model.blueprint.items() if k != "about"}
        return {"blueprint": blueprint, "steps": self.steps[name], "data": _data_identity(v.data),
                "tokenizer": v.tokenizer, "seed": seed, "train": dict(self.study.train)}

    def key(self, name: str, seed: int) -> str:
        return run_key(self.definition(name, seed))


# ---------------------------------------------------------------------------- one run
def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str), encoding="utf-8")
    os.replace(tmp, path)


def _set_aside(folder: Path, old_key: str | None) -> Path:
    """Rename ``folder`` to ``NAME.old-KEY`` (``-2``, ``-3``... when taken); never delete it."""
    stem = f"{folder.name}.old-{old_key}" if old_key else f"{folder.name}.old"
    aside, n = folder.with_name(stem), 1
    while aside.exists():
        n += 1
        aside = folder.with_name(f"{stem}-{n}")
    folder.rename(aside)
    return aside


def prepare(runs: StudyRuns, name: str, seed: int, con: Any = None) -> str:
    """Make the run's folder hold this definition: ``done`` (finished, reusable), ``resume``
    (a ``last`` checkpoint of this definition) or ``new``. A folder of another definition is
    moved aside first."""
    folder = runs.run_dir(name, seed)
    definition = runs.definition(name, seed)
    key = run_key(definition)
    if folder.exists():
        stored = _read_json(folder / "run.json") or {}
        if stored.get("key") != key:
            aside = _set_aside(folder, stored.get("key"))
            if con is not None:
                what = _changes(stored.get("definition") or {}, definition) if stored else "no run.json"
                con.print(f"{name} seed {seed}: changed ({what}); the old run is kept in {aside}")
    if (done := _read_json(folder / "done.json")) is not None and done.get("key") == key:
        return "done"
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "run.json").is_file():
        _write_json(folder / "run.json", {"key": key, "definition": definition, "resumes": []})
    (folder / "variant.yaml").write_text(yaml.safe_dump(runs.variants[name].source, sort_keys=False), encoding="utf-8")
    return "resume" if (folder / "last").exists() else "new"


def _peak_memory(device: Any) -> tuple[int, str]:
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return int(torch.cuda.max_memory_allocated()), "cuda max allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024), "process peak RSS"


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines() if path.is_file() else []


def _curve(metrics: Path, resumes: list[dict[str, int]]) -> list[list[float]]:
    """[step, tokens, val_loss] of each evaluation. A run killed after its last checkpoint
    logged steps that its resumed run trains again; each resume recorded how many lines
    metrics.jsonl had (``line``) and the checkpoint's step (``step``), so a line written before
    a resume counts only up to that step."""
    by_step: dict[int, list[float]] = {}
    for i, line in enumerate(_lines(metrics)):
        try:
            rec = json.loads(line)
        except ValueError:  # a line cut short by a kill
            continue
        if "val_loss" not in rec or any(i < r["line"] and rec["step"] > r["step"] for r in resumes):
            continue
        by_step[int(rec["step"])] = [rec["step"], rec.get("tokens", 0), rec["val_loss"]]
    return [by_step[s] for s in sorted(by_step)]


def run_one(runs: StudyRuns, name: str, seed: int, *, device: str = "auto", progress: bool = True,
            console: Any = None, stop_after: int | None = None) -> dict[str, Any]:
    """Train one variant x seed through ``train()`` (resuming its own unfinished run); write and
    return done.json. A run stopped before its last step (``stop_after``) writes no done.json."""
    import torch

    from .train import resolve_device, train

    status = prepare(runs, name, seed, console)
    folder = runs.run_dir(name, seed)
    if status == "done":
        return {**json.loads((folder / "done.json").read_text(encoding="utf-8")), "reused": True}
    v = runs.variants[name]
    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    extra = {"stop_after": stop_after} if stop_after is not None else {}
    record = json.loads((folder / "run.json").read_text(encoding="utf-8"))
    if status == "resume":  # where the logs of the run before stop counting (see _curve)
        step = (_read_json(folder / "last" / "trainer_state.json") or {}).get("step", 0)
        metrics = folder / "metrics.jsonl"
        if metrics.is_file() and not metrics.read_bytes().endswith(b"\n"):  # a line cut short by a kill:
            with open(metrics, "a", encoding="utf-8") as f:  # end it, so the next record starts its own line
                f.write("\n")
        record["resumes"].append({"line": len(_lines(folder / "metrics.jsonl")), "step": int(step)})
        _write_json(folder / "run.json", record)
    summary = train(str(folder / "variant.yaml"), data=v.data, tokenizer=v.tokenizer, steps=runs.steps[name],
                    overrides=runs.spec.overrides or None, out_dir=folder, resume=status == "resume", device=dev,
                    seed=seed, progress=progress, cache_dir=runs.out / "cache", console=console,
                    **runs.study.train, **extra)
    peak, peak_kind = _peak_memory(dev)
    state = _read_json(folder / "last" / "trainer_state.json") or {}
    result = {
        "variant": name, "seed": seed, "key": runs.key(name, seed), "params": summary["params"],
        "flops_per_token": v.model.flops_per_token, "steps": summary["steps"],
        "tokens": summary["tokens_seen"], "val_loss": summary["val_loss"], "best_val_loss": summary["best_val_loss"],
        "wall_s": summary["wall_s"], "tokens_per_s": summary["tokens_seen"] / max(summary["wall_s"], 1e-9),
        "peak_memory_bytes": peak, "peak_memory_kind": peak_kind, "device": str(dev), "resumed": status == "resume",
        "growth_history": state.get("growth_history") or [], "curve": _curve(folder / "metrics.jsonl", record["resumes"]),
        "diff": v.diff, "data": v.data, "tokenizer": v.tokenizer,
    }
    if summary["steps"] < runs.steps[name]:  # stopped early: not a finished run
        return {**result, "reused": False}
    _write_json(folder / "done.json", result)
    return {**result, "reused": False}


# ---------------------------------------------------------------------------- the study
def run_study(path: str | os.PathLike[str], *, out: str | os.PathLike[str] | None = None, device: str = "auto",
              progress: bool = True, console: Any = None, gpus: int | None = None) -> dict[str, Any]:
    """Run (or finish) a study; returns the aggregated results and writes the reports."""
    from rich.console import Console

    study, root = load_study(path)
    out_dir = Path(out) if out is not None else Path("runs") / "ablate" / study.study
    con = console or Console(stderr=True)
    runs = StudyRuns(StudySpec(study, root, path), out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "study.yaml").write_text(yaml.safe_dump(study.model_dump(mode="json"), sort_keys=False), encoding="utf-8")
    every = runs.runs()
    status = {r: prepare(runs, *r, con) for r in every}
    pending = [r for r in every if status[r] != "done"]
    con.print(f"[bold]study {study.study}[/]: {len(study.variants)} variants x {len(study.seeds)} seeds = "
              f"{len(every)} runs; {len(every) - len(pending)} reused (definition unchanged), "
              f"{sum(status[r] == 'resume' for r in pending)} to resume, "
              f"{sum(status[r] == 'new' for r in pending)} to run -> {out_dir}")
    n_gpus = _gpu_count() if gpus is None else gpus
    t0 = time.perf_counter()
    if pending and n_gpus > 1 and device in ("auto", "cuda"):
        _run_parallel(path, out_dir, pending, n_gpus, con)
    else:
        for i, (name, seed) in enumerate(pending):
            eta = ""
            if i:
                per = (time.perf_counter() - t0) / i
                eta = f", about {per * (len(pending) - i):.0f}s left"
            con.rule(f"[{len(every) - len(pending) + i + 1}/{len(every)}] {name} seed {seed} "
                     f"({runs.steps[name]} steps{', resuming' if status[(name, seed)] == 'resume' else ''}{eta})")
            run_one(runs, name, seed, device=device, progress=progress, console=con)
    results = []
    for name, seed in every:
        done = _read_json(runs.run_dir(name, seed) / "done.json")
        if done is None or done.get("key") != runs.key(name, seed):  # never report another definition's run
            raise StudyError(f"run {name} seed {seed} did not finish", loc=Loc(file=str(runs.run_dir(name, seed))),
                             fix="rerun the same command to finish it")
        results.append(done)
    table = aggregate(runs, results)
    write_reports(runs, table, results)
    return {"study": study.study, "out": str(out_dir), "ran": len(pending), "skipped": len(every) - len(pending),
            "reused": [f"{n}/seed{s}" for n, s in every if status[(n, s)] == "done"],
            "variants": table, "files": {k: str(out_dir / f) for k, f in
                                         (("md", "results.md"), ("csv", "results.csv"), ("runs_csv", "runs.csv"),
                                          ("png", "curves.png"))}}


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - no usable CUDA means one process
        return 0


def _run_parallel(path: Any, out_dir: Path, pending: list[tuple[str, int]], n_gpus: int, con: Any) -> None:
    """One worker process per GPU (CUDA_VISIBLE_DEVICES), each taking the next pending run."""
    queue = list(pending)
    active: dict[int, tuple[subprocess.Popen, tuple[str, int], Any]] = {}
    failed: list[str] = []
    logs = out_dir / "logs"
    logs.mkdir(exist_ok=True)
    total, finished = len(pending), 0
    while queue or active:
        for gpu in range(n_gpus):
            if gpu not in active and queue:
                name, seed = queue.pop(0)
                log = open(logs / f"{name}-seed{seed}.log", "w", encoding="utf-8")
                env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(gpu)}
                cmd = [sys.executable, "-m", "physlm_graph.runtime.study", str(path), "--out", str(out_dir),
                       "--run", name, str(seed)]
                active[gpu] = (subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), (name, seed), log)
                con.print(f"GPU {gpu}: {name} seed {seed} (log {log.name})")
        time.sleep(1.0)
        for gpu, (proc, (name, seed), log) in list(active.items()):
            if proc.poll() is None:
                continue
            log.close()
            del active[gpu]
            finished += 1
            ok = proc.returncode == 0
            con.print(f"[{finished}/{total}] {name} seed {seed} on GPU {gpu}: "
                      + ("[green]done[/]" if ok else f"[red]failed (exit {proc.returncode}), see {log.name}[/]"))
            if not ok:
                failed.append(f"{name} seed {seed}")
    if failed:
        raise StudyError(f"{len(failed)} run(s) failed: {', '.join(failed)}", loc=Loc(file=str(logs)),
                         fix="read the logs; rerun the same command to retry only the failed runs")


# ---------------------------------------------------------------------------- reports
def _stages(history: list[dict[str, Any]]) -> str:
    """A run's growth in a few words: ``0 -> 1 @20 -> 2 @40`` (stage and the step it began)."""
    return " -> ".join(["0"] + [f"{h['stage']} @{h['step']}" for h in history]) if history else ""


def aggregate(runs: StudyRuns, results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for v in runs.study.variants:
        rs = [r for r in results if r["variant"] == v.name]
        losses = [r["val_loss"] for r in rs if r["val_loss"] is not None]
        mean = statistics.fmean(losses) if losses else float("nan")
        std = statistics.stdev(losses) if len(losses) > 1 else 0.0
        rows.append({
            "variant": v.name, "seeds": len(rs), "params": rs[0]["params"], "flops_per_token": rs[0]["flops_per_token"],
            "steps": rs[0]["steps"], "tokens": rs[0]["tokens"], "val_loss_mean": mean, "val_loss_std": std,
            "perplexity": math.exp(mean) if mean < 700 else float("inf"),
            "tokens_per_s": statistics.fmean(r["tokens_per_s"] for r in rs),
            "peak_memory_mb": max(r["peak_memory_bytes"] for r in rs) / 2**20,
            "peak_memory_kind": rs[0]["peak_memory_kind"], "diff": runs.variants[v.name].diff,
            "growth": _stages(rs[0].get("growth_history") or []),
        })
    return rows


CSV_FIELDS = ("variant", "seeds", "params", "flops_per_token", "steps", "tokens", "val_loss_mean", "val_loss_std",
              "perplexity", "tokens_per_s", "peak_memory_mb", "growth", "diff")
RUN_FIELDS = ("variant", "seed", "key", "params", "steps", "tokens", "val_loss", "best_val_loss", "wall_s",
              "tokens_per_s", "peak_memory_bytes", "device", "resumed", "growth")


def write_reports(runs: StudyRuns, table: list[dict[str, Any]], results: list[dict[str, Any]]) -> None:
    out = runs.out
    with open(out / "results.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(table)
    with open(out / "runs.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=RUN_FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows({**r, "growth": _stages(r.get("growth_history") or [])} for r in results)
    s = runs.study
    steps = sorted(set(runs.steps.values()))
    budget = (f"{s.budget.steps} steps" if s.budget is not None and s.budget.steps else
              f"{s.budget.tokens:,} tokens ({', '.join(map(str, steps))} steps)" if s.budget is not None else
              f"each blueprint's train.steps ({', '.join(map(str, steps))})")
    data = sorted({v.data for v in runs.variants.values()})
    toks = sorted({v.tokenizer for v in runs.variants.values()})
    lines = [f"# Ablation study: {s.study}", ""]
    if s.about:
        lines += [s.about.strip(), ""]
    lines += [f"Base `{s.base}`; data `{'`, `'.join(data)}`, tokenizer `{'`, `'.join(toks)}`; budget {budget} per "
              f"run; seeds {', '.join(map(str, s.seeds))}. Validation loss is the final evaluation of each run "
              "(mean ± sample std over seeds); perplexity is exp(mean). Peak memory is "
              f"{table[0]['peak_memory_kind']}.", ""]
    grows = any(r["growth"] for r in table)
    head = "| variant | params | FLOPs/token | val loss | perplexity | tokens/s | peak MB |" + (" growth |" if grows else "")
    lines += [head + " diff vs base |", "|---|---:|---:|---:|---:|---:|---:|" + ("---|" if grows else "") + "---|"]
    best = min((r["val_loss_mean"] for r in table if not math.isnan(r["val_loss_mean"])), default=None)
    for r in table:
        loss = f"{r['val_loss_mean']:.4f} ± {r['val_loss_std']:.4f}"
        if best is not None and r["val_loss_mean"] == best:
            loss = f"**{loss}**"
        lines.append(f"| {r['variant']} | {r['params']:,} | {r['flops_per_token']:,.0f} | {loss} | "
                     f"{r['perplexity']:.2f} | {r['tokens_per_s']:,.0f} | {r['peak_memory_mb']:,.0f} | "
                     + (f"{r['growth'] or '-'} | " if grows else "") + f"{r['diff'].replace('|', '/')} |")
    if grows:
        lines += ["", "Growth: the stage each run grew into and the step it began (`0 -> 1 @20`); params are "
                      "those of the last stage."]
    curves = {r["variant"]: [x["curve"] for x in results if x["variant"] == r["variant"]] for r in table}
    try:
        plot_curves(out / "curves.png", curves, title=f"{s.study}: validation loss")
        lines += ["", "![validation curves](curves.png)", ""]
    except ImportError:
        lines += ["", "curves.png was not written: matplotlib is not installed "
                  "(`pip install matplotlib`); the curves are in each run's done.json.", ""]
    (out / "results.md").write_text("\n".join(lines), encoding="utf-8")


def _mean_curve(curves: list[list[list[float]]]) -> tuple[list[float], list[float]]:
    """Mean validation loss over seeds at each evaluated token count (present in every seed)."""
    by_tok: dict[float, list[float]] = {}
    for c in curves:
        for _step, tok, loss in c:
            by_tok.setdefault(tok, []).append(loss)
    xs = sorted(t for t, v in by_tok.items() if len(v) == len(curves))
    return xs, [statistics.fmean(by_tok[t]) for t in xs]


def plot_curves(path: Path, curves: dict[str, list[list[list[float]]]], *, title: str) -> None:
    """Validation loss against training tokens, one line per variant (matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for name, cs in curves.items():
        xs, ys = _mean_curve(cs)
        if xs:
            ax.plot(xs, ys, marker="o" if len(xs) < 20 else None, label=name)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation loss (mean over seeds)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _worker(argv: list[str]) -> int:
    """``python -m physlm_graph.runtime.study STUDY --out DIR --run NAME SEED``: one run (a GPU worker)."""
    import argparse

    p = argparse.ArgumentParser(prog="physlm_graph.runtime.study")
    p.add_argument("study")
    p.add_argument("--out", required=True)
    p.add_argument("--run", nargs=2, metavar=("VARIANT", "SEED"), required=True)
    a = p.parse_args(argv)
    study, root = load_study(a.study)
    runs = StudyRuns(StudySpec(study, root, a.study), Path(a.out))
    name, seed = a.run[0], int(a.run[1])
    if name not in runs.variants or seed not in study.seeds:
        raise StudyError(f"no run {name} seed {seed} in this study")
    run_one(runs, name, seed, device="auto", progress=False)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(_worker(sys.argv[1:]))
    except PhysLMError as exc:
        print(str(exc), file=sys.stderr)
        sys.exit(2)
