"""attention.holographic's fused Triton path B (``hrr_causal_triton``, mode ``fixed``) against the
torch path ``hrr_bind_causal``: forward and every gradient (q, k, v, the decay) in fp64 at several
head dims and lengths (block edges, one token, past the dense path's 1024); the packed and the
stacked qkv layouts; causality; the torch.library op (same numbers, meta shapes); on a GPU, the
module against its torch path in fp32 and bf16, and under torch.compile without a graph break.

Needs triton (skipped otherwise). Without CUDA the kernels run in Triton's interpreter on CPU
tensors (``TRITON_INTERPRET=1``, set here before triton is imported); if another test file imported
triton first (kernels compiled, not interpreted), this file re-runs itself in a subprocess.
"""

from __future__ import annotations

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")

from physlm_graph.components.attention import _holographic_triton as ht  # noqa: E402
from physlm_graph.components.attention.holographic import (  # noqa: E402
    HolographicAttention,
    hrr_bind_causal,
    real_dft_bases,
)

# triton's own @jit helpers (tl.sum among them) must be interpreted too: they are defined when
# triton is first imported, so another test file importing it first leaves them compiled
INTERPRETED = not CUDA and all(type(f).__name__ == "InterpretedFunction" for f in (ht._fwd_kernel, triton.language.sum))
DEV = "cuda" if CUDA else "cpu"
runs_here = pytest.mark.skipif(not (CUDA or INTERPRETED), reason="kernels compiled for a GPU: see the subprocess test")


@pytest.mark.skipif(CUDA or INTERPRETED, reason="the tests run in this process")
def test_file_under_the_interpreter_in_a_subprocess(rerun_under_triton_interpreter):
    rerun_under_triton_interpreter(__file__)


def _inputs(B, H, T, d, seed=0, dtype=torch.float64, device=DEV):
    """packed projection (B, T, 3, H, d) and decay rates (H,) spanning fast and slow heads."""
    g = torch.Generator().manual_seed(seed)
    packed = torch.randn(B, T, 3, H, d, generator=g, dtype=torch.float64)
    decay = torch.linspace(0.01, 1.5, H, dtype=torch.float64) * (1 + 0.1 * torch.rand(H, generator=g, dtype=torch.float64))
    return packed.to(device, dtype).requires_grad_(), decay.to(device, dtype).requires_grad_()


def _rel(got, want):
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30)).item()


def _kernel(packed, decay, use_op=True):
    fwd, inv = real_dft_bases(packed.shape[-1], packed.device)
    return ht.hrr_causal_triton(packed.permute(2, 0, 3, 1, 4), decay, fwd, inv, use_op=use_op)  # (B, T, H, d)


def _reference(packed, decay):
    q, k, v = packed.permute(2, 0, 3, 1, 4)
    fwd, inv = real_dft_bases(packed.shape[-1], packed.device)
    bases = (fwd.to(packed.dtype), inv.to(packed.dtype))
    return hrr_bind_causal(q, k, v, decay, bases).transpose(1, 2)  # (B, T, H, d)


def _with_grads(fn, packed, decay, w):
    y = fn(packed, decay)
    return (y, *torch.autograd.grad((y * w.to(y.dtype)).sum(), [packed, decay]))


@runs_here
@pytest.mark.parametrize("B,H,T,d", [(2, 2, 70, 16), (1, 3, 33, 32), (1, 2, 130, 64), (1, 2, 40, 128),
                                     (2, 1, 1, 16), (1, 1, 1100, 16)])
