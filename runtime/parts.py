"""The hooks a trainer part may implement.

The trainer (``runtime/train.py``) holds its features as parts: the objective
(``runtime/objective.py``: the final cross-entropy, auxiliary and exit losses), the non-finite
guard (``runtime/guard.py``), checkpoint cadence and interrupts (``runtime/cadence.py``), and,
when the plan has growth stages, growth (``runtime/growth_part.py``). Parts that act around the
step subclass ``Part``; the loop calls every hook of every such part at the same points:

    load_state(state)          resuming: the saved trainer state, before the model is built
    restored(trainer)          resuming: after weights, optimizer and RNGs are restored
    before_step(trainer, s)    before step s (0-based): may rebuild the model and optimizer
    lr_scale(s)                a factor on the schedule's learning rate at step s
    after_step(record)         the step's metrics record, before it is logged
    state()                    what to add to trainer_state.json
"""

from __future__ import annotations

from typing import Any

__all__ = ["Part"]


class Part:
    """A trainer part; every hook is optional (these defaults do nothing)."""

    name = "part"

    def load_state(self, state: dict[str, Any]) -> None:
        pass

    def restored(self, trainer: Any) -> None:
        pass

    def before_step(self, trainer: Any, step: int) -> None:
        pass

    def lr_scale(self, step: int) -> float:
        return 1.0

    def after_step(self, record: dict[str, Any]) -> None:
        pass

    def state(self) -> dict[str, Any]:
        return {}
