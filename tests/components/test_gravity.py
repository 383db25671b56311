"""attention.gravity and the NGT helpers: the faithful mode against a plain reference with
explicit (B, H, T, T, c) differences, the seed's sign quirks, the fixed mode's attraction, the
FlexAttention kernel's math, the repulsion loss against a loop, and the embeddings."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.nn import functional as F

from physlm_graph import Example, decoding
from physlm_graph.components.attention._gravity_kernels import gravity_flex
from physlm_graph.testing import build_example

NAME = "attention.gravity"
B, T, D, C, H, CH = 2, 7, 8, 5, 2, 3


def _build(mode="faithful", cutoff="hard", mass_mode="score", **extra):
    params = {"num_heads": H, "head_coord_dim": CH, "mode": mode, "cutoff": cutoff, "mass_mode": mass_mode, **extra}
    ex = Example(params, {"x": (B, T, D), "z": (B, T, C), "mass": (B, T, 1)})
    mod = build_example(NAME, ex, seed=2).eval()
    with torch.no_grad():
        mod.gamma_raw.copy_(torch.tensor([0.3, -0.5]))
        if mod.beta is not None:
            mod.beta.copy_(torch.tensor([-0.2, 0.4]))
    return mod


def _inputs(zb=B, seed=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, D, generator=g)
    z = torch.randn(zb, T, C, generator=g)
    mass = F.softplus(torch.randn(B, T, 1, generator=g))
    return x, z, mass


def _set_radius_to_median(mod, z):
    """Put r^2 near the median pairwise d2 so the cutoff actually bites, in the middle of the
    widest gap between neighbouring d2 values there: no pair sits on the hard boundary, where
    the rounding of a different (but equally exact) d2 formula, e.g. on a GPU, would flip it."""
    with torch.no_grad():
        zh = mod.coords(z)
        d2 = (zh[..., :, None, :] - zh[..., None, :, :]).square().sum(-1).flatten().sort().values
        mid = d2.numel() // 2
        near = d2[mid - 10 : mid + 11]
        i = int((near[1:] - near[:-1]).argmax())
        r = ((near[i] + near[i + 1]) / 2).sqrt()
        mod.radius_raw.copy_(torch.log(torch.expm1(r)))


def _reference(mod, x, z, mass, mode, cutoff, mass_mode, use_rsqrt=False, eps=1e-6, softening=1.0, width=1.0):
    """The seed's forward written plainly, with the explicit (B, H, T, T, c_h) difference tensor."""
    Bx, Tx, Dx = x.shape
    d = Dx // H
    v = (x @ mod.value.weight.T + mod.value.bias).view(Bx, Tx, H, d).transpose(1, 2)
    Z = (z @ mod.coord.weight.T + mod.coord.bias).view(z.shape[0], Tx, H, CH).transpose(1, 2)
    diff = Z[:, :, :, None, :] - Z[:, :, None, :, :]  # (B, H, T, T, c_h)
    d2 = (diff**2).sum(-1)
    gamma = F.softplus(mod.gamma_raw).view(1, H, 1, 1)
    r2 = F.softplus(mod.radius_raw) ** 2
    m = mass[..., 0]
    mm = m[:, None, :, None] * m[:, None, None, :]
    if mode == "faithful":
        inv = torch.rsqrt(d2 + eps) ** 2 if use_rsqrt else 1.0 / (d2 + eps)
        s = -gamma * inv + mod.beta.view(1, H, 1, 1)
    else:
        s = gamma / (d2 + softening)
    if mass_mode == "score":
        s = s * mm
    else:
        v = v * m[:, None, :, None]
    neg = torch.finfo(torch.float32).min
    if cutoff == "hard":
        s = s.masked_fill(d2 > r2, neg)
    elif cutoff == "soft" and mode == "faithful":
        s = s * torch.relu(1 - d2 / r2)
    elif cutoff == "soft":
        s = s - F.softplus((d2 - r2) / width)
    s = s.masked_fill(torch.ones(Tx, Tx, dtype=torch.bool).triu(1), neg)
    o = torch.softmax(s, -1) @ v
    out = o.transpose(1, 2).reshape(Bx, Tx, Dx) @ mod.proj.weight.T + mod.proj.bias
    return out, out @ mod.coord_out.weight.T + mod.coord_out.bias


CONFIGS = list(itertools.product(["hard", "soft", "none"], ["score", "value"]))


