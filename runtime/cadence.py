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
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import torch

from physlm_graph._errors import CheckpointError, Loc

from ._schedule_checks import resume_horizon
from .checkpoint import OPTIM_META, _flatten_optimizer, _read_json, load_weights, restore_optimizer, save_checkpoint
from .distributed import barrier, full_state_dict
from .sharded_checkpoint import is_sharded, load_sharded, save_sharded

__all__ = ["CheckpointCadence", "Interrupts", "rng_state", "set_rng_state", "trainer_state", "save_run", "restore_run",
           "read_state"]


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


# ---------------------------------------------------------------- what a saved state holds


def read_state(folder: Path) -> dict[str, Any]:
    """A checkpoint's ``trainer_state.json`` (a missing or damaged one is a CheckpointError naming it)."""
    state_path = folder / "trainer_state.json"
    if not state_path.is_file():
        raise CheckpointError("no trainer state: this checkpoint cannot be resumed", loc=Loc(file=str(state_path)),
                              fix="start a new run from it instead")
    return _read_json(state_path)  # a damaged file is a CheckpointError naming it


def trainer_state(t: Any) -> dict[str, Any]:
    """What ``trainer_state.json`` holds of trainer ``t``: step, tokens, losses, RNGs, batcher, parts."""
    state = {
        "format": 1,
        "step": t.step,
        "tokens_seen": t.tokens_seen,
        "best_val_loss": t.best_val,
        "last_val_loss": t.last_val,
        "skipped": t.guard.skipped,
        "elapsed_s": t.elapsed,
        "growth_stage": None,
        "blueprint_hash": t.cm.hash,
        "config": t.cfg.model_dump(mode="json"),
        "data": t.data,
        "rng": rng_state(t.device),
        "batcher": t.batches.state_dict(),
    }
    for part in t.parts:
        state.update(part.state())
    return state


def _batchers(t: Any) -> list[dict[str, Any]] | None:
    """Every rank's batcher state, in rank order (a collective with several processes), else None."""
    if not t.dist.enabled:
        return None
    import torch.distributed as tdist

    out: list[Any] = [None] * t.dist.world
    tdist.all_gather_object(out, t.batches.state_dict())
    return out


def save_run(t: Any, name: str) -> Path:
    """Save ``OUT/name``; every rank joins. ``train.checkpoint_format: full``: rank 0 writes the full
    weights and optimizer state (with FSDP2 gathered first); ``sharded``: every rank writes its own
    shards (``runtime/sharded_checkpoint.py``)."""
    path = t.out_dir / name
    batchers = _batchers(t)
    state = t.trainer_state() if t.dist.main else None
    if state is not None and batchers is not None:
        state["batchers"] = batchers
    if t.cfg.checkpoint_format == "sharded":
        return save_sharded(path, cm=t.cm, model=t.model, optimizer=t.optimizer, tokenizer=t.tokenizer,
                            trainer_state=state)
    module, optimizer = t.model, t.optimizer
    if t.dist.enabled and t.strategy == "fsdp":
        full = full_state_dict(t.model, t.strategy)
        optimizer = _flatten_optimizer(t.optimizer, keep=t.dist.main)  # the moments gathered too (every rank joins)
        if t.dist.main:
            from physlm_graph._compile import compile_blueprint

            module = compile_blueprint(t.cm.blueprint, device="cpu", stage=t.cm.resolved.stage).module
            module.load_state_dict(full)
    if t.dist.main:
        save_checkpoint(path, cm=t.cm, module=module, tokenizer=t.tokenizer, optimizer=optimizer, trainer_state=state)
    barrier(t.dist)
    return path


def restore_run(t: Any, folder: Path, state: dict[str, Any]) -> None:
    """Continue from a checkpoint: weights, optimizer, step, batcher, RNGs, the parts' state."""
    if state.get("blueprint_hash") != t.cm.hash:
        raise CheckpointError(
            f"the checkpoint holds another model (graph {state.get('blueprint_hash')}; this run builds {t.cm.hash})",
            loc=Loc(file=str(folder)), fix="resume with the same blueprint and --set overrides, or use another --out")
    t.schedule_steps, note = resume_horizon(state, steps=t.cfg.steps, schedule=t.cfg.schedule)
    if note:
        t.notes.append(note)
    if is_sharded(folder):  # every rank reads the pieces it owns, whatever the world size that wrote them
        load_sharded(folder, t.model, t.optimizer, cm_hash=t.cm.hash)
    else:
        load_weights(t.model, folder)
        if (folder / OPTIM_META).is_file():
            restore_optimizer(t.optimizer, folder)
        else:
            t.notes.append("the checkpoint holds no optimizer state (FSDP2 checkpoints did not, before they gathered "
                           "it): the optimizer's moments start again from zero")
    _restore_batcher(t, state)
    set_rng_state(state["rng"], t.device)
    t.step, t.tokens_seen = state["step"], state["tokens_seen"]
    t.best_val, t.last_val = state.get("best_val_loss"), state.get("last_val_loss")
    t.guard.skipped, t.elapsed = state.get("skipped", 0), state.get("elapsed_s", 0.0)
    for part in t.parts:
        part.restored(t)


def _restore_batcher(t: Any, state: dict[str, Any]) -> None:
    """Each rank continues its own window stream. A checkpoint written on another number of
    processes: the ranks it had continue theirs, a new rank starts its own (seed + rank). Data
    read in order (``data_order: sequential``) has one position for all ranks: every rank goes on
    from it, whatever the number of processes."""
    saved = state.get("batchers")
    if state["batcher"].get("order") == "sequential":  # one position in the data, the same on every rank
        t.batches.load_state_dict(state["batcher"])
        return
    if saved is None:  # one process wrote it (or an older run, which kept rank 0's position only)
        if t.dist.main:
            t.batches.load_state_dict(state["batcher"])
        if t.dist.enabled:  # only rank 0 prints notes
            t.notes.append("the checkpoint holds rank 0's data position only: the other ranks start their streams")
        return
    if t.dist.rank < len(saved):
        t.batches.load_state_dict(saved[t.dist.rank])
    if len(saved) != t.dist.world:
        kept = min(len(saved), t.dist.world)
        rest = (f", {_ranks(kept, t.dist.world, 'starts its own', 'start their own')}" if t.dist.world > kept
                else f"; {_ranks(kept, len(saved), 'ends its stream', 'end theirs')}")
        t.notes.append(f"resumed on {t.dist.world} process(es) from a checkpoint written on {len(saved)}: "
                       f"{_ranks(0, kept, 'continues its data stream', 'continue their data streams')}{rest}")


def _ranks(first: int, end: int, one: str, many: str) -> str:
    return f"rank {first} {one}" if end - first == 1 else f"ranks {first}-{end - 1} {many}"
