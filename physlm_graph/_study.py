"""Ablation studies: train every variant x seed of a base blueprint and tabulate the results.

    physlm-graph ablate examples/ablations/ngt.yaml --out runs/ngt-study

A study file (validated by ``StudyDoc``) names a base blueprint, its variants (each an
``extends`` of the base: ``set``/``replace``/``remove``, or another ``blueprint`` entirely),
the seeds, a budget (``steps`` or ``tokens``), the data and tokenizer, and training overrides.
Runs go one after another, or one process per GPU when several are visible. Each run lives in
``OUT/runs/VARIANT/seedN/`` and ends with ``done.json`` holding its result, so a second
invocation skips finished runs and resumes interrupted ones from their ``last`` checkpoint.
Outputs: ``results.md``, ``results.csv`` (one row per variant), ``runs.csv`` (one per run) and
``curves.png`` (validation loss against tokens, mean over seeds).
"""

from __future__ import annotations

import csv
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
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from physlm_graph._errors import Diagnostic, Loc, PhysLMError

__all__ = ["StudyDoc", "Variant", "Budget", "load_study", "run_study", "StudyError"]


class StudyError(PhysLMError):
    """A study file that cannot be run, or a run that failed."""

    stage = "study"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Variant(_Strict):
    """One arm of the study: the base (or ``blueprint``) changed by set/replace/remove."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$", description="folder-safe name")
    about: str = ""
    blueprint: str | None = Field(None, description="another base blueprint for this variant (relative to the study)")
    set: dict[str, Any] = Field(default_factory=dict)
    replace: dict[str, Any] = Field(default_factory=dict)
    remove: list[str] = Field(default_factory=list)


class Budget(_Strict):
    """How long each run trains: optimizer ``steps``, or training ``tokens`` (rounded up to steps)."""

    steps: int | None = Field(None, ge=1)
    tokens: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _one(self) -> "Budget":
        if (self.steps is None) == (self.tokens is None):
            raise ValueError("give exactly one of `steps` or `tokens`")
        return self


class StudyDoc(_Strict):
    """A study file."""

    study: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
    about: str = ""
    base: str = Field(description="the base blueprint, relative to the study file")
    overrides: dict[str, Any] = Field(default_factory=dict, description="--set overrides applied to every variant")
    variants: list[Variant] = Field(min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    budget: Budget
    data: str
    tokenizer: str = "bytes"
    train: dict[str, Any] = Field(default_factory=dict, description="train: options for every run (batch_size, lr, ...)")

    @model_validator(mode="after")
    def _unique(self) -> "StudyDoc":
        names = [v.name for v in self.variants]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"variant names must be unique; repeated: {', '.join(dup)}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError("seeds must be unique")
        if "steps" in self.train or "seed" in self.train:
            raise ValueError("`train` may not set steps or seed: use `budget` and `seeds`")
        return self


# ---------------------------------------------------------------------------- loading
def _near(path: Path, base: Path) -> str:
    return str(path) if path.is_absolute() else os.path.normpath(base / path)


def load_study(path: str | os.PathLike[str]) -> tuple[StudyDoc, Path]:
    """Read and validate a study file; errors carry ``file:line:col``."""
    from physlm_graph._load import load_document

    path = Path(path)
    if not path.is_file():
        raise StudyError("no such study file", loc=Loc(file=str(path)), fix="check the path")
    doc = load_document(path)
    try:
        study = StudyDoc.model_validate(doc.data)
    except ValidationError as err:
        diags = []
        for e in err.errors():
            where = tuple(e["loc"])
            msg = e["msg"].removeprefix("Value error, ")
            if e["type"] == "extra_forbidden":
                msg = f"unknown key {where[-1]!r}"
            diags.append(Diagnostic(f"{'.'.join(map(str, where)) or 'study'}: {msg}", loc=doc.loc(where)))
        raise StudyError(diags) from None
    root = path.resolve().parent
    missing = []
    for key, rel in [("base", study.base)] + [(f"variants.{i}.blueprint", v.blueprint)
                                                for i, v in enumerate(study.variants) if v.blueprint]:
        if not Path(_near(Path(rel), root)).is_file():
            parts = tuple(int(p) if p.isdigit() else p for p in key.split("."))
            missing.append(Diagnostic(f"{key}: no such blueprint {rel!r}", loc=doc.loc(parts),
                                      fix=f"paths are relative to the study file ({root})"))
    if missing:
        raise StudyError(missing)
    return study, root


def variant_source(study: StudyDoc, root: Path, v: Variant) -> dict[str, Any]:
    """The variant as a blueprint dict that ``extends`` its base (absolute path)."""
    base = Path(_near(Path(v.blueprint or study.base), root)).resolve()
    doc: dict[str, Any] = {"physlm": 1, "extends": str(base), "name": v.name}
    if v.about:
        doc["about"] = v.about
    for key in ("set", "replace", "remove"):
        val = getattr(v, key)
        if val:
            doc[key] = val
    return doc


def _data_path(study: StudyDoc, root: Path) -> str:
    d = study.data
    if d.startswith("hf:") or Path(d).expanduser().is_absolute():
        return d
    return _near(Path(d), root)


def _tokenizer_spec(study: StudyDoc, root: Path) -> str:
    t = study.tokenizer
    if t in ("bytes", "chars") or t.startswith("bpe:") or Path(t).is_absolute():
        return t
    cand = Path(_near(Path(t), root))
    return str(cand) if cand.exists() else t


# ---------------------------------------------------------------------------- plan
class Plan:
    """Everything a run needs, derived once from the study file."""

    def __init__(self, study: StudyDoc, root: Path, out: Path) -> None:
        from physlm_graph._compile import compile_blueprint
        from physlm_graph._diff import diff_models

        self.study, self.root, self.out = study, root, out
        # train options also go in as train.* overrides, so shape inference samples the study's seq_len
        self.overrides = {**study.overrides, **{f"train.{k}": v for k, v in study.train.items()}}
        self.data = _data_path(study, root)
        self.tokenizer = _tokenizer_spec(study, root)
        base_path = _near(Path(study.base), root)
        try:
            base = compile_blueprint(base_path, overrides=self.overrides or None, device="meta", build=False)
        except PhysLMError as exc:
            raise StudyError([Diagnostic(f"the base blueprint does not compile: {d.render()}", loc=Loc(file=base_path))
                              for d in exc.diagnostics]) from None
        self.variants: dict[str, dict[str, Any]] = {}
        self.models: dict[str, Any] = {}
        self.diffs: dict[str, str] = {}
        errors: list[Diagnostic] = []
        for v in study.variants:
            src = variant_source(study, root, v)
            try:
                cm = compile_blueprint(src, overrides=self.overrides or None, device="meta", build=False)
            except PhysLMError as exc:
                errors += [Diagnostic(f"variant {v.name!r}: {d.render()}") for d in exc.diagnostics]
                continue
            self.variants[v.name], self.models[v.name] = src, cm
            self.diffs[v.name] = diff_models(base, cm).summary()
        if errors:
            raise StudyError(errors)
        self.steps = {name: self._steps(cm) for name, cm in self.models.items()}

    def _steps(self, cm: Any) -> int:
        b = self.study.budget
        if b.steps is not None:
            return b.steps
        from physlm_graph._schema import TrainConfig
        from physlm_graph.runtime.checkpoint import model_context

        cfg = TrainConfig.model_validate({**cm.train_config.model_dump(), **self.study.train})
        seq = cfg.seq_len or model_context(cm)
        if seq is None:
            raise StudyError("budget.tokens needs a sequence length", fix="set train.seq_len in the study")
        return max(1, math.ceil(b.tokens / (cfg.batch_size * seq * cfg.accumulate)))

    def runs(self) -> list[tuple[str, int]]:
        return [(v.name, s) for v in self.study.variants for s in self.study.seeds]

    def run_dir(self, name: str, seed: int) -> Path:
        return self.out / "runs" / name / f"seed{seed}"


# ---------------------------------------------------------------------------- one run
def _peak_memory(device: Any) -> tuple[int, str]:
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return int(torch.cuda.max_memory_allocated()), "cuda max allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024), "process peak RSS"


def run_one(plan: Plan, name: str, seed: int, *, device: str = "auto", progress: bool = True,
            console: Any = None) -> dict[str, Any]:
    """Train one variant x seed (resuming an interrupted run); write and return done.json."""
    import torch

    from physlm_graph.runtime.train import Trainer, resolve_device

    folder = plan.run_dir(name, seed)
    done = folder / "done.json"
    if done.is_file():
        return json.loads(done.read_text(encoding="utf-8"))
    folder.mkdir(parents=True, exist_ok=True)
    src_file = folder / "variant.yaml"
    src_file.write_text(yaml.safe_dump(plan.variants[name], sort_keys=False), encoding="utf-8")
    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    resume = (folder / "last").exists()
    trainer = Trainer(str(src_file), out_dir=folder, data=plan.data, tokenizer=plan.tokenizer,
                      steps=plan.steps[name], overrides=plan.overrides or None, resume=resume, device=dev,
                      seed=seed, progress=progress, cache_dir=plan.out / "cache", console=console,
                      **plan.study.train)
    summary = trainer.fit()
    peak, peak_kind = _peak_memory(dev)
    curve = []
    for line in (folder / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        if "val_loss" in rec:
            curve.append([rec["step"], rec.get("tokens", 0), rec["val_loss"]])
    result = {
        "variant": name, "seed": seed, "params": summary["params"],
        "flops_per_token": plan.models[name].flops_per_token, "steps": summary["steps"],
        "tokens": summary["tokens_seen"], "val_loss": summary["val_loss"], "best_val_loss": summary["best_val_loss"],
        "wall_s": summary["wall_s"], "tokens_per_s": summary["tokens_seen"] / max(summary["wall_s"], 1e-9),
        "peak_memory_bytes": peak, "peak_memory_kind": peak_kind, "device": str(dev), "resumed": resume,
        "curve": curve, "diff": plan.diffs[name],
    }
    tmp = folder / "done.json.tmp"
    tmp.write_text(json.dumps(result, indent=2), encoding="utf-8")
    os.replace(tmp, done)
    return result


# ---------------------------------------------------------------------------- the study
def run_study(path: str | os.PathLike[str], *, out: str | os.PathLike[str] | None = None, device: str = "auto",
              progress: bool = True, console: Any = None, gpus: int | None = None) -> dict[str, Any]:
    """Run (or finish) a study; returns the aggregated results and writes the reports."""
    from rich.console import Console

    study, root = load_study(path)
    out_dir = Path(out) if out is not None else Path("runs") / "ablate" / study.study
    out_dir.mkdir(parents=True, exist_ok=True)
    con = console or Console(stderr=True)
    plan = Plan(study, root, out_dir)
    (out_dir / "study.yaml").write_text(yaml.safe_dump(study.model_dump(mode="json"), sort_keys=False), encoding="utf-8")
    runs = plan.runs()
    pending = [(n, s) for n, s in runs if not (plan.run_dir(n, s) / "done.json").is_file()]
    con.print(f"[bold]study {study.study}[/]: {len(study.variants)} variants x {len(study.seeds)} seeds = "
              f"{len(runs)} runs; {len(runs) - len(pending)} already done, {len(pending)} to run -> {out_dir}")
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
            con.rule(f"[{len(runs) - len(pending) + i + 1}/{len(runs)}] {name} seed {seed} "
                     f"({plan.steps[name]} steps{eta})")
            run_one(plan, name, seed, device=device, progress=progress, console=con)
    results = [json.loads((plan.run_dir(n, s) / "done.json").read_text(encoding="utf-8")) for n, s in runs]
    table = aggregate(plan, results)
    write_reports(plan, table, results)
    return {"study": study.study, "out": str(out_dir), "ran": len(pending), "skipped": len(runs) - len(pending),
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
                cmd = [sys.executable, "-m", "physlm_graph._study", str(path), "--out", str(out_dir),
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
def aggregate(plan: Plan, results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for v in plan.study.variants:
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
            "peak_memory_kind": rs[0]["peak_memory_kind"], "diff": plan.diffs[v.name],
        })
    return rows


CSV_FIELDS = ("variant", "seeds", "params", "flops_per_token", "steps", "tokens", "val_loss_mean", "val_loss_std",
              "perplexity", "tokens_per_s", "peak_memory_mb", "diff")
RUN_FIELDS = ("variant", "seed", "params", "steps", "tokens", "val_loss", "best_val_loss", "wall_s", "tokens_per_s",
              "peak_memory_bytes", "device", "resumed")


def write_reports(plan: Plan, table: list[dict[str, Any]], results: list[dict[str, Any]]) -> None:
    out = plan.out
    with open(out / "results.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(table)
    with open(out / "runs.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=RUN_FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(results)
    s = plan.study
    budget = f"{s.budget.steps} steps" if s.budget.steps else f"{s.budget.tokens:,} tokens"
    lines = [f"# Ablation study: {s.study}", ""]
    if s.about:
        lines += [s.about.strip(), ""]
    lines += [f"Base `{s.base}`; data `{s.data}`, tokenizer `{s.tokenizer}`; budget {budget} per run; "
              f"seeds {', '.join(map(str, s.seeds))}. Validation loss is the final evaluation of each run "
              "(mean ± sample std over seeds); perplexity is exp(mean). Peak memory is "
              f"{table[0]['peak_memory_kind']}.", "",
              "| variant | params | FLOPs/token | val loss | perplexity | tokens/s | peak MB | diff vs base |",
              "|---|---:|---:|---:|---:|---:|---:|---|"]
    best = min((r["val_loss_mean"] for r in table if not math.isnan(r["val_loss_mean"])), default=None)
    for r in table:
        loss = f"{r['val_loss_mean']:.4f} ± {r['val_loss_std']:.4f}"
        if best is not None and r["val_loss_mean"] == best:
            loss = f"**{loss}**"
        lines.append(f"| {r['variant']} | {r['params']:,} | {r['flops_per_token']:,.0f} | {loss} | "
                     f"{r['perplexity']:.2f} | {r['tokens_per_s']:,.0f} | {r['peak_memory_mb']:,.0f} | "
                     f"{r['diff'].replace('|', '/')} |")
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
    """``python -m physlm_graph._study STUDY --out DIR --run NAME SEED``: one run (a GPU worker)."""
    import argparse

    p = argparse.ArgumentParser(prog="physlm_graph._study")
    p.add_argument("study")
    p.add_argument("--out", required=True)
    p.add_argument("--run", nargs=2, metavar=("VARIANT", "SEED"), required=True)
    a = p.parse_args(argv)
    study, root = load_study(a.study)
    plan = Plan(study, root, Path(a.out))
    name, seed = a.run[0], int(a.run[1])
    if name not in plan.variants or seed not in study.seeds:
        raise StudyError(f"no run {name} seed {seed} in this study")
    run_one(plan, name, seed, device="auto", progress=False)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(_worker(sys.argv[1:]))
    except PhysLMError as exc:
        print(str(exc), file=sys.stderr)
        sys.exit(2)
