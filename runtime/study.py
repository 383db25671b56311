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

Where runs execute is the backend's part (``runtime/study_backends.py``: this process, a pool
of local processes, or Ray tasks, ``runtime/study_ray.py``); every backend runs ``run_one``.
Each result carries its provenance (``provenance``). The table, its statistics against the
baseline variant and the reports are ``runtime/study_report.py``: ``results.md``,
``results.csv`` (one row per variant), ``runs.csv`` (one per run) and ``curves.png``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from physlm_graph._errors import Loc, PhysLMError
from physlm_graph._study import StudyError, StudySpec, load_study

from .study_backends import Execution
from .study_report import aggregate, write_reports

__all__ = ["StudyRuns", "Execution", "run_study", "run_one", "run_key", "provenance", "aggregate", "write_reports"]


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


def _records(metrics: Path, resumes: list[dict[str, int]]) -> list[dict[str, Any]]:
    """Every logged step of a run once. A run killed after its last checkpoint logged steps that
    its resumed run trains again; each resume recorded how many lines metrics.jsonl had
    (``line``) and the checkpoint's step (``step``), so a line written before a resume counts
    only up to that step."""
    by_step: dict[int, dict[str, Any]] = {}
    for i, line in enumerate(_lines(metrics)):
        try:
            rec = json.loads(line)
        except ValueError:  # a line cut short by a kill
            continue
        if "step" in rec and not any(i < r["line"] and rec["step"] > r["step"] for r in resumes):
            by_step[int(rec["step"])] = rec
    return [by_step[s] for s in sorted(by_step)]


def _curve(metrics: Path, resumes: list[dict[str, int]]) -> list[list[float]]:
    """[step, tokens, val_loss] of each evaluation (``_records``)."""
    return [[r["step"], r.get("tokens", 0), r["val_loss"]] for r in _records(metrics, resumes) if "val_loss" in r]


@functools.lru_cache(maxsize=1)
def _git_commit() -> tuple[str | None, bool | None]:
    """The commit of the package's source tree and whether it has uncommitted changes (None
    outside a git checkout, e.g. an installed wheel)."""
    root = Path(__file__).resolve().parents[1]
    try:
        top = subprocess.run(["git", "-C", str(root), "rev-parse", "--show-toplevel"], capture_output=True, text=True,
                             timeout=10)
        if top.returncode != 0 or Path(top.stdout.strip()).resolve() != root:  # installed inside some other repo
            return None, None
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None, None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return head.stdout.strip(), bool(dirty.stdout.strip()) if dirty.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None, None


def provenance(*, blueprint_hash: str | None, seed: int, device: Any) -> dict[str, Any]:
    """What a run's result came from: the resolved blueprint's hash (the trained graph, as its
    checkpoint records it), the package version and git commit, the seed, torch, the device."""
    import torch

    import physlm_graph

    commit, dirty = _git_commit()
    dev = str(device)
    if getattr(device, "type", "") == "cuda" and torch.cuda.is_available():
        dev = f"{dev} ({torch.cuda.get_device_name(device)})"
    return {"blueprint_hash": blueprint_hash, "package_version": physlm_graph.__version__, "git_commit": commit,
            "git_dirty": dirty, "seed": seed, "torch_version": torch.__version__, "device": dev,
            "python": platform.python_version(), "host": platform.node()}


