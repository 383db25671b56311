"""Where a study's runs execute: this process, a local pool of worker processes, or Ray.

Every backend runs the same thing for a run: ``run_one`` (``runtime/study.py``), which trains
through ``train()``, resumes an unfinished run from its ``last`` checkpoint and writes
``done.json`` once the run has trained every step. A backend returns the runs that failed
(name and seed -> why); the study then reads every result from ``done.json``, so a run is
counted once however many times it was attempted.

- ``local``, one worker: the runs one after another in this process.
- ``local``, several workers: one process per GPU (``CUDA_VISIBLE_DEVICES``) when GPUs are
  visible, else ``workers`` CPU processes with ``cores / workers`` threads each; each takes the
  next pending run (``python -m physlm_graph.runtime.study STUDY --out DIR --variant NAME --seed SEED``).
- ``ray``: each run a Ray task (``runtime/study_ray.py``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Execution", "run_in_process", "run_pool", "gpu_count"]


@dataclass(frozen=True)
class Execution:
    """How a study's pending runs execute (the CLI's --backend and its options)."""

    backend: str = "local"
    device: str = "auto"
    workers: int | None = None  # local: processes (default: one per GPU, else 1)
    address: str | None = None  # ray: a cluster's address (default: a local instance)
    cpus_per_run: float = 1.0
    gpus_per_run: float | None = None  # ray: default 1 when the device is CUDA, else 0
    max_retries: int = 3  # ray: attempts after a worker dies, each resuming from `last`

    def check(self) -> None:
        from physlm_graph._study import StudyError

        if self.backend not in ("local", "ray"):
            raise StudyError(f"unknown backend {self.backend!r}", fix="use --backend local or --backend ray")
        if self.workers is not None and self.workers < 1:
            raise StudyError(f"--workers must be at least 1, got {self.workers}")
        if self.cpus_per_run <= 0 or (self.gpus_per_run is not None and self.gpus_per_run < 0) or self.max_retries < 0:
            raise StudyError("--cpus-per-run must be > 0, --gpus-per-run and --max-retries >= 0")
        if self.backend == "local" and (self.address is not None or self.gpus_per_run is not None
                                        or self.cpus_per_run != 1.0 or self.max_retries != 3):
            raise StudyError("--address, --cpus-per-run, --gpus-per-run and --max-retries are for --backend ray",
                             fix="add --backend ray, or drop them (the local backend gives each run one GPU or "
                                 "an equal share of the cores)")
        if self.backend == "ray" and self.workers is not None:
            raise StudyError("--workers is for --backend local; Ray runs as many tasks at once as the cluster "
                             "has resources for", fix="drop --workers, or set --cpus-per-run / --gpus-per-run")
        gpus = self.gpus_per_run or 0
        if self.backend == "ray" and self.device.startswith("cuda") and self.gpus_per_run == 0:
            raise StudyError("--device cuda with --gpus-per-run 0: the runs would have no GPU",
                             fix="drop --gpus-per-run (one GPU per run), or use --device cpu")
        if self.backend == "ray" and self.device == "cpu" and gpus > 0:
            raise StudyError(f"--device cpu with --gpus-per-run {gpus:g}: the runs would hold GPUs they do not use",
                             fix="use --device cuda, or drop --gpus-per-run")
        if gpus > 1 and gpus != int(gpus):
            raise StudyError(f"--gpus-per-run above 1 must be a whole number, got {gpus}")


def gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - no usable CUDA means one process
        return 0


def run_in_process(runs: Any, pending: list[tuple[str, int]], status: dict[tuple[str, int], str], *,
                   run_one: Any, device: str, progress: bool, con: Any,
                   on_done: Any = None) -> dict[tuple[str, int], str]:
    """The runs one after another in this process, each through ``run_one`` (the study's own,
    passed in so that this module does not import the study); a run that raises is recorded,
    the rest go on."""
    from physlm_graph._errors import PhysLMError

    failed: dict[tuple[str, int], str] = {}
    t0, total = time.perf_counter(), len(status)
    done_before = total - len(pending)
    for i, (name, seed) in enumerate(pending):
        eta = ""
        if i:
            eta = f", about {(time.perf_counter() - t0) / i * (len(pending) - i):.0f}s left"
        con.rule(f"[{done_before + i + 1}/{total}] {name} seed {seed} "
                 f"({runs.steps[name]} steps{', resuming' if status[(name, seed)] == 'resume' else ''}{eta})")
        try:
            run_one(runs, name, seed, device=device, progress=progress, console=con)
        except PhysLMError as exc:
            failed[(name, seed)] = str(exc).splitlines()[0]
            con.print(f"[red]{name} seed {seed} failed:[/] {exc}")
            continue
        except Exception as exc:  # noqa: BLE001 - one broken run does not stop the study; its traceback is shown
            failed[(name, seed)] = f"{type(exc).__name__}: {exc}"
            con.print(f"[red]{name} seed {seed} failed:[/]\n{traceback.format_exc()}")
            continue
        if on_done is not None:
            on_done(name, seed)
    return failed


def _slots(workers: int | None, device: str) -> list[dict[str, str]]:
    """The environment of each pool process: a GPU each, or a share of the CPU cores."""
    gpus = gpu_count() if device in ("auto", "cuda") else 0
    if gpus:
        n = min(workers or gpus, gpus)
        return [{"CUDA_VISIBLE_DEVICES": str(i)} for i in range(n)]
    n = workers or 1
    threads = str(max(1, (os.cpu_count() or 1) // n))
    return [{"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads} for _ in range(n)]


def pool_size(workers: int | None, device: str) -> int:
    return len(_slots(workers, device))


def run_pool(path: Any, out_dir: Path, pending: list[tuple[str, int]], *, workers: int | None, device: str,
             con: Any, on_done: Any = None) -> dict[tuple[str, int], str]:
    """One worker process per slot (GPU, or CPU share), each taking the next pending run."""
    slots = _slots(workers, device)
    queue = list(pending)
    active: dict[int, tuple[subprocess.Popen, tuple[str, int], Any]] = {}
    failed: dict[tuple[str, int], str] = {}
    logs = out_dir / "logs"
    logs.mkdir(exist_ok=True)
    total, finished = len(pending), 0
    what = "GPU" if "CUDA_VISIBLE_DEVICES" in slots[0] else "worker"
    while queue or active:
        for i, env in enumerate(slots):
            if i not in active and queue:
                name, seed = queue.pop(0)
                log = open(logs / f"{name}-seed{seed}.log", "w", encoding="utf-8")
                cmd = [sys.executable, "-m", "physlm_graph.runtime.study", str(path), "--out", str(out_dir),
                       "--variant", name, "--seed", str(seed), "--device", "cuda" if what == "GPU" else device]
                proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
                active[i] = (proc, (name, seed), log)
                con.print(f"{what} {i}: {name} seed {seed} (log {log.name})")
        time.sleep(0.2)
        for i, (proc, (name, seed), log) in list(active.items()):
            if proc.poll() is None:
                continue
            log.close()
            del active[i]
            finished += 1
            ok = proc.returncode == 0
            con.print(f"[{finished}/{total}] {name} seed {seed} on {what} {i}: "
                      + ("[green]done[/]" if ok else f"[red]failed (exit {proc.returncode}), see {log.name}[/]"))
            if ok and on_done is not None:
                on_done(name, seed)
            if not ok:
                failed[(name, seed)] = f"exit {proc.returncode}, see {logs / log.name}"
    return failed
