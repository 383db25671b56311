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

from physlm_graph._study import StudySpec, load_study
from physlm_graph.runtime.study import Execution, StudyRuns, run_one, run_study

from ._study_fixtures import DATA, tiny_study

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.skipif(not DATA.is_file(), reason="needs ../shared/data/tinyshakespeare"),
              pytest.mark.usefixtures("one_thread")]


@pytest.fixture
def local_ray():
    """A local Ray instance with two CPUs: two one-CPU tasks run at once, each in its own worker."""
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


@pytest.mark.slow  # about 40 s on two idle cores (Ray's start is 10 s of it); minutes on a loaded machine
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