@pytest.mark.parametrize("cutoff,mass_mode", CONFIGS)
@pytest.mark.parametrize("zb", [B, 1])
def test_faithful_matches_explicit_difference_reference(cutoff, mass_mode, zb):
    mod = _build("faithful", cutoff, mass_mode)
    x, z, mass = _inputs(zb)
    _set_radius_to_median(mod, z)
    with torch.no_grad():
        want = _reference(mod, x, z, mass, "faithful", cutoff, mass_mode)
        for exact in (False, True):
            mod.exact = exact
            got = mod(x, z, mass)
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_faithful_use_rsqrt_matches_reference():
    mod = _build("faithful", "soft", "score", use_rsqrt=True)
    x, z, mass = _inputs()
    with torch.no_grad():
        want = _reference(mod, x, z, mass, "faithful", "soft", "score", use_rsqrt=True)
        for a, b in zip(mod(x, z, mass), want):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cutoff,mass_mode", CONFIGS)
def test_fixed_matches_reference(cutoff, mass_mode):
    extra = {"softening": 0.5} | ({"cutoff_width": 2.0} if cutoff == "soft" else {})
    mod = _build("fixed", cutoff, mass_mode, **extra)
    x, z, mass = _inputs()
    _set_radius_to_median(mod, z)
    with torch.no_grad():
        want = _reference(mod, x, z, mass, "fixed", cutoff, mass_mode, softening=0.5, width=extra.get("cutoff_width", 1.0))
        for a, b in zip(mod(x, z, mass), want):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def _probs(mod, z, mass):
    with torch.no_grad():
        return mod.probs(mod.coords(z), mass[..., 0], F.softplus(mod.gamma_raw), F.softplus(mod.radius_raw) ** 2)


@pytest.mark.parametrize("mass_mode", ["score", "value"])
def test_faithful_sign_self_weight_is_zero_and_far_tokens_win(mass_mode):
    mod = _build("faithful", "none", mass_mode)
    _, z, mass = _inputs()
    p = _probs(mod, z, mass)  # (B, H, T, T)
    diag = p.diagonal(dim1=-2, dim2=-1)  # (B, H, T)
    assert torch.all(diag[..., 0] == 1.0)
    assert diag[..., 1:].max() < 1e-6
    if mass_mode == "value":  # no mass product: weight rises with distance among past tokens
        zh = mod.coords(z).detach()
        d2 = (zh[..., :, None, :] - zh[..., None, :, :]).square().sum(-1)
        for i in range(2, T):
            order = d2[..., i, :i].argsort(-1)
            w = p[..., i, :i].gather(-1, order)
            assert torch.all(w[..., 1:] >= w[..., :-1] - 1e-7)


def test_faithful_soft_cutoff_is_inverted():
    """Out-of-radius past tokens get score 0 > any in-radius (negative) score: more weight."""
    mod = _build("faithful", "soft", "value")
    with torch.no_grad():
        mod.beta.zero_()
    _, z, mass = _inputs()
    _set_radius_to_median(mod, z)
    p = _probs(mod, z, mass)
    zh = mod.coords(z).detach()
    d2 = (zh[..., :, None, :] - zh[..., None, :, :]).square().sum(-1)
    r2 = F.softplus(mod.radius_raw).detach() ** 2
    past = torch.ones(T, T, dtype=torch.bool).tril(-1)
    outside, inside = (d2 > r2) & past, (d2 < r2) & past
    rows = outside.any(-1) & inside.any(-1)  # rows with both kinds
    assert rows.any()
    w_out = p.masked_fill(~outside, float("inf")).amin(-1)
    w_in = p.masked_fill(~inside, float("-inf")).amax(-1)
    assert torch.all(w_out[rows] >= w_in[rows])


@pytest.mark.parametrize("mass_mode", ["score", "value"])
def test_fixed_attracts_nearer_tokens(mass_mode):
    mod = _build("fixed", "none", mass_mode)
    _, z, _ = _inputs()
    mass = torch.ones(B, T, 1)
    p = _probs(mod, z, mass)
    zh = mod.coords(z).detach()
    d2 = (zh[..., :, None, :] - zh[..., None, :, :]).square().sum(-1)
    for i in range(1, T):  # including self: the nearest (itself) gets the most weight
        order = d2[..., i, : i + 1].argsort(-1)
        w = p[..., i, : i + 1].gather(-1, order)
        assert torch.all(w[..., 1:] <= w[..., :-1] + 1e-7)
    assert torch.all(p.diagonal(dim1=-2, dim2=-1) == p.amax(-1))


