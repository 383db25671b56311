"""Baseline GPT/LLaMA components against plain reference formulas written here.

RoPE (both styles), causal attention (MHA, GQA, with and without rope, KV-cache decoding),
learned positions under decoding, parameter counts of a GPT-2 small block, SwiGLU, RMSNorm,
the LM head and the plain ops.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import physlm_graph
from physlm_graph import REGISTRY, ComponentError, Example
from physlm_graph.components._rope import apply_rope
from physlm_graph.testing import build_example, make_inputs

TOL = dict(atol=1e-5, rtol=1e-5)


def build(name: str, params: dict, inputs: dict, seed: int = 0) -> nn.Module:
    mod = build_example(name, Example(params, inputs), seed=seed)
    mod.eval()
    return mod


def tokens(B: int, T: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 50, (B, T), generator=torch.Generator().manual_seed(seed))


# -- RoPE ------------------------------------------------------------------------------------


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def rope_reference(x: torch.Tensor, style: str, base: float, offset: int = 0) -> torch.Tensor:
    """x (B, H, T, d): half = x cos + rotate_half(x) sin; interleaved = rotate each (x_2i, x_2i+1)."""
    B, H, T, d = x.shape
    x = x.double()
    pos = torch.arange(offset, offset + T, dtype=torch.float64)
    theta = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)  # (d/2,)
    ang = pos[:, None] * theta[None, :]  # (T, d/2)
    if style == "half":
        cos = torch.cat([ang.cos(), ang.cos()], dim=-1)
        sin = torch.cat([ang.sin(), ang.sin()], dim=-1)
        return x * cos + rotate_half(x) * sin
    out = torch.empty_like(x)
    for i in range(d // 2):  # tiny reference: loop over pairs
        a, b = x[..., 2 * i], x[..., 2 * i + 1]
        c, s = ang[:, i].cos(), ang[:, i].sin()
        out[..., 2 * i] = a * c - b * s
        out[..., 2 * i + 1] = a * s + b * c
    return out


@pytest.mark.parametrize("style", ["half", "interleaved"])
@pytest.mark.parametrize("base", [10000.0, 500000.0])
def test_rope_matches_reference(style, base):
    rope = build("embed.rope", {"head_dim": 8, "max_seq_len": 32, "base": base, "style": style}, {"tokens": ((2, 12), torch.long)})
    table = rope(tokens(2, 12))
    assert table.shape == (1, 12, 3, 8) and table.dtype == torch.float32
    x = torch.randn(2, 3, 12, 8)
    got = apply_rope(x, table)
    torch.testing.assert_close(got.double(), rope_reference(x, style, base), **TOL)


def test_rope_reads_decode_offset_and_max_seq_len():
    rope = build("embed.rope", {"head_dim": 8, "max_seq_len": 16, "style": "interleaved"}, {"tokens": ((1, 4), torch.long)})
    full = rope(tokens(1, 10))
    with physlm_graph.decoding() as ctx:
        ctx.offset = 6
        part = rope(tokens(1, 4))
        torch.testing.assert_close(part, full[:, 6:10])
        ctx.offset = 14
        with pytest.raises(ValueError, match="max_seq_len 16"):
            rope(tokens(1, 4))
    x = torch.randn(1, 2, 4, 8)
    torch.testing.assert_close(apply_rope(x, part).double(), rope_reference(x, "interleaved", 10000.0, offset=6), **TOL)


def test_rope_rejects_odd_head_dim():
    with pytest.raises(ValueError, match="even"):
        REGISTRY.get("embed.rope").params.model_validate({"head_dim": 7, "max_seq_len": 8})


def test_rope_runs_on_meta():
    rope = build_example("embed.rope", Example({"head_dim": 8, "max_seq_len": 16}, {"tokens": ((1, 4), torch.long)}), device="meta")
    assert rope(torch.zeros(2, 5, dtype=torch.long, device="meta")).shape == (1, 5, 3, 8)


# -- attention -------------------------------------------------------------------------------


def attention_reference(attn: nn.Module, x: torch.Tensor, table: torch.Tensor | None) -> torch.Tensor:
    """Materialised softmax(q k^T / sqrt(hd) + causal mask) v from the module's own weights."""
    B, T, D = x.shape
    H, Hkv, hd = attn.num_heads, attn.num_kv_heads, attn.head_dim
    qkv = x @ attn.qkv.weight.T + (attn.qkv.bias if attn.qkv.bias is not None else 0)
    q = qkv[..., : H * hd].reshape(B, T, H, hd).permute(0, 2, 1, 3)
    k = qkv[..., H * hd : (H + Hkv) * hd].reshape(B, T, Hkv, hd).permute(0, 2, 1, 3)
    v = qkv[..., (H + Hkv) * hd :].reshape(B, T, Hkv, hd).permute(0, 2, 1, 3)
    if table is not None:
        q, k = apply_rope(q, table), apply_rope(k, table)
    g = H // Hkv  # query head h uses kv head h // g
    k = k[:, torch.arange(H) // g]
    v = v[:, torch.arange(H) // g]
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)  # (B, H, T, T)
    future = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
    scores = scores.masked_fill(future, float("-inf"))
    y = scores.softmax(dim=-1) @ v  # (B, H, T, hd)
    y = y.permute(0, 2, 1, 3).reshape(B, T, H * hd)
    return y @ attn.proj.weight.T + (attn.proj.bias if attn.proj.bias is not None else 0)


ATTN_CASES = [
    pytest.param({"num_heads": 4}, id="mha"),
    pytest.param({"num_heads": 4, "num_kv_heads": 2, "bias": False}, id="gqa"),
    pytest.param({"num_heads": 4, "num_kv_heads": 1}, id="mqa"),
    pytest.param({"num_heads": 2, "head_dim": 12}, id="explicit-head-dim"),
]


@pytest.mark.parametrize("params", ATTN_CASES)
@pytest.mark.parametrize("style", [None, "half", "interleaved"])
def test_attention_matches_reference(params, style):
    D, T = 32, 9
    attn = build("attention.causal", params, {"x": (2, T, D)})
    x = torch.randn(2, T, D)
    table = None
    if style is not None:
        rope = build("embed.rope", {"head_dim": attn.head_dim, "max_seq_len": 64, "style": style}, {"tokens": ((2, T), torch.long)})
        table = rope(tokens(2, T))
    with torch.no_grad():
        torch.testing.assert_close(attn(x, table), attention_reference(attn, x, table), **TOL)


@pytest.mark.parametrize("params", ATTN_CASES)
@pytest.mark.parametrize("chunks", [[5, 1, 1, 1, 1], [5, 3, 1, 2], [1] * 6])
def test_attention_kv_cache_equals_full_sequence(params, chunks):
    D, T = 32, sum(chunks)
    attn = build("attention.causal", params, {"x": (2, T, D)})
    rope = build("embed.rope", {"head_dim": attn.head_dim, "max_seq_len": 64}, {"tokens": ((2, T), torch.long)})
    x, tok = torch.randn(2, T, D), tokens(2, T)
    with torch.no_grad():
        full = attn(x, rope(tok))
        outs = []
        with physlm_graph.decoding() as ctx:
            for n in chunks:
                s = ctx.offset
                outs.append(attn(x[:, s : s + n], rope(tok[:, s : s + n])))
                ctx.offset += n
        assert physlm_graph.decode_context() is None
    torch.testing.assert_close(torch.cat(outs, dim=1), full, **TOL)


def test_learned_position_decoding_equals_full_sequence():
    pos = build("embed.learned_position", {"max_seq_len": 16, "embed_dim": 8}, {"tokens": ((2, 9), torch.long)})
    tok = tokens(2, 9)
    full = pos(tok)
    assert full.shape == (1, 9, 8)
    torch.testing.assert_close(full[0], pos.weight[:9])
    outs = []
    with physlm_graph.decoding() as ctx:
        for n in [5, 1, 1, 1, 1]:
            outs.append(pos(tok[:, ctx.offset : ctx.offset + n]))
            ctx.offset += n
    torch.testing.assert_close(torch.cat(outs, dim=1), full)


def test_learned_position_too_long_is_a_clear_error():
    pos = build("embed.learned_position", {"max_seq_len": 8, "embed_dim": 4}, {"tokens": ((1, 8), torch.long)})
    with pytest.raises(ValueError, match=r"positions 0\.\.8 do not fit max_seq_len 8"):
        pos(tokens(1, 9))
    with physlm_graph.decoding() as ctx:
        ctx.offset = 7
        pos(tokens(1, 1))
        with pytest.raises(ValueError, match=r"positions 7\.\.8"):
            pos(tokens(1, 2))


def attn_error(params: dict, width: int) -> ComponentError:
    with pytest.raises(ComponentError) as err:
        build("attention.causal", params, {"x": (2, 4, width)})
    return err.value


def test_attention_rejects_bad_heads():
    e = attn_error({"num_heads": 5}, 384)
    assert str(e) == "num_heads (5) must divide the input width 384"
    assert (e.param, e.got) == ("num_heads", "5")
    assert e.fix.startswith("use one of 1, 2, 3, 4, 6, 8, 12")
    e = attn_error({"num_heads": 8, "num_kv_heads": 3}, 64)
    assert str(e) == "num_kv_heads (3) must divide num_heads (8)"
    assert (e.param, e.got, e.fix) == ("num_kv_heads", "3", "use one of 1, 2, 4, 8")
    # an explicit head_dim frees num_heads from dividing the width
    build("attention.causal", {"num_heads": 5, "head_dim": 8}, {"x": (2, 4, 384)})


def test_attention_rejects_mismatched_rope_table():
    with pytest.raises(ComponentError, match="head_dim 16 but the attention's head_dim is 8"):
        build("attention.causal", {"num_heads": 4}, {"x": (2, 4, 32), "rope": (1, 4, 3, 16)})


def test_attention_dropout_only_in_training():
    attn = build("attention.causal", {"num_heads": 4, "dropout": 0.5}, {"x": (2, 8, 32)})
    x = torch.randn(2, 8, 32)
    with torch.no_grad():
        torch.testing.assert_close(attn(x, None), attention_reference(attn, x, None), **TOL)
        attn.train()
        torch.manual_seed(0)
        a = attn(x, None)
        torch.manual_seed(1)
        b = attn(x, None)
    assert not torch.allclose(a, b)


def count(mod: nn.Module) -> int:
    return sum(p.numel() for p in mod.parameters())


def test_gpt2_small_block_parameter_count():
    x = {"x": (1, 4, 768)}
    attn = build_example("attention.causal", Example({"num_heads": 12}, x), device="meta")
    mlp = build_example("ffn.mlp", Example({"hidden_dim": 3072}, x), device="meta")
    ln = build_example("norm.layer", Example({}, x), device="meta")
    assert count(attn.qkv) == 768 * 2304 + 2304
    assert count(attn.proj) == 768 * 768 + 768
    assert count(attn) + count(mlp) + 2 * count(ln) == 7_087_872


def test_llama_gqa_attention_parameter_count():
    # LLaMA-3-8B attention: D 4096, 32 heads, 8 kv heads, no biases.
    attn = build_example("attention.causal", Example({"num_heads": 32, "num_kv_heads": 8, "bias": False}, {"x": (1, 4, 4096)}), device="meta")
    assert count(attn) == 4096 * (4096 + 2 * 1024) + 4096 * 4096


# -- the rest -------------------------------------------------------------------------------


def test_swiglu_matches_reference():
    ffn = build("ffn.swiglu", {"hidden_dim": 40}, {"x": (2, 8, 16)})
    x = torch.randn(2, 8, 16)
    a, b = x @ ffn.w1.weight.T, x @ ffn.w3.weight.T
    want = (a * torch.sigmoid(a) * b) @ ffn.w2.weight.T
    with torch.no_grad():
        torch.testing.assert_close(ffn(x), want, **TOL)
    assert ffn.w1.bias is None and count(ffn) == 3 * 16 * 40


def test_rms_norm_matches_reference():
    norm = build("norm.rms", {"eps": 1e-5}, {"x": (2, 8, 16)})
    with torch.no_grad():
        norm.weight.copy_(torch.randn(16))
    x = torch.randn(2, 8, 16)
    xd = x.double()
    want = xd / torch.sqrt((xd**2).mean(-1, keepdim=True) + 1e-5) * norm.weight.double()
    torch.testing.assert_close(norm(x).double(), want, **TOL)
    # bf16 activations: normalised in fp32, cast back, times the weight, output in bf16
    got = norm(x.to(torch.bfloat16))
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), want, atol=2e-2, rtol=1e-2)


