"""The objective a run optimizes, and the names its terms are logged under.

    total, terms = objective(cm, out, y)     # terms: {"loss": final CE, "aux/<name>": ..., "exit/<point>/ce": ...}

``loss`` is always the final head's cross-entropy (next-token, ``-100`` ignored), the number
validation measures too. Each auxiliary loss the blueprint declares is ``aux/<name>``
(unweighted), each exit's cross-entropy ``exit/<point>/ce`` (unweighted); the optimized total,
``loss + sum(weight * term)``, is logged as ``objective``. ``describe()`` lists the terms with
their weights for the run summary.

``micro_loss`` is what a micro-batch back-propagates (``train.loss_reduction``): ``mean`` divides
the total by the micro-batches of a step, so the gradient is of the per-token mean over the step;
``sum`` multiplies it by the micro-batch's target tokens (and the number of processes, whose
gradients DDP averages), so the gradient is of the objective summed over every token of the step,
as the speedrun's program back-propagates its summed cross-entropy.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional as F

__all__ = ["Objective", "LOSS", "OBJECTIVE"]

LOSS, OBJECTIVE = "loss", "objective"


class Objective:
    """The final cross-entropy plus the plan's weighted auxiliary losses and the model's exit losses."""

    def __init__(self, loss_weights: dict[str, float], *, reduction: str = "mean", accumulate: int = 1,
                 world: int = 1) -> None:
        self.loss_weights = dict(loss_weights)
        self.reduction, self.accumulate, self.world = reduction, accumulate, world
        self._exit_weights: tuple[Any, dict[str, float]] | None = None  # (graph, weights), per model

    def exit_weights(self, cm: Any) -> dict[str, float]:
        """Each exit loss's weight for this model (recomputed when growth rebuilds it)."""
        from .early_exit import exit_loss_weights

        if self._exit_weights is None or self._exit_weights[0] is not cm.module.graph:
            self._exit_weights = (cm.module.graph, exit_loss_weights(cm))
        return self._exit_weights[1]

    def __call__(self, cm: Any, out: dict[str, Any], y: torch.Tensor,
                 ce: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The total and each named term. ``ce``: the final cross-entropy already computed by the
        fused head + loss (``out`` then has no logits)."""
        if ce is None:
            logits = out["logits"]
            ce = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1), ignore_index=-100)
        total, terms = ce, {LOSS: ce}
        for name, term in (out.get("aux") or {}).items():
            terms[f"aux/{name}"] = term
            total = total + self.loss_weights.get(name, 1.0) * term
        if cm.resolved.exit_points:  # this model's exits (a growth stage may have fewer layers, so fewer exits)
            from .early_exit import exit_losses

            extra, parts = exit_losses(cm, out, y, weights=self.exit_weights(cm))
            total = total + extra
            terms.update(parts)
        return total, terms

    def micro_loss(self, total: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """What one micro-batch with targets ``y`` back-propagates of its per-token ``total``."""
        if self.reduction == "sum":
            return total * ((y != -100).sum() * self.world)
        return total / self.accumulate

    def describe(self, cm: Any) -> str:
        """``loss + 0.01 x aux/balance + 0.25 x exit/trunk.1/ce`` (the optimized total's terms)."""
        parts = ["loss"]
        parts += [f"{w:g} x aux/{name}" for name, w in self.loss_weights.items()]
        if cm.resolved.exit_points:
            parts += [f"{w:.3g} x exit/{p}/ce" for p, w in self.exit_weights(cm).items()]
        out = " + ".join(parts)
        return out + (", summed over the step's tokens (loss_reduction: sum)" if self.reduction == "sum" else "")
