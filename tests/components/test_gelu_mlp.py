"""The GELU MLP as one operation (``components/ffn/_gelu_mlp.py``): output and every gradient equal
``linear(gelu_tanh(linear(x)))`` in torch (CPU, fp64, eager and compiled), with and without biases;
``ffn.mlp`` takes it only where it applies; on a GPU the cuBLASLt epilogues match the unfused
bf16 path (marked ``gpu``)."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from physlm_graph.components.ffn import _gelu_mlp
from physlm_graph.components.ffn._gelu_mlp import gelu_mlp
from physlm_graph.components.ffn.mlp import MLP


def _params(d=16, h=48, d2=16, bias=True, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    t = [torch.randn(7, 5, d, generator=g, dtype=dtype),
         0.3 * torch.randn(h, d, generator=g, dtype=dtype), 0.3 * torch.randn(h, generator=g, dtype=dtype),
         0.3 * torch.randn(d2, h, generator=g, dtype=dtype), 0.3 * torch.randn(d2, generator=g, dtype=dtype)]
    if not bias:
        t[2] = t[4] = None
    return [None if x is None else x.to(device).requires_grad_() for x in t]


def _reference(x, w1, b1, w2, b2):
    return F.linear(F.gelu(F.linear(x, w1, b1), approximate="tanh"), w2, b2)


def _value_and_grads(fn, params, dy):
    for p in params:
        if p is not None:
            p.grad = None
    y = fn(*params)
    y.backward(dy)
    return [y.detach()] + [None if p is None else p.grad.clone() for p in params]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("compiled", [False, True])
def test_matches_the_three_step_mlp(bias, compiled):
    params = _params(bias=bias)
    dy = torch.randn(7, 5, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    fn = torch.compile(gelu_mlp, backend="aot_eager", fullgraph=True) if compiled else gelu_mlp
    got = _value_and_grads(fn, params, dy)
    want = _value_and_grads(_reference, params, dy)
    names = ["y", "dx", "dw1", "db1", "dw2", "db2"]
    for name, a, b in zip(names, got, want):
        if b is None:
            assert a is None, name
        else:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)


def test_the_exact_gelu_is_not_the_tanh_one():
    """The check above can tell the two GELUs apart (so a fused path with the wrong one fails it)."""
    x, w1, b1, w2, b2 = _params()
    exact = F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)
    assert (exact - gelu_mlp(x, w1, b1, w2, b2)).abs().max() > 1e-6


def test_mlp_takes_the_fused_path_only_for_tanh():
    assert MLP(embed_dim=16, hidden_dim=64, approximate="tanh").fused
    assert not MLP(embed_dim=16, hidden_dim=64).fused  # exact GELU: cuBLASLt has only the tanh form
    assert not MLP(embed_dim=16, hidden_dim=60, approximate="tanh").fused  # cuBLASLt's alignment
    m = MLP(embed_dim=16, hidden_dim=64, approximate="tanh")
    x = torch.randn(2, 3, 16)
    assert _gelu_mlp.fused_dtype(x, m.fc.weight) is None  # CPU: the module's own three steps
    torch.testing.assert_close(m(x), m.proj(F.gelu(m.fc(x), approximate="tanh")))


class _TorchLt:
    """cuBLASLt's ``gemm`` (row-major ``out = op(a) @ op(b)``) with its epilogues, written in torch
    from cuBLASLt's documentation: lets the GPU backward's choice of calls run on CPU."""

    def gemm(self, out, a, b, *, trans_a=False, trans_b=False, epilogue=_gelu_mlp.EPI_DEFAULT, bias=None, aux=None):
        m = _gelu_mlp
        r = (a.t() if trans_a else a) @ (b.t() if trans_b else b)
        if epilogue in (m.EPI_BIAS, m.EPI_GELU_AUX_BIAS):
            r = r + bias
        if epilogue in (m.EPI_GELU_AUX, m.EPI_GELU_AUX_BIAS):
            aux.copy_(r)
            r = F.gelu(r, approximate="tanh")
        if epilogue in (m.EPI_DGELU, m.EPI_DGELU_BGRAD):
            r = torch.ops.aten.gelu_backward(r, aux, approximate="tanh")
        if epilogue == m.EPI_DGELU_BGRAD:
            bias.copy_(r.sum(0))
        if epilogue == m.EPI_BGRADB:  # the reduction over k of op(a): its column sums
            bias.copy_((a.t() if trans_a else a).sum(1))
        out.copy_(r)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("options", [{}, {"bgrad_epilogue": True}, {"lt_matmuls": True},
                                     {"lt_matmuls": True, "bgrad_wgrad": True}], ids=str)
def test_every_split_of_the_gpu_backward_asks_for_the_right_products(bias, options, monkeypatch):
    """The GPU backward's calls (which epilogue, which bias buffer, under each of OPTIONS) with
    cuBLASLt replaced by its torch description: the same five gradients as the torch backward."""
    monkeypatch.setattr(_gelu_mlp, "_lt", lambda: _TorchLt())
    monkeypatch.setattr(_gelu_mlp, "OPTIONS", {"bgrad_epilogue": False, "lt_matmuls": False, "bgrad_wgrad": False,
                                               "timed_choice": True, **options})
    x, w1, b1, w2, b2 = (t.detach() if t is not None else None for t in _params(bias=bias))
    x = x.reshape(-1, x.shape[-1])
    y, g, pre = _gelu_mlp._fwd_impl(x, w1, b1, w2, b2)
    dy = torch.randn_like(y)
    got = _gelu_mlp._bwd_cuda(dy, x, w1, w2, g, pre, bias, bias)
    want = _gelu_mlp._bwd_op(dy, x, w1, w2, g, pre, bias, bias)
    for name, a, b in zip(["dx", "dw1", "db1", "dw2", "db2"], got, want):
        if not bias and name in ("db1", "db2"):
            assert a is None
            continue
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)


def _gpu_ok():
    return torch.cuda.is_available() and _gelu_mlp.AVAILABLE


@pytest.mark.gpu
@pytest.mark.skipif(not _gpu_ok(), reason="needs CUDA and cuBLASLt")
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("options", [{}, {"timed_choice": False}, {"bgrad_epilogue": True}, {"lt_matmuls": True},
                                     {"lt_matmuls": True, "bgrad_wgrad": True}], ids=str)
def test_cublaslt_epilogues_match_bf16_torch(bias, options, monkeypatch):
    """The GELU_AUX_BIAS forward and the DGELU backward (every way of splitting the backward into
    calls) against the unfused path, both compared with fp32."""
    monkeypatch.setattr(_gelu_mlp, "_TIMED_MIN_MACS", 0)  # time the candidates even at this small size
    _gelu_mlp._lt().plans.clear()  # each case chooses its algorithms afresh
    monkeypatch.setattr(_gelu_mlp, "OPTIONS", {"bgrad_epilogue": False, "lt_matmuls": False, "bgrad_wgrad": False,
                                               "timed_choice": True, **options})
    params = _params(d=64, h=256, d2=64, bias=bias, dtype=torch.float32, device="cuda")
    x = params[0].detach().repeat(40, 1, 1).requires_grad_()  # 280 x 5 tokens
    params = [x] + params[1:]
    dy = torch.randn(280, 5, 64, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = _value_and_grads(lambda *p: gelu_mlp(*p, dtype=torch.bfloat16), params, dy)
        bf16 = _value_and_grads(_reference, params, dy)
    fp32 = _value_and_grads(_reference, params, dy)
    for name, a, b, c in zip(["y", "dx", "dw1", "db1", "dw2", "db2"], got, bf16, fp32):
        if c is None:
            assert a is None
            continue
        err_fused = (a.float() - c).abs().max().item()
        err_bf16 = (b.float() - c).abs().max().item()
        scale = c.abs().max().item()
        # as close to fp32 as the unfused bf16 path is (both round to bf16 at the same places)
        assert err_fused <= 2 * err_bf16 + 1e-3 * scale, (name, err_fused, err_bf16, scale)


@pytest.mark.gpu
@pytest.mark.skipif(not _gpu_ok(), reason="needs CUDA and cuBLASLt")
def test_decoding_sizes_match_the_unfused_mlp():
    """One to a few tokens at a time, no autograd (generation): the same outputs as the three steps."""
    torch.manual_seed(0)
    m = MLP(embed_dim=64, hidden_dim=256, approximate="tanh").cuda().eval()
    assert m.fused
    for tokens in (1, 3, 17):
        x = torch.randn(2, tokens, 64, device="cuda")
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            fused = m(x)
            m.fused = False
            plain = m(x)
            m.fused = True
        torch.testing.assert_close(fused.float(), plain.float(), rtol=2e-2, atol=2e-2)
