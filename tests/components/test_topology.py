"""topology.processor: faithful against a loop reference with the RNG frozen; fixed k-NN selection."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from physlm_graph import REGISTRY, Example
from physlm_graph.testing import build_example, causality_leak


def _build(params: dict, shape):
    return build_example("topology.processor", Example({"dropout": 0.0, **params}, {"x": shape})).eval()


def _faithful_reference(mod, u, seed):
    b, t, d = u.shape
    n_s = min(64, max(16, math.floor(mod.sampling_rate * t)))
    torch.manual_seed(seed)
    idx = torch.randperm(t)[:n_s] if t > n_s else torch.arange(t)
    out = torch.empty_like(u)
    for i in range(b):
        s = u[i, idx]  # (n_s, D)
        f = torch.relu(mod.encoder.weight @ s.mean(0) + mod.encoder.bias)
        un = s / s.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        g = un @ un.T
        dens = g.mean().reshape(1)
        conn = (g > 0.5).float().mean().reshape(1)
        clus = (g**2).mean().reshape(1)
        stats = [mod.density(dens), mod.connectivity(conn), mod.clustering(clus)]
        v = mod.integration(torch.cat([f, *stats]))
        for j in range(t):
            out[i, j] = u[i, j] + mod.residual_weight * v
    return out


@pytest.mark.parametrize("shape,rate", [((2, 40, 8), 0.5), ((3, 12, 8), 0.05), ((2, 600, 8), 0.2)])
def test_faithful_matches_loop_reference(shape, rate):
    params = {"mode": "faithful"} if rate == 0.05 else {"mode": "faithful", "sampling_rate": rate}
    mod = _build(params, shape)
    u = torch.randn(shape)
    torch.manual_seed(3)
    got = mod(u)
    torch.testing.assert_close(got, _faithful_reference(mod, u, seed=3), atol=1e-5, rtol=1e-5)


def test_faithful_leaks_and_is_nondeterministic():
    ex = Example({"mode": "faithful", "dropout": 0.0}, {"x": (2, 8, 16)})
    mod = build_example("topology.processor", ex).eval()
    assert causality_leak(mod, ex, t=0) > 1e-3  # position 0 sees the future
    u = torch.randn(1, 100, 16)
    assert not torch.allclose(mod(u), mod(u))  # a new sample every call, eval included


@torch.no_grad()
def _knn_reference(mod, u):
    """Per (b, i): score earlier-or-equal j, keep the k best, softmax-weight their u_j."""
    b, t, d = u.shape
    z = F.normalize(mod.proj(u), dim=-1)
    lam = F.softplus(mod.decay)
    agg = torch.zeros_like(u)
    chosen = {}
    for bi in range(b):
        for i in range(t):
            scores = [(float(z[bi, i] @ z[bi, j] - lam * math.log1p(i - j)), j) for j in range(i + 1)]
            top = sorted(scores, reverse=True)[: mod.k_neighbors]
            chosen[bi, i] = {j for _, j in top}
            w = torch.tensor([s for s, _ in top]).softmax(0)
            agg[bi, i] = sum(wk * u[bi, j] for wk, (_, j) in zip(w, top))
    return u + mod.residual_weight * mod.out_proj(agg), chosen


@pytest.mark.parametrize("k", [1, 3, 4])
def test_fixed_knn_matches_loop_reference(k):
    mod = _build({"k_neighbors": k}, (2, 10, 8))
    with torch.no_grad():
        mod.decay.fill_(0.3)
    u = torch.randn(2, 10, 8)
    want, chosen = _knn_reference(mod, u)
    torch.testing.assert_close(mod(u), want, atol=1e-5, rtol=1e-5)
    # the neighbours picked by topk are the reference's, and never in the future
    z = F.normalize(mod.proj(u), dim=-1)
    pos = torch.arange(10)
    dist = pos[:, None] - pos[None, :]
    s = (z @ z.transpose(1, 2) - F.softplus(mod.decay) * torch.log1p(dist.clamp(min=0).float()))
    idx = s.masked_fill(dist < 0, float("-inf")).topk(min(k, 10), dim=-1).indices
    for (bi, i), ref in chosen.items():
        got = {int(j) for j in idx[bi, i] if int(j) <= i}
        assert got == ref


def test_fixed_is_causal():
    ex = Example({"k_neighbors": 4, "dropout": 0.0}, {"x": (2, 16, 8)})
    mod = build_example("topology.processor", ex).eval()
    for t in (0, 3, 9):
        assert causality_leak(mod, ex, t=t) <= 1e-6


def test_mode_owns_its_knobs():
    params = REGISTRY.get("topology.processor").params
    with pytest.raises(ValidationError, match="k_neighbors=8 has no effect in faithful mode"):
        params.model_validate({"mode": "faithful", "k_neighbors": 8})
    with pytest.raises(ValidationError, match="sampling_rate=0.1 has no effect in fixed mode"):
        params.model_validate({"sampling_rate": 0.1})
    params.model_validate({"mode": "faithful", "k_neighbors": 4, "sampling_rate": 0.1})
