"""Muon (Jordan et al. 2024) as the modded-nanogpt programs write it, for what ``torch.optim.Muon``
cannot do or where it does not exist (torch < 2.9).

    opt = Muon([{"params": [w_qkv], "split": 3}, {"params": [w_fc, w_proj]}], lr=0.025, weight_decay=0.05)

Per matrix W with gradient G and momentum buffer M (zero at first):

    M <- mu M + (1 - mu) G                         (``lerp``)
    U <- (1 - mu) G + mu M  (Nesterov)  or  M
    O <- NS(U), in bf16                            (Newton-Schulz, the orthogonalised update)
    W <- (1 - lr wd) W - lr sqrt(max(1, rows / cols)) O

``NS`` normalises ``X = U / (|U|_F + eps)`` (transposed first when tall), then repeats
``X <- a X + (b A + c A^2) X`` with ``A = X X^T``. ``split: k`` orthogonalises the matrix as k
equal blocks of rows, each with its own scale: a fused q, k, v projection (``attention.causal``'s
``qkv``) is then updated as three separate projections are. Matrices of one shape are
orthogonalised together as one batch (the same numbers, fewer kernel launches).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["Muon", "newton_schulz"]


def newton_schulz(g: torch.Tensor, *, coefficients: tuple[float, float, float], steps: int, eps: float) -> torch.Tensor:
    """The orthogonalised ``g`` (..., rows, cols) in bf16, batched over leading dimensions."""
    x = g.bfloat16()
    tall = g.size(-2) > g.size(-1)
    if tall:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)  # spectral norm <= Frobenius norm <= 1
    a, b, c = coefficients
    for _ in range(steps):
        gram = x @ x.mT  # (..., r, r), r = min(rows, cols)
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if tall else x


class Muon(torch.optim.Optimizer):
    """Momentum, then a Newton-Schulz orthogonalised update, on 2-D parameters (module docstring).
    Group settings: ``lr``, ``weight_decay``, ``momentum``, ``nesterov``, ``ns_coefficients``,
    ``ns_steps``, ``eps`` and ``split``; the state of a parameter is its ``momentum_buffer``."""

    def __init__(self, params: Any, *, lr: float = 0.02, weight_decay: float = 0.0, momentum: float = 0.95,
                 nesterov: bool = True, ns_coefficients: tuple[float, float, float] = (2.0, -1.5, 0.5),
                 ns_steps: int = 12, eps: float = 1e-7, split: int = 1) -> None:
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_coefficients=tuple(ns_coefficients), ns_steps=ns_steps, eps=eps, split=split)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2 or p.shape[0] % group["split"]:
                    raise ValueError(f"Muon takes 2-D matrices whose rows split into {group['split']} equal blocks; "
                                     f"got shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            mu, k = group["momentum"], group["split"]
            todo: dict[tuple[int, ...], list[tuple[torch.Tensor, int, torch.Tensor]]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - mu)
                update = p.grad.lerp(buf, mu) if group["nesterov"] else buf
                for i, block in enumerate(update.chunk(k, dim=0)):
                    todo.setdefault(tuple(block.shape), []).append((p, i, block))
            out: dict[tuple[int, int], torch.Tensor] = {}
            for shape, items in todo.items():
                ortho = newton_schulz(torch.stack([b for _, _, b in items]), coefficients=group["ns_coefficients"],
                                      steps=group["ns_steps"], eps=group["eps"])  # (n, rows / k, cols)
                ortho = ortho * max(1.0, shape[0] / shape[1]) ** 0.5
                for (p, i, _), o in zip(items, ortho):
                    out[(id(p), i)] = o
            for p in group["params"]:
                if p.grad is None:
                    continue
                o = torch.cat([out[(id(p), i)] for i in range(k)]) if k > 1 else out[(id(p), 0)]
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(o, alpha=-group["lr"])
