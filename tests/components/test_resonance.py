"""attention.resonance: faithful eval is one softmax at beta0; the halting schedules; fixed vs a plain reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from physlm_graph import REGISTRY, Example
from physlm_graph._errors import ComponentError
from physlm_graph.testing import build_example, causality_leak

INFO = REGISTRY.get("attention.resonance")


def build(params: dict, shape=(2, 12, 16), seed=0):
    ex = Example(params, {"x": shape})
    m = build_example(INFO, ex, seed=seed)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1))
    return m, x


def split_heads(y, H):
    B, T, D = y.shape
    return y.view(B, T, H, D // H).transpose(1, 2)


def one_softmax_reference(m, x, beta):
    """Plain causal attention at inverse temperature beta, no phase shift, materialised."""
    B, T, D = x.shape
    H = m.num_heads
    q, k, v = (split_heads(lin(x), H) for lin in (m.q_proj, m.k_proj, m.v_proj))
    s = q @ k.transpose(-2, -1) / math.sqrt(D // H)
    mask = torch.triu(torch.full((T, T), -10000.0), 1)
    a = torch.softmax(beta * (s + mask), dim=-1)
    y = (a @ v).transpose(1, 2).reshape(B, T, D)
    ent = -(a * torch.log(a.clamp_min(1e-10))).sum(-1).mean()
    return m.o_proj(y), ent


def test_faithful_eval_is_one_softmax_at_beta0():
    m, x = build({"num_heads": 4}, shape=(2, 10, 32))
    m.eval()
    with torch.no_grad():
        m.phase_factors.normal_()  # delta = phi sin(0) = 0 at t = 0 whatever phi is
        out, ent = m(x)
        ref, ref_ent = one_softmax_reference(m, x, beta=0.8)
    assert m.last_iterations == 1
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, ref_ent, atol=1e-5, rtol=1e-5)


def test_faithful_resonance_bias_is_dead():
    m, x = build({"num_heads": 2})
    m.eval()
    with torch.no_grad():
        a, _ = m(x)
        m.resonance_bias.normal_(std=3.0)
        b, _ = m(x)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_faithful_training_runs_more_iterations():
    m, x = build({"num_heads": 4}, shape=(2, 32, 32))
    m.train()
    counts = []
    for seed in range(4):
        torch.manual_seed(seed)
        m(x)
        counts.append(m.last_iterations)
    assert max(counts) > 1, counts
    m.eval()
    m(x)
    assert m.last_iterations == 1


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fixed_same_schedule_in_train_and_eval(dropout):
    m, x = build({"num_heads": 4, "mode": "fixed", "dropout": dropout, "convergence_threshold": 0.999}, shape=(2, 16, 32))
    m.eval()
    with torch.no_grad():
        a, ea = m(x)
    n_eval = m.last_iterations
    m.train()
    with torch.no_grad():
        b, eb = m(x)
    assert m.last_iterations == n_eval
    assert n_eval > 1
    torch.testing.assert_close(ea, eb)
    if dropout == 0.0:
        torch.testing.assert_close(a, b)


def fixed_reference(m, x):
    """Per-row halting, written with explicit loops over batch, rows and iterations."""
    B, T, D = x.shape
    H, d, N = m.num_heads, D // m.num_heads, m.max_iterations
    mu, pen = m.momentum, m.entropy_penalty
    q, k, v = (split_heads(lin(x), H) for lin in (m.q_proj, m.k_proj, m.v_proj))
    y = torch.zeros(B, T, H, d)
    for b in range(B):
        for i in range(T):
            prev = prev_h = None
            for t in range(N):
                delta = m.phase_factors.view(H, 1) * math.sin(2 * math.pi * t / N)  # (H, 1)
                s = (q[b, :, i] + delta).unsqueeze(1) @ (k[b, :, : i + 1] + delta.unsqueeze(1)).transpose(1, 2)
                a = torch.softmax((m.beta0 + t * m.beta_step) * s.squeeze(1) / math.sqrt(d), dim=-1)  # (H, i+1)
                if prev is not None:
                    a = (1 - mu) * a + mu * prev
                    a = a / a.sum(-1, keepdim=True)
                h = -(a * torch.log(a.clamp_min(1e-10))).sum(-1)  # (H,)
                if prev_h is not None and h.mean() > prev_h.mean():
                    h = h * (1 - pen) + prev_h * pen
                conv = bool(h.mean() < m.entropy_threshold)
                if prev is not None:
                    conv |= bool((F.cosine_similarity(a, prev, dim=-1) > m.convergence_threshold).all())
                prev, prev_h = a, h
                if conv:
                    break
            y[b, i] = (a.unsqueeze(1) @ v[b, :, : i + 1]).squeeze(1)  # (H, d)
    return m.o_proj(y.reshape(B, T, D))


@pytest.mark.parametrize("threshold", [0.95, 0.995])
def test_fixed_matches_per_row_reference(threshold):
    m, x = build({"num_heads": 2, "mode": "fixed", "dropout": 0.0, "convergence_threshold": threshold}, shape=(2, 9, 16))
    m.eval()
    with torch.no_grad():
        m.phase_factors.normal_(std=0.5)
        out, _ = m(x)
        ref = fixed_reference(m, x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_fixed_is_causal_in_training_too():
    ex = Example({"num_heads": 2, "mode": "fixed", "dropout": 0.0, "convergence_threshold": 0.99}, {"x": (2, 12, 16)})
    m = build_example(INFO, ex)
    m.train()
    assert causality_leak(m, ex) <= 1e-5


def test_num_heads_must_divide_width():
    with pytest.raises(ComponentError) as err:
        build({"num_heads": 5})
    assert err.value.param == "num_heads"


def test_faithful_is_declared_leaking_because_training_halting_sees_later_tokens():
    """The faithful halting step is one number per batch from full T x T matrices: in training,
    earlier outputs move when later tokens change, so the mode is declared non-causal and the
    leak guard asks qllm.yaml for allow_leak."""
    assert not INFO.is_causal(INFO.params.model_validate({"num_heads": 2}))
    assert INFO.is_causal(INFO.params.model_validate({"num_heads": 2, "mode": "fixed"}))
    ex = Example({"num_heads": 2}, {"x": (2, 8, 16)})
    m = build_example(INFO, ex)
    m.train()
    assert causality_leak(m, ex) > 1e-3
    m.eval()
    assert causality_leak(m, ex) <= 1e-5  # eval runs one iteration: causal


def test_qllm_seed_needs_allow_leak(tmp_path):
    from pathlib import Path

    from physlm_graph import PhysLMError, compile_blueprint

    seeds = Path(__file__).resolve().parents[2] / "blueprints" / "seeds"
    text = (seeds / "qllm.yaml").read_text(encoding="utf-8")
    assert text.count("allow_leak: true}") == 2  # on the attention node of each block
    (tmp_path / "qllm.yaml").write_text(text.replace("allow_leak: true}", "allow_leak: false}"), encoding="utf-8")
    with pytest.raises(PhysLMError, match="attention.resonance \\(mode faithful\\) sees future tokens"):
        compile_blueprint(tmp_path / "qllm.yaml", device="meta", build=False)
