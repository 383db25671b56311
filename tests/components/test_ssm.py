"""ssm.ssd and ssm.gated_conv: against plain references, and generation equals full output."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import physlm_graph
from physlm_graph import Example
from physlm_graph.testing import build_example


def _causal_depthwise_conv(x, weight, bias):
    """x (B, T, C), weight (C, 1, K): out_t = sum_k w_k x_{t-K+1+k}, zeros before the start."""
    K = weight.shape[-1]
    out = torch.zeros_like(x)
    for k in range(K):
        shift = K - 1 - k
        xs = F.pad(x, (0, 0, shift, 0))[:, : x.shape[1]]
        out = out + xs * weight[:, 0, k]
    return out if bias is None else out + bias


def _naive_ssd_mixer(m, u):
    """The Mamba-2 mixer with the scan as a Python loop over time steps."""
    Bsz, T, _ = u.shape
    H, P, N, G, Di = m.num_heads, m.head_dim, m.d_state, m.ngroups, m.d_inner
    proj = u @ m.in_proj.weight.T
    z, xbc, dt = proj[..., :Di], proj[..., Di : 2 * Di + 2 * G * N], proj[..., 2 * Di + 2 * G * N :]
    xbc = F.silu(_causal_depthwise_conv(xbc, m.conv_weight, m.conv_bias))
    x = xbc[..., :Di].reshape(Bsz, T, H, P)
    Bm = xbc[..., Di : Di + G * N].reshape(Bsz, T, G, N)
    Cm = xbc[..., Di + G * N :].reshape(Bsz, T, G, N)
    dt = F.softplus(dt + m.dt_bias)
    A = -torch.exp(m.A_log)
    h = [torch.zeros(Bsz, P, N) for _ in range(H)]  # one (B, P, N) state per head
    ys = []
    for t in range(T):
        y_t = []
        for hd in range(H):
            g = hd // (H // G)
            decay = torch.exp(dt[:, t, hd] * A[hd])  # (B,)
            h[hd] = decay[:, None, None] * h[hd] + dt[:, t, hd, None, None] * x[:, t, hd, :, None] * Bm[:, t, g, None, :]
            y_t.append((h[hd] @ Cm[:, t, g][..., None])[..., 0] + m.D[hd] * x[:, t, hd])  # (B, P)
        ys.append(torch.stack(y_t, 1))
    y = torch.stack(ys, 1).reshape(Bsz, T, Di)
    gated = y * F.silu(z)
    gs = gated.reshape(Bsz, T, G, Di // G)
    gs = gs / torch.sqrt(gs.pow(2).mean(-1, keepdim=True) + 1e-5)
    return (gs.reshape(Bsz, T, Di) * m.norm.weight) @ m.out_proj.weight.T


def _ssd(T=10, **params):
    base = {"d_state": 8, "head_dim": 8, "chunk_size": 4}
    base.update(params)
    ex = Example(base, {"x": (2, T, 32)})
    m = build_example("ssm.ssd", ex).eval()
    # spread A and dt so decays differ visibly across heads and steps
    with torch.no_grad():
        m.A_log.copy_(torch.linspace(-1.0, 1.5, m.num_heads))
        m.dt_bias.copy_(torch.linspace(-2.0, 1.0, m.num_heads))
    return m


@pytest.mark.parametrize("T,params", [(10, {}), (8, {}), (13, {"ngroups": 2}), (3, {"chunk_size": 8}), (17, {"d_conv": 2})])
def test_ssd_matches_sequential_scan(T, params):
    torch.manual_seed(0)
    m = _ssd(T, **params)
    u = torch.randn(2, T, 32)
    with torch.no_grad():
        got, want = m(u), _naive_ssd_mixer(m, u)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_ssd_chunk_size_does_not_change_output():
    torch.manual_seed(0)
    a = _ssd(23, chunk_size=4)
    b = _ssd(23, chunk_size=16)
    b.load_state_dict(a.state_dict())
    u = torch.randn(2, 23, 32)
    with torch.no_grad():
        torch.testing.assert_close(a(u), b(u), atol=1e-5, rtol=1e-5)


def _generate(m, u, chunks):
    outs = []
    with torch.no_grad(), physlm_graph.decoding() as ctx:
        start = 0
        for n in chunks:
            outs.append(m(u[:, start : start + n]))
            start += n
            ctx.offset += n
    assert start == u.shape[1]
    return torch.cat(outs, 1)


@pytest.mark.parametrize("name,params", [("ssm.ssd", {"d_state": 8, "head_dim": 8, "chunk_size": 4}), ("ssm.gated_conv", {"d_state": 4}),
                                         ("ssm.mamba", {"d_state": 4}), ("ssm.mamba", {"d_state": 4, "dt_bc_norm_eps": 1e-6})])
@pytest.mark.parametrize("chunks", [[5, 1, 1, 1, 1, 1, 1], [1] * 11, [3, 1, 6, 1]])
def test_generation_equals_full_sequence(name, params, chunks):
    torch.manual_seed(0)
    m = build_example(name, Example(params, {"x": (2, 11, 32)})).eval()
    u = torch.randn(2, 11, 32)
    with torch.no_grad():
        full = m(u)
    torch.testing.assert_close(_generate(m, u, chunks), full, atol=1e-4, rtol=1e-4)


def test_decode_context_restarts_at_offset_zero():
    torch.manual_seed(0)
    m = _ssd(6)
    u = torch.randn(2, 6, 32)
    with torch.no_grad(), physlm_graph.decoding() as ctx:
        first = m(u)
        ctx.offset = 0  # a new generation in the same context starts from an empty state
        again = m(u)
    torch.testing.assert_close(first, again)


def test_ssd_meta_and_shapes():
    m = build_example("ssm.ssd", Example({"d_state": 8, "head_dim": 8, "chunk_size": 4}, {"x": (2, 10, 32)}), device="meta")
    assert m(torch.empty(3, 7, 32, device="meta")).shape == (3, 7, 32)


def test_ssd_rejects_bad_head_dim():
    with pytest.raises(ValueError, match="not a multiple of head_dim"):
        build_example("ssm.ssd", Example({"head_dim": 48}, {"x": (1, 4, 32)}))


def _naive_gated_conv(m, u):
    """The published MambaBlock forward, with x_proj re-assembled as one matrix."""
    Di = m.d_inner
    xz = u @ m.in_proj.weight.T
    x, z = xz[..., :Di], xz[..., Di:]
    x = F.silu(_causal_depthwise_conv(x, m.conv.weight, None))
    x_proj = torch.cat([m.x_proj_bc, m.x_proj_dt], 0)
    dt_raw = (x @ x_proj.T)[..., -1:]
    dt = F.softplus(dt_raw @ m.dt_proj.weight.T + m.dt_proj.bias)
    y = x * torch.sigmoid(dt) + x * m.D_skip
    return (y * F.silu(z)) @ m.out_proj.weight.T


def test_gated_conv_matches_published_forward():
    torch.manual_seed(0)
    m = build_example("ssm.gated_conv", Example({}, {"x": (2, 12, 16)})).eval()
    with torch.no_grad():
        m.D_skip.normal_()
    u = torch.randn(2, 12, 16)
    with torch.no_grad():
        torch.testing.assert_close(m(u), _naive_gated_conv(m, u), atol=1e-5, rtol=1e-5)


def test_gated_conv_init_and_receptive_field():
    torch.manual_seed(0)
    m = build_example("ssm.gated_conv", Example({"d_conv": 3}, {"x": (1, 12, 16)})).eval()
    dt0 = torch.exp(m.dt_proj.bias.detach())
    assert dt0.min() >= 1e-4 - 1e-9 and dt0.max() <= 0.1 + 1e-6
    assert m.x_proj_bc.shape == (32, 32) and m.x_proj_dt.shape == (1, 32)
    assert torch.equal(m.D_skip.detach(), torch.ones(32))
    u = torch.randn(1, 12, 16)
    v = u.clone()
    v[:, 3] += 1.0  # a change at t=3 reaches t=3..5 only (3 taps)
    with torch.no_grad():
        d = (m(u) - m(v)).abs().amax(-1)[0]
    assert (d[:3] == 0).all() and (d[3:6] > 0).all() and (d[6:] < 1e-6).all()


def test_ssd_gradients_match_sequential_scan():
    torch.manual_seed(0)
    m = _ssd(11, ngroups=2).train()
    u = torch.randn(2, 11, 32, requires_grad=True)
    w = torch.randn(2, 11, 32)
    grads = []
    for fn in (m, lambda x: _naive_ssd_mixer(m, x)):
        m.zero_grad()
        u.grad = None
        (fn(u) * w).sum().backward()
        grads.append([u.grad.clone()] + [p.grad.clone() for p in m.parameters()])
    for a, b in zip(*grads):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("T,G,init", [(37, 1, False), (40, 2, True), (5, 4, True)])
def test_ssd_layouts_agree(T, G, init):
    """The CPU (heads folded) and CUDA (head-major) layouts of the scan are one function:
    outputs, final states and every input gradient, with groups, padding and an initial state,
    and with decays large enough that a chunk's total decay underflows exp in fp32."""
    from physlm_graph.components.ssm._ssd_kernels import ssd_chunked

    torch.manual_seed(0)
    b, H, P, N = 2, 4, 3, 5
    x = torch.randn(b, T, H, P)
    dt = F.softplus(torch.randn(b, T, H) * 3)  # some steps decay by e^-40 and more
    A = -torch.tensor([0.5, 2.0, 8.0, 30.0])
    Bm, Cm = torch.randn(b, T, G, N), torch.randn(b, T, G, N)
    s0 = torch.randn(b, H, P, N) if init else None
    leaves = [t.requires_grad_() for t in (x, dt, Bm, Cm) + ((s0,) if init else ())]
    outs = []
    for layout in ("folded", "head_major"):
        y, s = ssd_chunked(x, dt, A, Bm, Cm, chunk_size=8, initial_state=s0, layout=layout)
        grads = torch.autograd.grad((y * torch.linspace(-1, 1, P)).sum() + s.sum(), leaves)
        outs.append([y, s, *grads])
    for a, c in zip(*outs):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, c, atol=1e-4, rtol=1e-4)


