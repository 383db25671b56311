"""Checks of a run's length against its learning-rate schedule, at the start and on resume.

    horizon, note = resume_horizon(state, steps=cfg.steps, schedule=cfg.schedule)
    note = warmup_note(warmup=cfg.warmup, steps=cfg.steps, lr=cfg.lr)

A resumed run follows the schedule of the run it continues: the learning rate is
``lr_at(step, steps=horizon)`` with the saved run's ``train.steps`` as the horizon, so more
``--steps`` continue at the floor (``min_lr``) after the horizon instead of stretching the
cosine and making the learning rate jump up at the resumed step.
"""

from __future__ import annotations

from typing import Any

from physlm_graph._errors import TrainingError

__all__ = ["resume_horizon", "warmup_note"]


def resume_horizon(state: dict[str, Any], *, steps: int, schedule: str) -> tuple[int, str | None]:
    """The schedule horizon for a run resumed from ``state`` (a checkpoint's trainer state) to
    ``steps``, and a note when it differs from ``steps``. ``steps`` below the saved step is an
    error: the run is already past it."""
    step = int(state["step"])
    if steps < step:
        raise TrainingError(f"--steps {steps} is below the step this run has reached ({step:,})",
                            expected=f"--steps {step} or more", fix=f"pass --steps {step + 100} (or any number above "
                            f"{step}) to train further, or drop --resume to start a new run in another --out")
    saved = (state.get("config") or {}).get("steps")
    if not isinstance(saved, int) or isinstance(saved, bool) or saved < 1 or saved == steps or schedule == "constant":
        return steps, None
    if steps > saved:
        return saved, (f"train.steps is {steps:,} but the resumed run was planned for {saved:,}: the {schedule} "
                       f"schedule keeps its horizon of {saved:,} steps (the learning rate does not jump), so steps "
                       f"{saved:,} to {steps:,} run at train.min_lr")
    return saved, (f"train.steps is {steps:,}, the resumed run was planned for {saved:,}: it stops early on the "
                   f"{schedule} schedule of {saved:,} steps")


def warmup_note(*, warmup: int, steps: int, lr: float) -> str | None:
    """A warning when the warmup is not shorter than the run: the learning rate never reaches ``lr``."""
    if warmup < steps:
        return None
    peak = lr * steps / (warmup + 1)
    return (f"train.warmup {warmup:,} is not shorter than the run ({steps:,} steps): the learning rate only rises, "
            f"to {peak:.3g} at the last step instead of train.lr {lr:g}; lower train.warmup (e.g. --set "
            f"train.warmup={max(steps // 10, 0)}) for a full schedule")
