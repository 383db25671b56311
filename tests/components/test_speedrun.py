"""blueprints/speedrun-track3.yaml: its parameter count, its pieces against formulas written here,
and the whole model against the hand-written reference (benchmarks/_handspeedrun.py) with the
same weights: equal fp32 logits and summed losses."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from physlm_graph import Example, compile_blueprint
from physlm_graph.components._rope import apply_rope
from physlm_graph.testing import build_example

ROOT = Path(__file__).resolve().parents[2]
BLUEPRINT = ROOT / "blueprints" / "speedrun-track3.yaml"
sys.path.insert(0, str(ROOT / "benchmarks"))
from _handspeedrun import HandSpeedrun, load_blueprint_state  # noqa: E402

SMALL = {"params.layers": 2, "params.dim": 256, "params.vocab": 512, "params.context": 64, "train.seq_len": 64}


def test_full_size_parameter_count_on_meta():
    cm = compile_blueprint(BLUEPRINT, device="meta")
    assert cm.num_params == 162_354_816
    assert sum(p.numel() for p in cm.module.parameters()) == 162_354_816
    sd = cm.module.state_dict()
    assert sd["tok.weight"].dtype == torch.bfloat16 and sd["head.weight"].dtype == torch.float32
    assert "head.bias" in sd and sd["trunk.0.attn.qkv.bias"].shape == (3 * 768,)  # every linear has a bias
    attn = cm.module.get_submodule("trunk.0.attn")
    assert (attn.num_heads, attn.head_dim, attn.scale, attn.qk_norm) == (6, 128, 0.12, "rms")
    with torch.device("meta"):
        hand = HandSpeedrun()
    assert sum(p.numel() for p in hand.parameters()) == 162_354_816


def _perturbed(cm, seed: int = 0):
    """The blueprint model with every parameter random (gains near 1, biases non-zero), so each
    weight, gain and bias matters to the comparison."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in cm.module.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if name.endswith("n1.weight") or name.endswith("n2.weight") or name in ("x0.weight", "norm.weight"):
                p.copy_(1.0 + 0.2 * r)
            elif name == "tok.weight":
                p.copy_(r)
            elif name == "head.weight":  # logits of a few units: the cap's curve matters
                p.copy_(r * 5.0 / math.sqrt(p.shape[-1]))
            else:
                p.copy_(r * (0.5 / math.sqrt(p.shape[-1]) if p.ndim == 2 else 0.1))
    return cm.module.eval()


@pytest.mark.parametrize("embed_dtype", ["bfloat16", "float32"])
def test_blueprint_equals_hand_written_reference(embed_dtype):
    cm = compile_blueprint(BLUEPRINT, overrides={**SMALL, "params.embed_dtype": embed_dtype})
    model = _perturbed(cm)
    assert cm.module.get_submodule("trunk.0.attn").num_heads == 2
    hand = HandSpeedrun(vocab=512, dim=256, layers=2, head_dim=128, embed_dtype=getattr(torch, embed_dtype)).eval()
    load_blueprint_state(hand, model.state_dict())
    x = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = model(x)["logits"]
        want = hand(x)
        assert got.dtype == want.dtype == torch.float32 and got.shape == (2, 48, 512)
        assert got.abs().max() < 15.0 and got.std() > 2.0  # capped, and not trivially small
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        loss = F.cross_entropy(got.reshape(-1, 512), y.reshape(-1), reduction="sum")
        torch.testing.assert_close(loss, hand.loss(x, y), atol=1e-3, rtol=1e-6)


def test_reference_differs_when_a_piece_differs():
    """The comparison can fail: the same weights with the rotary turned the usual way differ."""
    cm = compile_blueprint(BLUEPRINT, overrides={**SMALL, "nodes.rope.sign": 1})
    model = _perturbed(cm)
    hand = HandSpeedrun(vocab=512, dim=256, layers=2, head_dim=128).eval()
    load_blueprint_state(hand, model.state_dict())
    x = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model(x)["logits"] - hand(x)).abs().max() > 1e-2


def test_residual_stream_is_bf16_under_autocast_and_fp32_without():
    cm = compile_blueprint(BLUEPRINT, overrides=SMALL)
    seen = []
    hook = cm.module.get_submodule("trunk.1.n1").register_forward_pre_hook(lambda _m, a: seen.append(a[0].dtype))
    x = torch.randint(0, 512, (1, 16))
    with torch.no_grad():
        assert cm.module(x)["logits"].dtype == torch.float32
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert cm.module(x)["logits"].dtype == torch.float32  # the cap computes in fp32
    hook.remove()
    assert seen == [torch.float32, torch.bfloat16]


