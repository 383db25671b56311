"""loss.gravity_repulsion: the Newton Gravity Transformer's coordinate repulsion regulariser."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn

from physlm_graph import ComponentParams, Example, Inputs, register


class GravityRepulsion(nn.Module):
    """Inverse-square repulsion energy between token coordinates, an unweighted scalar loss.

    Reproduces ``compute_repulsion_loss`` of ``leetae9yu/newton-gravity-transformer``
    (``train_shakespeare.py``; SEEDS.md §2.2). Inputs: the final-layer coordinates z (B, T, c)
    (after the last coordinate LayerNorm) and the masses m (B, T, 1). Output: a scalar::

        if T > num_samples: keep num_samples positions, randperm, the same for the whole batch
        d2_ij = max(|z_i - z_j|^2, min_dist2)
        L     = mean over b and pairs i < j of m_i m_j / d2_ij

    The blueprint's ``losses:`` section weights it (the seed: lambda 0.05). As in the seed the
    gradient also reaches m (a mass-decay pressure), and it acts only on the coordinates it is
    given, not on the per-head projections attention uses. Cost O(B num_samples^2 c): explicit
    differences, as the seed does.

    ``interval``: the seed adds the term only when ``step % interval == 0``; here a persistent
    counter buffer counts training forwards and the loss is computed on the 0th, interval-th,
    ... of them, and is 0 (no graph) otherwise. Eval forwards always compute it and do not
    count. The sample uses the global torch RNG.
    """

    def __init__(self, *, num_samples: int = 64, min_dist2: float = 1e-6, interval: int = 1) -> None:
        super().__init__()
        self.num_samples, self.min_dist2, self.interval = num_samples, min_dist2, interval
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, z: Tensor, mass: Tensor) -> Tensor:
        if self.training and self.interval > 1 and not z.is_meta:
            skip = int(self.calls) % self.interval != 0
            self.calls += 1
            if skip:
                return z.new_zeros(())
        T = z.shape[1]
        m = mass.squeeze(-1)  # (B, T)
        if T > self.num_samples:
            idx = torch.randperm(T, device=z.device)[: self.num_samples]  # shared across the batch
            z, m = z[:, idx], m[:, idx]
        n = z.shape[1]
        if n < 2:
            return z.new_zeros(())
        d2 = (z.unsqueeze(2) - z.unsqueeze(1)).square().sum(-1).clamp_min(self.min_dist2)  # (B, n, n)
        energy = m.unsqueeze(2) * m.unsqueeze(1) / d2  # (B, n, n)
        pairs = energy.shape[0] * n * (n - 1) // 2
        return energy.triu(1).sum() / pairs  # mean over b and pairs i < j


class GravityRepulsionParams(ComponentParams):
    num_samples: int = Field(64, ge=2, description="positions sampled (randperm, shared by the batch) when T is larger")
    min_dist2: float = Field(1e-6, gt=0.0, description="floor on the squared distance")
    interval: int = Field(1, ge=1, description="compute on every interval-th training forward, 0 otherwise")


@register(
    "loss.gravity_repulsion",
    params=GravityRepulsionParams,
    inputs=("z", "mass"),
    outputs=("loss",),
    examples=[
        Example({}, {"z": (2, 8, 6), "mass": (2, 8, 1)}),
        Example({"num_samples": 4, "interval": 2}, {"z": (2, 8, 6), "mass": (2, 8, 1)}),
    ],
)
def build_gravity_repulsion(p: GravityRepulsionParams, ins: Inputs) -> GravityRepulsion:
    return GravityRepulsion(num_samples=p.num_samples, min_dist2=p.min_dist2, interval=p.interval)
