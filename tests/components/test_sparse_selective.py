"""attention.sparse_topk and attention.selective against loop references; the selective leak."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from physlm_graph import REGISTRY, Example
from physlm_graph.testing import build_example, causality_leak

SPARSE = REGISTRY.get("attention.sparse_topk")
SELECTIVE = REGISTRY.get("attention.selective")


def build(info, params: dict, shape, seed=0):
    m = build_example(info, Example(params, {"x": shape}), seed=seed)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1))
    return m, x


def qkv_heads(m, x):
    B, T, D = x.shape
    H = m.num_heads
    q, k, v = m.qkv(x).split(D, dim=-1)
    return (y.view(B, T, H, D // H).transpose(1, 2) for y in (q, k, v))  # (B, H, T, d)


# -- attention.sparse_topk --------------------------------------------------------------------


def sparse_reference(m, x, keep_count):
    """Loops over batch, head and query; keeps the keep_count(i) best visible keys."""
    B, T, D = x.shape
    H, d = m.num_heads, D // m.num_heads
    q, k, v = qkv_heads(m, x)
    y = torch.zeros(B, H, T, d)
    for b in range(B):
        for h in range(H):
            for i in range(T):
                s = k[b, h, : i + 1] @ q[b, h, i] / math.sqrt(d)  # (i+1,) visible scores
                best = torch.argsort(s, descending=True)[: keep_count(i)]
                a = torch.softmax(s[best], dim=0)
                y[b, h, i] = a @ v[b, h, best]
    return m.proj(y.transpose(1, 2).reshape(B, T, D))


@pytest.mark.parametrize(
    "params,keep",
    [
        ({"top_k": 3}, lambda i: min(3, i + 1)),
        ({"top_k": 1}, lambda i: 1),
        ({"top_fraction": 0.3}, lambda i: max(1, math.floor(0.3 * (i + 1)))),
        ({}, lambda i: max(1, math.floor(0.05 * (i + 1)))),  # default: 5 %
        ({"top_fraction": 1.0}, lambda i: i + 1),  # dense causal attention
    ],
)
def test_sparse_topk_matches_loop_reference(params, keep):
    m, x = build(SPARSE, {"num_heads": 2, **params}, shape=(2, 45, 16))
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(m(x), sparse_reference(m, x, keep), atol=1e-5, rtol=1e-5)


def test_sparse_topk_full_fraction_is_causal_sdpa():
    m, x = build(SPARSE, {"num_heads": 4, "top_fraction": 1.0}, shape=(2, 12, 32))
    with torch.no_grad():
        q, k, v = qkv_heads(m, x)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(x.shape)
        torch.testing.assert_close(m(x), m.proj(y), atol=1e-5, rtol=1e-5)


def test_sparse_topk_budget_validation():
    P = SPARSE.params
    assert P.model_validate({"num_heads": 2, "top_k": 4}).top_k == 4
    assert P.model_validate({"num_heads": 2, "top_k": 4, "top_fraction": None}).top_k == 4
    with pytest.raises(ValidationError, match="exactly one"):
        P.model_validate({"num_heads": 2, "top_k": 4, "top_fraction": 0.1})
    with pytest.raises(ValidationError, match="set one"):
        P.model_validate({"num_heads": 2, "top_fraction": None})
    m, _ = build(SPARSE, {"num_heads": 2, "top_k": 4}, shape=(1, 8, 16))
    assert m.top_fraction is None


# -- attention.selective ----------------------------------------------------------------------


def selective_faithful_reference(m, u):
    """Per sample: global top-n by importance, unmasked attention among them, scatter back."""
    B, T, D = u.shape
    H, d = m.num_heads, D // m.num_heads
    n = max(1, math.floor(m.select_fraction * T))
    s = m.importance(u)
    out = torch.zeros_like(u)
    for b in range(B):
        idx = torch.argsort(s[b], descending=True)[:n]
        q, k, v = (y[0] for y in qkv_heads(m, u[b : b + 1, idx]))  # (H, n, d)
        a = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(d), dim=-1)  # (H, n, n): no mask
        out[b, idx] = m.proj((a @ v).transpose(0, 1).reshape(n, D))
    return u + m.residual_weight * out


def selective_fixed_reference(m, u):
    """Per sample and query: a selected token attends to the selected tokens at or before it."""
    B, T, D = u.shape
    H, d = m.num_heads, D // m.num_heads
    s = m.importance(u)
    q, k, v = qkv_heads(m, u)
    out = torch.zeros_like(u)
    for b in range(B):
        for i in range(T):
            if s[b, i] <= m.threshold:
                continue
            keys = [j for j in range(i + 1) if s[b, j] > m.threshold]
            a = torch.softmax(q[b, :, i : i + 1] @ k[b, :, keys].transpose(1, 2) / math.sqrt(d), dim=-1)
            o = m.proj((a @ v[b, :, keys]).reshape(D))
            out[b, i] = m.residual_weight * s[b, i] * o
    return out


@pytest.mark.parametrize("fraction,T", [(0.1, 16), (0.1, 40), (0.5, 12), (1.0, 8)])
def test_selective_faithful_matches_reference(fraction, T):
    m, u = build(SELECTIVE, {"num_heads": 2, "select_fraction": fraction, "mode": "faithful"}, shape=(2, T, 16))
    with torch.no_grad():
        m.residual_weight.fill_(0.7)
        torch.testing.assert_close(m(u), selective_faithful_reference(m, u), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("threshold", [0.5, 0.7, 0.75])
def test_selective_fixed_matches_reference(threshold):
    m, u = build(SELECTIVE, {"num_heads": 4, "threshold": threshold}, shape=(2, 14, 32))
    with torch.no_grad():
        m.score_out.bias.fill_(math.log(threshold / (1 - threshold)))  # about half selected
        sel = m.importance(u) > threshold
        assert 0 < int(sel.sum()) < sel.numel()  # a real mixture of selected and not
        torch.testing.assert_close(m(u), selective_fixed_reference(m, u), atol=1e-5, rtol=1e-5)


def test_selective_fixed_starts_with_most_tokens_selected():
    m, u = build(SELECTIVE, {"num_heads": 4}, shape=(2, 32, 32))
    with torch.no_grad():
        assert float((m.importance(u) > 0.5).float().mean()) > 0.8


def test_selective_probe_catches_faithful_leak_and_passes_fixed():
    for params, leaks in (({"mode": "faithful", "select_fraction": 0.5}, True), ({}, False)):
        ex = Example({"num_heads": 2, **params}, {"x": (2, 16, 16)})
        m = build_example(SELECTIVE, ex)
        m.eval()
        leak = causality_leak(m, ex)
        assert (leak > 1e-5) == leaks, (params, leak)
        assert SELECTIVE.is_causal(SELECTIVE.params.model_validate(ex.params)) != leaks


def test_selective_scorer_gradient_only_in_fixed():
    for mode, expect in (("faithful", False), ("fixed", True)):
        m, u = build(SELECTIVE, {"num_heads": 2, "mode": mode}, shape=(2, 16, 16))
        m(u).square().sum().backward()
        g = m.score_fc.weight.grad
        assert (g is not None and bool(g.abs().sum() > 0)) == expect, mode


def test_selective_mode_knobs_are_checked():
    P = SELECTIVE.params
    with pytest.raises(ValidationError, match="select_fraction"):
        P.model_validate({"num_heads": 2, "select_fraction": 0.2})
    with pytest.raises(ValidationError, match="threshold"):
        P.model_validate({"num_heads": 2, "mode": "faithful", "threshold": 0.3})
