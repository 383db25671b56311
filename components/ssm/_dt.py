"""The step-size initialisation the selective mixers share (Mamba, Mamba-2, the gated conv)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def log_uniform_dt(n: int, dt_min: float, dt_max: float, *, device: torch.device | str | None = None) -> Tensor:
    """``n`` steps drawn log-uniformly in [dt_min, dt_max], floored at 1e-4 (Gu & Dao 2023)."""
    u = torch.rand(n, device=device)
    return torch.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=1e-4)


def inverse_softplus(y: Tensor) -> Tensor:
    """x with softplus(x) = y: the bias that makes softplus(dt_bias) start at ``y``."""
    return y + torch.log(-torch.expm1(-y))