def test_ssd_unknown_layout_is_refused():
    from physlm_graph.components.ssm._ssd_kernels import ssd_chunked

    z = torch.zeros(1, 4, 2, 2)
    with pytest.raises(ValueError, match="layout must be"):
        ssd_chunked(z, z[..., 0], -torch.ones(2), z[:, :, :1], z[:, :, :1], chunk_size=4, layout="rows")


def _mamba(**params):
    torch.manual_seed(0)
    m = build_example("ssm.mamba", Example({"d_state": 4, "dt_rank": 3, **params}, {"x": (2, 9, 16)})).eval()
    with torch.no_grad():  # A and D off their structured inits, biases and norm weights random
        m.A_log.add_(torch.randn_like(m.A_log) * 0.3)
        m.D.normal_()
        for name, p in m.named_parameters():
            if name.endswith("bias") or name.endswith("norm.weight"):
                p.normal_(1.0 if "norm" in name else 0.0, 0.5)
    return m


def _mamba_reference(m, u):
    """Mamba-1 written out with the state as a sum over past tokens (cumulative log decays), not a loop."""
    Di, N, R = m.d_inner, m.d_state, m.dt_rank
    x, z = (u @ m.in_proj.weight.T + (m.in_proj.bias if m.in_proj.bias is not None else 0)).split(Di, -1)
    x = F.silu(_causal_depthwise_conv(x, m.conv_weight, m.conv_bias))
    d, Bm, Cm = (x @ m.x_proj.weight.T).split([R, N, N], -1)
    if m.dt_bc_norm_eps is not None:
        rms = lambda t, w: t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + m.dt_bc_norm_eps) * w  # noqa: E731
        d, Bm, Cm = rms(d, m.dt_norm.weight), rms(Bm, m.b_norm.weight), rms(Cm, m.c_norm.weight)
    dt = F.softplus(d @ m.dt_proj.weight.T + m.dt_proj.bias)  # (B, T, Di)
    logdecay = (dt[..., None] * -torch.exp(m.A_log)).cumsum(1)  # (B, T, Di, N): sum of dt A up to t
    T = u.shape[1]
    y = torch.zeros_like(x)
    for t in range(T):
        w = torch.exp(logdecay[:, t : t + 1] - logdecay[:, : t + 1])  # decay from s to t, s <= t
        h = (w * (dt[:, : t + 1] * x[:, : t + 1])[..., None] * Bm[:, : t + 1, None, :]).sum(1)  # (B, Di, N)
        y[:, t] = (h * Cm[:, t, None, :]).sum(-1)
    y = (y + x * m.D) * F.silu(z)
    return y @ m.out_proj.weight.T + (m.out_proj.bias if m.out_proj.bias is not None else 0)