def run_one(runs: StudyRuns, name: str, seed: int, *, device: str = "auto", progress: bool = True,
            console: Any = None, stop_after: int | None = None) -> dict[str, Any]:
    """Train one variant x seed through ``train()`` (resuming its own unfinished run); write and
    return done.json. A run stopped before its last step (``stop_after``) writes no done.json."""
    import torch

    from .train import resolve_device, train

    folder = runs.run_dir(name, seed)
    main = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 writes the run's records
    if main:
        status = prepare(runs, name, seed, console)
    else:  # the launcher prepared the folder (study_ray.run_task)
        status = "resume" if (folder / "last").exists() else "new"
    if status == "done":
        return {**json.loads((folder / "done.json").read_text(encoding="utf-8")), "reused": True}
    v = runs.variants[name]
    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    extra = {"stop_after": stop_after} if stop_after is not None else {}
    record = json.loads((folder / "run.json").read_text(encoding="utf-8"))
    if status == "new" and main:  # an attempt killed before its first checkpoint: its steps are trained again
        (folder / "metrics.jsonl").unlink(missing_ok=True)
    if status == "resume" and main:  # where the logs of the run before stop counting (see _curve)
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
        "provenance": provenance(blueprint_hash=state.get("blueprint_hash"), seed=seed, device=dev),
    }
    if summary["steps"] < runs.steps[name] or not main:  # stopped early: not a finished run
        return {**result, "reused": False}
    _write_json(folder / "done.json", result)
    return {**result, "reused": False}


# ---------------------------------------------------------------------------- the study
def _track(trackers: list[Any], runs: StudyRuns, name: str, seed: int) -> None:
    """Send a run that finished to each tracker: its definition and provenance, steps, summary."""
    folder = runs.run_dir(name, seed)
    done = _read_json(folder / "done.json")
    if not trackers or done is None:
        return
    record = _read_json(folder / "run.json") or {}
    config = {"study": runs.study.study, "variant": name, "seed": seed, "key": done["key"], "steps": done["steps"],
              "diff": done.get("diff"), **(done.get("provenance") or {})}
    summary = {k: float(done[k]) for k in ("val_loss", "best_val_loss", "tokens", "wall_s", "tokens_per_s")
               if isinstance(done.get(k), (int, float))}
    steps = _records(folder / "metrics.jsonl", record.get("resumes") or [])
    for tr in trackers:
        tr.start(f"{name}-seed{seed}", config)
        for rec in steps:
            tr.log({k: float(v) for k, v in rec.items() if k != "step" and isinstance(v, (int, float))
                    and not isinstance(v, bool)}, int(rec["step"]))
        tr.finish(summary)