def test_layer_norm_matches_torch_and_bias_flag():
    x = torch.randn(2, 8, 16)
    ln = build("norm.layer", {"eps": 1e-3}, {"x": (2, 8, 16)})
    torch.testing.assert_close(ln(x), nn.functional.layer_norm(x, (16,), eps=1e-3))
    assert ln.bias is not None and build("norm.layer", {"bias": False}, {"x": (2, 8, 16)}).bias is None


def test_token_embedding_and_lm_head_share_layout():
    emb = build("embed.token", {"vocab_size": 50, "embed_dim": 16}, {"tokens": ((2, 8), torch.long)})
    head = build("head.lm", {"vocab_size": 50}, {"x": (2, 8, 16)})
    assert emb.weight.shape == head.weight.shape == (50, 16)
    assert REGISTRY.get("embed.token").tie_param == "weight" == REGISTRY.get("head.lm").tie_param
    tok = tokens(2, 8)
    torch.testing.assert_close(emb(tok), emb.weight[tok])
    x = torch.randn(2, 8, 16)
    torch.testing.assert_close(head(x), x @ head.weight.T)
    assert abs(emb.weight.std().item() - 0.02) < 0.005


def test_decode_kinds():
    kinds = {n: REGISTRY.get(n).decode for n in ["embed.token", "embed.learned_position", "embed.rope", "norm.layer",
                                                 "norm.rms", "attention.causal", "ffn.swiglu", "misc.dropout", "head.lm"]}
    assert kinds == {"embed.token": "stateless", "embed.learned_position": "cached", "embed.rope": "cached",
                     "norm.layer": "stateless", "norm.rms": "stateless", "attention.causal": "cached",
                     "ffn.swiglu": "stateless", "misc.dropout": "stateless", "head.lm": "stateless"}


