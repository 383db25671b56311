"""attention.holographic: the faithful mode against SEEDS.md §1.1's closed form, the fixed mode's
causal sequence binding against a per-token loop, and causality at a longer length."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from physlm_graph import Example
from physlm_graph.components._rope import rope_table
from physlm_graph.testing import build_example, causality_leak

NAME = "attention.holographic"


def _build(mode: str, D: int = 8, H: int = 2, T: int = 5, **extra):
    ex = Example({"num_heads": H, "mode": mode, **extra}, {"x": (2, T, D)})
    mod = build_example(NAME, ex, seed=1).eval()
    with torch.no_grad():  # non-trivial affine LayerNorms and a gate away from its init
        for ln in (mod.ln_a, mod.ln_b):
            ln.weight.uniform_(0.5, 1.5)
            ln.bias.normal_()
        mod.gate.fill_(0.3)
        mod.qkv.weight.normal_(0.0, 0.5)  # larger than 0.02 so both paths matter
    return mod


def _heads(mod, x, rope=None):
    """q, k, v (B, H, T, d) with the seed's interleaved RoPE written out pair by pair."""
    B, T, D = x.shape
    H = mod.num_heads
    d = D // H
    qkv = x @ mod.qkv.weight.T
    q, k, v = (qkv[..., i * D : (i + 1) * D].reshape(B, T, H, d).transpose(1, 2) for i in range(3))
    if rope:
        def rot(t):
            out = t.clone()
            for pos in range(T):
                for i in range(d // 2):
                    th = pos * 10000.0 ** (-2 * i / d)
                    a, b = t[:, :, pos, 2 * i], t[:, :, pos, 2 * i + 1]
                    out[:, :, pos, 2 * i] = a * math.cos(th) - b * math.sin(th)
                    out[:, :, pos, 2 * i + 1] = b * math.cos(th) + a * math.sin(th)
            return out
        q, k = rot(q), rot(k)
    return q, k, v


def _path_a(q, k, v):
    d = q.shape[-1]
    T = q.shape[2]
    s = q @ k.transpose(-1, -2) / math.sqrt(d)
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(s, -1) @ v


def _closed_form(q, k, v):
    """y[j] = (1/d) sum_m c[m] v[(j - m) mod d],  c[m] = sum_i q[i] k[(i + m) mod d]."""
    d = q.shape[-1]
    y = torch.zeros_like(q)
    for j in range(d):
        for m in range(d):
            c = sum(q[..., i] * k[..., (i + m) % d] for i in range(d))
            y[..., j] += c * v[..., (j - m) % d] / d
    return y


def _merge(mod, a, y):
    B, H, T, d = a.shape
    a = a.transpose(1, 2).reshape(B, T, H * d)
    y = y.transpose(1, 2).reshape(B, T, H * d)
    la = F.layer_norm(a, (H * d,), mod.ln_a.weight, mod.ln_a.bias, 1e-5)
    lb = F.layer_norm(y, (H * d,), mod.ln_b.weight, mod.ln_b.bias, 1e-5)
    g = torch.sigmoid(mod.gate).clamp(0.05, 0.9)
    return ((1 - g) * la + g * lb) @ mod.proj.weight.T


@pytest.mark.parametrize("with_rope", [False, True])
def test_faithful_matches_closed_form(with_rope):
    mod = _build("faithful")
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(3))
    table = rope_table(0, 5, head_dim=4, base=10000.0, style="interleaved") if with_rope else None
    with torch.no_grad():
        got = mod(x, table)
        q, k, v = _heads(mod, x, rope=with_rope)
        want = _merge(mod, _path_a(q, k, v), _closed_form(q, k, v))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_fixed_matches_loop_over_past_tokens():
    mod = _build("fixed", T=6)
    x = torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        got = mod(x)
        q, k, v = _heads(mod, x)
        lam = F.softplus(mod.decay_raw)  # (H,)
        qf, kf, vf = (torch.fft.rfft(t, dim=-1, norm="ortho") for t in (q, k, v))
        y = torch.zeros_like(q)
        for h in range(q.shape[1]):
            for t in range(q.shape[2]):
                w = torch.exp(-lam[h] * torch.arange(t + 1.0))  # w[tau], tau = 0..t
                mem = sum(w[t - s] * kf[:, h, s] * vf[:, h, s] for s in range(t + 1)) / w.sum()
                y[:, h, t] = torch.fft.irfft(qf[:, h, t].conj() * mem, n=q.shape[-1], norm="ortho")
        want = _merge(mod, _path_a(q, k, v), y)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_fixed_reduces_to_faithful_binding_with_instant_decay():
    from physlm_graph.components.attention.holographic import hrr_bind_causal, hrr_bind_per_token

    q, k, v = torch.randn(3, 2, 2, 7, 8).unbind(0)
    y = hrr_bind_causal(q, k, v, torch.full((2,), 1e3))
    torch.testing.assert_close(y, hrr_bind_per_token(q, k, v), atol=1e-6, rtol=1e-5)


def test_fixed_mixes_tokens_faithful_does_not():
    from physlm_graph.components.attention.holographic import hrr_bind_causal, hrr_bind_per_token

    q, k, v = torch.randn(3, 1, 2, 6, 8).unbind(0)
    k2 = k.clone()
    k2[:, :, 0] += 1.0  # change token 0 only
    decay = torch.full((2,), 0.5)
    assert torch.allclose(hrr_bind_per_token(q, k, v)[:, :, 1:], hrr_bind_per_token(q, k2, v)[:, :, 1:])
    assert not torch.allclose(hrr_bind_causal(q, k, v, decay)[:, :, 1:], hrr_bind_causal(q, k2, v, decay)[:, :, 1:])


@pytest.mark.parametrize("mode", ["faithful", "fixed"])
def test_causal_at_longer_length(mode):
    ex = Example({"num_heads": 4, "mode": mode}, {"x": (2, 96, 32)})
    mod = build_example(NAME, ex).eval()
    for t in (0, 17, 60):
        assert causality_leak(mod, ex, t=t) <= 1e-5


def test_initial_mix_is_sigmoid_of_strength():
    mod = build_example(NAME, Example({"num_heads": 2}, {"x": (1, 4, 8)}))
    assert torch.sigmoid(mod.gate).item() == pytest.approx(0.525, abs=1e-3)


def test_rejects_bad_clamp():
    from physlm_graph.components.attention.holographic import HolographicAttentionParams

    with pytest.raises(ValueError):
        HolographicAttentionParams(num_heads=2, gate_clamp=(0.9, 0.1))
