"""The step-size initialisation the selective mixers share (Mamba, Mamba-2, the gated conv)."""

from __future__ import annotations

import math

import torch
from pydantic import model_validator
from torch import Tensor

from physlm_graph import ComponentParams


def log_uniform_dt(n: int, dt_min: float, dt_max: float, *, device: torch.device | str | None = None) -> Tensor:
    """``n`` steps drawn log-uniformly in [dt_min, dt_max], floored at 1e-4 (Gu & Dao 2023)."""
    u = torch.rand(n, device=device)
    return torch.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=1e-4)


def inverse_softplus(y: Tensor) -> Tensor:
    """x with softplus(x) = y: the bias that makes softplus(dt_bias) start at ``y``."""
    return y + torch.log(-torch.expm1(-y))


class StepInitParams(ComponentParams):
    """Parameters of a mixer with a log-uniform step init: its ``dt_min`` must not exceed its
    ``dt_max`` (each subclass declares both fields, where they belong in its list)."""

    @model_validator(mode="after")
    def _check_dt_range(self) -> "StepInitParams":
        if self.dt_min > self.dt_max:  # type: ignore[attr-defined]
            raise ValueError(f"dt_min {self.dt_min} must be <= dt_max {self.dt_max}")  # type: ignore[attr-defined]
        return self
