"""The shared conformance suite: every registered component, every example.

For each: it builds on the meta device with the same output shapes as a real build; it runs
inside an fx GraphModule; gradients reach every parameter that should learn; and the causality
probe (change inputs after position t, compare outputs at <= t) agrees with what the component
declares: a component declared causal must pass it, one declared leaking must be caught by it.
"""

from __future__ import annotations

import pytest
import torch
from torch import fx

from physlm_graph import REGISTRY
from physlm_graph.testing import (
    as_outputs,
    build_example,
    causality_leak,
    make_inputs,
    params_without_grad,
    run_component,
)

CASES = [
    pytest.param(info, i, id=f"{info.name}[{i}]")
    for info in REGISTRY
    if info.builder is not None
    for i in range(len(info.examples))
]


def test_every_module_component_has_an_example():
    missing = [info.name for info in REGISTRY if info.builder is not None and not info.examples]
    assert missing == []


@pytest.mark.parametrize("info,i", CASES)
def test_meta_build_matches_real_shapes(info, i):
    ex = info.examples[i]
    meta = build_example(info, ex, device="meta")
    assert all(p.is_meta for p in meta.parameters())
    meta_in = [x.to("meta") for x in make_inputs(ex)]
    meta_out = as_outputs(meta(*meta_in))
    real = build_example(info, ex)
    real.eval()
    real_out = run_component(real, make_inputs(ex))
    assert [tuple(o.shape) for o in meta_out] == [tuple(o.shape) for o in real_out]
    assert len(real_out) == len(info.outputs)


@pytest.mark.parametrize("info,i", CASES)
def test_runs_inside_fx(info, i):
    ex = info.examples[i]
    mod = build_example(info, ex)
    mod.eval()
    g = fx.Graph()
    args = [g.placeholder(p) for p in ex.inputs]
    node = g.call_module("c", tuple(args))
    g.output(node)
    root = torch.nn.Module()
    root.c = mod
    gm = fx.GraphModule(root, g)
    inputs = make_inputs(ex)
    want = run_component(mod, inputs)
    got = run_component(gm, inputs)
    for a, b in zip(want, got):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("info,i", CASES)
def test_gradients_reach_parameters(info, i):
    ex = info.examples[i]
    mod = build_example(info, ex)
    assert params_without_grad(mod, ex) == []


@pytest.mark.parametrize("info,i", CASES)
def test_causality_matches_declaration(info, i):
    ex = info.examples[i]
    mod = build_example(info, ex)
    mod.train(ex.probe_training)
    params = info.params.model_validate(ex.params)
    leak = causality_leak(mod, ex)
    if info.is_causal(params):
        assert leak <= ex.atol, f"{info.name} is declared causal but outputs at <= t moved by {leak}"
    else:
        assert leak > ex.atol, f"{info.name} is declared leaking but the probe saw no leak"
