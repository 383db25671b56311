"""The Ray backend of a study: each variant x seed one Ray task.

    physlm-graph ablate STUDY.yaml --backend ray                      # a local Ray instance
    physlm-graph ablate STUDY.yaml --backend ray --address HOST:6379  # a running cluster

Each task declares its resources (``cpus_per_run`` CPUs, ``gpus_per_run`` GPUs); Ray places
the tasks on whatever nodes have them, all submitted at once, and the study collects them in
the order they finish. A task trains its run through ``run_one``; a run on several GPUs is
``torchrun --nproc-per-node G`` inside the task (DDP over the GPUs Ray gave it).

A task whose worker process dies (killed, out of memory, a lost node) is retried by Ray up to
``max_retries`` times; the retry finds the run's ``last`` checkpoint and resumes it exactly, so
its final weights are those of an uninterrupted run. An error the run raises itself (a bad
blueprint, non-finite loss) is not retried. Results are never taken from a task's return
value: the study reads every run's ``done.json``, written once when the run has trained every
step, so a result is neither lost nor counted twice. On a cluster, ``--out`` must be a folder
every node sees at the same path (a shared filesystem), and each node needs this package.

Each attempt appends a line to the run's ``attempts.jsonl`` (process id, host, time); a task that
raises something other than a PhysLMError leaves its traceback in the run's ``errors.log``.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

__all__ = ["run_ray", "import_ray"]


def import_ray() -> Any:
    from physlm_graph._study import StudyError

    try:
        import ray
    except ImportError:
        raise StudyError("--backend ray needs Ray, which is not installed",
                         fix="pip install 'physlm-graph[ray]' (or pip install ray), or use --backend local") from None
    return ray


def _die_with_parent() -> None:
    """In a child process: be killed when the task's worker dies, so no orphan trains on."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:  # not Linux: the orphan finishes its run, which the retry then reuses or resumes
        pass


def _attempt(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "attempts.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}) + "\n")


def run_task(api: Any, study_path: str, out: str, name: str, seed: int, device: str, cpus: float, gpus: int) -> str:
    """The body of one Ray task: train (or finish) one run; returns its key."""
    from physlm_graph._errors import PhysLMError

    try:
        return _run_task(api, study_path, out, name, seed, device, cpus, gpus)
    except PhysLMError as exc:  # as plain text: the error's message survives Ray's pickling unchanged
        raise RuntimeError(str(exc)) from None
    except Exception:  # the full traceback stays beside the run; the study prints its last line
        folder = Path(out) / "runs" / name / f"seed{seed}"
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "errors.log", "a", encoding="utf-8") as f:
            f.write(traceback.format_exc() + "\n")
        raise


def _run_task(api: Any, study_path: str, out: str, name: str, seed: int, device: str, cpus: float, gpus: int) -> str:
    from physlm_graph._study import StudyError, StudySpec, load_study

    StudyRuns, prepare, run_one = api  # the study's own (runtime/study.py), sent by reference with the task

    study, root = load_study(study_path)
    runs = StudyRuns(StudySpec(study, root, study_path), Path(out))
    prepare(runs, name, seed)
    _attempt(runs.run_dir(name, seed))
    if gpus > 1:  # several GPUs: DDP inside this task, over the GPUs Ray assigned (CUDA_VISIBLE_DEVICES)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}",
               "-m", "physlm_graph.runtime.study", study_path, "--out", out, "--variant", name, "--seed", str(seed),
               "--device", "cuda"]
        log = runs.run_dir(name, seed) / "torchrun.log"
        with open(log, "a", encoding="utf-8") as f:
            rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        if rc != 0:
            raise StudyError(f"run {name} seed {seed}: torchrun exited {rc}", fix=f"read {log}")
    else:
        import torch

        torch.set_num_threads(max(1, int(cpus)))
        run_one(runs, name, seed, device=device, progress=False)
    return runs.key(name, seed)


def run_ray(path: Any, out_dir: Path, pending: list[tuple[str, int]], *, execution: Any, con: Any, api: Any,
            on_done: Any = None) -> dict[tuple[str, int], str]:
    """Submit every pending run as a Ray task and wait for them as they finish; returns the failed.
    ``api``: the study's ``(StudyRuns, prepare, run_one)``, which each task calls (passed in, as
    module-level names Ray pickles by reference, so that this module does not import the study)."""
    ray = import_ray()
    started = not ray.is_initialized()
    if started:
        ray.init(address=execution.address, include_dashboard=False, log_to_driver=False)
    try:
        gpus = execution.gpus_per_run
        if gpus is None:
            gpus = 1 if execution.device.startswith("cuda") else 0
        device = "cuda" if gpus else execution.device if execution.device != "auto" else "cpu"
        task = ray.remote(run_task).options(num_cpus=execution.cpus_per_run, num_gpus=gpus,
                                            max_retries=execution.max_retries, retry_exceptions=False)
        refs = {task.remote(api, str(Path(path).resolve()), str(out_dir.resolve()), name, seed, device,
                            execution.cpus_per_run, int(gpus)): (name, seed) for name, seed in pending}
        res = ray.cluster_resources()
        con.print(f"ray: {len(refs)} tasks of {execution.cpus_per_run:g} CPU, {gpus:g} GPU each on a cluster of "
                  f"{res.get('CPU', 0):g} CPUs, {res.get('GPU', 0):g} GPUs")
        failed: dict[tuple[str, int], str] = {}
        waiting, finished = list(refs), 0
        while waiting:
            ready, waiting = ray.wait(waiting, num_returns=1)
            name, seed = refs[ready[0]]
            finished += 1
            try:
                ray.get(ready[0])
            except Exception as exc:  # noqa: BLE001 - the run's own error, or its worker died more than max_retries
                cause = getattr(exc, "cause", None) or exc
                failed[(name, seed)] = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
                con.print(f"[{finished}/{len(refs)}] {name} seed {seed}: [red]failed[/] ({failed[(name, seed)]})")
                continue
            con.print(f"[{finished}/{len(refs)}] {name} seed {seed}: [green]done[/]")
            if on_done is not None:
                on_done(name, seed)
        return failed
    finally:
        if started:
            ray.shutdown()
