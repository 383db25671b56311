"""The trainer's growth part: follow the plan's growth stages during training.

Before each step it grows the model when the current stage's bound has passed (``until``
steps or ``until_tokens``), rebuilds the optimizer carrying AdamW state over by parameter
name, re-warms the learning rate for ``rewarmup`` steps, and ramps ``mask`` growth in. The
stage and ``growth_history`` go into ``trainer_state.json``; on resume the model is built at the
recorded stage (and a running mask ramp re-applied). With ``check`` (the default), growth by an
operator that claims to keep the function (zero_init, mask) is checked: the fp32 logits before
and after on the first 16 validation tokens must agree within 1e-4, else a GrowthError.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from physlm_graph._growth_ops import MASK_BUFFER, GrowthError, growth_op, mask_residuals, set_mask, unmask_residuals

from .growth import Growth, carry_optimizer_state, describe_stage, grow
from .parts import Part

__all__ = ["GrowthPart"]


def _loc(cm: Any, *path: Any) -> Any:
    return cm.resolved.doc.loc(("growth",) + path)


class GrowthPart(Part):
    """Growth stages as a trainer part (see the module docstring)."""

    name = "growth"

    def __init__(self, stages: list[Any], *, check: bool = True) -> None:
        self.stages = stages
        self.check = check
        self.stage = 0
        self.history: list[dict[str, Any]] = []

    def describe(self) -> str:
        return " -> ".join(describe_stage(st) for st in self.stages) + (
            f" (resuming in stage {self.stage})" if self.stage else "")

    # -- resume
    def load_state(self, state: dict[str, Any]) -> None:
        self.stage = int(state.get("stage") or 0)
        self.history = list(state.get("growth_history") or [])

    def restored(self, trainer: Any) -> None:
        last = self.history[-1] if self.history else None
        if last and last.get("ramp_steps") and trainer.step < last["step"] + last["ramp_steps"]:
            mask_residuals(trainer.cm, last["new_instances"])
            trainer.set_model(trainer.cm)

    def state(self) -> dict[str, Any]:
        return {"stage": self.stage, "growth_stage": self.stage, "growth_history": self.history}

    def check_reached(self, trainer: Any) -> None:
        """Every stage must start within the run (``train.steps``): a boundary the last step never
        passes would leave the later stages untrained, so it is refused before step 0 at its key."""
        steps, tps = trainer.cfg.steps, trainer.tokens_per_step
        for i, st in enumerate(self.stages[:-1]):
            key = "until" if st.until is not None else "until_tokens"
            at = st.until if st.until is not None else -(-st.until_tokens // tps)  # the step it grows before
            if at <= steps - 1:
                continue
            bound = f"step {at:,}" if key == "until" else f"{st.until_tokens:,} tokens (step {at:,} at {tps:,} a step)"
            later = f"stage {i + 1}" if i + 2 == len(self.stages) else f"stages {i + 1}..{len(self.stages) - 1}"
            raise GrowthError(f"growth stage {i + 1} starts at {bound}, but the run's last step is {steps - 1:,} "
                              f"(train.steps {steps:,}): {later} would never train", loc=_loc(trainer.cm, i, key),
                              fix=f"train for {at + 1:,} steps or more (--steps, train.steps), or end the schedule "
                              f"sooner (a smaller growth[{i}].{key}, or fewer stages)")

    # -- growing
    def boundary_passed(self, step: int, tokens: int) -> bool:
        if self.stage >= len(self.stages) - 1:
            return False
        st = self.stages[self.stage]
        return (st.until is not None and step >= st.until) or (st.until_tokens is not None and tokens >= st.until_tokens)

    @torch.no_grad()
    def _logits_probe(self, module: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        was = module.training
        module.eval()
        out = module(tokens)["logits"].float()
        module.train(was)
        return out

    def grow_now(self, trainer: Any) -> Growth:
        """Enter the next stage now: grow ``trainer``'s model, rebuild its optimizer."""
        old_cm, old_opt = trainer.cm, trainer.optimizer
        seed = trainer.cfg.seed + self.stage + 1
        g = grow(old_cm, self.stage + 1, seed=seed,  # train.init_rules draw the fresh layers too
                 init_fresh=lambda m, names: trainer.plan.apply_init_rules(m, only=names, seed=seed))
        if self.check and growth_op(g.grow).exact:
            probe = trainer.val_tokens[: min(16, trainer.seq_len)].astype("int64")
            tokens = torch.from_numpy(probe).to(trainer.device).reshape(1, -1)
            diff = float((self._logits_probe(old_cm.module, tokens) - self._logits_probe(g.model.module, tokens)).abs().max())
            if not diff <= 1e-4:
                raise GrowthError(f"growth into stage {g.stage} by {g.grow} changed the logits by {diff:.3g}",
                                  loc=_loc(old_cm, g.stage, "grow"),
                                  fix="a component in the new blocks is not zeroed by its output projection, or holds "
                                  "state; use grow: mask, or check_growth=False to accept it")
        trainer.set_model(g.model)
        trainer.optimizer = trainer.build_optimizer()
        carried = carry_optimizer_state(old_opt, trainer.optimizer, g.names)
        st = self.stages[g.stage]
        ramps = "ramp_steps" in growth_op(g.grow).options
        self.stage = g.stage
        self.history.append({**g.record(), "step": trainer.step, "tokens": trainer.tokens_seen, "rewarmup": st.rewarmup,
                             "ramp_steps": st.ramp_steps if ramps else 0, "optimizer_carried": len(carried),
                             "changed": len(g.prepared)})
        trainer.console.print(f"[bold]grew[/] into stage {g.stage} at step {trainer.step} ({g.grow}): "
                              f"{old_cm.num_params:,} -> {g.model.num_params:,} params, new {', '.join(g.new_instances)}")
        return g

    def _mask_value(self, model: nn.Module, step: int) -> float | None:
        last = self.history[-1] if self.history else None
        if not last or not last.get("ramp_steps") or MASK_BUFFER not in getattr(
                model.get_submodule(last["new_instances"][0]), "_buffers", {}):
            return None
        return min(1.0, (step - last["step"]) / last["ramp_steps"])

    def before_step(self, trainer: Any, step: int) -> None:
        while self.boundary_passed(trainer.step, trainer.tokens_seen):
            self.grow_now(trainer)
        m = self._mask_value(trainer.model, step)
        if m is not None:
            if m >= 1.0:
                unmask_residuals(trainer.model)
                trainer.set_model(trainer.cm)
            else:
                set_mask(trainer.model, self.history[-1]["new_instances"], m)

    def lr_scale(self, step: int) -> float:
        """A linear re-warmup ``(s - g + 1) / (rewarmup + 1)`` for the ``rewarmup`` steps after
        the last growth at step g."""
        last = self.history[-1] if self.history else None
        if last and last.get("rewarmup") and step - last["step"] < last["rewarmup"]:
            return (step - last["step"] + 1) / (last["rewarmup"] + 1)
        return 1.0

    def after_step(self, record: dict[str, Any]) -> None:
        record["stage"] = self.stage
