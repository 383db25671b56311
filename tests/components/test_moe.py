"""moe.category and moe.topk against plain per-token loop references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from physlm_graph import REGISTRY, Example
from physlm_graph.testing import build_example, causality_leak


def _expert(mod, e: int, x: torch.Tensor) -> torch.Tensor:
    ex = mod.experts
    return F.gelu(x @ ex.w1[e] + ex.b1[e]) @ ex.w2[e] + ex.b2[e]


def _category(params: dict, shape=(2, 7, 8)):
    ex = Example({"hidden_dim": 16, "dropout": 0.0, **params}, {"x": shape})
    return build_example("moe.category", ex)


def _category_reference(mod, x, topo, weighted: bool):
    b, t, d = x.shape
    out = torch.zeros_like(x)
    for i in range(b):
        for j in range(t):
            logits = mod.router.weight @ x[i, j] + mod.router.bias
            probs = logits.softmax(-1)
            e = int(probs.argmax())
            y = _expert(mod, e, x[i, j] + mod.expert_embed_scale * mod.game_embed[e])
            out[i, j] = (probs[e] * y if weighted else y) + 0.1 * topo[i, j]
    return out


def test_category_faithful_matches_loop_reference():
    mod = _category({"mode": "faithful", "expert_embed_scale": 0.7}).eval()
    x, topo = torch.randn(2, 7, 8), torch.randn(2, 7, 8)
    out, balance, z = mod(x, topo)
    torch.testing.assert_close(out, _category_reference(mod, x, topo, weighted=False), atol=1e-5, rtol=1e-5)
    assert float(z) == 0.0
    assert float(balance) < 1e-10  # buffers start at ones: a balanced share (up to the 1e-6 guard)


def test_category_faithful_ema_buffers_and_constant_balance():
    mod = _category({"mode": "faithful", "num_experts": 4}).train()
    x = torch.randn(3, 5, 8)
    c = torch.ones(4)
    for _ in range(3):
        with torch.no_grad():
            expert = mod.router(x.reshape(-1, 8)).argmax(-1)
        n = torch.stack([(expert == e).sum() for e in range(4)]).float()
        c = 0.9 * c + 0.1 * n
        out, balance, _ = mod(x)
    torch.testing.assert_close(mod.expert_counts, c)
    share = c / (c.sum() + 1e-6)
    torch.testing.assert_close(balance, ((share - 0.25) ** 2).mean())
    # the balance loss is a constant: no parameter depends on it, the router learns nothing
    assert not balance.requires_grad
    out.sum().backward()
    assert mod.router.weight.grad is None and mod.router.bias.grad is None
    # every 100th call renormalises the counts to sum E
    mod.calls.fill_(99)
    mod(x)
    assert int(mod.calls) == 100
    assert abs(float(mod.expert_counts.sum()) - 4.0) < 1e-4
    # eval leaves the buffers alone
    before = mod.expert_counts.clone()
    mod.eval()(x)
    torch.testing.assert_close(mod.expert_counts, before)


def test_category_fixed_weights_by_probability_and_router_learns():
    mod = _category({"mode": "fixed", "num_experts": 3}).eval()
    x = torch.randn(2, 7, 8)
    out, balance, z = mod(x, None)
    torch.testing.assert_close(out, _category_reference(mod, x, torch.zeros_like(x), weighted=True), atol=1e-5, rtol=1e-5)
    logits = x.reshape(-1, 8) @ mod.router.weight.T + mod.router.bias
    probs = logits.softmax(-1)
    f = torch.stack([(probs.argmax(-1) == e).float().mean() for e in range(3)])
    torch.testing.assert_close(balance, 3 * (f * probs.mean(0)).sum())
    torch.testing.assert_close(z, (torch.logsumexp(logits, -1) ** 2).mean())
    (out.sum() + balance + z).backward()
    assert mod.router.weight.grad is not None and mod.router.weight.grad.abs().sum() > 0


def test_category_router_jitter_only_on_router_input_in_fixed_training():
    eps = 0.3
    mod = _category({"mode": "fixed", "router_jitter": eps}).train()  # dropout 0: training is deterministic but for jitter
    x = torch.randn(2, 7, 8)
    torch.manual_seed(5)
    out, balance, z = mod(x)
    torch.manual_seed(5)
    noise = torch.empty(14, 8).uniform_(1.0 - eps, 1.0 + eps)  # (N, D), the same draw as the module's
    xf = x.reshape(-1, 8)
    logits = (xf * noise) @ mod.router.weight.T + mod.router.bias
    probs = logits.softmax(-1)
    p, e = probs.max(-1)
    ref = torch.stack([p[n] * _expert(mod, int(e[n]), xf[n] + mod.expert_embed_scale * mod.game_embed[e[n]]) for n in range(14)])
    torch.testing.assert_close(out, ref.view(2, 7, 8), atol=1e-5, rtol=1e-5)  # experts see the clean input
    torch.testing.assert_close(z, (torch.logsumexp(logits, -1) ** 2).mean())
    f = torch.stack([(e == i).float().mean() for i in range(3)])
    torch.testing.assert_close(balance, 3 * (f * probs.mean(0)).sum())
    # eval: no jitter
    out_eval, _, _ = mod.eval()(x)
    torch.testing.assert_close(out_eval, _category_reference(mod, x, torch.zeros_like(x), weighted=True), atol=1e-5, rtol=1e-5)
    # jitter 0 in training is the plain router
    mod0 = _category({"mode": "fixed", "router_jitter": 0.0}).train()
    torch.testing.assert_close(mod0(x)[0], _category_reference(mod0, x, torch.zeros_like(x), weighted=True), atol=1e-5, rtol=1e-5)


def test_category_router_jitter_ignored_in_faithful_and_validated():
    mod = _category({"mode": "faithful", "router_jitter": 0.5}).train()
    x, topo = torch.randn(2, 7, 8), torch.randn(2, 7, 8)
    out, _, _ = mod(x, topo)
    torch.testing.assert_close(out, _category_reference(mod, x, topo, weighted=False), atol=1e-5, rtol=1e-5)
    params = REGISTRY.get("moe.category").params
    assert params.model_validate({}).router_jitter == 1e-2  # Switch Transformer's default
    for bad in (-0.1, 1.0):
        with pytest.raises(ValidationError, match="router_jitter"):
            params.model_validate({"router_jitter": bad})


def _topk(params: dict, shape=(2, 9, 8)):
    ex = Example({"num_experts": 4, "top_k": 2, "hidden_dim": 16, **params}, {"x": shape})
    return build_example("moe.topk", ex)


def _topk_reference(mod, x, capacity=None):
    """Loop reference: assignments claim capacity in order of position, batch row, rank."""
    b, t, d = x.shape
    out = torch.zeros_like(x)
    load = [0] * mod.num_experts
    for j in range(t):
        for i in range(b):
            probs = (mod.router.weight @ x[i, j]).softmax(-1)
            w, e = probs.topk(mod.top_k)
            if mod.normalize_weights:
                w = w / w.sum()
            for r in range(mod.top_k):
                ei = int(e[r])
                load[ei] += 1
                if capacity is not None and load[ei] > capacity:
                    continue  # dropped
                out[i, j] += w[r] * _expert(mod, ei, x[i, j])
    return out


@pytest.mark.parametrize("normalize", [True, False])
def test_topk_dropless_matches_loop_reference(normalize):
    mod = _topk({"normalize_weights": normalize}).eval()
    x = torch.randn(2, 9, 8)
    out, balance, z = mod(x)
    torch.testing.assert_close(out, _topk_reference(mod, x), atol=1e-5, rtol=1e-5)
    logits = x.reshape(-1, 8) @ mod.router.weight.T
    probs = logits.softmax(-1)
    top = probs.topk(2, -1).indices.reshape(-1)
    f = torch.stack([(top == e).float().mean() for e in range(4)])
    torch.testing.assert_close(balance, 4 * (f * probs.mean(0)).sum())
    torch.testing.assert_close(z, (torch.logsumexp(logits, -1) ** 2).mean())


@pytest.mark.parametrize("cf", [0.5, 1.0, 1.25])
def test_topk_capacity_matches_loop_reference(cf):
    mod = _topk({"capacity_factor": cf}).eval()
    # skew the router so some experts overflow
    with torch.no_grad():
        mod.router.weight[0] += 1.0
    x = torch.randn(2, 9, 8)
    cap = math.ceil(cf * 2 * 9 * 2 / 4)
    assert mod.capacity(18) == cap
    out, _, _ = mod(x)
    torch.testing.assert_close(out, _topk_reference(mod, x, capacity=cap), atol=1e-5, rtol=1e-5)


def test_topk_capacity_drops_are_causal():
    info = REGISTRY.get("moe.topk")
    ex = Example({"num_experts": 4, "top_k": 2, "hidden_dim": 16, "capacity_factor": 0.5}, {"x": (3, 16, 8)})
    mod = build_example(info, ex).eval()
    for t in (0, 5, 11):
        assert causality_leak(mod, ex, t=t) <= 1e-6


def test_topk_meta_forward_and_k_check():
    ex = Example({"num_experts": 4, "top_k": 2, "hidden_dim": 16}, {"x": (2, 5, 8)})
    mod = build_example("moe.topk", ex, device="meta")
    out, balance, z = mod(torch.empty(2, 5, 8, device="meta"))
    assert out.shape == (2, 5, 8) and balance.shape == () and z.shape == ()
    with pytest.raises(ValidationError, match="top_k"):
        REGISTRY.get("moe.topk").params.model_validate({"num_experts": 2, "top_k": 3, "hidden_dim": 4})


def test_stacked_experts_train_mode_gradients_match_loop():
    mod = _topk({}).train()
    x = torch.randn(2, 9, 8, requires_grad=True)
    out, _, _ = mod(x)
    out.square().sum().backward()
    got = mod.experts.w1.grad.clone(), x.grad.clone()
    mod.zero_grad()
    x.grad = None
    _topk_reference(mod, x).square().sum().backward()
    torch.testing.assert_close(got[0], mod.experts.w1.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got[1], x.grad, atol=1e-5, rtol=1e-4)


def test_topk_one_expert_weights_by_router_probability_and_router_learns():
    """top_k 1: the weight is the router probability (not renormalised to 1), so the router gets a
    gradient from the output; asking to renormalise it is refused with the fix."""
    params = REGISTRY.get("moe.topk").params
    assert params.model_validate({"num_experts": 4, "top_k": 1, "hidden_dim": 16}).normalize is False
    assert params.model_validate({"num_experts": 4, "top_k": 2, "hidden_dim": 16}).normalize is True
    with pytest.raises(ValidationError, match="normalize_weights: true with top_k: 1 makes every expert weight 1"):
        params.model_validate({"num_experts": 4, "top_k": 1, "hidden_dim": 16, "normalize_weights": True})
    mod = _topk({"top_k": 1})
    assert mod.normalize_weights is False
    out, _, _ = mod(torch.randn(2, 9, 8))
    out.square().sum().backward()  # the main loss only: no balance or z-loss
    assert mod.router.weight.grad is not None and mod.router.weight.grad.abs().sum() > 0