# -- the pieces, against formulas written here --------------------------------------------------


def test_truncated_rope_reference():
    d, T = 16, 12
    rope = build_example("embed.rope", Example({"head_dim": d, "max_seq_len": 32, "base": 1024.0,
                                                 "frequencies": "truncated", "sign": -1}, {"tokens": ((1, T), torch.long)}))
    table = rope(torch.zeros(1, T, dtype=torch.long))
    x = torch.randn(2, 3, T, d, dtype=torch.float64)
    got = apply_rope(x.float(), table).double()
    want = torch.empty_like(x)
    for i in range(d // 2):  # pair (i, i + d/2); the first d/4 turn at 1024^(-i/(d/4-1)), the rest stand still
        theta = 1024.0 ** (-i / (d // 4 - 1)) if i < d // 4 else 0.0
        ang = torch.arange(T, dtype=torch.float64) * theta
        c, s = ang.cos(), ang.sin()
        x1, x2 = x[..., i], x[..., i + d // 2]
        want[..., i] = x1 * c + x2 * s
        want[..., i + d // 2] = -x1 * s + x2 * c
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(got[..., d // 4 : d // 2], x[..., d // 4 : d // 2].float().double())  # not turning


def test_truncated_rope_needs_a_multiple_of_four():
    from pydantic import ValidationError

    from physlm_graph import REGISTRY

    with pytest.raises(ValidationError, match="multiple of 4 and at least 8"):
        REGISTRY.get("embed.rope").params.model_validate({"head_dim": 6, "max_seq_len": 8, "frequencies": "truncated"})


def test_attention_qk_norm_and_scale():
    attn = build_example("attention.causal", Example({"num_heads": 2, "head_dim": 8, "scale": 0.12, "qk_norm": "rms"},
                                                     {"x": (2, 5, 16)})).eval()
    x = torch.randn(2, 5, 16)
    q, k, v = attn.qkv(x).view(2, 5, 3, 2, 8).permute(2, 0, 3, 1, 4)  # (B, H, T, hd) each
    q = q / (q.pow(2).mean(-1, keepdim=True) + torch.finfo(torch.float32).eps).sqrt()
    k = k / (k.pow(2).mean(-1, keepdim=True) + torch.finfo(torch.float32).eps).sqrt()
    w = (0.12 * q @ k.transpose(-1, -2)).masked_fill(torch.ones(5, 5).triu(1).bool(), float("-inf")).softmax(-1)
    want = attn.proj((w @ v).transpose(1, 2).reshape(2, 5, 16))
    torch.testing.assert_close(attn(x), want, atol=1e-5, rtol=1e-5)


def test_relu2_softcap_norm_eps_and_bf16_table():
    mlp = build_example("ffn.relu2", Example({"hidden_dim": 32}, {"x": (2, 4, 8)}))
    x = torch.randn(2, 4, 8)
    torch.testing.assert_close(mlp(x), mlp.proj(torch.clamp(mlp.fc(x), min=0) ** 2))
    for form, fn in (("algebraic", lambda z: 15 * z / torch.sqrt(z * z + 225)), ("tanh", lambda z: 15 * torch.tanh(z / 15))):
        cap = build_example("head.softcap", Example({"cap": 15.0, "form": form}, {"x": (2, 4, 8)}))
        z = torch.randn(2, 4, 8) * 40
        torch.testing.assert_close(cap(z.bfloat16()), fn(z.bfloat16().float()))
        assert cap(z.bfloat16()).dtype == torch.float32
    assert torch.finfo(torch.float32).eps == 1.1920928955078125e-07  # the blueprint's norm_eps
    small = torch.full((1, 1, 8), 1e-3)  # mean square 1e-6: the eps shows
    for dtype in (torch.float32, torch.bfloat16):  # F.rms_norm's default eps is float32's, bf16 input or not
        want = small.to(dtype).float() / math.sqrt(1e-6 + torch.finfo(torch.float32).eps)
        torch.testing.assert_close(F.rms_norm(small.to(dtype), (8,)).float(), want, rtol=1e-2, atol=0)
    torch.manual_seed(0)
    t32 = build_example("embed.token", Example({"vocab_size": 10, "embed_dim": 4}, {"tokens": ((1, 3), torch.long)}), seed=3)
    t16 = build_example("embed.token", Example({"vocab_size": 10, "embed_dim": 4, "dtype": "bfloat16"},
                                               {"tokens": ((1, 3), torch.long)}), seed=3)
    assert t16.weight.dtype == torch.bfloat16 and torch.equal(t16.weight, t32.weight.bfloat16())
