"""The trainer's checkpoint cadence: when a step is logged, evaluated and saved; what a saved
state holds of the RNGs; and how Ctrl-C ends a run so that it resumes exactly.

Every ``log_every`` steps the metrics are written, every ``eval_every`` steps (and at the last
step) the validation loss is measured, every ``save_every`` steps (default ``eval_every``, and at
the last step) ``last`` is saved. A saved state is taken between steps only, so resuming from it
is bit-identical to not stopping (on CPU; GPU kernels may not be deterministic).

Ctrl-C (SIGINT) does not break into a step: ``Interrupts`` turns the first one into a request
that the loop honours once the step in flight, with its evaluation and saves, is complete; then
``last`` is saved and ``KeyboardInterrupt`` raised. A second Ctrl-C stops at once, without
saving (the last saved state stays). With several processes, the ranks agree on stopping at the
next step that synchronises them anyway (a log, evaluation or save step).
"""

from __future__ import annotations

import random
import signal
import threading
from types import FrameType
from typing import Any

import numpy as np
import torch

__all__ = ["CheckpointCadence", "Interrupts", "rng_state", "set_rng_state"]


def rng_state(device: torch.device) -> dict[str, Any]:
    """Every RNG the loop may draw from, as JSON-able lists of ints."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state: dict[str, Any] = {
        "torch_cpu": torch.get_rng_state().tolist(),
        "numpy": {"kind": np_state[0], "keys": np_state[1].tolist(), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss": py_state[2]},
    }
    if device.type == "cuda":
        state["torch_cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(torch.tensor(state["torch_cpu"], dtype=torch.uint8))
    if "numpy" in state:
        n = state["numpy"]
        np.random.set_state((n["kind"], np.array(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "python" in state:
        p = state["python"]
        random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if device.type == "cuda" and state.get("torch_cuda"):
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["torch_cuda"]])


class CheckpointCadence:
    """Which of log / evaluate / save a finished step does (1-based ``step``)."""

    name = "cadence"

    def __init__(self, cfg: Any, stop_after: int | None = None) -> None:
        self.log_every, self.eval_every = cfg.log_every, cfg.eval_every
        self.save_every = cfg.save_every or cfg.eval_every
        self.end = min(cfg.steps, stop_after) if stop_after is not None else cfg.steps

    def evaluate(self, step: int) -> bool:
        return step % self.eval_every == 0 or step == self.end

    def log(self, step: int) -> bool:
        return step % self.log_every == 0 or self.evaluate(step)

    def save(self, step: int) -> bool:
        return step % self.save_every == 0 or step == self.end

    def sync(self, step: int) -> bool:
        """Whether the step reports to the host (the deferred step's one synchronisation)."""
        return self.log(step) or step % self.save_every == 0


class Interrupts:
    """SIGINT as a request to stop between steps, while the context is active (main thread only;
    elsewhere, or when another handler than Python's default is installed, nothing changes)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None
        self._installed = False

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:  # the second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> "Interrupts":
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._previous = signal.signal(signal.SIGINT, self._handler)
            self._installed = True
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
            self._installed = False

    def agreed(self, dist: Any, device: torch.device) -> bool:
        """Whether to stop now: this process's request, or, with several processes, any rank's
        (call it on every rank at the same steps)."""
        if not dist.enabled:
            return self.requested
        import torch.distributed as tdist

        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        tdist.all_reduce(flag, op=tdist.ReduceOp.MAX)
        return bool(flag.item())