def test_dropout():
    drop = build("misc.dropout", {"p": 0.5}, {"x": (4, 64)})
    x = torch.ones(4, 64)
    assert torch.equal(drop(x), x)
    drop.train()
    y = drop(x)
    assert set(y.unique().tolist()) <= {0.0, 2.0} and 0 < (y == 0).sum() < x.numel()


# -- plain ops ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["add", "mul", "concat", "scale"])
def test_ops_examples(name):
    info = REGISTRY.get(name)
    assert info.builder is None and info.function is not None and info.examples
    assert info.function.__module__ == "physlm_graph.components.ops.basic"
    for ex in info.examples:
        xs = make_inputs(ex)
        params = info.params.model_validate(ex.params).model_dump()
        got = info.function(*xs, **params)
        if name == "add":
            want = xs[0] + xs[1]
        elif name == "mul":
            want = xs[0] * xs[1]
        elif name == "concat":
            want = torch.cat(xs, dim=params["dim"])
        else:
            want = xs[0] * params["factor"]
        torch.testing.assert_close(got, want)
        meta = info.function(*[x.to("meta") for x in xs], **params)
        assert meta.shape == want.shape


def test_ops_are_variadic():
    from physlm_graph.components.ops.basic import add, concat, mul

    a, b, c = torch.randn(3, 2, 4).unbind(0)
    torch.testing.assert_close(add(a, b, c), a + b + c)
    torch.testing.assert_close(mul(a, b, c), a * b * c)
    assert concat(a, b, c).shape == (2, 12)
    assert REGISTRY.get("add").variadic and not REGISTRY.get("scale").variadic