def test_fixed_heavier_key_gets_more_weight():
    mod = _build("fixed", "none", "score")
    z = torch.zeros(1, T, C)  # every token at the same place: only mass differs
    mass = torch.ones(1, T, 1)
    mass[0, 2] = 3.0
    p = _probs(mod, z, mass)
    assert torch.all(p[0, :, 5, 2] > p[0, :, 5, 1])


def test_radius_gradient_only_with_soft_cutoff():
    x, z, mass = _inputs()
    for mode, cutoff, learns in [("faithful", "hard", False), ("faithful", "soft", True), ("fixed", "soft", True)]:
        mod = _build(mode, cutoff, "score")
        _set_radius_to_median(mod, z)
        out, z_next = mod(x, z, mass)
        (out.sum() + z_next.sum()).backward()
        got = mod.radius_raw.grad is not None and bool(mod.radius_raw.grad.abs() > 0)
        assert got == learns, (mode, cutoff)


def test_mode_specific_parameters_are_rejected_elsewhere():
    from physlm_graph.components.attention.gravity import GravityAttentionParams

    with pytest.raises(ValueError):
        GravityAttentionParams(num_heads=2, mode="faithful", softening=2.0)
    with pytest.raises(ValueError):
        GravityAttentionParams(num_heads=2, mode="fixed", eps=1e-3)
    with pytest.raises(ValueError):
        GravityAttentionParams(num_heads=2, mode="fixed", cutoff="hard", cutoff_width=2.0)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("mode", ["faithful", "fixed"])
@pytest.mark.parametrize("cutoff,mass_mode", CONFIGS)
def test_flex_kernel_computes_the_same_function(mode, cutoff, mass_mode):
    """The FlexAttention path, run eagerly on CPU (unfused), equals the materialised path."""
    mod = _build(mode, cutoff, mass_mode)
    x, z, mass = _inputs()
    _set_radius_to_median(mod, z)
    with torch.no_grad():
        zh = mod.coords(z)
        v = torch.randn(B, H, T, D // H)
        m = mass[..., 0]
        gamma, r2 = F.softplus(mod.gamma_raw), F.softplus(mod.radius_raw) ** 2
        if mass_mode == "value":
            v = v * m[:, None, :, None]
        want = mod.probs(zh, m, gamma, r2) @ v
        got = gravity_flex(zh, v, mod.spec, gamma, mod.beta, m if mass_mode == "score" else None, r2, compile=False)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["faithful", "fixed"])
@pytest.mark.parametrize("cutoff,mass_mode", CONFIGS)
def test_cuda_path_matches_cpu(mode, cutoff, mass_mode):
    """With gradients on CUDA: the Triton kernel (or, without Triton or with
    PHYSLM_GRAVITY_TRITON=0, the compiled materialised path) equals the CPU path."""
    mod = _build(mode, cutoff, mass_mode)
    x, z, mass = _inputs()
    _set_radius_to_median(mod, z)
    want = mod(x, z, mass)
    cuda = mod.to("cuda")
    got = cuda(x.cuda(), z.cuda(), mass.cuda())
    for a, b in zip(got, want):
        torch.testing.assert_close(a.cpu(), b.detach(), atol=1e-4, rtol=1e-4)
    (got[0].sum() + got[1].sum()).backward()  # the compiled backward runs
    assert cuda.gamma_raw.grad is not None


# ------------------------------------------------------------------ loss.gravity_repulsion


def _repulsion_loop(z, m, min_dist2):
    total, count = 0.0, 0
    for b in range(z.shape[0]):
        for i in range(z.shape[1]):
            for j in range(i + 1, z.shape[1]):
                d2 = max(float(((z[b, i] - z[b, j]) ** 2).sum()), min_dist2)
                total += float(m[b, i, 0] * m[b, j, 0]) / d2
                count += 1
    return total / count


