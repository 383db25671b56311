"""ssm.mamba's chunked selective scan against the token-by-token recurrence: outputs, last
states and gradients, with long sequences, padding and extreme steps; the memory it holds; and
the mixer built on it (causality, generation)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import physlm_graph
from physlm_graph import Example
from physlm_graph.components.ssm import mamba as mamba_module
from physlm_graph.components.ssm._mamba_kernels import (
    CPU_STEP_ELEMENTS,
    default_chunk_len,
    selective_scan,
    selective_scan_chunked,
)
from physlm_graph.testing import build_example


def _inputs(T, *, b=2, Di=6, N=4, dt_scale=1.0, seed=0, dtype=torch.float32):
    """(dt, A, B, C, x, h0) with A off Mamba's init and a random initial state."""
    g = torch.Generator().manual_seed(seed)
    dt = F.softplus(torch.randn(b, T, Di, generator=g) * dt_scale - 1.0)
    A = -torch.exp(torch.randn(Di, N, generator=g))
    B, C = torch.randn(b, T, N, generator=g), torch.randn(b, T, N, generator=g)
    x, h0 = torch.randn(b, T, Di, generator=g), torch.randn(b, Di, N, generator=g)
    return [t.to(dtype) for t in (dt, A, B, C, x, h0)]


def _close(got, want, rtol=1e-5):
    """Equal to fp32 rounding: within rtol of the reference's largest magnitude, elementwise."""
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * want.abs().max().item())


@pytest.mark.parametrize("T,chunk_len", [(1, None), (2, None), (37, None), (37, 1), (37, 5), (37, 37), (37, 50),
                                         (64, 8), (2000, None)])
def test_chunked_scan_equals_the_recurrence(T, chunk_len):
    dt, A, B, C, x, h0 = _inputs(T)
    y, h = selective_scan_chunked(dt, A, B, C, x, h0, chunk_len=chunk_len)
    y_ref, h_ref = selective_scan(dt, A, B, C, x, h0)
    assert y.shape == x.shape and h.shape == h0.shape and y.dtype == torch.float32
    _close(y, y_ref)
    _close(h, h_ref)


def test_chunked_scan_with_extreme_steps():
    """dt from about 1e-9 to 1e3 and A from -1e-3 to -50: per-step decays from 1 - 1e-12 down to an
    exp(-5e4) that underflows to 0, and chunk log-decays far past fp32's exp range. Nothing
    overflows or turns NaN, and the outputs are the recurrence's."""
    T, Di, N = 300, 8, 5
    g = torch.Generator().manual_seed(3)
    dt = torch.exp(torch.empty(2, T, Di).uniform_(math.log(1e-9), math.log(1e3), generator=g))
    dt[:, 100:140] = 1e3  # a stretch that wipes every state
    dt[:, 200:260] = 1e-7  # a stretch that barely decays
    A = -torch.exp(torch.empty(Di, N).uniform_(math.log(1e-3), math.log(50.0), generator=g))
    B, C, x = torch.randn(2, T, N, generator=g), torch.randn(2, T, N, generator=g), torch.randn(2, T, Di, generator=g)
    h0 = torch.randn(2, Di, N, generator=g) * 10
    y_ref, h_ref = selective_scan(dt, A, B, C, x, h0)
    for L in (None, 7, 64):
        y, h = selective_scan_chunked(dt, A, B, C, x, h0, chunk_len=L)
        assert torch.isfinite(y).all() and torch.isfinite(h).all()
        _close(y, y_ref)
        _close(h, h_ref)


@pytest.mark.parametrize("chunk_len", [1, 4, 23])
def test_chunked_scan_gradients_equal_the_recurrence(chunk_len):
    leaves = [t.requires_grad_() for t in _inputs(23)]
    before = [t.detach().clone() for t in leaves]
    w = torch.randn(2, 23, 6)
    grads = []
    for scan in (lambda *a: selective_scan_chunked(*a, chunk_len=chunk_len), selective_scan):
        y, h = scan(*leaves)
        grads.append(torch.autograd.grad((y * w).sum() + h.square().sum(), leaves))
    for got, want in zip(*grads):
        assert torch.isfinite(got).all()
        _close(got, want)
    assert all(torch.equal(t, t0) for t, t0 in zip(leaves, before))  # the inputs are left as they were


def test_chunked_scan_gradcheck_in_float64():
    """float64 inputs stay float64 (the scan widens to at least float32), so gradcheck applies."""
    leaves = [t.requires_grad_() for t in _inputs(7, b=1, Di=2, N=3, dtype=torch.float64)]
    assert torch.autograd.gradcheck(lambda *a: selective_scan_chunked(*a, chunk_len=3), leaves)


def test_default_chunk_len():
    """sqrt(T) chunks (of ceil(T / chunks) tokens) on CUDA; on CPU no more chunks than keep one
    step's (b, chunks, Di, N) tensor within CPU_STEP_ELEMENTS, down to a single chunk."""
    assert [default_chunk_len(T) for T in (0, 1, 2, 10, 1024, 1025)] == [1, 1, 1, 3, 32, 32]
    assert default_chunk_len(1024, 2 * 512 * 16, "cuda") == 32
    assert default_chunk_len(1024, 2 * 512 * 16, "cpu") == 1024 // (CPU_STEP_ELEMENTS // (2 * 512 * 16))
    assert default_chunk_len(1024, 96, "cpu") == 32
    assert default_chunk_len(1024, CPU_STEP_ELEMENTS + 1, "cpu") == 1024


