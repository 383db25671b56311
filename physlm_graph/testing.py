"""Helpers for testing components: build one from an ``Example``, probe causality.

The shared conformance suite (``tests/components/test_conformance.py``) runs these over every
registered component; component authors use them in their own tests too.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from physlm_graph._registry import REGISTRY, ComponentInfo, Example, TensorSpec

__all__ = [
    "example_specs",
    "build_example",
    "make_inputs",
    "run_component",
    "as_outputs",
    "causality_leak",
    "params_without_grad",
]


def _shape_dtype(v: Any) -> tuple[tuple[int, ...], torch.dtype]:
    if isinstance(v, torch.Tensor):
        return tuple(v.shape), v.dtype
    if isinstance(v, tuple) and len(v) == 2 and isinstance(v[1], torch.dtype):
        return tuple(v[0]), v[1]
    return tuple(v), torch.float32


def example_specs(ex: Example) -> dict[str, TensorSpec]:
    specs = {}
    for port, v in ex.inputs.items():
        shape, dtype = _shape_dtype(v)
        syms: list[str | None] = [None] * len(shape)
        if len(shape) >= 1:
            syms[0] = "batch"
        if len(shape) >= 2 and ex.seq_dim < len(shape):
            syms[ex.seq_dim] = "seq"
        specs[port] = TensorSpec(shape=shape, dtype=dtype, symbols=tuple(syms))
    return specs


def build_example(
    info: ComponentInfo | str, ex: Example, device: str | torch.device = "cpu", seed: int = 0
) -> nn.Module:
    """Validate ``ex.params`` with the component's model and call its builder on ``device``."""
    if isinstance(info, str):
        got = REGISTRY.get(info)
        assert got is not None, f"unknown component {info}"
        info = got
    params = info.params.model_validate(ex.params)
    assert info.builder is not None, f"{info.name} is a plain function, not a module"
    torch.manual_seed(seed)
    with torch.device(device):
        return info.builder(params, example_specs(ex))


def make_inputs(ex: Example, seed: int = 0, device: str = "cpu") -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for v in ex.inputs.values():
        shape, dtype = _shape_dtype(v)
        if isinstance(v, torch.Tensor):  # a fixed input (a rope table: its partner row must be a permutation)
            t = v.clone()
        elif dtype.is_floating_point:
            t = torch.randn(shape, generator=g, dtype=dtype)
        elif dtype == torch.bool:
            t = torch.ones(shape, dtype=torch.bool)
        else:
            t = torch.randint(0, ex.int_high, shape, generator=g, dtype=dtype)
        out.append(t.to(device))
    return out


def as_outputs(result: Any) -> list[torch.Tensor]:
    """A component returns one tensor or a tuple (one per output port)."""
    if isinstance(result, torch.Tensor):
        return [result]
    return [r for r in result]


def run_component(module: nn.Module, inputs: Sequence[torch.Tensor], seed: int = 0) -> list[torch.Tensor]:
    """Run ``module`` with the RNG frozen (so random sampling is the same in every run)."""
    torch.manual_seed(seed)
    return as_outputs(module(*inputs))


def causality_leak(module: nn.Module, ex: Example, t: int | None = None, seed: int = 0) -> float:
    """Largest change at positions <= t of any per-token output when inputs after t change.

    Zero (to ``ex.atol``) means causal. Every input with a sequence axis is perturbed after t.
    """
    inputs = make_inputs(ex, seed=seed)
    sd = ex.seq_dim
    seq_len = next(x.shape[sd] for x in inputs if x.ndim > sd)
    t = seq_len // 2 if t is None else t
    changed = []
    g = torch.Generator().manual_seed(seed + 1)
    for x in inputs:
        y = x.clone()
        if x.ndim > sd and x.shape[sd] == seq_len:
            idx = [slice(None)] * x.ndim
            idx[sd] = slice(t + 1, None)
            tail = y[tuple(idx)]
            if x.dtype.is_floating_point:
                y[tuple(idx)] = torch.randn(tail.shape, generator=g, dtype=x.dtype) * 3.0
            elif x.dtype != torch.bool:
                y[tuple(idx)] = torch.randint(0, ex.int_high, tail.shape, generator=g, dtype=x.dtype)
        changed.append(y)
    with torch.no_grad():
        a = run_component(module, inputs, seed=seed)
        b = run_component(module, changed, seed=seed)
    worst = 0.0
    for oa, ob in zip(a, b):
        if oa.ndim > sd and oa.shape[sd] == seq_len:
            idx = [slice(None)] * oa.ndim
            idx[sd] = slice(0, t + 1)
            d = (oa[tuple(idx)].float() - ob[tuple(idx)].float()).abs().max().item()
            worst = max(worst, d)
    return worst


def params_without_grad(module: nn.Module, ex: Example, seed: int = 0) -> list[str]:
    """Trainable parameters that get no (or an all-zero) gradient from the sum of all outputs,
    less those the example declares in ``no_grad``."""
    module.train()
    inputs = make_inputs(ex, seed=seed)
    for x in inputs:
        if x.dtype.is_floating_point:
            x.requires_grad_(True)
    outs = run_component(module, inputs, seed=seed)
    total = sum((o.float() * torch.linspace(0.5, 1.5, o.numel()).view(o.shape)).sum() for o in outs if o.dtype.is_floating_point)
    module.zero_grad(set_to_none=True)
    if not isinstance(total, torch.Tensor) or not total.requires_grad:
        # nothing differentiable came out (e.g. a table computed from integer tokens)
        return [n for n, p in module.named_parameters()
                if p.requires_grad and not any(fnmatch.fnmatch(n, g) for g in ex.no_grad)]
    total.backward()
    missing = []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        if any(fnmatch.fnmatch(name, pat) for pat in ex.no_grad):
            continue
        if p.grad is None or not torch.any(p.grad != 0):
            missing.append(name)
    return missing
