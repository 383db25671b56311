"""The Ray backend of `physlm-graph ablate`: a local Ray instance of two worker processes runs a
3-variant x 3-seed study; a worker killed mid-run is retried, resumes from its checkpoint and
ends with the weights of an uninterrupted run; every result is there once."""

from __future__ import annotations

import csv
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from physlm_graph.runtime import study_ray

from physlm_graph._study import StudySpec, load_study
from physlm_graph.runtime.study import Execution, StudyRuns, run_one, run_study

from ._study_fixtures import DATA, tiny_study

try:
    import ray
except ImportError:  # the Ray tests skip; the fake-Ray test runs
    ray = None

pytestmark = [pytest.mark.skipif(not DATA.is_file(), reason="needs ../shared/data/tinyshakespeare"),
              pytest.mark.usefixtures("one_thread")]


@pytest.fixture
def local_ray():
    """A local Ray instance with two CPUs: two one-CPU tasks run at once, each in its own worker."""
    if ray is None:
        pytest.skip("needs ray (pip install 'physlm-graph[ray]')")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _kill_when_checkpointed(folder: Path, killed: dict, stop: threading.Event) -> None:
    """Kill (SIGKILL) the worker process training the run in ``folder`` once it has saved a
    checkpoint and before it has finished."""
    while not stop.is_set():
        state, attempts = folder / "last" / "trainer_state.json", folder / "attempts.jsonl"
        if state.is_file() and attempts.is_file() and not (folder / "done.json").exists():
            try:
                step = json.loads(state.read_text(encoding="utf-8"))["step"]
                pid = json.loads(attempts.read_text(encoding="utf-8").splitlines()[0])["pid"]
            except (ValueError, KeyError, IndexError, OSError):  # a file being written
                time.sleep(0.005)
                continue
            os.kill(pid, signal.SIGKILL)
            killed.update(pid=pid, step=step)
            return
        time.sleep(0.005)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "last" / "model.safetensors")