def test_forward_and_gradients_match_torch_path(B, H, T, d):
    """The kernels compute in fp32; the torch path here runs in fp64. T = 1100 checks against the
    chunked O(T) recurrence (the torch path's form past 1024 tokens), T = 1 a lone token."""
    packed, decay = _inputs(B, H, T, d)
    w = torch.randn(B, T, H, d, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(DEV)
    got = _with_grads(_kernel, packed, decay, w)
    want = _with_grads(_reference, packed, decay, w)
    assert got[0].shape == (B, T, H, d) and got[1].shape == packed.shape and got[2].shape == (H,)
    for name, a, b in zip(("y", "dqkv", "ddecay"), got, want):
        assert _rel(a, b) < 2e-5, (name, _rel(a, b))


@runs_here
def test_stacked_layout_same_as_packed():
    """With rope the module stacks rotated q, k and v (3, B, H, T, d) contiguous: same numbers as
    the permuted packed projection, gradient back in each layout."""
    packed, decay = _inputs(2, 2, 50, 32)
    fwd, inv = real_dft_bases(32, DEV)
    y1 = ht.hrr_causal_triton(packed.permute(2, 0, 3, 1, 4), decay, fwd, inv)
    (g1,) = torch.autograd.grad(y1.sum(), [packed])
    stacked = packed.detach().permute(2, 0, 3, 1, 4).contiguous().requires_grad_()
    y2 = ht.hrr_causal_triton(stacked, decay, fwd, inv)
    (g2,) = torch.autograd.grad(y2.sum(), [stacked])
    assert torch.equal(y1, y2)
    assert torch.equal(g1.permute(2, 0, 3, 1, 4), g2)


@runs_here
def test_causal():
    """Changing q, k, v from t0 on never changes outputs before t0, and a loss on those outputs
    gives the future no gradient (but the decay one)."""
    T, t0 = 90, 61
    packed, decay = _inputs(1, 2, T, 16)
    other, _ = _inputs(1, 2, T, 16, seed=7)
    mixed = packed.detach().clone()
    mixed[:, t0:] = other.detach()[:, t0:]
    mixed.requires_grad_()
    outs = []
    for x in (packed, mixed):
        y = _kernel(x, decay)
        outs.append(y.detach())
        (gx,) = torch.autograd.grad(y[:, :t0].sum(), [x])
        assert gx[:, t0:].abs().max() == 0
    assert torch.equal(outs[0][:, :t0], outs[1][:, :t0])
    assert not torch.equal(outs[0][:, t0:], outs[1][:, t0:])


@runs_here
@pytest.mark.skipif(not ht._op_available, reason="no torch.library op on this torch")
def test_library_op_same_numbers_and_meta_shapes():
    packed, decay = _inputs(2, 2, 45, 16, dtype=torch.float32)
    w = torch.randn(2, 45, 2, 16, dtype=torch.float32).to(DEV)
    a = _with_grads(_kernel, packed, decay, w)
    b = _with_grads(lambda p, dc: _kernel(p, dc, use_op=False), packed, decay, w)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    qkv = torch.empty(3, 2, 2, 45, 16, device="meta")
    fwd, inv = (t.to("meta") for t in real_dft_bases(16))
    y, m, z = torch.ops.physlm_graph.holo_causal_fwd(qkv, torch.empty(2, device="meta"), fwd, inv)
    assert y.shape == (2, 45, 2, 16) and m.shape == (2, 2, 45, 32) and z.shape == (2, 2, 45)
    dqkv, dd = torch.ops.physlm_graph.holo_causal_bwd(y, qkv, torch.empty(2, device="meta"), fwd, inv, m, z)
    assert dqkv.shape == qkv.shape and dd.shape == (2,)


def test_refuses_what_it_cannot_take():
    assert ht.supports(64) and ht.supports(128) and not ht.supports(63) and not ht.supports(256)
    fwd, inv = real_dft_bases(15)
    with pytest.raises(ValueError, match="head dim 15"):
        ht.hrr_causal_triton(torch.zeros(3, 1, 1, 4, 15), torch.ones(1), fwd, inv)
    fwd, inv = real_dft_bases(16)
    with pytest.raises(ValueError, match=r"\(3, B, H, T, d\)"):
        ht.hrr_causal_triton(torch.zeros(1, 4, 16), torch.ones(1), fwd, inv)
    with pytest.raises(ValueError, match="decay must be"):
        ht.hrr_causal_triton(torch.zeros(3, 1, 2, 4, 16), torch.ones(3), fwd, inv)


def test_missing_triton_or_head_dim_is_said_once(monkeypatch):
    """On CUDA without triton, or with a head dim the kernels do not take, the fixed mode keeps its
    torch path: a RuntimeWarning says why, once per process (no silent slow path), and the module
    gets no kernels. Turned off by PHYSLM_HOLOGRAPHIC_TRITON=0 (ENABLED): no kernels, no warning."""
    import warnings

    from physlm_graph.components import _triton
    from physlm_graph.components.attention import holographic

    _triton.warn_slow_path.cache_clear()
    with pytest.warns(RuntimeWarning, match="even head dims up to 128, not 63"):
        assert holographic._triton_kernels(63) is None
    monkeypatch.setattr(ht, "triton_available", False)
    with pytest.warns(RuntimeWarning, match="attention.holographic: triton is not importable"):
        assert holographic._triton_kernels(64) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert holographic._triton_kernels(64) is None  # said already: silent now
        assert holographic._triton_kernels(63) is None
        monkeypatch.setattr(ht, "triton_available", True)
        monkeypatch.setattr(ht, "ENABLED", False)
        assert holographic._triton_kernels(64) is None
        monkeypatch.setattr(ht, "ENABLED", True)
        assert holographic._triton_kernels(64) is ht


# ------------------------------------------------------------------ GPU


def _module_pair(rope: bool):
    torch.manual_seed(0)
    mod = HolographicAttention(embed_dim=256, num_heads=4, mode="fixed", dropout=0.0).cuda()
    x = torch.randn(2, 300, 256, device="cuda")
    table = None
    if rope:
        from physlm_graph.components._rope import rope_table

        table = rope_table(0, 300, head_dim=64, base=10000.0, style="interleaved", device="cuda")
    return mod, x, table


def _module_run(mod, x, rope, triton_on):
    enabled, ht.ENABLED = ht.ENABLED, triton_on
    try:
        mod.zero_grad()
        out = mod(x, rope)
        out.float().square().sum().backward()
        # a compiled wrapper names them "_orig_mod.<name>"
        return out.float(), {n.removeprefix("_orig_mod."): p.grad.float().clone() for n, p in mod.named_parameters()}
    finally:
        ht.ENABLED = enabled


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("rope", [False, True])
def test_cuda_module_matches_torch_path(rope, monkeypatch):
    """The module's output and every parameter gradient with the kernels equal its torch path: in
    fp32 to 1e-4 (both TF32-free), under bf16 autocast within the bf16 error of the two paths."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    mod, x, table = _module_pair(rope)
    want, want_g = _module_run(mod, x, table, False)
    got, got_g = _module_run(mod, x, table, True)
    assert _rel(got, want) < 1e-4
    for n in want_g:
        assert _rel(got_g[n], want_g[n]) < 1e-3, (n, _rel(got_g[n], want_g[n]))
    with torch.autocast("cuda", torch.bfloat16):
        want_b, want_bg = _module_run(mod, x, table, False)
        got_b, got_bg = _module_run(mod, x, table, True)
    assert _rel(got_b, want) <= 2 * _rel(want_b, want) + 1e-3
    for n in want_g:
        assert _rel(got_bg[n], want_g[n]) <= 2 * _rel(want_bg[n], want_g[n]) + 1e-3, n


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_compiled_module_no_graph_break():
    """torch.compile of the module (bf16 autocast, training) traces the Triton op without a graph
    break, and equals the eager module with the kernels."""
    from torch._dynamo.utils import counters

    mod, x, _ = _module_pair(False)
    with torch.autocast("cuda", torch.bfloat16):
        eager, eager_g = _module_run(mod, x, None, True)
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(mod, fullgraph=True)
        got, got_g = _module_run(compiled, x, None, True)
    assert sum(counters["graph_break"].values()) == 0
    assert _rel(got, eager) < 2e-2
    for n in eager_g:
        assert _rel(got_g[n], eager_g[n]) < 5e-2, n