@pytest.mark.parametrize("params", [{}, {"dt_bc_norm_eps": 1e-6, "bias": True, "conv_bias": False, "d_conv": 3}])
def test_mamba_matches_the_written_out_recurrence(params):
    m = _mamba(**params)
    u = torch.randn(2, 9, 16)
    with torch.no_grad():
        torch.testing.assert_close(m(u), _mamba_reference(m, u), atol=1e-5, rtol=1e-5)


def test_mamba_equals_transformers_mamba_mixer():
    """Without the inner norms ssm.mamba is transformers' MambaMixer, weight for weight."""
    transformers = pytest.importorskip("transformers")
    from physlm_graph import REGISTRY

    m = _mamba(bias=True)
    cfg = transformers.MambaConfig(hidden_size=16, state_size=4, expand=2, conv_kernel=4, time_step_rank=3,
                                   use_bias=True, use_conv_bias=True)
    theirs = transformers.models.mamba.modeling_mamba.MambaMixer(cfg, layer_idx=0).eval()
    ours = dict(m.named_parameters())
    with torch.no_grad():
        for n in REGISTRY.get("ssm.mamba").hf_names("default"):
            if n.ours in ours:
                theirs.get_parameter(n.theirs[0]).copy_(ours[n.ours])
    u = torch.randn(2, 9, 16)
    with torch.no_grad():
        torch.testing.assert_close(m(u), theirs(u), atol=1e-5, rtol=1e-5)


