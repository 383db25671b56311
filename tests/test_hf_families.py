"""Hugging Face families both ways: transformers model -> import -> same logits -> export ->
plain transformers (without physlm_graph) -> same logits. Small random models from a config,
fp32, nothing downloaded."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from physlm_graph import compile_blueprint  # noqa: E402
from physlm_graph._hf_export import export_hf  # noqa: E402
from physlm_graph._hf_families import FAMILIES, HFError  # noqa: E402
from physlm_graph._hf_import import import_hf  # noqa: E402
from physlm_graph.cli import main  # noqa: E402
from physlm_graph.runtime.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GPT2_TOKENIZER = ROOT.parent / "shared" / "data" / "tokenizers" / "gpt2"
VOCAB = 97


def _tiny(model_type: str, **kw):
    """A 2-layer, narrow transformers model with random weights (biases random too)."""
    torch.manual_seed(0)
    if model_type == "qwen2":
        cfg = transformers.Qwen2Config(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                       intermediate_size=48, vocab_size=VOCAB, max_position_embeddings=64,
                                       rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=0, **kw)
        return _randomize(transformers.Qwen2ForCausalLM(cfg))
    if model_type == "gpt2":
        cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=64,
                                      bos_token_id=0, eos_token_id=0, **kw)
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                       intermediate_size=48, vocab_size=VOCAB, max_position_embeddings=64,
                                       rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=0, **kw)
        model = transformers.LlamaForCausalLM(cfg)
    return _randomize(model)


def _randomize(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_" in name:
                p.normal_(0.0, 0.1 if name.endswith("bias") else 1.0)  # the defaults (0 / 1) would hide mix-ups
    return model.eval()


def _logits(model, x):
    with torch.no_grad():
        return model(x).logits


X = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "qwen2"])
def test_full_size_family_blueprint_has_transformers_parameter_count(model_type):
    cfg = transformers.AutoConfig.for_model(model_type)  # GPT2Config(): GPT-2 124M, LlamaConfig(): Llama 2 7B
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    theirs = sum(p.numel() for p in model.parameters())
    ours = compile_blueprint(ROOT / "blueprints" / "families" / f"{model_type}.yaml", device="meta", build=False)
    assert ours.num_params == theirs
    assert theirs == {"gpt2": 124_439_808, "llama": 6_738_415_616, "qwen2": 12_049_846_272}[model_type]


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "qwen2"])
def test_import_gives_the_same_logits_and_export_loads_in_plain_transformers(model_type, tmp_path):
    model = _tiny(model_type, **({"attention_bias": True} if model_type == "llama" else {}))
    model.save_pretrained(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "ckpt")
    ck = load_checkpoint(tmp_path / "ckpt")
    assert ck.model.blueprint["name"] == f"{model_type}-import"
    want = _logits(model, X)
    got = ck.model.module(X)["logits"]
    assert (got - want).abs().max().item() < 1e-5

    r = export_hf(tmp_path / "ckpt", tmp_path / "out")
    assert r.model_type == model_type
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == model_type
    torch.save({"x": X, "want": want}, tmp_path / "io.pt")
    code = textwrap.dedent(f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained({str(tmp_path / "out")!r}).eval()
        io = torch.load({str(tmp_path / "io.pt")!r})
        with torch.no_grad():
            err = (m(io["x"]).logits - io["want"]).abs().max().item()
        print(type(m).__name__, err, "physlm_graph" in sys.modules)
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    cls, err, imported = run.stdout.split()
    assert cls == {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[model_type]
    assert float(err) < 1e-5
    assert imported == "False"


def test_sharded_safetensors_import(tmp_path):
    model = _tiny("llama")
    model.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "hf").glob("model-*.safetensors"))) > 1
    import_hf(tmp_path / "hf", tmp_path / "ckpt")
    got = load_checkpoint(tmp_path / "ckpt").model.module(X)["logits"]
    assert (got - _logits(model, X)).abs().max().item() < 1e-5


def test_a_config_we_cannot_express_names_each_missing_piece(tmp_path, capsys):
    model = _tiny("llama")
    model.save_pretrained(tmp_path / "hf")
    path = tmp_path / "hf" / "config.json"
    cfg = json.loads(path.read_text())
    cfg["hidden_act"] = "gelu"
    cfg["pretraining_tp"] = 2
    cfg["rope_parameters"] = {"rope_type": "dynamic", "rope_theta": 500000.0, "factor": 8.0}
    path.write_text(json.dumps(cfg, indent=2))
    lines = path.read_text().splitlines()
    capsys.readouterr()

    def at(key: str) -> str:
        n = next(i for i, ln in enumerate(lines) if f'"{key}"' in ln)
        return f"{path}:{n + 1}:{lines[n].index(chr(34) + key) + 1}"

    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt")]) == 2
    err = capsys.readouterr().err
    fix = "docs/hugging-face.md lists what each family supports"
    assert err == (
        "3 hugging face errors:\n"
        f"  1. {at('hidden_act')}: hidden_act: gelu is not supported yet (llama imports need hidden_act: silu)\n"
        f"       fix: {fix}\n"
        f"  2. {at('pretraining_tp')}: pretraining_tp: 2 is not supported yet "
        "(llama imports need pretraining_tp: 1)\n"
        f"       fix: {fix}\n"
        f"  3. {at('rope_parameters')}: rope_parameters.rope_type: dynamic is not supported yet "
        "(supported: default, linear, llama3, yarn)\n"
        f"       fix: {fix}\n"
    )
    assert not (tmp_path / "ckpt").exists()


def test_an_unknown_model_type_is_a_located_error(tmp_path, capsys):
    _tiny("gpt2").save_pretrained(tmp_path / "hf")
    path = tmp_path / "hf" / "config.json"
    path.write_text(path.read_text().replace('"model_type": "gpt2"', '"model_type": "gptj"'))
    capsys.readouterr()
    line = next(i for i, ln in enumerate(path.read_text().splitlines(), 1) if '"model_type"' in ln)
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt")]) == 2
    assert {"gpt2", "llama", "qwen2", "mistral", "gemma2"} <= set(FAMILIES)
    assert capsys.readouterr().err == (
        f"hugging face error: {path}:{line}:3: model_type 'gptj' is not supported yet (expected "
        f"{' or '.join(sorted(FAMILIES))}, got gptj)\n  fix: see docs/hugging-face.md for the supported families\n"
    )


@pytest.mark.skipif(not GPT2_TOKENIZER.is_dir(), reason="needs ../shared/data/tokenizers/gpt2")
def test_cli_import_generate_export_with_a_tokenizer(tmp_path, capsys):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, n_positions=64)  # GPT-2's vocabulary
    model = transformers.GPT2LMHeadModel(cfg).eval()
    model.save_pretrained(tmp_path / "hf")
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(GPT2_TOKENIZER / name, tmp_path / "hf" / name)
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["blueprint"] == "gpt2-import"
    assert main(["generate", str(tmp_path / "ckpt"), "--prompt", "Hello", "--max-new-tokens", "4",
                 "--temperature", "0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)
    assert main(["export", str(tmp_path / "ckpt"), "--to", "hf", "--out", str(tmp_path / "out"), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert (r["model_type"], r["tokenizer"]) == ("gpt2", True)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tok("Hello world")["input_ids"] == [15496, 995]


def test_a_blueprint_that_is_no_family_exports_as_physlm(tmp_path):
    cm = compile_blueprint(ROOT / "blueprints" / "llama-style.yaml", overrides={
        "params.layers": 1, "params.dim": 32, "params.heads": 4, "params.kv_heads": 2, "params.hidden": 48,
        "params.vocab": VOCAB, "params.context": 64})
    save_checkpoint(tmp_path / "ckpt", cm=cm)
    r = export_hf(tmp_path / "ckpt", tmp_path / "out")
    assert r.model_type == "physlm"
    # the three closest families (fewest params missing) are named, not all fifteen
    assert r.why_physlm.startswith("gpt2: no param eps, gelu; qwen2: no param head_dim, eps, rope_base; ")
    assert r.why_physlm.endswith("; 12 other families lack more params")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "physlm"
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        assert (m(X).logits - cm.module(X)["logits"]).abs().max().item() < 1e-6


def test_a_changed_family_graph_is_not_exported_natively(tmp_path):
    """An imported llama whose MLP became a GELU MLP is no longer `llama`: physlm type, with why."""
    _tiny("llama").save_pretrained(tmp_path / "hf")
    cm = import_hf(tmp_path / "hf", tmp_path / "ckpt")
    doc = dict(cm.blueprint)
    doc["blocks"] = json.loads(json.dumps(doc["blocks"]))
    doc["blocks"]["decoder_layer"]["nodes"]["ffn"] = {"use": "ffn.mlp", "in": "n2", "hidden_dim": "${hidden}"}
    changed = compile_blueprint(doc)
    save_checkpoint(tmp_path / "changed", cm=changed)
    r = export_hf(tmp_path / "changed", tmp_path / "out")
    assert r.model_type == "physlm"
    assert "llama: the graph differs" in r.why_physlm


def test_an_older_rope_scaling_is_named_where_config_json_writes_it(tmp_path, capsys):
    _tiny("llama").save_pretrained(tmp_path / "hf")
    path = tmp_path / "hf" / "config.json"
    cfg = json.loads(path.read_text())
    cfg.pop("rope_parameters", None)
    cfg.update(rope_theta=10000.0, rope_scaling={"type": "dynamic", "factor": 2.0})
    path.write_text(json.dumps(cfg, indent=2))
    line = next(i for i, ln in enumerate(path.read_text().splitlines(), 1) if '"rope_scaling"' in ln)
    capsys.readouterr()
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt")]) == 2
    assert capsys.readouterr().err == (
        f"hugging face error: {path}:{line}:3: rope_parameters.rope_type: dynamic is not supported yet "
        "(supported: default, linear, llama3, yarn)\n"
        "  fix: docs/hugging-face.md lists what each family supports\n"
    )
