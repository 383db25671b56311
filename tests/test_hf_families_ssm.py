"""The state-space Hugging Face families both ways: mamba2, jamba (Mamba-1 + attention) and bamba
(Mamba-2 + attention with partial rotary). A small random transformers model (2-3 layers, narrow,
fp32) -> import -> same logits -> export -> plain transformers (without physlm_graph) -> same
logits; incremental decoding of the imported model equals its full forward; the family blueprints
at transformers' default sizes have transformers' parameter counts. Nothing is downloaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import physlm_graph  # noqa: E402
from physlm_graph import compile_blueprint  # noqa: E402
from physlm_graph._hf_export import export_hf  # noqa: E402
from physlm_graph._hf_import import import_hf  # noqa: E402
from physlm_graph.cli import main  # noqa: E402
from physlm_graph.runtime.checkpoint import load_checkpoint  # noqa: E402
from physlm_graph.runtime.generate import generate  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 97
X = torch.randint(0, VOCAB, (2, 21), generator=torch.Generator().manual_seed(1))


def _config(model_type: str, **kw):
    """2-3 layers, 32 wide; the hybrids get one attention layer, the scans several chunks."""
    args = dict(vocab_size=VOCAB, hidden_size=32, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    if model_type == "mamba2":
        args.update(num_hidden_layers=2, expand=2, num_heads=8, head_dim=8, state_size=8, n_groups=2, chunk_size=8,
                    conv_kernel=3, layer_norm_epsilon=1e-5, use_bias=True)
    elif model_type == "jamba":
        args.update(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
                    num_experts=3, num_experts_per_tok=2, expert_layer_period=2, expert_layer_offset=0,
                    attn_layer_period=2, attn_layer_offset=1, mamba_d_state=4, mamba_dt_rank=3,
                    mamba_proj_bias=True, rms_norm_eps=1e-5)
    else:
        args.update(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
                    attn_layer_indices=[1], mamba_n_heads=8, mamba_d_state=8, mamba_n_groups=2, mamba_chunk_size=8,
                    mamba_proj_bias=True, attention_bias=True, rms_norm_eps=1e-5, max_position_embeddings=64)
    return transformers.AutoConfig.for_model(model_type, **{**args, **kw})


def _tiny(model_type: str, **kw):
    """A small transformers model with every weight random, at a scale where the logits are O(1):
    norms, biases, D and A_log off their defaults, so a swapped or misplaced tensor shows."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_config(model_type, **kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("bias", ".D")) or "norm" in name:
                p.normal_(0.0, 0.5 if name.endswith(("bias", ".D")) else 1.0).add_(1.0 if "norm" in name else 0.0)
            elif "A_log" in name:
                p.add_(torch.randn_like(p) * 0.3)
            elif p.dim() >= 2:
                p.normal_(0.0, 0.5 / p.shape[-1] ** 0.5)
    return model.eval()


def _logits(model, x):
    with torch.no_grad():
        return model(x).logits


FAMILIES = ["mamba2", "jamba", "bamba"]
CLASSES = {"mamba2": "Mamba2ForCausalLM", "jamba": "JambaForCausalLM", "bamba": "BambaForCausalLM"}


def _round_trip(model_type, tmp_path):
    """The tiny model imported and exported again; returns (model, export folder, its logits)."""
    model = _tiny(model_type)
    model.save_pretrained(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "ckpt")
    ck = load_checkpoint(tmp_path / "ckpt")
    assert ck.model.blueprint["name"] == f"{model_type}-import"
    want = _logits(model, X)
    assert want.std().item() > 0.3  # logits of a size where a wrong weight cannot hide under 1e-5
    got = ck.model.module(X)["logits"]
    assert (got - want).abs().max().item() < 1e-5
    r = export_hf(tmp_path / "ckpt", tmp_path / "out")
    assert (r.model_type, r.why_physlm) == (model_type, "")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == model_type
    return model, tmp_path / "out", want