def test_mamba_rejects_bad_options():
    with pytest.raises(Exception, match="dt_min"):
        build_example("ssm.mamba", Example({"dt_min": 0.5, "dt_max": 0.1}, {"x": (2, 4, 16)}))
    with pytest.raises(Exception, match="dt_bc_norm_eps"):
        build_example("ssm.mamba", Example({"dt_bc_norm_eps": 0.0}, {"x": (2, 4, 16)}))


def test_mamba_keeps_its_dt_init_under_the_gpt2_scheme():
    """init: gpt2 zeroes every Linear bias; dt_proj's bias is Mamba's softplus^-1 of dt in [dt_min, dt_max]."""
    from physlm_graph import compile_blueprint

    doc = {"physlm": 1, "name": "m", "params": {}, "inputs": {"tokens": ["batch", "seq"]},
           "nodes": {"tok": {"use": "embed.token", "in": "tokens", "vocab_size": 20, "embed_dim": 16},
                     "mix": {"use": "ssm.mamba", "in": "tok", "d_state": 4},
                     "head": {"use": "head.lm", "in": "mix", "vocab_size": 20}},
           "outputs": {"logits": "head"}, "init": {"scheme": "gpt2", "std": 0.02}}
    cm = compile_blueprint(doc)
    m = cm.module.get_submodule("mix")
    dt = F.softplus(m.dt_proj.bias)
    assert dt.min().item() >= 1e-4 - 1e-7 and dt.max().item() <= 0.1 + 1e-6
    assert dt.std().item() > 0.005  # one step per channel, not softplus(0) everywhere
    assert cm.module.get_submodule("head").weight.std().item() < 0.03  # the scheme did run
