"""The trackers against the real packages (installed by the dev setup; skipped without them):
W&B in offline mode and MLflow's local file store each record a run's config, steps and summary."""

from __future__ import annotations

import pytest

from physlm_graph.runtime.trackers import make_trackers


def _one_run(name: str, tmp_path) -> None:
    (tracker,) = make_trackers([name], study="study-x", out=tmp_path)
    tracker.start("base-seed0", {"variant": "base", "seed": 0, "train": {"lr": 0.001}})
    for step, loss in ((1, 3.5), (2, 3.25)):
        tracker.log({"loss": loss}, step)
    tracker.finish({"val_loss": 3.0})
    tracker.close()


def test_mlflow_file_store(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    _one_run("mlflow", tmp_path)
    client = mlflow.tracking.MlflowClient(tracking_uri=(tmp_path / "mlruns").resolve().as_uri())
    (exp,) = [e for e in client.search_experiments() if e.name == "study-x"]
    (run,) = client.search_runs([exp.experiment_id])
    assert run.data.params["variant"] == "base" and run.data.params["train.lr"] == "0.001"
    assert [m.value for m in client.get_metric_history(run.info.run_id, "loss")] == [3.5, 3.25]
    assert run.data.metrics["final_val_loss"] == 3.0


def test_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    _one_run("wandb", tmp_path)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))