@pytest.mark.parametrize("model_type", FAMILIES)
def test_import_gives_the_same_logits_and_export_loads_in_transformers(model_type, tmp_path):
    _, out, want = _round_trip(model_type, tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(back).__name__ == CLASSES[model_type]
    assert (_logits(back, X) - want).abs().max().item() < 1e-5


@pytest.mark.slow
def test_exports_load_in_plain_transformers_without_physlm_graph(tmp_path):
    """One fresh interpreter (transformers' import is most of the time) loads all three exports."""
    io = {}
    for model_type in FAMILIES:
        _, out, want = _round_trip(model_type, tmp_path / model_type)
        io[str(out)] = want
    torch.save({"x": X, "want": io}, tmp_path / "io.pt")
    code = textwrap.dedent(f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        io = torch.load({str(tmp_path / "io.pt")!r})
        for out, want in io["want"].items():
            m = AutoModelForCausalLM.from_pretrained(out).eval()
            with torch.no_grad():
                print(type(m).__name__, (m(io["x"]).logits - want).abs().max().item())
        print("physlm_graph" in sys.modules)
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    *rows, imported = run.stdout.split("\n")[:-1]
    assert [r.split()[0] for r in rows] == [CLASSES[t] for t in FAMILIES]
    assert all(float(r.split()[1]) < 1e-5 for r in rows)
    assert imported == "False"


def test_the_hybrids_put_each_layer_kind_where_the_config_says(tmp_path):
    """Jamba: attention where i % attn_layer_period == attn_layer_offset, experts where i %
    expert_layer_period == expert_layer_offset (all four combinations here); Bamba: attention at
    attn_layer_indices; one expert is a plain MLP everywhere."""
    cases = (("jamba", {"num_hidden_layers": 5, "attn_layer_period": 3, "attn_layer_offset": 1,
                        "expert_layer_period": 2, "expert_layer_offset": 1}, [1, 4], [1, 3]),
             ("jamba", {"num_experts": 1, "num_experts_per_tok": 1}, [1], []),
             ("bamba", {"num_hidden_layers": 4, "attn_layer_indices": [0, 3]}, [0, 3], []))
    for n, (model_type, kw, attn, moe) in enumerate(cases):
        model = _tiny(model_type, **kw)
        model.save_pretrained(tmp_path / str(n))
        cm = import_hf(tmp_path / str(n), tmp_path / f"{n}-ckpt")
        layers = cm.resolved.instances["trunk"]
        nodes = cm.graph["nodes"]
        assert [i for i, p in enumerate(layers) if f"{p}.attn" in nodes] == attn
        assert [i for i, p in enumerate(layers) if f"{p}.moe" in nodes] == moe
        assert all((f"{p}.attn" in nodes) != (f"{p}.mamba" in nodes) for p in layers)
        assert all((f"{p}.moe" in nodes) != (f"{p}.ffn" in nodes) for p in layers)
        assert (cm.module(X)["logits"] - _logits(model, X)).abs().max().item() < 1e-5


def _incremental_logits(module, x, first):
    """Logits of ``x`` fed as a prefix of ``first`` tokens and then one token at a time."""
    outs = []
    with torch.no_grad(), physlm_graph.decoding() as ctx:
        outs.append(module(x[:, :first])["logits"])
        ctx.offset = first
        for t in range(first, x.shape[1]):
            outs.append(module(x[:, t : t + 1])["logits"])
            ctx.offset += 1
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_incremental_decoding_equals_the_full_forward(model_type, tmp_path):
    """The recurrent states (conv inputs + SSM state) and the attention cache carry exactly the
    prefix: step-by-step logits equal the full forward's, and cached greedy generation equals
    generation that recomputes the whole context every step."""
    _tiny(model_type).save_pretrained(tmp_path / "hf")
    cm = import_hf(tmp_path / "hf", tmp_path / "ckpt")
    with torch.no_grad():
        full = cm.module(X)["logits"]
    torch.testing.assert_close(_incremental_logits(cm.module, X, 5), full, atol=1e-5, rtol=1e-5)
    prompt = X[:, :4]
    cached = generate(cm, prompt, max_new_tokens=6, temperature=0, use_cache=True)
    recomputed = generate(cm, prompt, max_new_tokens=6, temperature=0, use_cache=False)
    assert cached.shape == (2, 10)
    assert torch.equal(cached, recomputed)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", FAMILIES)
def test_full_size_family_blueprint_has_transformers_parameter_count(model_type):
    cfg = transformers.AutoConfig.for_model(model_type)  # Mamba2Config(), JambaConfig() (Jamba v0.1), BambaConfig()
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    theirs = sum(p.numel() for p in model.parameters())
    ours = compile_blueprint(ROOT / "blueprints" / "families" / f"{model_type}.yaml", device="meta", build=False)
    assert ours.num_params == theirs
    assert theirs == {"mamba2": 7_285_403_648, "jamba": 51_570_323_328, "bamba": 9_992_765_440}[model_type]


def test_what_the_ssm_families_cannot_express_is_named(tmp_path, capsys):
    cases = {"mamba2": {"time_step_limit": [0.0, 0.1], "hidden_act": "gelu"},
             "jamba": {"hidden_act": "gelu"}, "bamba": {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0,
                                                                         "rope_theta": 10000.0}}}
    want = {"mamba2": ["time_step_limit: [0.0, 0.1] is not supported yet (mamba2 imports need time_step_limit: "
                       "[0.0, inf])", "hidden_act: gelu is not supported yet (mamba2 imports need hidden_act: silu)"],
            "jamba": ["hidden_act: gelu is not supported yet (jamba imports need hidden_act: silu)"],
            "bamba": ["rope_parameters.rope_type: dynamic is not supported yet (supported: default, linear, llama3, "
                      "yarn)"]}
    for model_type, change in cases.items():
        folder = tmp_path / model_type
        transformers.AutoConfig.for_model(model_type).save_pretrained(folder)
        cfg = json.loads((folder / "config.json").read_text())
        cfg.update(change)
        (folder / "config.json").write_text(json.dumps(cfg, indent=2))
        capsys.readouterr()
        assert main(["import", str(folder), "--out", str(tmp_path / "ckpt")]) == 2
        err = capsys.readouterr().err
        for line in want[model_type]:
            assert line in err, err
        assert not (tmp_path / "ckpt").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("model_type", FAMILIES)
def test_imported_families_run_on_cuda_as_on_cpu(model_type, tmp_path):
    """The CUDA paths (SSD's head-major layout, the SDPA kernels) give the CPU logits, fp32, no TF32;
    and step-by-step decoding on CUDA equals the CUDA full forward."""
    _tiny(model_type).save_pretrained(tmp_path / "hf")
    cm = import_hf(tmp_path / "hf", tmp_path / "ckpt")
    with torch.no_grad():
        cpu = cm.module(X)["logits"]
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        cm.module.cuda()
        with torch.no_grad():
            gpu = cm.module(X.cuda())["logits"]
        assert (gpu.cpu() - cpu).abs().max().item() < 1e-4
        torch.testing.assert_close(_incremental_logits(cm.module, X.cuda(), 5), gpu, atol=1e-4, rtol=1e-4)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