# The one default test that starts Ray (Ray is in the dev extra so that CI runs this backend for
# real): about 30 s on the shared 2-core machine at load 5, 8 s of it Ray's start; minutes when
# the machine is loaded.
def test_ray_study_survives_a_killed_worker(local_ray, tmp_path):
    steps = 30
    study = tiny_study(tmp_path, variants=[{"name": "a"}, {"name": "wide", "set": {"params.dim": 24}},
                                           {"name": "slow", "set": {"train.lr": 1e-4}}],
                       seeds=[0, 1, 2], steps=steps, train={"eval_every": 10, "save_every": 2, "log_every": 2})
    out = tmp_path / "out"
    target = out / "runs" / "wide" / "seed1"
    killed: dict = {}
    stop = threading.Event()
    killer = threading.Thread(target=_kill_when_checkpointed, args=(target, killed, stop), daemon=True)
    killer.start()
    try:
        res = run_study(study, out=out, progress=False, execution=Execution(backend="ray", device="cpu", max_retries=2))
    finally:
        stop.set()
        killer.join()
    assert killed, "the run finished before it could be killed"
    assert 0 < killed["step"] < steps

    assert res["ran"] == 9 and res["missing"] == []
    assert ray.is_initialized()  # the study joined the instance it found and left it running
    rows = list(csv.DictReader(open(out / "runs.csv", encoding="utf-8")))
    assert sorted((r["variant"], r["seed"]) for r in rows) == sorted((v, str(s)) for v in ("a", "wide", "slow")
                                                                     for s in (0, 1, 2))
    assert all(int(r["steps"]) == steps for r in rows)
    done = json.loads((target / "done.json").read_text(encoding="utf-8"))
    assert done["resumed"] is True and done["steps"] == steps
    attempts = [json.loads(x) for x in (target / "attempts.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(attempts) == 2 and attempts[0]["pid"] == killed["pid"] != attempts[1]["pid"]
    assert sum(json.loads((out / "runs" / v / f"seed{s}" / "done.json").read_text())["resumed"]
               for v in ("a", "wide", "slow") for s in (0, 1, 2)) == 1
    assert [c[0] for c in done["curve"]] == [10, 20, 30]  # each evaluation once
    prov = done["provenance"]
    assert prov["seed"] == 1 and prov["torch_version"] == torch.__version__ and prov["device"] == "cpu"
    assert len(prov["blueprint_hash"]) == 16

    # the same run uninterrupted, in this process on one thread: bit-identical final weights
    spec, root = load_study(study)
    ref = StudyRuns(StudySpec(spec, root, study), tmp_path / "ref")
    run_one(ref, "wide", 1, device="cpu", progress=False)
    ours, theirs = _weights(target), _weights(ref.run_dir("wide", 1))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


class FakeRay:
    """Enough of Ray to drive the backend in this process: tasks run when submitted; records the
    resources each declared and how Ray was started."""

    def __init__(self) -> None:
        self.inits: list = []
        self.options: list = []
        self.up = False

    def is_initialized(self):
        return self.up

    def init(self, **kw):
        self.inits.append(kw)
        self.up = True

    def shutdown(self):
        self.up = False

    def cluster_resources(self):
        return {"CPU": 2.0}

    def remote(self, fn):
        fake = self

        class Task:
            def options(self, **kw):
                fake.options.append(kw)
                return self

            def remote(self, *args):
                try:
                    return ("ok", fn(*args))
                except Exception as exc:  # noqa: BLE001 - as Ray does: raised again by get()
                    return ("err", exc)
        return Task()

    def wait(self, refs, num_returns=1):
        return refs[:num_returns], refs[num_returns:]

    def get(self, ref):
        if ref[0] == "err":
            raise ref[1]
        return ref[1]


def test_ray_backend_declares_resources_and_reports_failures(tmp_path, monkeypatch):
    """Without starting Ray: each run is one task with the declared CPUs, GPUs and retries
    (errors of the run itself are not retried); a run that fails is missing from the table."""
    from physlm_graph._study import StudyError

    fake = FakeRay()
    monkeypatch.setattr(study_ray, "import_ray", lambda: fake)

    def task(api, study_path, out, name, seed, device, cpus, gpus):
        assert api[0] is StudyRuns  # the study's own functions travel with the task
        if (name, seed) == ("b", 1):
            raise RuntimeError("worker exploded")
        spec, root = load_study(study_path)
        runs = StudyRuns(StudySpec(spec, root, study_path), Path(out))
        done = {"variant": name, "seed": seed, "key": runs.key(name, seed), "params": 1, "flops_per_token": 1.0,
                "steps": 2, "tokens": 2, "val_loss": 2.0 + seed, "best_val_loss": 2.0, "tokens_per_s": 1.0,
                "peak_memory_bytes": 1, "peak_memory_kind": "x", "curve": [[2, 2, 2.0 + seed]], "growth_history": [],
                "device": device, "cpus": cpus, "gpus": gpus}
        (runs.run_dir(name, seed) / "done.json").write_text(json.dumps(done), encoding="utf-8")
        return done["key"]

    monkeypatch.setattr(study_ray, "run_task", task)
    study = tiny_study(tmp_path, variants=[{"name": "a"}, {"name": "b"}], seeds=[0, 1], steps=2)
    exe = Execution(backend="ray", device="cpu", address="head:6379", cpus_per_run=2, max_retries=5)
    with pytest.raises(StudyError, match=r"1 of 4 runs missing or failed: b seed 1 \(worker exploded\)"):
        run_study(study, out=tmp_path / "out", progress=False, execution=exe)
    assert fake.inits == [{"address": "head:6379", "include_dashboard": False, "log_to_driver": False}]
    assert not fake.up  # the backend shut down the Ray it started
    assert fake.options == [{"num_cpus": 2, "num_gpus": 0, "max_retries": 5, "retry_exceptions": False}]
    done = json.loads((tmp_path / "out" / "runs" / "a" / "seed1" / "done.json").read_text(encoding="utf-8"))
    assert (done["device"], done["cpus"], done["gpus"]) == ("cpu", 2, 0)

    # the failed run alone goes again; with --allow-missing a table is written from what finished
    res = run_study(study, out=tmp_path / "out", progress=False, execution=exe, allow_missing=True)
    assert res["ran"] == 1 and res["missing"] == ["b seed 1 (worker exploded)"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_a_run_on_two_gpus_trains_under_torchrun_in_its_task(tmp_path):
    """--gpus-per-run 2: the task launches torchrun over the two GPUs Ray gave it; rank 0 writes
    the result, which records a CUDA device; one result per run."""
    if ray is None:
        pytest.skip("needs ray")
    study = tiny_study(tmp_path, variants=[{"name": "a"}], seeds=[0, 1], steps=10)
    ray.init(num_cpus=4, num_gpus=2, include_dashboard=False, log_to_driver=False)
    try:
        res = run_study(study, out=tmp_path / "out", progress=False,
                        execution=Execution(backend="ray", device="cuda", gpus_per_run=2))
    finally:
        ray.shutdown()
    assert res["ran"] == 2 and res["missing"] == []
    for seed in (0, 1):
        folder = tmp_path / "out" / "runs" / "a" / f"seed{seed}"
        done = json.loads((folder / "done.json").read_text(encoding="utf-8"))
        assert done["steps"] == 10 and done["provenance"]["device"].startswith("cuda")
        assert (folder / "torchrun.log").is_file()
        assert done["tokens"] == 10 * 4 * 16 * 2  # two ranks, each batch 4 x seq 16
