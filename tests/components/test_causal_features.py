"""attention.causal's sliding window (and its decode cache), soft-capping and learned QK-norms,
against a plain reference written out position by position; the windowed cache in generation
and in self-speculative decoding."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from physlm_graph import PhysLMError, compile_blueprint, decoding
from physlm_graph._context import DecodeContext
from physlm_graph.components.attention.causal import CausalSelfAttention
from physlm_graph.runtime.generate import generate
from physlm_graph.runtime.speculative import generate_self_speculative

ROOT = Path(__file__).resolve().parents[2]
WINDOW = 6
PROMPT = [5, 17, 30, 2, 44, 9, 12, 60, 1, 33]

pytestmark = pytest.mark.usefixtures("one_thread")


def _reference(m: CausalSelfAttention, x: torch.Tensor) -> torch.Tensor:
    """The attention of ``m`` one query at a time, every key it may see listed explicitly."""
    B, T, _ = x.shape
    H, Hkv, hd = m.num_heads, m.num_kv_heads, m.head_dim
    q, k, v = m.qkv(x).split([H * hd, Hkv * hd, Hkv * hd], dim=-1)
    if m.qk_norm == "rms_proj":
        q, k = m.q_norm(q), m.k_norm(k)
    q, k, v = q.view(B, T, H, hd), k.view(B, T, Hkv, hd), v.view(B, T, Hkv, hd)
    if m.qk_norm == "rms_head":
        q, k = m.q_norm(q), m.k_norm(k)
    scale = m.scale if m.scale is not None else 1 / math.sqrt(hd)
    y = torch.zeros(B, T, H, hd)
    for i in range(T):
        first = 0 if m.sliding_window is None else max(0, i - m.sliding_window + 1)
        for h in range(H):
            g = h // (H // Hkv)
            s = torch.einsum("bd,bjd->bj", q[:, i, h], k[:, first : i + 1, g]) * scale  # (B, seen)
            if m.softcap is not None:
                s = m.softcap * torch.tanh(s / m.softcap)
            y[:, i, h] = torch.einsum("bj,bjd->bd", s.softmax(-1), v[:, first : i + 1, g])
    return m.proj(y.reshape(B, T, H * hd))


@pytest.mark.parametrize("kw", [
    {"sliding_window": 3},
    {"sliding_window": 1},
    {"sliding_window": 50},
    {"softcap": 0.5, "scale": 0.7},
    {"sliding_window": 4, "softcap": 1.0},
    {"qk_norm": "rms_head", "qk_norm_eps": 1e-5},
    {"qk_norm": "rms_proj"},
    {"qk_norm": "rms_head", "qk_norm_unit_offset": True},
], ids=lambda kw: ",".join(kw))
def test_attention_equals_the_written_out_reference(kw):
    torch.manual_seed(0)
    m = CausalSelfAttention(embed_dim=16, num_heads=4, num_kv_heads=2, head_dim=8, **kw).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:
                p.normal_()
    x = torch.randn(2, 12, 16) * 3
    with torch.no_grad():
        torch.testing.assert_close(m(x), _reference(m, x), atol=1e-5, rtol=1e-5)


def test_a_window_of_one_sees_only_the_query_itself():
    m = CausalSelfAttention(embed_dim=16, num_heads=2, num_kv_heads=2, head_dim=8, sliding_window=1).eval()
    x = torch.randn(1, 5, 16)
    v = m.qkv(x)[..., 32:]  # each position's own value: (1, 5, 16)
    with torch.no_grad():
        torch.testing.assert_close(m(x), m.proj(v))


def _windowed_cm(window: int = WINDOW, context: int = 128, **extra):
    d = yaml.safe_load((ROOT / "blueprints" / "families" / "mistral.yaml").read_text())
    d["params"].update(vocab=97, dim=32, heads=4, kv_heads=2, head_dim=8, layers=2, hidden=48, context=context,
                       window=window)
    d.update(extra)
    cm = compile_blueprint(d)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in cm.module.parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)  # so that greedy decoding varies
    return cm


def test_cached_greedy_generation_equals_full_recompute_past_the_window():
    cm = _windowed_cm()
    cached = generate(cm, PROMPT, max_new_tokens=60, temperature=0, use_cache=True)
    full = generate(cm, PROMPT, max_new_tokens=60, temperature=0, use_cache=False)
    assert len(set(cached[len(PROMPT):])) > 5  # a real sequence, not one repeated token
    assert cached == full


def test_gemma2_alternating_windows_and_caps_decode_as_they_recompute():
    d = yaml.safe_load((ROOT / "blueprints" / "families" / "gemma2.yaml").read_text())
    d["params"].update(vocab=97, dim=32, heads=4, kv_heads=2, head_dim=8, layers=3, hidden=48, context=128,
                       window=WINDOW, attn_cap=2.0)
    cm = compile_blueprint(d)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a small tied embedding: else greedy decoding repeats the last token
        for name, p in cm.module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.05 if name == "tok.weight" else 1.0 if p.ndim == 2 else 0.3))
    cached = generate(cm, PROMPT, max_new_tokens=40, temperature=0, use_cache=True)
    assert len(set(cached[len(PROMPT):])) > 5
    assert cached == generate(cm, PROMPT, max_new_tokens=40, temperature=0, use_cache=False)


@pytest.mark.parametrize("rewind", [0, 3])
def test_the_decode_cache_keeps_only_the_window_and_stays_exact(rewind):
    cm = _windowed_cm()
    attns = [m for m in cm.module.modules() if isinstance(m, CausalSelfAttention)]
    for m in attns:
        m.REWIND = rewind
    ids = torch.tensor([PROMPT + [(7 * i) % 97 for i in range(40)]])  # 50 positions, far past the window
    with torch.no_grad():
        full = cm.module(ids)["logits"]  # (1, 50, V)
        ctx = DecodeContext()
        with decoding(ctx):
            steps = [cm.module(ids[:, :10])["logits"]]
            ctx.offset = 10
            for t in range(10, ids.shape[1]):
                steps.append(cm.module(ids[:, t : t + 1])["logits"])
                ctx.offset += 1
                for m in attns:
                    k, v, start = ctx.get(m)
                    assert k.shape[2] == v.shape[2] == min(t + 1, WINDOW - 1 + rewind)
                    assert start == t + 1 - k.shape[2]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_a_windowed_cache_rewinds_within_its_spare_rows_and_refuses_beyond():
    m = CausalSelfAttention(embed_dim=16, num_heads=2, num_kv_heads=1, head_dim=8, sliding_window=4).eval()
    m.REWIND = 2
    x = torch.randn(1, 12, 16)
    with torch.no_grad(), decoding() as ctx:
        m(x[:, :10])  # keeps positions 5..9 (window 4 - 1 + 2 spare)
        state = ctx.get(m)
        assert state[2] == 5 and state[0].shape[2] == 5
        ctx.set(m, m.truncate_decode_state(state, 8))  # back to positions 5..7: still 3 before the next
        y = m(x[:, 8:12])
    with torch.no_grad():
        torch.testing.assert_close(y, m(x)[:, 8:12], atol=1e-5, rtol=1e-5)
        with decoding() as ctx:
            m(x[:, :10])
            with pytest.raises(PhysLMError, match=r"cannot go back to position 7: it kept positions 5 to 9 "
                                                  r"and the window needs the 3 before the next"):
                m.truncate_decode_state(ctx.get(m), 7)


def test_self_speculative_decoding_with_windowed_caches_is_full_depth_greedy():
    cm = _windowed_cm(exits={"every": 1, "block": "trunk"})
    plain = _windowed_cm()
    plain.module.load_state_dict(cm.module.state_dict(), strict=False)
    want = generate(plain, PROMPT, max_new_tokens=40, temperature=0, use_cache=True)
    got, stats = generate_self_speculative(cm, PROMPT, max_new_tokens=40, draft_exit=0, draft_len=3)
    assert got == want
    assert stats.accepted < stats.drafted  # some drafts were rejected, so caches were cut back


def test_learned_qk_norm_weights_are_used():
    """A learned QK-norm weight changes the output (it is not left out), and a zero one zeroes q."""
    torch.manual_seed(0)
    m = CausalSelfAttention(embed_dim=16, num_heads=2, num_kv_heads=2, head_dim=8, qk_norm="rms_head").eval()
    x = torch.randn(1, 6, 16)
    with torch.no_grad():
        before = m(x)
        m.q_norm.weight.zero_()  # every score 0: uniform attention over the keys seen
        after = m(x)
        v = m.qkv(x)[..., 32:].view(1, 6, 16)
        uniform = m.proj(v.cumsum(1) / torch.arange(1, 7)[None, :, None])
    assert (before - after).abs().max() > 1e-3
    torch.testing.assert_close(after, uniform, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kw", [{"qk_norm": "rms_head"}, {"qk_norm": "rms_proj"}, {"sliding_window": 3}],
                         ids=lambda kw: str(next(iter(kw.values()))))
def test_early_exit_key_value_filling_matches_the_forward_cache(kw):
    """Early exit's propagate fills skipped layers' caches with K/V only (runtime/exit_segments.py);
    with learned QK-norms and windows its rows are the forward's."""
    from physlm_graph.runtime.exit_segments import _causal_kv

    torch.manual_seed(0)
    m = CausalSelfAttention(embed_dim=16, num_heads=4, num_kv_heads=2, head_dim=8, **kw).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:
                p.normal_()
    x = torch.randn(1, 9, 16)
    with torch.no_grad():
        with decoding() as a:
            m(x)
        with decoding() as b:
            _causal_kv(m, x)
    for want, got in zip(a.get(m), b.get(m)):
        torch.testing.assert_close(got, want)


@pytest.mark.gpu
@pytest.mark.parametrize("kw", [{"sliding_window": 64}, {"softcap": 50.0, "scale": 0.0625},
                                {"sliding_window": 64, "softcap": 20.0}, {"qk_norm": "rms_proj"}],
                         ids=lambda kw: ",".join(kw))
def test_on_cuda_bf16_autocast_is_close_to_float32_and_trains(kw):
    """The SDPA path with a window mask and the soft-capped path run under bf16 autocast on a GPU,
    close to their float32 results, with gradients."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    torch.manual_seed(0)
    m = CausalSelfAttention(embed_dim=256, num_heads=8, num_kv_heads=2, head_dim=32, **kw).cuda()
    x = torch.randn(2, 512, 256, device="cuda")
    with torch.no_grad():
        want = m(x)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = m(x)
    assert got.dtype == torch.bfloat16
    assert ((got.float() - want).norm() / want.norm()).item() < 2e-2
    got.float().square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
