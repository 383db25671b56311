"""embed.rope's partial rotary and context-extension scalings against transformers' own rotary
embeddings (the same angles, so imported checkpoints rotate q and k as they were trained)."""

from __future__ import annotations

import pytest
import torch

from physlm_graph import PhysLMError, compile_blueprint
from physlm_graph._registry import REGISTRY
from physlm_graph.components._rope import apply_rope

transformers = pytest.importorskip("transformers")
transformers.AutoModelForCausalLM  # noqa: B018  (the auto classes first: importing a model module alone trips physlm_graph.hf's import hook)


def _theirs(config, head_dim: int, rd: int, q: torch.Tensor) -> torch.Tensor:
    """q (B, H, T, hd) rotated as transformers does: its rotary module's cos/sin on the first rd
    channels (rotate_half), the rest passed through."""
    from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXRotaryEmbedding

    rot = GPTNeoXRotaryEmbedding(config)
    pos = torch.arange(q.shape[2])[None]
    cos, sin = rot(q, pos)  # (1, T, rd)
    cos, sin = cos[:, None], sin[:, None]
    qr, qp = q[..., :rd], q[..., rd:]
    half = torch.cat([-qr[..., rd // 2:], qr[..., : rd // 2]], dim=-1)
    return torch.cat([qr * cos + half * sin, qp], dim=-1)


CASES = {
    "partial": ({"rope_theta": 10000.0, "rope_type": "default", "partial_rotary_factor": 0.25},
                {"rotary_dim": 8}),
    "linear": ({"rope_theta": 10000.0, "rope_type": "linear", "factor": 4.0}, {"scaling": "linear", "factor": 4.0}),
    "llama3": ({"rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
               {"base": 500000.0, "scaling": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_seq_len": 64}),
    "yarn": ({"rope_theta": 10000.0, "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
             {"scaling": "yarn", "factor": 4.0, "original_max_seq_len": 32}),
    "yarn-partial": ({"rope_theta": 10000.0, "rope_type": "yarn", "factor": 3.0, "original_max_position_embeddings": 16,
                      "beta_fast": 16.0, "beta_slow": 2.0, "attention_factor": 1.3, "truncate": False,
                      "partial_rotary_factor": 0.5},
                     {"scaling": "yarn", "factor": 3.0, "original_max_seq_len": 16, "beta_fast": 16.0, "beta_slow": 2.0,
                      "attention_factor": 1.3, "truncate": False, "rotary_dim": 16}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_rotation_matches_transformers(case):
    rope_parameters, ours = CASES[case]
    head_dim, T = 32, 200
    cfg = transformers.GPTNeoXConfig(hidden_size=head_dim * 2, num_attention_heads=2, max_position_embeddings=256,
                                     rope_parameters={"partial_rotary_factor": 1.0, **rope_parameters})
    rd = ours.get("rotary_dim", head_dim)
    q = torch.randn(2, 2, T, head_dim, generator=torch.Generator().manual_seed(0))
    info = REGISTRY.get("embed.rope")
    mod = info.builder(info.params(head_dim=head_dim, max_seq_len=256, **ours), {})
    table = mod(torch.zeros(1, T, dtype=torch.long))
    got, want = apply_rope(q, table), _theirs(cfg, head_dim, rd, q)
    assert (got - want).abs().max().item() < 1e-5
    if rd < head_dim:
        assert torch.equal(got[..., rd:], q[..., rd:])  # the channels past rotary_dim do not turn
    if case != "partial":  # the scaling changed the angles: the unscaled table rotates differently
        plain = info.builder(info.params(head_dim=head_dim, max_seq_len=256, rotary_dim=ours.get("rotary_dim"),
                                         base=ours.get("base", 10000.0)), {})(torch.zeros(1, T, dtype=torch.long))
        assert (apply_rope(q, plain) - want).abs().max().item() > 1e-2


@pytest.mark.parametrize("params,msg", [
    ({"rotary_dim": 7}, "rotary_dim must be even and at most head_dim (16), got 7"),
    ({"rotary_dim": 18}, "rotary_dim must be even and at most head_dim (16), got 18"),
    ({"factor": 2.0}, "factor is not read with scaling: none (it reads none of them)"),
    ({"scaling": "linear", "factor": 2.0, "beta_fast": 8.0}, "beta_fast is not read with scaling: linear (it reads factor)"),
    ({"scaling": "llama3", "factor": 8.0}, "scaling: llama3 needs original_max_seq_len, low_freq_factor, high_freq_factor"),
    ({"scaling": "llama3", "factor": 8.0, "original_max_seq_len": 8, "low_freq_factor": 4.0, "high_freq_factor": 1.0},
     "high_freq_factor (1.0) must be above low_freq_factor (4.0)"),
    ({"scaling": "yarn", "factor": 2.0, "original_max_seq_len": 8, "beta_fast": 1.0, "beta_slow": 2.0},
     "beta_fast (1.0) must be at least beta_slow (2.0)"),
    ({"scaling": "linear", "factor": 0.5}, "greater than or equal to 1"),
])
def test_bad_settings_are_refused_with_the_reason(params, msg):
    doc = {"physlm": 1, "name": "t", "inputs": {"tokens": ["batch", "seq"]},
           "nodes": {"rope": {"use": "embed.rope", "in": "tokens", "head_dim": 16, "max_seq_len": 32, **params},
                     "tok": {"use": "embed.token", "in": "tokens", "vocab_size": 11, "embed_dim": 16},
                     "attn": {"use": "attention.causal", "in": {"x": "tok", "rope": "rope"}, "num_heads": 1},
                     "head": {"use": "head.lm", "in": "attn", "vocab_size": 11}},
           "outputs": {"logits": "head"}}
    with pytest.raises(PhysLMError) as err:
        compile_blueprint(doc, device="meta", build=False)
    assert msg in str(err.value)
    assert "rope" in str(err.value)


@pytest.mark.parametrize("style,rotary_dim", [("half", None), ("interleaved", None), ("half", 4), ("interleaved", 4)])
def test_rotation_gradient_is_a_gather_not_a_scatter(style, rotary_dim):
    """``apply_rope``'s gradient equals index_select's own (the partner row is a permutation), and
    the backward graph holds no ``index_add``/``scatter_add``: on a GPU those are atomic adds over
    every q and k of every layer that the compiler cannot fuse."""
    from torch._functorch.aot_autograd import aot_function

    from physlm_graph.components._rope import apply_rope, rope_table

    table = rope_table(3, 5, head_dim=8, base=100.0, style=style, rotary_dim=rotary_dim)
    x = torch.randn(2, 3, 5, 8, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 3, 5, 8, dtype=torch.float64)
    (apply_rope(x, table) * g).sum().backward()
    ours, x.grad = x.grad, None
    cos, sin, partner = table[:, :, 0].unsqueeze(1), table[:, :, 1].unsqueeze(1), table[0, 0, 2].long()
    ((x * cos + x.index_select(-1, partner) * sin) * g).sum().backward()
    assert torch.equal(ours, x.grad)
    torch.autograd.gradcheck(lambda x: apply_rope(x, table), (x,))

    backward_ops = []  # (op, elements of its output)

    def keep(gm, _):
        backward_ops.extend((str(n.target), n.meta["val"].numel()) for n in gm.graph.nodes
                            if n.op == "call_function" and hasattr(n.meta.get("val"), "numel"))
        return gm

    aot_function(apply_rope, fw_compiler=lambda gm, _: gm, bw_compiler=keep)(x, table).sum().backward()
    assert ("aten.index_select.default", x.numel()) in backward_ops
    # a scatter or index_add may only build the inverse permutation (head_dim entries), never touch the gradient
    assert not [(op, n) for op, n in backward_ops if ("index_add" in op or "scatter" in op) and n != 8], backward_ops
