"""Experiment trackers receive each finished run once (config with provenance, every logged step,
the summary); a tracker that is not installed is a clear error before anything trains. Here the
packages are replaced by fakes that record calls (tests/runtime/test_trackers_real.py runs the
real wandb and mlflow, which the dev setup installs)."""

from __future__ import annotations

import json
import sys
import types

import pytest

from physlm_graph._study import StudyError
from physlm_graph.cli import main
from physlm_graph.runtime import study as study_mod
from physlm_graph.runtime.study import run_study
from physlm_graph.runtime.trackers import make_trackers

from ._study_fixtures import DATA, tiny_study

pytestmark = pytest.mark.skipif(not DATA.is_file(), reason="needs ../shared/data/tinyshakespeare")


def _fake_modules(monkeypatch) -> list:
    calls: list = []

    class Run:
        def __init__(self, **kw):
            calls.append(("wandb.init", kw))
            self.summary = {}

        def log(self, metrics, step):
            calls.append(("wandb.log", step, metrics))

        def finish(self):
            calls.append(("wandb.finish", dict(self.summary)))

    wandb = types.SimpleNamespace(init=lambda **kw: Run(**kw))
    mlflow = types.SimpleNamespace(
        set_tracking_uri=lambda uri: calls.append(("mlflow.uri", uri)),
        set_experiment=lambda name: calls.append(("mlflow.experiment", name)),
        start_run=lambda run_name: calls.append(("mlflow.start", run_name)),
        log_params=lambda p: calls.append(("mlflow.params", p)),
        log_metrics=lambda m, step=None: calls.append(("mlflow.metrics", step, m)),
        end_run=lambda: calls.append(("mlflow.end",)))

    class Writer:
        def __init__(self, logdir):
            calls.append(("tb.writer", logdir))

        def add_text(self, tag, text):
            calls.append(("tb.text", tag))

        def add_scalar(self, tag, value, step):
            calls.append(("tb.scalar", tag, step, value))

        def close(self):
            calls.append(("tb.close",))

    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.setitem(sys.modules, "mlflow", mlflow)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    return calls


def _fake_run_one(runs, name, seed, **_kw):
    folder = runs.run_dir(name, seed)
    with open(folder / "metrics.jsonl", "w", encoding="utf-8") as f:
        for step in (1, 2):
            f.write(json.dumps({"step": step, "loss": 3.0 - step, "lr": 0.1, "tokens": 64 * step}) + "\n")
    done = {"variant": name, "seed": seed, "key": runs.key(name, seed), "params": 10, "flops_per_token": 1.0,
            "steps": 2, "tokens": 128, "val_loss": 2.5, "best_val_loss": 2.5, "wall_s": 1.0, "tokens_per_s": 128.0,
            "peak_memory_bytes": 1, "peak_memory_kind": "x", "curve": [[2, 128, 2.5]], "growth_history": [],
            "provenance": {"seed": seed, "torch_version": "t", "git_commit": "abc"}}
    (folder / "done.json").write_text(json.dumps(done), encoding="utf-8")
    return done


def test_each_finished_run_reaches_every_tracker(tmp_path, monkeypatch):
    calls = _fake_modules(monkeypatch)
    monkeypatch.setattr(study_mod, "run_one", _fake_run_one)
    path = tiny_study(tmp_path, variants=[{"name": "a"}], seeds=[0, 1], steps=2, name="tracked")
    run_study(path, out=tmp_path / "out", device="cpu", progress=False, trackers=("wandb", "mlflow", "tensorboard"))
    inits = [c[1] for c in calls if c[0] == "wandb.init"]
    assert [(i["name"], i["project"], i["mode"]) for i in inits] == [("a-seed0", "tracked", "offline"),
                                                                     ("a-seed1", "tracked", "offline")]
    assert inits[0]["config"]["git_commit"] == "abc" and inits[0]["config"]["seed"] == 0
    assert [c[1:] for c in calls if c[0] == "wandb.log"][:2] == [(1, {"loss": 2.0, "lr": 0.1, "tokens": 64.0}),
                                                                  (2, {"loss": 1.0, "lr": 0.1, "tokens": 128.0})]
    assert ("mlflow.uri", (tmp_path / "out" / "mlruns").resolve().as_uri()) in calls
    assert [c[1] for c in calls if c[0] == "mlflow.start"] == ["a-seed0", "a-seed1"]
    assert [c for c in calls if c[0] == "mlflow.end"] == [("mlflow.end",)] * 2
    assert [c[1] for c in calls if c[0] == "tb.writer"] == [str(tmp_path / "out" / "tensorboard" / f"a-seed{s}")
                                                           for s in (0, 1)]
    assert ("tb.scalar", "final/val_loss", 0, 2.5) in calls

    # a second invocation trains nothing, so it sends nothing
    calls.clear()
    run_study(path, out=tmp_path / "out", device="cpu", progress=False, trackers=("wandb",))
    assert not [c for c in calls if c[0] == "wandb.init"]


def test_a_tracker_that_is_not_installed_says_what_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(StudyError, match=r"--tracker wandb needs wandb, which is not installed"):
        make_trackers(["wandb"], study="s", out=tmp_path)
    path = tiny_study(tmp_path, variants=[{"name": "a"}], seeds=[0], steps=2)
    assert main(["ablate", str(path), "--out", str(tmp_path / "out"), "--tracker", "wandb"]) == 2
    err = capsys.readouterr().err
    assert "fix: pip install wandb, or drop --tracker wandb" in err
    assert not (tmp_path / "out" / "runs").exists()  # refused before any run was prepared
