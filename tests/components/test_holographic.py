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


# --- the FFT-free forms (real DFT-basis matmuls, chunked decay scan) against torch.fft ---


def _fft_per_token(q, k, v):
    """The seed's path B written with torch.fft (the previous implementation)."""
    d = q.shape[-1]
    qf, kf, vf = (torch.fft.rfft(t.double(), dim=-1, norm="ortho") for t in (q, k, v))
    return torch.fft.irfft(qf.conj() * kf * vf, n=d, dim=-1, norm="ortho")


def _fft_causal(q, k, v, decay):
    """The fixed path B as a zero-padded FFT along time (the previous implementation), float64."""
    B, H, T, d = q.shape
    qf, kf, vf = (torch.fft.rfft(t.double(), dim=-1, norm="ortho") for t in (q, k, v))
    w = torch.exp(-decay.double()[:, None] * torch.arange(T, dtype=torch.float64))  # (H, T)
    w_t = torch.fft.fft(w, n=2 * T, dim=-1)[None, :, :, None]
    mem = torch.fft.ifft(torch.fft.fft(kf * vf, n=2 * T, dim=2) * w_t, dim=2)
    mem = mem[:, :, :T] / torch.cumsum(w, dim=-1)[None, :, :, None]
    return torch.fft.irfft(qf.conj() * mem, n=d, dim=-1, norm="ortho")