def test_chunked_scan_of_no_tokens():
    dt, A, B, C, x, h0 = _inputs(0)
    y, h = selective_scan_chunked(dt, A, B, C, x, h0)
    assert y.shape == (2, 0, 6) and torch.equal(h, h0)


def test_chunked_scan_refuses_a_chunk_below_one():
    with pytest.raises(ValueError, match="chunk_len must be >= 1, not 0"):
        selective_scan_chunked(*_inputs(4), chunk_len=0)


class _LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any op returns."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, torch.Tensor):
                self.numel = max(self.numel, o.numel())
        return out


def test_chunked_scan_never_holds_the_whole_sequence_state():
    """The largest tensor is one step of all chunks, (b, T/L, Di, N), or one of the size of the
    inputs and output ((b, T, Di), (b, T, N)), never the (b, T, Di, N) that the token-by-token
    reference builds."""
    b, T, Di, N = 2, 256, 6, 8
    args = _inputs(T, b=b, Di=Di, N=N)
    L = default_chunk_len(T, b * Di * N, "cpu")
    assert L == 16
    largest = {}
    for name, scan in (("chunked", selective_scan_chunked), ("sequential", selective_scan)):
        with torch.no_grad(), _LargestTensor() as probe:
            scan(*args)
        largest[name] = probe.numel
    assert largest["chunked"] == max(b * (T // L) * Di * N, b * T * Di, b * T * N)
    assert largest["sequential"] == b * T * Di * N


def test_chunked_scan_keeps_no_step_states_for_the_backward():
    """Autograd holds the inputs and the (b, c, Di, N) states entering the chunks, not the
    per-step decays and states that the token-by-token reference leaves to it."""
    b, T, Di, N = 2, 256, 6, 8
    leaves = [t.requires_grad_() for t in _inputs(T, b=b, Di=Di, N=N)]
    largest = {}
    for name, scan in (("chunked", selective_scan_chunked), ("sequential", selective_scan)):
        kept = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.numel()) or t, lambda t: t):
            y, h = scan(*leaves)
        largest[name] = max(kept)
        (y.sum() + h.sum()).backward()
    assert largest["chunked"] == max(b * (T // 16) * Di * N, b * T * Di, b * T * N)
    assert largest["sequential"] == b * T * Di * N


def _mamba(T, **params):
    torch.manual_seed(0)
    m = build_example("ssm.mamba", Example({"d_state": 4, "dt_rank": 3, **params}, {"x": (2, T, 16)})).eval()
    with torch.no_grad():
        m.A_log.add_(torch.randn_like(m.A_log) * 0.3)
        m.D.normal_()
    return m


def test_mixer_equals_the_mixer_on_the_recurrence(monkeypatch):
    """The whole mixer, output and every parameter's gradient, over 150 tokens (13 chunks)."""
    m = _mamba(150, dt_bc_norm_eps=1e-6).train()
    u = torch.randn(2, 150, 16, requires_grad=True)
    w = torch.randn(2, 150, 16)
    results = []
    for scan in (selective_scan_chunked, selective_scan):
        monkeypatch.setattr(mamba_module, "selective_scan_chunked", scan)
        m.zero_grad()
        u.grad = None
        out = m(u)
        (out * w).sum().backward()
        results.append([out.detach()] + [u.grad.clone()] + [p.grad.clone() for p in m.parameters()])
    for got, want in zip(*results):
        _close(got, want)


def test_mixer_is_causal_across_chunks():
    """A change at token t leaves every output before t bit for bit the same, wherever t falls
    in its chunk (T = 50: chunks of 8, the last one padded)."""
    m = _mamba(50)
    u = torch.randn(1, 50, 16)
    with torch.no_grad():
        base = m(u)
        for t in (0, 7, 8, 21, 49):
            v = u.clone()
            v[:, t:] = torch.randn(1, 50 - t, 16)
            out = m(v)
            assert torch.equal(out[:, :t], base[:, :t])
            assert not torch.equal(out[:, t], base[:, t])


@pytest.mark.parametrize("chunks", [[37, 1, 1, 1], [20, 17, 3], [1] * 6 + [34]])
def test_generation_after_a_long_prompt_equals_the_full_sequence(chunks):
    """Prefills of many chunks (with padding) hand the recurrent steps the right state."""
    m = _mamba(40)
    u = torch.randn(2, 40, 16)
    outs = []
    with torch.no_grad():
        full = m(u)
        with physlm_graph.decoding() as ctx:
            start = 0
            for n in chunks:
                outs.append(m(u[:, start : start + n]))
                start += n
                ctx.offset += n
    _close(torch.cat(outs, 1), full)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_chunked_scan_on_cuda_equals_the_recurrence_on_cpu():
    """The CUDA run of the chunked scan, outputs and gradients, against the CPU reference, at T = 1024."""
    cpu = [t.requires_grad_() for t in _inputs(1024, Di=64, N=16)]
    cuda = [t.detach().cuda().requires_grad_() for t in cpu]
    w = torch.randn(2, 1024, 64)
    results = []
    for scan, args, wt in ((selective_scan, cpu, w), (selective_scan_chunked, cuda, w.cuda())):
        y, h = scan(*args)
        grads = torch.autograd.grad((y * wt).sum() + h.sum(), args)
        results.append([t.detach().cpu() for t in (y, h, *grads)])
    for got, want in zip(results[1], results[0]):
        _close(got, want)