def run_study(path: str | os.PathLike[str], *, out: str | os.PathLike[str] | None = None, device: str = "auto",
              progress: bool = True, console: Any = None, execution: Execution | None = None,
              metric: str = "final", allow_missing: bool = False, trackers: tuple[str, ...] = ()) -> dict[str, Any]:
    """Run (or finish) a study; returns the aggregated results and writes the reports.

    ``execution`` says where the runs go (``runtime/study_backends.py``; default: this machine
    with ``device``), ``metric`` what the table compares (``runtime/study_report.METRICS``). A
    run missing or failed fails the study (StudyError) unless ``allow_missing``: then the table is
    made of the runs that finished and says which are missing. ``trackers`` names experiment
    trackers (``runtime/trackers.py``) that receive each run as it finishes."""
    from rich.console import Console

    from .study_backends import gpu_count, run_in_process, run_pool
    from .study_report import METRICS, aggregate, write_reports
    from .trackers import make_trackers

    if execution is not None and device not in ("auto", execution.device):
        raise StudyError(f"device {device!r} and the execution's device {execution.device!r} disagree",
                         fix="give the device once, in the Execution")
    exe = execution or Execution(device=device)
    exe.check()
    if metric not in METRICS:
        raise StudyError(f"unknown metric {metric!r}", fix=f"use one of: {', '.join(METRICS)}")
    study, root = load_study(path)
    out_dir = Path(out) if out is not None else Path("runs") / "ablate" / study.study
    con = console or Console(stderr=True)
    runs = StudyRuns(StudySpec(study, root, path), out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tracking = make_trackers(list(trackers), study=study.study, out=out_dir)
    (out_dir / "study.yaml").write_text(yaml.safe_dump(study.model_dump(mode="json"), sort_keys=False), encoding="utf-8")
    every = runs.runs()
    status = {r: prepare(runs, *r, con) for r in every}
    pending = [r for r in every if status[r] != "done"]
    con.print(f"[bold]study {study.study}[/]: {len(study.variants)} variants x {len(study.seeds)} seeds = "
              f"{len(every)} runs; {len(every) - len(pending)} reused (definition unchanged), "
              f"{sum(status[r] == 'resume' for r in pending)} to resume, "
              f"{sum(status[r] == 'new' for r in pending)} to run -> {out_dir} ({exe.backend} backend)")
    for note in runs.spec.notes:
        con.print(f"note: {note}")

    def on_done(name: str, seed: int) -> None:
        _track(tracking, runs, name, seed)

    failed: dict[tuple[str, int], str] = {}
    if pending and exe.backend == "ray":
        from .study_ray import run_ray

        failed = run_ray(path, out_dir, pending, execution=exe, con=con, api=(StudyRuns, prepare, run_one),
                         on_done=on_done)
    elif pending:
        gpus = gpu_count() if exe.device in ("auto", "cuda") else 0
        workers = exe.workers or (gpus if gpus > 1 else 1)
        if workers > 1:
            failed = run_pool(path, out_dir, pending, workers=workers, device=exe.device, con=con, on_done=on_done)
        else:
            failed = run_in_process(runs, pending, status, run_one=run_one, device=exe.device, progress=progress, con=con,
                                    on_done=on_done)
    for tr in tracking:
        tr.close()
    results, missing = [], []
    for name, seed in every:
        done = _read_json(runs.run_dir(name, seed) / "done.json")
        if done is None or done.get("key") != runs.key(name, seed):  # never report another definition's run
            missing.append(f"{name} seed {seed} ({failed.get((name, seed), 'did not finish')})")
            continue
        results.append(done)
    if missing and not allow_missing:
        raise StudyError(f"{len(missing)} of {len(every)} runs missing or failed: {'; '.join(missing)}",
                         loc=Loc(file=str(out_dir)),
                         fix="rerun the same command to retry only those runs (finished ones are reused), or pass "
                             "--allow-missing to tabulate the runs that finished")
    if not results:
        raise StudyError("no run of the study finished", loc=Loc(file=str(out_dir)), fix="read the errors above")
    baseline = study.baseline or study.variants[0].name
    table = aggregate(runs, results, metric=metric, baseline=baseline)
    write_reports(runs, table, results, missing=missing)
    return {"study": study.study, "out": str(out_dir), "ran": len(pending), "skipped": len(every) - len(pending),
            "reused": [f"{n}/seed{s}" for n, s in every if status[(n, s)] == "done"], "missing": missing,
            "metric": metric, "baseline": baseline,
            "variants": [{k: v for k, v in r.items() if k != "summary"} for r in table],
            "files": {k: str(out_dir / f) for k, f in
                      (("md", "results.md"), ("csv", "results.csv"), ("runs_csv", "runs.csv"), ("png", "curves.png"))}}

def _worker(argv: list[str]) -> int:
    """``python -m physlm_graph.runtime.study STUDY --out DIR --variant NAME --seed SEED [--device D]``: one run
    (a pool worker, or each rank of a multi-GPU run under torchrun)."""
    import argparse

    p = argparse.ArgumentParser(prog="physlm_graph.runtime.study")
    p.add_argument("study")
    p.add_argument("--out", required=True)
    # not --run: torchrun, which launches this module for a run on several GPUs, reads --run as its --run-path
    p.add_argument("--variant", required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--device", default="auto")
    a = p.parse_args(argv)
    study, root = load_study(a.study)
    runs = StudyRuns(StudySpec(study, root, a.study), Path(a.out))
    name, seed = a.variant, a.seed
    if name not in runs.variants or seed not in study.seeds:
        raise StudyError(f"no run {name} seed {seed} in this study")
    from .distributed import close_distributed

    run_one(runs, name, seed, device=a.device, progress=False)
    close_distributed()  # under torchrun: every rank leaves the group before the interpreter exits
    return 0


if __name__ == "__main__":
    try:
        sys.exit(_worker(sys.argv[1:]))
    except PhysLMError as exc:
        print(str(exc), file=sys.stderr)
        sys.exit(2)
