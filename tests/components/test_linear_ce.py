"""The fused LM head + cross-entropy (``components/head/_linear_ce.py``) and the trainer's way to it
(``runtime/fused_head.py``): loss and both gradients equal ``F.cross_entropy(h @ W.T)``, in torch
(CPU), in the Triton kernel (under Triton's interpreter, in a subprocess, or on a GPU), through
``torch.compile``; ignored targets; clear errors; and which blueprints can split their head off."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.nn import functional as F

from physlm_graph import compile_blueprint
from physlm_graph._errors import PhysLMError
from physlm_graph.components.head._linear_ce import default_chunk, linear_cross_entropy
from physlm_graph.runtime.fused_head import fused_lm_loss, split_lm_head

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _case(n=37, d=16, v=101, dtype=torch.float64, seed=0, ignore=(3, 10)):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=dtype).requires_grad_()
    w = torch.randn(v, d, generator=g, dtype=dtype).requires_grad_()
    y = torch.randint(0, v, (n,), generator=g)
    y[list(ignore)] = -100
    return h, w, y


def _grads(loss_fn, h, w, y, scale=1.0):
    h.grad = w.grad = None
    loss = loss_fn(h, w, y)
    (scale * loss).backward()
    return loss.detach(), h.grad.clone(), w.grad.clone()


def _reference(h, w, y):
    return F.cross_entropy(h @ w.T, y, ignore_index=-100)


@pytest.mark.parametrize("chunk", [1, 8, 37, 64])
def test_equals_cross_entropy_of_the_linear_in_fp64(chunk):
    h, w, y = _case()
    ref = _grads(_reference, h, w, y, scale=2.5)
    out = _grads(lambda h, w, y: linear_cross_entropy(h, w, y, chunk=chunk), h, w, y, scale=2.5)
    # the per-row losses and the 1 / n scale are fp32 (as the kernel keeps them); the rest is fp64
    assert torch.allclose(out[0].double(), ref[0], rtol=1e-6, atol=0)
    assert torch.allclose(out[1], ref[1], rtol=1e-6, atol=1e-7)
    assert torch.allclose(out[2], ref[2], rtol=1e-6, atol=1e-7)


def test_batch_shaped_input_and_ignored_rows_get_no_gradient():
    h, w, y = _case(n=24)
    hb, yb = h.detach().reshape(2, 12, -1).requires_grad_(), y.reshape(2, 12)
    loss = linear_cross_entropy(hb, w, yb, chunk=5)
    loss.backward()
    assert torch.allclose(loss.double(), _reference(h, w, y), rtol=1e-6)
    assert hb.grad.shape == hb.shape
    assert hb.grad.reshape(24, -1)[[3, 10]].abs().max() == 0  # the ignored rows
    assert hb.grad.reshape(24, -1)[0].abs().max() > 0


def test_all_targets_ignored_gives_zero_loss_and_zero_gradient():
    h, w, y = _case(n=6, ignore=range(6))
    loss = linear_cross_entropy(h, w, y)
    loss.backward()
    assert float(loss.detach()) == 0.0 and h.grad.abs().max() == 0 and w.grad.abs().max() == 0


def test_bf16_autocast_casts_both_operands_like_f_linear():
    h, w, y = _case(n=32, d=32, v=64, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.cross_entropy(F.linear(h, w).float(), y)
        out = linear_cross_entropy(h, w, y)
    assert abs(float(out) - float(ref)) < 1e-5  # both from the same bf16 logits, upcast


def test_through_torch_compile_same_loss_and_gradients():
    h, w, y = _case(dtype=torch.float32)
    ref = _grads(_reference, h, w, y)
    fn = torch.compile(lambda h, w, y: linear_cross_entropy(h, w, y, chunk=16), backend="aot_eager")
    out = _grads(fn, h, w, y)
    for a, b in zip(out, ref):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_a_target_outside_the_vocabulary_gives_a_nan_loss_not_a_wrong_one():
    h, w, y = _case()
    for bad in (w.shape[0], w.shape[0] + 40, -3):
        yb = y.clone()
        yb[5] = bad
        assert torch.isnan(linear_cross_entropy(h, w, yb, chunk=8))


@pytest.mark.parametrize("chunk", [4, 37])
def test_a_logit_limit_counts_the_ids_past_it_as_minus_infinity(chunk):
    """``limit`` (head.lm's logit_limit, for a padded vocabulary): the loss and gradients of the
    first ``limit`` logits alone; the padded rows of the weight get exactly zero gradient."""
    h, w, y = _case(v=101)
    y = torch.where(y >= 80, y - 40, y)  # real ids only
    masked = lambda h, w, y: F.cross_entropy((h @ w.T).masked_fill(torch.arange(101) >= 80, float("-inf")), y)  # noqa: E731
    ref = _grads(masked, h, w, y, scale=2.0)
    out = _grads(lambda h, w, y: linear_cross_entropy(h, w, y, chunk=chunk, limit=80), h, w, y, scale=2.0)
    assert torch.allclose(out[0].double(), ref[0], rtol=1e-6, atol=0)
    assert torch.allclose(out[1], ref[1], rtol=1e-6, atol=1e-7)
    assert torch.allclose(out[2], ref[2], rtol=1e-6, atol=1e-7)
    assert out[2][80:].abs().max() == 0
    unlimited = linear_cross_entropy(h, w, y, chunk=chunk)
    assert abs(float(unlimited) - float(out[0])) > 1e-3  # the limit changes the loss: the check can fail
    yb = y.clone()
    yb[0] = 90  # a padded id as a target
    assert torch.isnan(linear_cross_entropy(h, w, yb, chunk=chunk, limit=80))


def test_shape_errors_are_plain_errors():
    h, w, y = _case()
    with pytest.raises(PhysLMError, match="does not match weight"):
        linear_cross_entropy(h, w[:, :5], y)
    with pytest.raises(PhysLMError, match="target"):
        linear_cross_entropy(h, w, y[:5])


def test_default_chunk_is_a_power_of_two_of_about_1_gb():
    assert default_chunk(32768, 50304, 2) == 8192  # 1 GiB / 100 KB rows = 10672 -> 8192
    assert default_chunk(1 << 20, 50304, 4) == 4096
    assert default_chunk(32768, 1000, 2) == 32768  # all rows fit in one chunk
    assert default_chunk(100, 1000, 2) == 100


_KERNEL_SCRIPT = textwrap.dedent("""
    import torch
    from torch.nn import functional as F
    from physlm_graph.components.head import _linear_ce as m
    assert m.triton_available and m._INTERPRET
    m._MAX_BLOCK = 64  # several blocks per row at these vocabularies
    torch.manual_seed(0)
    worst = 0.0
    for n, d, v, chunk, limit in [(37, 16, 101, 8, None), (20, 8, 300, 20, None), (5, 4, 7, 2, None),
                                  (6, 8, 300, 3, None), (9, 8, 130, 4, 100)]:
        h = torch.randn(n, d)
        w = torch.randn(v, d)
        if n == 6:  # rows 0 and 4: a logit ~200 above the first block's max, past it (the overflow path)
            h[[0, 4]] = 0.0; h[[0, 4], 0] = 10.0; w[250, 0] = 20.0; w[70, 0] = -5.0
        h.requires_grad_(); w.requires_grad_()
        y = torch.randint(0, limit or v, (n,)); y[1] = -100
        ref = F.cross_entropy((h @ w.T)[:, :limit], y); ref.backward()
        rh, rw = h.grad.clone(), w.grad.clone(); h.grad = w.grad = None
        out = m.linear_cross_entropy(h, w, y, chunk=chunk, limit=limit); (3 * out).backward()
        worst = max(worst, abs(float(out - ref)) / float(ref), float((h.grad - 3 * rh).abs().max() / rh.abs().max()),
                    float((w.grad - 3 * rw).abs().max() / rw.abs().max()))
    yb = torch.randint(0, 300, (6,)); yb[2] = 300 + 7  # past the row (and past its padding to 320)
    assert torch.isnan(m.linear_cross_entropy(torch.randn(6, 8), torch.randn(300, 8), yb, chunk=3))
    yl = torch.randint(0, 100, (6,)); yl[4] = 110  # past the limit, inside the row (its logit is -inf there)
    assert torch.isnan(m.linear_cross_entropy(torch.randn(6, 8), torch.randn(130, 8), yl, chunk=3, limit=100))
    print("WORST", worst)
""")


def test_triton_kernel_under_the_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PHYSLM_LINEAR_CE_INTERPRET": "1", "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-c", _KERNEL_SCRIPT], env=env, cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    worst = float(r.stdout.split("WORST")[-1])
    assert worst < 1e-5, worst


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("limit", [None, 50257])
def test_gpu_kernel_matches_compiled_cross_entropy_in_bf16(limit):
    torch.manual_seed(0)
    n, d, v = 4096, 256, 50304
    h = torch.randn(n, d, device="cuda", requires_grad=True)
    w = (0.05 * torch.randn(v, d, device="cuda")).requires_grad_()
    y = torch.randint(0, limit or v, (n,), device="cuda")
    y[:7] = -100
    pad = torch.arange(v, device="cuda") >= (limit or v)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref = _grads(lambda h, w, y: F.cross_entropy(F.linear(h, w).float().masked_fill(pad, float("-inf")), y),
                     h, w, y)
        for chunk in (128, 1000, n):
            out = _grads(lambda h, w, y: linear_cross_entropy(h, w, y, chunk=chunk, limit=limit), h, w, y)
            assert abs(float(out[0] - ref[0])) < 1e-3 * float(ref[0])
            for a, b in zip(out[1:], ref[1:]):  # gradients rounded to bf16 on both sides
                assert float((a - b).abs().max() / b.abs().max()) < 2e-2


# ------------------------------------------------------------------------ splitting the head off
def _gpt(extra_head: str = "", out: str = "head", extra_nodes: str = "") -> str:
    return textwrap.dedent(f"""
        physlm: 1
        name: tiny
        params: {{vocab: 64, dim: 32}}
        inputs: {{tokens: [batch, seq]}}
        nodes:
          tok:  {{use: embed.token, in: tokens, vocab_size: "${{vocab}}", embed_dim: "${{dim}}"}}
          norm: {{use: norm.layer, in: tok}}
          head: {{use: head.lm, in: norm, vocab_size: "${{vocab}}"{extra_head}}}
        {extra_nodes}
        outputs: {{logits: {out}}}
    """)


def test_split_head_gives_the_same_loss_and_gradients_as_the_logits(tmp_path):
    cm = compile_blueprint(_gpt(), seed=0)
    x = torch.randint(0, 64, (2, 9))
    y = torch.randint(0, 64, (2, 9))
    ref = F.cross_entropy(cm.module(x)["logits"].flatten(0, 1), y.flatten())
    ref.backward()
    g_ref = {n: p.grad.clone() for n, p in cm.module.named_parameters()}
    cm.module.zero_grad()
    split = split_lm_head(cm.module)
    assert not isinstance(split, str), split
    loss, out = fused_lm_loss(split, x, y)
    loss.backward()
    assert "logits" not in out and out["hidden"].shape == (2, 9, 32)
    assert torch.allclose(loss, ref, rtol=1e-6)
    for n, p in cm.module.named_parameters():  # the copy shares the original's parameters
        assert torch.allclose(p.grad, g_ref[n], rtol=1e-5, atol=1e-7), n
    assert "logits" in cm.module(x)  # the original is untouched


def test_split_head_refuses_a_bias_or_logits_used_elsewhere():
    assert "bias" in split_lm_head(compile_blueprint(_gpt(extra_head=", bias: true"), seed=0).module)
    used = _gpt(out="lg", extra_nodes='  lg: {use: add, in: [head, head]}')
    assert "head module" in split_lm_head(compile_blueprint(used, seed=0).module)
    assert "GraphModule" in split_lm_head(torch.nn.Linear(2, 2))
