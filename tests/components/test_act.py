"""adaptive.act: halting math against per-token loop references, causality, the faithful leak."""

from __future__ import annotations

import pytest
import torch

from physlm_graph import Example
from physlm_graph.testing import build_example


def _act(mode, D=16, **params):
    ex = Example({"mode": mode, "hidden_dim": 32, **params}, {"x": (2, 7, D)})
    return build_example("adaptive.act", ex)


def _states(m, x):
    """States x_1..x_S and halting probabilities p_1..p_S for every token (block is per-token)."""
    xs, ps = [], []
    for _ in range(m.max_steps):
        x = m.block(x)
        xs.append(x)
        ps.append(torch.sigmoid(m.halt(x))[..., 0])
    return xs, ps


def _graves_reference(m, x):
    xs, ps = _states(m, x)
    Bsz, T, _ = x.shape
    out = torch.zeros_like(x)
    ponder = []
    for b in range(Bsz):
        for t in range(T):
            cum = 0.0
            for n in range(m.max_steps):
                p = ps[n][b, t].item()
                if n == m.max_steps - 1 or cum + p >= m.threshold:
                    R = 1.0 - cum
                    out[b, t] += R * xs[n][b, t]
                    ponder.append(n + 1 + R)
                    break
                out[b, t] += p * xs[n][b, t]
                cum += p
    return out, torch.tensor(ponder).mean()


def _published_reference(m, x):
    xs, ps = _states(m, x)
    Bsz, T, _ = x.shape
    out = torch.zeros_like(x)
    H = torch.zeros(Bsz, T)
    R = torch.ones(Bsz, T)
    N = torch.zeros(Bsz, T)
    stop = m.max_steps - 1
    for n in range(m.max_steps):
        for b in range(Bsz):
            for t in range(T):
                if H[b, t] < m.threshold:
                    d = min(R[b, t].item(), ps[n][b, t].item())
                    H[b, t] += d
                    R[b, t] -= d
                    N[b, t] += 1
                    out[b, t] += d * xs[n][b, t]
        if (H >= m.threshold).all():
            stop = n
            break
    return out + R[..., None] * xs[stop], N.mean()


@pytest.mark.parametrize("params", [{}, {"threshold": 0.8, "max_steps": 3}, {"max_steps": 6}, {"max_steps": 1}])
def test_fixed_matches_graves_loop(params):
    torch.manual_seed(0)
    m = _act("fixed", **params)
    with torch.no_grad():  # spread the halting probabilities over (0, 1)
        m.halt[2].weight.mul_(8.0)
    x = torch.randn(2, 7, 16)
    for training in (True, False):
        m.train(training)
        with torch.no_grad():
            out, ponder = m(x)
            want, want_ponder = _graves_reference(m, x)
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ponder, want_ponder, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("params", [{}, {"threshold": 0.5}, {"threshold": 0.7, "max_steps": 6}])
def test_faithful_eval_matches_published_loop(params):
    torch.manual_seed(1)
    m = _act("faithful", **params).eval()
    with torch.no_grad():
        m.halt[2].weight.mul_(8.0)
    x = torch.randn(2, 7, 16)
    with torch.no_grad():
        out, ponder = m(x)
        want, want_ponder = _published_reference(m, x)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ponder, want_ponder, atol=1e-6, rtol=1e-6)


def test_faithful_training_is_one_application():
    torch.manual_seed(0)
    m = _act("faithful").train()
    x = torch.randn(2, 7, 16)
    out, ponder = m(x)
    torch.testing.assert_close(out, m.block(x))
    assert ponder.item() == 1.0


def test_fixed_ponder_has_gradient_into_halting():
    torch.manual_seed(0)
    m = _act("fixed").train()
    _, ponder = m(torch.randn(2, 7, 16))
    ponder.backward()
    assert m.halt[0].weight.grad is not None and m.halt[0].weight.grad.abs().sum() > 0


def _rigged(mode):
    """Halting reads channel 0 only; each step adds a constant to channel 1 only."""
    m = _act(mode, D=4, threshold=0.6, max_steps=4).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
        m.block.norm.weight.fill_(1.0)
        m.block.fc.bias.fill_(1.0)  # gelu(1) = 0.84 in every hidden unit
        m.block.proj.weight[1].fill_(1.0 / 32)  # x_n = x + 0.84 n e_1
        m.halt[0].weight[0, 0] = 1.0  # relu(x_0)
        m.halt[2].weight.fill_(10.0)
        m.halt[2].bias.fill_(-5.0)  # p = sigmoid(10 relu(x_0) - 5)
    return m


def test_faithful_global_early_exit_leaks_future_and_fixed_does_not():
    x = torch.zeros(1, 2, 4)
    x[0, 0, 0] = 0.45  # p ~ 0.38: H = 0.38, 0.76 -> halts at step 2 with R ~ 0.24 left
    halting, lingering = x.clone(), x.clone()
    halting[0, 1, 0] = 2.0  # p ~ 1: the last token halts at once, the loop stops at step 2
    lingering[0, 1, 0] = -1.0  # p ~ 0.007: it never halts, the loop runs all 4 steps
    m = _rigged("faithful")
    with torch.no_grad():
        a, b = m(halting)[0][0, 0], m(lingering)[0][0, 0]
    assert (a - b).abs().max() > 0.1  # token 0 saw whether token 1 halted
    m = _rigged("fixed")
    with torch.no_grad():
        torch.testing.assert_close(m(halting)[0][0, 0], m(lingering)[0][0, 0])


def test_meta_runs_full_path():
    m = build_example("adaptive.act", Example({"mode": "faithful", "hidden_dim": 8}, {"x": (1, 3, 8)}), device="meta").eval()
    out, ponder = m(torch.empty(2, 5, 8, device="meta"))
    assert out.shape == (2, 5, 8) and ponder.shape == ()
