"""moe.swiglu: the routed SwiGLU experts against a per-token loop and against transformers'
Mixtral and Qwen2-MoE blocks with the same weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from physlm_graph._registry import REGISTRY

transformers = pytest.importorskip("transformers")
transformers.AutoModelForCausalLM  # noqa: B018  (the auto classes first: importing a model module alone trips physlm_graph.hf's import hook)


def _build(**params):
    from physlm_graph.components.moe.swiglu import SwiGLUMoE

    p = REGISTRY.get("moe.swiglu").params(**params)
    torch.manual_seed(0)
    m = SwiGLUMoE(embed_dim=16, num_experts=p.num_experts, top_k=p.top_k, hidden_dim=p.hidden_dim,
                  normalize_weights=p.normalize_weights, shared_hidden_dim=p.shared_hidden_dim, shared_gate=p.shared_gate)
    return m.eval()


@pytest.mark.parametrize("normalize", [True, False])
def test_matches_a_per_token_loop(normalize):
    m = _build(num_experts=5, top_k=2, hidden_dim=12, normalize_weights=normalize, shared_hidden_dim=8, shared_gate=True)
    x = torch.randn(3, 7, 16)
    out, balance, z = m(x)
    want = torch.zeros_like(x)
    ex = m.experts
    for b in range(3):
        for t in range(7):
            v = x[b, t]
            p = (m.router.weight @ v).softmax(-1)
            w, e = p.topk(2)
            if normalize:
                w = w / w.sum()
            for wj, ej in zip(w, e):
                want[b, t] += wj * (ex.down[ej] @ (F.silu(ex.gate[ej] @ v) * (ex.up[ej] @ v)))
            want[b, t] += torch.sigmoid(m.shared_gate.weight @ v)[0] * m.shared(v[None])[0]
    assert (out - want).abs().max().item() < 1e-5
    assert balance.shape == () and z.shape == () and balance.item() > 0


def _copy_into_hf(m, block, router: str):
    with torch.no_grad():
        getattr(block, router).weight.copy_(m.router.weight)
        block.experts.gate_up_proj.copy_(torch.cat([m.experts.gate, m.experts.up], dim=1))
        block.experts.down_proj.copy_(m.experts.down)


def test_same_output_as_transformers_mixtral_block():
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = transformers.MixtralConfig(hidden_size=16, intermediate_size=12, num_local_experts=4, num_experts_per_tok=2)
    block = MixtralSparseMoeBlock(cfg).eval()
    m = _build(num_experts=4, top_k=2, hidden_dim=12, normalize_weights=True)
    _copy_into_hf(m, block, "gate")
    x = torch.randn(2, 9, 16)
    got = m(x)[0]
    theirs = block(x)
    theirs = theirs[0] if isinstance(theirs, tuple) else theirs
    assert (got - theirs).abs().max().item() < 1e-6


def test_same_output_as_transformers_qwen2_moe_block():
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    cfg = transformers.Qwen2MoeConfig(hidden_size=16, moe_intermediate_size=12, shared_expert_intermediate_size=20,
                                      num_experts=4, num_experts_per_tok=3, norm_topk_prob=False)
    block = Qwen2MoeSparseMoeBlock(cfg).eval()
    m = _build(num_experts=4, top_k=3, hidden_dim=12, normalize_weights=False, shared_hidden_dim=20, shared_gate=True)
    _copy_into_hf(m, block, "gate")
    with torch.no_grad():
        block.shared_expert.gate_proj.weight.copy_(m.shared.w1.weight)
        block.shared_expert.up_proj.weight.copy_(m.shared.w3.weight)
        block.shared_expert.down_proj.weight.copy_(m.shared.w2.weight)
        block.shared_expert_gate.weight.copy_(m.shared_gate.weight)
    x = torch.randn(2, 9, 16)
    theirs = block(x)
    theirs = theirs[0] if isinstance(theirs, tuple) else theirs
    assert (m(x)[0] - theirs).abs().max().item() < 1e-6


@pytest.mark.parametrize("params,msg", [
    ({"num_experts": 2, "top_k": 3, "hidden_dim": 4, "normalize_weights": True}, "top_k (3) must be <= num_experts (2)"),
    ({"num_experts": 2, "top_k": 1, "hidden_dim": 4, "normalize_weights": True}, "normalize_weights: true with top_k: 1"),
    ({"num_experts": 2, "top_k": 1, "hidden_dim": 4, "normalize_weights": False, "shared_gate": True},
     "shared_gate: true needs a shared expert"),
    ({"num_experts": 2, "top_k": 1, "hidden_dim": 4}, "normalize_weights"),
])
def test_bad_settings_are_refused(params, msg):
    with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        REGISTRY.get("moe.swiglu").params(**params)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_grouped_gemm_path_matches_the_padded_path_on_cuda_bf16():
    m = _build(num_experts=8, top_k=2, hidden_dim=64, normalize_weights=True).cuda().to(torch.bfloat16)
    x = torch.randn(4, 128, 16, device="cuda", dtype=torch.bfloat16)
    xt = x.reshape(-1, 16)
    expert = torch.randint(0, 8, (xt.shape[0],), device="cuda")
    fast = m.experts(xt, expert)
    slow = m.experts.float()(xt.float(), expert)
    assert (fast.float() - slow).abs().max().item() < 5e-2
