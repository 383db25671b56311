"""layer.pre_manifest: against the published formula written out in plain loops."""

from __future__ import annotations

import math

import pytest
import torch

from physlm_graph import Example
from physlm_graph.testing import build_example


def _reference(m, h, prime):
    D = h.shape[-1]
    f = torch.tensor([0.5 + 0.5 * math.cos(2 * math.pi * (i % prime) / prime) for i in range(D)])
    down = h @ m.down.weight.T + m.down.bias
    gelu = 0.5 * down * (1 + torch.erf(down / math.sqrt(2)))
    u = (gelu @ m.up.weight.T + m.up.bias) * f
    g = 1 / (1 + torch.exp(-(h @ m.gate.weight.T + m.gate.bias)))
    y = (1 - g) * h + g * u
    mu = y.mean(-1, keepdim=True)
    var = ((y - mu) ** 2).mean(-1, keepdim=True)
    return (y - mu) / torch.sqrt(var + 1e-5)


@pytest.mark.parametrize("params,D", [({}, 16), ({"prime": 5, "base_dim": 8}, 24), ({"prime": 7}, 256)])
def test_matches_reference(params, D):
    torch.manual_seed(0)
    m = build_example("layer.pre_manifest", Example(params, {"x": (2, 5, D)}))
    h = torch.randn(2, 5, D)
    with torch.no_grad():
        torch.testing.assert_close(m(h), _reference(m, h, params.get("prime", 16)), atol=1e-5, rtol=1e-5)


def test_defaults_follow_head():
    m = build_example("layer.pre_manifest", Example({}, {"x": (1, 2, 768)}))
    assert m.down.out_features == 192  # max(32, 768 // 4)
    m = build_example("layer.pre_manifest", Example({}, {"x": (1, 2, 64)}))
    assert m.down.out_features == 32
    f = m.factors
    assert f[0] == 1.0 and f[16] == 1.0 and abs(f[8].item()) < 1e-7  # period 16, zero at p/2


def test_no_affine_norm_and_buffer_not_parameter():
    m = build_example("layer.pre_manifest", Example({}, {"x": (1, 2, 32)}))
    names = {n for n, _ in m.named_parameters()}
    assert names == {"down.weight", "down.bias", "up.weight", "up.bias", "gate.weight", "gate.bias"}
    assert "factors" in dict(m.named_buffers())
