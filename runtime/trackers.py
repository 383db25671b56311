"""Experiment trackers for studies, behind one small interface; none is on by default.

    physlm-graph ablate STUDY.yaml --tracker tensorboard --tracker mlflow

When a run of the study finishes, the study sends it to each tracker as one tracked run: its
configuration (variant, seed, definition key, provenance), every logged step of its
``metrics.jsonl`` (a resumed run's steps once each) and its final summary. Trackers are fed
from the process that runs the study, whatever the backend, so workers need no tracker.

- ``tensorboard``: one event folder per run in ``OUT/tensorboard/VARIANT-seedN``
  (needs ``pip install tensorboard``).
- ``wandb``: Weights & Biases, project = the study's name, in offline mode unless
  ``WANDB_MODE`` says otherwise (``wandb sync OUT/wandb/...`` uploads later; needs ``pip install wandb``).
- ``mlflow``: MLflow, experiment = the study's name, in the local file store ``OUT/mlruns``
  unless ``MLFLOW_TRACKING_URI`` is set (needs ``pip install mlflow``).
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Any

__all__ = ["Tracker", "TRACKERS", "make_trackers"]


class Tracker:
    """A tracker receives finished runs: ``start(name, config)``, ``log(metrics, step)`` for each
    logged step, ``finish(summary)``; ``close()`` once the study is done."""

    def __init__(self, *, study: str, out: Path) -> None:
        self.study, self.out = study, out

    def start(self, name: str, config: dict[str, Any]) -> None:
        raise NotImplementedError

    def log(self, metrics: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def finish(self, summary: dict[str, float]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


def _need(module: str, package: str, tracker: str) -> Any:
    from physlm_graph._study import StudyError

    try:
        return importlib.import_module(module)
    except ImportError:
        raise StudyError(f"--tracker {tracker} needs {package}, which is not installed",
                         fix=f"pip install {package}, or drop --tracker {tracker}") from None


class TensorBoardTracker(Tracker):
    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.module = _need("torch.utils.tensorboard", "tensorboard", "tensorboard")
        self.writer: Any = None

    def start(self, name: str, config: dict[str, Any]) -> None:
        self.writer = self.module.SummaryWriter(str(self.out / "tensorboard" / name))
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2, default=str) + "\n```")

    def log(self, metrics: dict[str, float], step: int) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)

    def finish(self, summary: dict[str, float]) -> None:
        for k, v in summary.items():
            self.writer.add_scalar(f"final/{k}", v, 0)
        self.writer.close()


class WandbTracker(Tracker):
    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.wandb = _need("wandb", "wandb", "wandb")
        self.run: Any = None

    def start(self, name: str, config: dict[str, Any]) -> None:
        self.run = self.wandb.init(project=self.study, name=name, config=config, dir=str(self.out),
                                   mode=os.environ.get("WANDB_MODE", "offline"), reinit=True)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def finish(self, summary: dict[str, float]) -> None:
        self.run.summary.update(summary)
        self.run.finish()


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = str(v)[:500]  # MLflow caps a parameter's value
    return out


class MlflowTracker(Tracker):
    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.mlflow = _need("mlflow", "mlflow", "mlflow")
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            # a local file store under the study (MLflow 3.x refuses one unless told it is wanted;
            # a server or database is chosen with MLFLOW_TRACKING_URI)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            self.mlflow.set_tracking_uri((self.out / "mlruns").resolve().as_uri())
        self.mlflow.set_experiment(self.study)

    def start(self, name: str, config: dict[str, Any]) -> None:
        self.mlflow.start_run(run_name=name)
        self.mlflow.log_params(_flat(config))

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics(metrics, step=step)

    def finish(self, summary: dict[str, float]) -> None:
        self.mlflow.log_metrics({f"final_{k}": v for k, v in summary.items()})
        self.mlflow.end_run()


TRACKERS: dict[str, type[Tracker]] = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "mlflow": MlflowTracker}


def make_trackers(names: list[str] | tuple[str, ...], *, study: str, out: Path) -> list[Tracker]:
    """The named trackers, each checked to be installed before any run starts."""
    from physlm_graph._study import StudyError

    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise StudyError(f"unknown tracker {unknown[0]!r}", fix=f"use one of: {', '.join(TRACKERS)}")
    return [TRACKERS[n](study=study, out=out) for n in dict.fromkeys(names)]