@pytest.mark.parametrize("num_samples", [64, 5])
def test_repulsion_matches_loop(num_samples):
    ex = Example({"num_samples": num_samples, "min_dist2": 0.5}, {"z": (3, 9, 4), "mass": (3, 9, 1)})
    mod = build_example("loss.gravity_repulsion", ex)
    g = torch.Generator().manual_seed(0)
    z, m = torch.randn(3, 9, 4, generator=g), F.softplus(torch.randn(3, 9, 1, generator=g))
    z[0, 1] = z[0, 0]  # a coincident pair hits the floor
    torch.manual_seed(11)
    got = mod(z, m)
    if num_samples < 9:
        torch.manual_seed(11)
        idx = torch.randperm(9)[:num_samples]
        z, m = z[:, idx], m[:, idx]
    assert got.item() == pytest.approx(_repulsion_loop(z, m, 0.5), rel=1e-5)


def test_repulsion_interval_counts_training_forwards():
    ex = Example({"interval": 3}, {"z": (2, 6, 4), "mass": (2, 6, 1)})
    mod = build_example("loss.gravity_repulsion", ex).train()
    z, m = torch.randn(2, 6, 4), torch.ones(2, 6, 1)
    got = [mod(z, m).item() for _ in range(7)]
    assert [v != 0 for v in got] == [True, False, False, True, False, False, True]
    assert int(mod.calls) == 7 and "calls" in mod.state_dict()
    mod.eval()
    assert mod(z, m).item() != 0 and int(mod.calls) == 7


# ------------------------------------------------------------------ embeddings


def test_mass_is_softplus_of_table():
    mod = build_example("embed.ngt_mass", Example({"vocab_size": 10}, {"tokens": ((2, 4), torch.long)}))
    tok = torch.tensor([[1, 2, 3, 1], [0, 9, 9, 4]])
    torch.testing.assert_close(mod(tok), F.softplus(mod.weight[tok]))
    assert mod(tok).shape == (2, 4, 1)


def test_coords_follow_decode_offset():
    mod = build_example("embed.ngt_coords", Example({"max_len": 12, "coord_dim": 3}, {"tokens": ((2, 4), torch.long)}))
    tok = torch.zeros(2, 10, dtype=torch.long)
    full = mod(tok)
    assert full.shape == (2, 10, 3)
    torch.testing.assert_close(full[1], mod.weight[:10])
    with decoding() as ctx:
        ctx.offset = 6
        torch.testing.assert_close(mod(tok[:, :4]), full[:, 6:10])
        ctx.offset = 10
        with pytest.raises(ValueError, match="max_len"):
            mod(tok[:, :4])


