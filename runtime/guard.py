"""The trainer's non-finite guard: what happens when a step's loss or gradient norm is not finite.

``train.nan_policy: stop`` (the default) stops with the step, the loss and the gradient norm;
``skip`` drops the batch (no optimizer step) and counts it, stopping once more than
``max_skips`` were skipped. The last good checkpoint is kept either way.

A synchronous step reports at once (``on_nonfinite``). A deferred step (the fused AdamW on
CUDA, see ``Trainer.deferred``) is skipped on the device by the optimizer's ``found_inf``;
``watch`` records on the device the first bad step and the one past ``max_skips``, and
``resolve`` brings the step's record and that account to the host in one synchronisation (at
log, evaluation and save steps) and then acts as the policy says.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from physlm_graph._errors import TrainingError

__all__ = ["NonFiniteGuard"]


class NonFiniteGuard:
    """Non-finite steps under ``nan_policy`` and ``max_skips`` (see the module docstring)."""

    name = "nonfinite"

    def __init__(self, cfg: Any, device: torch.device, out_dir: Path) -> None:
        self.cfg, self.device, self.out_dir = cfg, device, out_dir
        self.skipped = 0
        self._watch: dict[str, torch.Tensor] | None = None

    def reset(self) -> None:
        self._watch = None

    def error(self, step: int, loss: float, gnorm: float | None, skipped: int | None = None) -> TrainingError:
        """The error for a non-finite loss or gradient norm at ``step``: ``nan_policy: stop``'s
        (``skipped`` None), or the one for ``skipped`` batches, more than ``max_skips``."""
        what = f"the loss is {loss}" if not math.isfinite(loss) else f"the gradient norm is {gnorm}"
        kept = f"; the last good checkpoint is kept in {self.out_dir / 'last'}" if (self.out_dir / "last").exists() else ""
        if skipped is None:
            return TrainingError(f"{what} at step {step}{kept}",
                                 fix="lower lr, raise warmup, or set train.nan_policy: skip to skip such batches")
        return TrainingError(f"{what} at step {step}: {skipped} batches skipped, more than max_skips "
                             f"{self.cfg.max_skips}{kept}", fix="lower lr or raise warmup")

    # -- synchronous steps
    def on_nonfinite(self, step: int, loss: float, gnorm: float | None) -> None:
        """A synchronous step (1-based ``step``) was not finite: stop, or count the skip."""
        if self.cfg.nan_policy == "stop":
            raise self.error(step, loss, gnorm)
        self.skipped += 1
        if self.skipped > self.cfg.max_skips:
            raise self.error(step, loss, gnorm, self.skipped)

    # -- deferred steps
    def _state(self) -> dict[str, torch.Tensor]:
        if self._watch is None:
            z = torch.zeros((), device=self.device)
            self._watch = {"n": torch.zeros((), dtype=torch.long, device=self.device),
                           **{f"{t}_{k}": z.clone() - (1 if k == "step" else 0)
                              for t in ("first", "limit") for k in ("step", "loss", "gnorm")}}
        return self._watch

    def watch(self, step: int, bad: torch.Tensor, loss: torch.Tensor, gnorm: torch.Tensor | None) -> None:
        """Record on the device whether deferred step ``step`` (1-based) was bad."""
        w = self._state()
        first = bad & (w["n"] == 0)
        w["n"] += bad.long()
        over = bad & (w["limit_step"] < 0) & (self.skipped + w["n"] > self.cfg.max_skips)
        for tag, hit in (("first", first), ("limit", over)):
            w[f"{tag}_step"] = torch.where(hit, step, w[f"{tag}_step"])
            w[f"{tag}_loss"] = torch.where(hit, loss.float(), w[f"{tag}_loss"])
            if gnorm is not None:
                w[f"{tag}_gnorm"] = torch.where(hit, gnorm.float(), w[f"{tag}_gnorm"])

    def resolve(self, record: dict[str, Any]) -> dict[str, Any]:
        """A step's record with host numbers (one synchronisation), after acting on the
        non-finite steps since the last call as ``nan_policy`` says. Synchronous records pass."""
        keys = [k for k, v in record.items() if isinstance(v, torch.Tensor)]
        if not keys:
            return record
        w = self._state()
        wkeys = list(w)
        vals = torch.stack([record[k].detach().float().reshape(()) for k in keys]
                           + [w[k].float() for k in wkeys]).tolist()
        out = {**record, **dict(zip(keys, vals))}
        seen = dict(zip(wkeys, vals[len(keys):]))
        if out.pop("_bad"):
            out["skipped"] = True
        n = int(seen["n"])
        if n:
            self._watch = None
            has_gnorm = self.cfg.grad_clip > 0
            if self.cfg.nan_policy == "stop":
                raise self.error(int(seen["first_step"]), seen["first_loss"], seen["first_gnorm"] if has_gnorm else None)
            self.skipped += n
            if self.skipped > self.cfg.max_skips:
                raise self.error(int(seen["limit_step"]), seen["limit_loss"],
                                 seen["limit_gnorm"] if has_gnorm else None, self.cfg.max_skips + 1)
        return out
