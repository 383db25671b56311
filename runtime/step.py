"""The optimizer step of the trainer, after the micro-batches' backward passes: gradient
clipping, the non-finite check, and the optimizer's step, synchronous or deferred; and what the
step needs beforehand: the optimizers of ``train.optimizers``' groups (``group_optimizers``) and
the learning rate of each group at a step (``scheduled_lr``, ``set_lr``).

A synchronous step brings the loss and the gradient norm to the host and skips the step (with
the guard's policy) when one is not finite. A deferred step (the fused AdamW) never waits for
the device: the optimizer's ``found_inf`` skips a bad step on the device and the guard learns of
it at the next log, evaluation or save step (``runtime/guard.py``).
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch

from .objective import OBJECTIVE

__all__ = ["optimizer_step", "clip_gradients", "fused_optimizer", "deferred", "group_optimizers", "scheduled_lr",
           "set_lr"]


def group_optimizers(t: Any) -> Any:
    """Trainer ``t``'s optimizers over ``train.optimizers``' groups: one per kind, driven as one
    (``recipe.OptimizerSet``). Without groups the trainer builds one AdamW (``optim.py``)."""
    from .recipe import OptimizerSet, make_optimizers

    return OptimizerSet(make_optimizers(t.plan.optimizer_groups(t.model)))


def scheduled_lr(cfg: Any, step: int, steps: int) -> float:
    """The schedule at 0-based ``step`` of ``steps``: the learning rate, or with ``train.optimizers``
    the factor on each group's own lr (``recipe.lr_factor``)."""
    from .optim import lr_at
    from .recipe import lr_factor, wsd_lr

    if cfg.optimizers is not None:
        return lr_factor(step, schedule=cfg.schedule, steps=steps, warmup=cfg.warmup, decay_frac=cfg.decay_frac)
    if cfg.schedule == "wsd":
        return wsd_lr(step, lr=cfg.lr, steps=steps, warmup=cfg.warmup,
                      decay_frac=0.7 if cfg.decay_frac is None else cfg.decay_frac,
                      min_lr=0.0 if cfg.min_lr is None else cfg.min_lr)
    return lr_at(step, lr=cfg.lr, min_lr=cfg.min_lr, warmup=cfg.warmup, steps=steps, schedule=cfg.schedule)


def set_lr(t: Any, lr: float) -> None:
    """Give every group of ``t.optimizer`` the scheduled ``lr``: a group with its own ``initial_lr``
    (``train.optimizers``) gets ``initial_lr * lr``."""
    for g in t.optimizer.param_groups:
        base = g.get("initial_lr")
        g["lr"] = lr if base is None else base * lr


def optimizer_step(t: Any, step: int, loss_sum: torch.Tensor, record: dict[str, Any]) -> None:
    """Clip, check and step trainer ``t``'s optimizer for 0-based ``step``; fills ``record``."""
    if t.deferred():
        _deferred(t, step, loss_sum, record)
    else:
        _synchronous(t, step, loss_sum, record)


def _synchronous(t: Any, step: int, loss_sum: torch.Tensor, record: dict[str, Any]) -> None:
    c = t.cfg
    for k, v in record.items():
        if isinstance(v, torch.Tensor):
            record[k] = float(v)
    loss_val = record[OBJECTIVE]
    finite = math.isfinite(loss_val)
    if finite and c.grad_clip > 0:
        record["grad_norm"] = gnorm = float(t.clip_gradients())
        finite = math.isfinite(gnorm)
    if not finite:
        t.optimizer.grad_scale = None
        t.optimizer.zero_grad(set_to_none=True)
        t.guard.on_nonfinite(step + 1, loss_val, record.get("grad_norm"))
        record["skipped"] = True
        return
    try:
        t.optimizer.step()
    finally:
        t.optimizer.grad_scale = None

def _deferred(t: Any, step: int, loss_sum: torch.Tensor, record: dict[str, Any]) -> None:
    bad = ~torch.isfinite(loss_sum)
    gnorm = None
    if t.cfg.grad_clip > 0:
        record["grad_norm"] = gnorm = t.clip_gradients()
        bad = bad | ~torch.isfinite(gnorm)
    t.optimizer.found_inf = bad.float()  # the fused kernel leaves weights, moments and step as they were
    try:
        t.optimizer.step()
    finally:
        t.optimizer.found_inf = t.optimizer.grad_scale = None
    t.guard.watch(step + 1, bad, loss_sum, gnorm)
    record["_bad"] = bad

def clip_gradients(t: Any) -> torch.Tensor:
    """Clip the gradients' global 2-norm to ``train.grad_clip``; returns the norm before clipping.

    With a fused AdamW the clipping rides in the optimizer's kernel: its ``grad_scale`` divides
    every gradient by max(1, (norm + 1e-6) / grad_clip), which is ``clip_grad_norm_``'s factor
    (up to the rounding of a division against a product), and writes the clipped gradient back
    as it goes. The separate pass that scales the gradients in place does not run, nor do its
    launches (GPT-2 124M on an H100: the trainer went from 0.977 to 0.990-0.993 of the bare
    compiled step's tokens/s, ``benchmarks/trainer_profile.py``). Other optimizers, and FSDP2's
    sharded gradients, take ``clip_grad_norm_``."""
    c = t.cfg
    get_total_norm = getattr(torch.nn.utils, "get_total_norm", None)  # torch >= 2.6
    if get_total_norm is None or t.strategy == "fsdp" or not fused_optimizer(t):
        return torch.nn.utils.clip_grad_norm_(t.model.parameters(), c.grad_clip)
    grads = [p.grad for p in t.model.parameters() if p.grad is not None]
    norm = get_total_norm(grads)
    t.optimizer.grad_scale = torch.clamp((norm + 1e-6) / c.grad_clip, min=1.0).float()
    return norm

def fused_optimizer(t: Any) -> bool:
    return bool(t.optimizer.param_groups) and all(g.get("fused") for g in t.optimizer.param_groups)

def deferred(t: Any) -> bool:
    """Whether steps run without a host synchronisation: with the fused AdamW (on CUDA) a
    non-finite step is skipped on the device (the kernel's ``found_inf``), and the loss, the
    gradient norm and the non-finite steps reach the host only when ``resolve`` is called
    (at log, evaluation and save steps). FSDP2 keeps the synchronous path, and so does
    ``PHYSLM_SYNC_STEPS=1`` in the environment (every step checked at once, as before).
    ``train.optimizers``' groups defer too under ``nan_policy: stop``: their Muon cannot skip a
    step on the device, but the run stops at the next resolve, which comes before any save, so
    the last good checkpoint is kept, and the host never waits on the device mid-run."""
    if os.environ.get("PHYSLM_SYNC_STEPS", "0") == "1" or t.strategy == "fsdp":
        return False
    if fused_optimizer(t):
        return True
    # train.optimizers' groups (Muon has no found_inf): a bad step is not skipped on the device, so
    # only nan_policy stop defers: the run stops at the next resolve, before anything is saved
    from .recipe import OptimizerSet

    return isinstance(t.optimizer, OptimizerSet) and t.cfg.nan_policy == "stop"
