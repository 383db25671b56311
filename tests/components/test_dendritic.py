"""attention.dendritic: both modes against plain per-group references; the n_dendrites check."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from physlm_graph import REGISTRY, Example
from physlm_graph._errors import ComponentError
from physlm_graph.testing import build_example

INFO = REGISTRY.get("attention.dendritic")


def build(params: dict, shape=(2, 10, 32), seed=0):
    m = build_example(INFO, Example(params, {"x": shape}), seed=seed)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1))
    return m, x


def group_attention(m, x, g):
    """Dendrite g's causal attention, one head at a time, with a materialised softmax."""
    B, T, D = x.shape
    hpg, d = m.num_heads // m.groups, m.head_dim
    w = m.qkv_weight[g]  # (3 hpg d, D), split as [q | k | v]
    q, k, v = (x @ w[i * hpg * d : (i + 1) * hpg * d].T for i in range(3))  # (B, T, hpg d)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    heads = []
    for h in range(hpg):
        sl = slice(h * d, (h + 1) * d)
        s = q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(d)  # (B, T, T)
        a = torch.softmax(s.masked_fill(~causal, float("-inf")), dim=-1)
        heads.append(a @ v[..., sl])
    return torch.cat(heads, dim=-1)  # (B, T, hpg d)


def gate(m, x):
    return torch.sigmoid(m.gate_out(F.gelu(m.gate_fc(x))))


def faithful_reference(m, x):
    mask = (gate(m, x) > m.threshold).float()  # (B, T, 1)
    outs = [group_attention(m, mask * x, g) for g in range(m.groups)]
    return m.soma(torch.cat(outs, dim=-1)) * mask


def fixed_reference(m, x):
    w = torch.clamp(gate(m, x) - m.threshold, min=0) / (1 - m.threshold)  # (B, T, G)
    outs = [w[..., g : g + 1] * group_attention(m, x, g) for g in range(m.groups)]
    return m.soma(torch.cat(outs, dim=-1))


@pytest.mark.parametrize("heads,dendrites", [(4, 2), (4, 8), (8, 4), (2, 1)])
def test_faithful_matches_reference(heads, dendrites):
    m, x = build({"num_heads": heads, "n_dendrites": dendrites, "mode": "faithful"})
    # a threshold at the median gate value, so that about half the tokens are masked
    with torch.no_grad():
        thr = float(gate(m, x).median())
        m.threshold = thr
        mask = gate(m, x) > thr
        assert 0 < int(mask.sum()) < mask.numel()
        torch.testing.assert_close(m(x), faithful_reference(m, x), atol=1e-5, rtol=1e-5)


def test_faithful_default_threshold_is_standard_attention():
    m, x = build({"num_heads": 4, "n_dendrites": 2, "mode": "faithful"})
    with torch.no_grad():
        assert bool((gate(m, x) > 0.3).all())  # M = 1 at init, as measured in SEEDS.md
        torch.testing.assert_close(m(x), faithful_reference(m, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("heads,dendrites,thr", [(4, 2, 0.3), (4, 8, 0.5), (8, 4, 0.45)])
def test_fixed_matches_reference(heads, dendrites, thr):
    m, x = build({"num_heads": heads, "n_dendrites": dendrites, "dendrite_threshold": thr})
    with torch.no_grad():
        torch.testing.assert_close(m(x), fixed_reference(m, x), atol=1e-5, rtol=1e-5)


def test_faithful_gate_gets_no_gradient_fixed_gate_does():
    for mode, expect in (("faithful", False), ("fixed", True)):
        m, x = build({"num_heads": 4, "n_dendrites": 2, "mode": mode})
        m(x).square().sum().backward()
        got = m.gate_fc.weight.grad is not None and bool(m.gate_fc.weight.grad.abs().sum() > 0)
        assert got == expect, mode


def test_groups_capped_at_num_heads():
    m, _ = build({"num_heads": 4, "n_dendrites": 8})
    assert m.groups == 4
    assert m.qkv_weight.shape == (4, 3 * 8, 32)


def test_n_dendrites_must_divide_num_heads():
    with pytest.raises(ComponentError) as err:
        build({"num_heads": 6, "n_dendrites": 4}, shape=(2, 8, 24))
    assert err.value.param == "n_dendrites"
    assert "1, 2, 3, 6" in err.value.fix


def test_num_heads_must_divide_width():
    with pytest.raises(ComponentError) as err:
        build({"num_heads": 5})
    assert err.value.param == "num_heads"