def test_no_difference_tensor_on_the_default_path():
    """The default path never builds a (B, H, T, T, c_h) tensor: nothing above 4 dims."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class MaxDim(TorchDispatchMode):
        most = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    MaxDim.most = max(MaxDim.most, t.dim())
            return out

    x, z, mass = _inputs()
    for exact, limit in ((False, 4), (True, 5)):
        mod = _build("faithful", "hard", "score")
        mod.exact = exact
        MaxDim.most = 0
        with MaxDim():
            mod(x, z, mass)
        assert MaxDim.most == limit


# ------------------------------------------------------------------ fixed gaussian kernel (SDPA)


def _gaussian_reference(mod, x, z, mass, cutoff, mass_mode):
    """S = -gamma_h |Z_i - Z_j|^2 / r^2 + log m_j, from explicit differences, softmax, @ V."""
    Bx, Tx, Dx = x.shape
    d = Dx // H
    v = (x @ mod.value.weight.T + mod.value.bias).view(Bx, Tx, H, d).transpose(1, 2)
    Z = (z @ mod.coord.weight.T + mod.coord.bias).view(z.shape[0], Tx, H, CH).transpose(1, 2)
    d2 = (Z[:, :, :, None, :] - Z[:, :, None, :, :]).square().sum(-1)  # (B, H, T, T)
    gamma = F.softplus(mod.gamma_raw).view(1, H, 1, 1)
    s = -gamma * d2
    if cutoff == "soft":
        s = s / F.softplus(mod.radius_raw) ** 2
    m = mass[..., 0]
    if mass_mode == "score":
        s = s + m.log()[:, None, None, :]
    else:
        v = v * m[:, None, :, None]
    s = s.masked_fill(torch.ones(Tx, Tx, dtype=torch.bool).triu(1), float("-inf"))
    o = torch.softmax(s, -1) @ v
    out = o.transpose(1, 2).reshape(Bx, Tx, Dx) @ mod.proj.weight.T + mod.proj.bias
    return out, out @ mod.coord_out.weight.T + mod.coord_out.bias


@pytest.mark.parametrize("cutoff,mass_mode", list(itertools.product(["soft", "none"], ["score", "value"])))
@pytest.mark.parametrize("zb", [B, 1])
def test_gaussian_sdpa_matches_explicit_reference(cutoff, mass_mode, zb):
    mod = _build("fixed", cutoff, mass_mode, kernel="gaussian")
    x, z, mass = _inputs(zb)
    with torch.no_grad():
        mod.radius_raw.fill_(0.3)  # a narrow kernel, so the radius matters
        want = _gaussian_reference(mod, x, z, mass, cutoff, mass_mode)
        for exact in (False, True):  # SDPA path, and the materialised GravityScore path
            mod.exact = exact
            for a, b in zip(mod(x, z, mass), want):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_gaussian_gradients_match_reference():
    mod = _build("fixed", "soft", "score", kernel="gaussian")
    x, z, mass = _inputs()
    mass.requires_grad_(True)
    grads = []
    for fn in (lambda: mod(x, z, mass), lambda: _gaussian_reference(mod, x, z, mass, "soft", "score")):
        mod.zero_grad(set_to_none=True)
        mass.grad = None
        out, zn = fn()
        (out.square().sum() + zn.sum()).backward()
        grads.append([mod.gamma_raw.grad.clone(), mod.radius_raw.grad.clone(), mod.coord.weight.grad.clone(), mass.grad.clone()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_gaussian_nearer_and_heavier_tokens_attract():
    mod = _build("fixed", "soft", "score", kernel="gaussian")
    _, z, _ = _inputs()
    mod.exact = True
    p = _probs(mod, z, torch.ones(B, T, 1))
    zh = mod.coords(z).detach()
    d2 = (zh[..., :, None, :] - zh[..., None, :, :]).square().sum(-1)
    for i in range(1, T):
        order = d2[..., i, : i + 1].argsort(-1)
        w = p[..., i, : i + 1].gather(-1, order)
        assert torch.all(w[..., 1:] <= w[..., :-1] + 1e-7)
    zc = torch.zeros(1, T, C)
    mass = torch.ones(1, T, 1)
    mass[0, 2] = 3.0
    p = _probs(mod, zc, mass)
    torch.testing.assert_close(p[0, :, 5, 2], 3.0 * p[0, :, 5, 1])  # weight proportional to m_j


def test_gaussian_parameter_rules():
    from physlm_graph.components.attention.gravity import GravityAttentionParams as P

    assert P(num_heads=2, mode="fixed", kernel="gaussian").cutoff == "soft"  # the kernel is the soft radius
    assert P(num_heads=2, mode="fixed").kernel == "inverse_square"
    for bad in (
        dict(mode="faithful", kernel="gaussian"),
        dict(mode="faithful", kernel="inverse_square"),
        dict(mode="fixed", kernel="gaussian", cutoff="hard"),
        dict(mode="fixed", kernel="gaussian", softening=2.0),
        dict(mode="fixed", kernel="gaussian", cutoff_width=2.0),
        dict(mode="fixed", kernel="gaussian", use_rsqrt=True),
    ):
        with pytest.raises(ValueError):
            P(num_heads=2, **bad)


def test_gaussian_wide_coordinates_pad_the_values():
    """c_h + 1 > value head dim: v is zero-padded to the augmented width and sliced back."""
    params = {"num_heads": 2, "head_coord_dim": 9, "mode": "fixed", "kernel": "gaussian", "dropout": 0.0}
    ex = Example(params, {"x": (2, 6, 8), "z": (2, 6, 5), "mass": (2, 6, 1)})
    mod = build_example(NAME, ex, seed=1).eval()
    x, z, mass = torch.randn(2, 6, 8), torch.randn(2, 6, 5), F.softplus(torch.randn(2, 6, 1))
    with torch.no_grad():
        got = mod(x, z, mass)
        mod.exact = True
        want = mod(x, z, mass)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_gaussian_bf16_error_at_realistic_size():
    """bf16 q'/k' (what SDPA gets under autocast) vs the fp32 path at NGT-like coordinates
    (coordinate LayerNorm output through W_z; T = 256, c_h = 16, 8 heads). Baseline: the error
    that bf16 values alone cause (fp32 q'/k'). At the init sharpness (gamma / r^2 ~ 0.043) the
    bf16 distances add nothing measurable; with a 23x sharper kernel they add at most ~2x (score
    error ~0.2% of the score range, as for ordinary bf16 attention logits)."""
    from physlm_graph.components.attention._gravity_kernels import gaussian_qk, gravity_gaussian_sdpa

    torch.manual_seed(0)
    Hn, Tn, c, d = 8, 256, 16, 64
    zin = F.layer_norm(torch.randn(1, Tn, 64), (64,))
    W = torch.nn.Linear(64, Hn * c)
    zh = W(zin).view(1, Tn, Hn, c).transpose(1, 2).detach() - W.bias.detach().view(Hn, 1, c)
    v = torch.randn(1, Hn, Tn, d)
    mass = F.softplus(torch.randn(1, Tn))
    for g, r2, factor in ((F.softplus(torch.tensor(0.0)), F.softplus(torch.tensor(4.0)) ** 2, 1.2), (4.0, torch.tensor(4.0), 3.0)):
        gamma = torch.full((Hn,), float(g))
        want = gravity_gaussian_sdpa(zh, v, gamma, r2, mass)  # fp32
        got = gravity_gaussian_sdpa(zh, v.bfloat16(), gamma, r2, mass).float()
        q, k = gaussian_qk(zh, gamma, r2, mass, 1, d)
        base = F.scaled_dot_product_attention(q, k, v.bfloat16().float(), is_causal=True, scale=1.0).bfloat16().float()
        err, base_err = (got - want).abs().max(), (base - want).abs().max()
        assert err <= factor * base_err + 1e-3, (err, base_err)
        assert (got - want).abs().mean() < 3e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("params", [dict(mode="faithful", cutoff="hard"), dict(mode="fixed", cutoff="soft"),
                                    dict(mode="fixed", cutoff="soft", kernel="gaussian")])
def test_cuda_inference_paths_match_cpu(params):
    """No grad on CUDA: the Triton kernel (inverse kernels; FlexAttention without Triton) or SDPA
    (gaussian) equals the CPU path."""
    mod = _build(mass_mode="score", **params)
    x, z, mass = _inputs()
    _set_radius_to_median(mod, z)
    with torch.no_grad():
        want = mod(x, z, mass)
        got = mod.to("cuda")(x.cuda(), z.cuda(), mass.cuda())
    for a, b in zip(got, want):
        torch.testing.assert_close(a.cpu(), b, atol=1e-4, rtol=1e-4)


def test_triton_kernels_load_lazily_and_trace_without_a_break():
    """Loading the component library does not import the Triton kernels (about 1 s of start-up
    that CPU work never needs); importing them from inside a compiled function breaks no graph."""
    import subprocess
    import sys

    code = ("import sys, physlm_graph.components; "
            "print('physlm_graph.components.attention._gravity_triton' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stdout + out.stderr
    from physlm_graph.components.attention import gravity as g

    def f(x):
        return x * 2 if g._triton_kernels().__name__ else x

    explained = torch._dynamo.explain(f)(torch.ones(3))
    torch._dynamo.reset()
    assert explained.graph_break_count == 0, explained.break_reasons


def test_bad_kernel_precision_setting_is_a_plain_error():
    """PHYSLM_GRAVITY_ZDOT is read when the Triton kernel module is imported (on first CUDA use):
    a wrong value is a PhysLMError naming the variable (the CLI prints it as a user error)."""
    import os
    import subprocess
    import sys

    code = ("from physlm_graph._errors import PhysLMError\n"
            "try:\n    import physlm_graph.components.attention._gravity_triton\n"
            "except PhysLMError as e:\n    print(e)\n    raise SystemExit(7)\n")
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PHYSLM_GRAVITY_ZDOT": "tf32"},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 7, r.stderr[-2000:]
    assert "PHYSLM_GRAVITY_ZDOT must be 'ieee' or 'tf32x3', not 'tf32'" in r.stdout


def test_missing_triton_is_said_once(monkeypatch):
    """On CUDA without triton the gravity kernels take the materialised path: a RuntimeWarning
    says so, once per process (no silent slow path)."""
    import warnings

    from physlm_graph.components import _triton
    from physlm_graph.components.attention import _gravity_triton, gravity

    monkeypatch.setattr(_gravity_triton, "triton_available", False)
    _triton.warn_slow_path.cache_clear()
    with pytest.warns(RuntimeWarning, match="triton is not importable"):
        gravity._triton_kernels()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gravity._triton_kernels()  # said already: silent now