@pytest.mark.parametrize("d", [1, 2, 3, 4, 5, 8, 15, 64])
def test_real_dft_bases_are_rfft_and_irfft(d):
    from physlm_graph.components.attention.holographic import real_dft_bases

    fwd, inv = real_dft_bases(d)
    x = torch.randn(6, d, dtype=torch.float64)
    X = torch.fft.rfft(x, dim=-1, norm="ortho")  # (6, d//2+1)
    h = (d + 1) // 2
    nyq = X[:, d // 2].real if d % 2 == 0 and d > 0 else torch.zeros(6, dtype=torch.float64)
    packed = torch.cat([X.real[:, :h], nyq[:, None], X.imag[:, 1:h]], dim=-1)
    torch.testing.assert_close((x.float() @ fwd).double(), packed, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close((packed.float() @ inv).double(), x, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("d", [4, 5, 8, 64])
def test_per_token_binding_matches_fft(d):
    from physlm_graph.components.attention.holographic import hrr_bind_per_token

    q, k, v = torch.randn(3, 2, 3, 17, d, generator=torch.Generator().manual_seed(d)).unbind(0)
    torch.testing.assert_close(hrr_bind_per_token(q, k, v).double(), _fft_per_token(q, k, v), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("T", [1, 7, 64, 130])
def test_causal_binding_matches_fft(T):
    """Across chunk boundaries (chunk 64), with padding, fast and slow decays, and d = 64."""
    from physlm_graph.components.attention.holographic import hrr_bind_causal

    q, k, v = torch.randn(3, 2, 4, T, 64, generator=torch.Generator().manual_seed(T)).unbind(0)
    decay = torch.tensor([1e-3, 0.05, 0.7, 30.0])
    got = hrr_bind_causal(q, k, v, decay).double()
    torch.testing.assert_close(got, _fft_causal(q, k, v, decay), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("T,chunk", [(11, 4), (12, 4), (3, 8), (9, 1)])
def test_decayed_causal_sum_matches_loop(T, chunk):
    from physlm_graph.components.attention.holographic import decayed_causal_sum

    x = torch.randn(2, 3, T, 5, dtype=torch.float64)
    decay = torch.tensor([0.0, 0.3, 5.0], dtype=torch.float64)
    want = torch.zeros_like(x)
    for t in range(T):
        for s in range(t + 1):
            want[:, :, t] += torch.exp(-decay * (t - s))[None, :, None] * x[:, :, s]
    torch.testing.assert_close(decayed_causal_sum(x, decay, chunk=chunk), want)


@pytest.mark.parametrize("T", [1, 9, 130])
def test_dense_and_chunked_causal_mean_agree(T, monkeypatch):
    """decayed_causal_mean's dense form (T <= 1024) and its chunked O(T) form (longer) are the
    same function, values and gradients (decay included), slow and fast decays."""
    from physlm_graph.components.attention import holographic as hol

    g = torch.Generator().manual_seed(T)
    x = torch.randn(2, 3, T, 6, generator=g, dtype=torch.float64)
    decay = torch.tensor([1e-3, 0.3, 20.0], dtype=torch.float64)
    cot = torch.randn(2, 3, T, 6, generator=g, dtype=torch.float64)

    def run():
        xs, ds = x.clone().requires_grad_(), decay.clone().requires_grad_()
        y = hol.decayed_causal_mean(xs, ds)
        (y * cot).sum().backward()
        return y.detach(), xs.grad, ds.grad

    dense = run()
    monkeypatch.setattr(hol, "_DENSE_MAX_T", 0)
    chunked = run()
    for a, b in zip(dense, chunked):
        torch.testing.assert_close(a, b)
    # and the chunked form is what the loop reference says (via decayed_causal_sum's own test)
    w = torch.exp(-decay[:, None] * torch.arange(T, dtype=torch.float64))
    torch.testing.assert_close(chunked[0], hol.decayed_causal_sum(x, decay) / torch.cumsum(w, -1)[None, :, :, None])


def test_gradients_match_fft():
    """Gradients wrt q, k, v and the decay agree with the torch.fft forms (float64 reference)."""
    from physlm_graph.components.attention.holographic import hrr_bind_causal, hrr_bind_per_token

    g = torch.Generator().manual_seed(5)
    q, k, v = torch.randn(3, 2, 2, 70, 16, generator=g).unbind(0)
    decay = torch.tensor([0.1, 2.0])
    cot = torch.randn(2, 2, 70, 16, generator=g)

    def grads(fn, dtype):
        ins = [t.detach().to(dtype).clone().requires_grad_() for t in (q, k, v, decay)]
        (fn(*ins).to(dtype) * cot.to(dtype)).sum().backward()
        return [torch.zeros(()) if t.grad is None else t.grad.double() for t in ins]

    for new, old in (
        (lambda q, k, v, lam: hrr_bind_per_token(q, k, v), lambda q, k, v, lam: _fft_per_token(q, k, v)),
        (hrr_bind_causal, _fft_causal),
    ):
        for a, b in zip(grads(new, torch.float32), grads(old, torch.float64)):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", ["faithful", "fixed"])
def test_bases_not_in_state_dict_and_path_b_in_fp32_under_autocast(mode):
    mod = _build(mode, D=16, H=2, T=9)
    assert not any("dft" in key for key in mod.state_dict())
    x = torch.randn(2, 9, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q, k, v = (torch.randn(1, 2, 9, 8).bfloat16() for _ in range(3))
        bases = (mod.dft_fwd, mod.dft_inv)
        from physlm_graph.components.attention.holographic import hrr_bind_causal, hrr_bind_per_token

        if mode == "faithful":
            y = hrr_bind_per_token(q, k, v, bases)
        else:
            y = hrr_bind_causal(q, k, v, torch.full((2,), 0.3), bases)
        out = mod(x)
    want = _fft_per_token(q, k, v) if mode == "faithful" else _fft_causal(q, k, v, torch.full((2,), 0.3))
    assert y.dtype == torch.bfloat16 and out.shape == x.shape
    torch.testing.assert_close(y.double(), want.bfloat16().double())  # only the final bf16 rounding


@pytest.mark.parametrize("mode", ["faithful", "fixed"])
def test_traces_as_one_graph_under_autocast(mode):
    """torch.compile must see one graph: the fp32 switch for path B once called a function dynamo
    cannot trace, which broke every layer's graph on a GPU (found by benchmarks/seed_speed.py)."""
    import torch._dynamo

    mod = _build(mode, D=16, H=2, T=8)
    x = torch.randn(2, 8, 16)
    torch._dynamo.reset()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        explained = torch._dynamo.explain(mod)(x)
    torch._dynamo.reset()
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


@pytest.mark.parametrize("d", [4, 5, 64])
def test_packed_binding_equals_the_stacked_one(d):
    """The rope-free fast path (spectra straight from the (B, T, 3, H, d) projection) is the
    same function as the per-token binding on q, k, v, values and gradients."""
    from physlm_graph.components.attention.holographic import (
        hrr_bind_per_token,
        hrr_bind_per_token_packed,
        real_dft_bases,
    )

    torch.manual_seed(0)
    packed = torch.randn(2, 7, 3, 3, d, dtype=torch.float64, requires_grad=True)
    bases = tuple(b.double() for b in real_dft_bases(d))
    got = hrr_bind_per_token_packed(packed, bases)  # (B, T, H, d)
    q, k, v = packed.permute(2, 0, 3, 1, 4)
    want = hrr_bind_per_token(q, k, v, bases).transpose(1, 2)
    torch.testing.assert_close(got, want.to(got.dtype), atol=1e-5, rtol=1e-5)
    g1, = torch.autograd.grad(got.sum(), packed)
    g2, = torch.autograd.grad(want.sum(), packed)
    torch.testing.assert_close(g1, g2, atol=1e-5, rtol=1e-5)
