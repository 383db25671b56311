"""Hugging Face families with sliding windows, QK-norms, soft-caps and (1 + w) norms, both ways:
Mistral, Qwen3, Gemma, Gemma 2, OLMo 2. As tests/test_hf_families.py: a small random transformers
model -> import -> the same fp32 logits -> export -> plain transformers loads it -> the same logits."""

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

from physlm_graph import compile_blueprint  # noqa: E402
from physlm_graph._hf_export import export_hf  # noqa: E402
from physlm_graph._hf_import import import_hf  # noqa: E402
from physlm_graph.cli import main  # noqa: E402
from physlm_graph.runtime.checkpoint import load_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 97
FAMILIES = ["mistral", "qwen3", "gemma", "gemma2", "olmo2"]
CLASSES = {"mistral": "MistralForCausalLM", "qwen3": "Qwen3ForCausalLM", "gemma": "GemmaForCausalLM",
           "gemma2": "Gemma2ForCausalLM", "olmo2": "Olmo2ForCausalLM"}
# transformers' default sizes (AutoConfig.for_model(t)), counted on the meta device
FULL_SIZE = {"mistral": 7_241_732_096, "qwen3": 12_049_461_248, "gemma": 8_537_680_896, "gemma2": 2_614_341_888,
             "olmo2": 6_888_624_128}

# Narrow and short; a window of 5 and small caps so that a window or a cap left out shows in the logits
# of a 24-token input. head_dim 16 differs from hidden / heads (8) where the family reads head_dim.
_SMALL = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48, vocab_size=VOCAB,
              max_position_embeddings=64, rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=0, pad_token_id=0)
_EXTRA = {
    "mistral": dict(num_hidden_layers=2, head_dim=16, sliding_window=5),
    "qwen3": dict(num_hidden_layers=2, head_dim=16, attention_bias=True),
    "gemma": dict(num_hidden_layers=2, head_dim=16),
    "gemma2": dict(num_hidden_layers=3, head_dim=16, sliding_window=5, query_pre_attn_scalar=10,
                   attn_logit_softcapping=2.0, final_logit_softcapping=3.0),
    "olmo2": dict(num_hidden_layers=2),
}


def _tiny(model_type: str, **kw):
    """A narrow transformers model with random weights (norm weights and biases random too)."""
    torch.manual_seed(0)
    cfg = transformers.AutoConfig.for_model(model_type, **{**_SMALL, **_EXTRA[model_type], **kw})
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(0.0, 0.1 if name.endswith("bias") else 1.0)  # the defaults (0 / 1) would hide mix-ups
            elif "embed" in name:
                p.normal_(0.0, 1.0)
    return model.eval()


def _logits(model, x):
    with torch.no_grad():
        return model(x).logits


X = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("model_type", FAMILIES)
def test_full_size_family_blueprint_has_transformers_parameter_count(model_type):
    cfg = transformers.AutoConfig.for_model(model_type)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    theirs = sum(p.numel() for p in model.parameters())
    ours = compile_blueprint(ROOT / "blueprints" / "families" / f"{model_type}.yaml", device="meta", build=False)
    assert ours.num_params == theirs == FULL_SIZE[model_type]


@pytest.mark.parametrize("model_type", FAMILIES)
def test_import_gives_the_same_logits_and_export_writes_the_model_type(model_type, tmp_path):
    model = _tiny(model_type)
    model.save_pretrained(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "ckpt")
    ck = load_checkpoint(tmp_path / "ckpt")
    assert ck.model.blueprint["name"] == f"{model_type}-import"
    assert (ck.model.module(X)["logits"] - _logits(model, X)).abs().max().item() < 1e-5
    r = export_hf(tmp_path / "ckpt", tmp_path / "out")
    assert r.model_type == model_type
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == model_type


@pytest.mark.slow  # about 50 s on a shared CPU, most of it a second process starting transformers
def test_exports_load_in_plain_transformers_with_the_same_logits(tmp_path):
    """Each family imported and exported; one process without physlm_graph loads every export
    (one process: starting transformers costs far more than the models)."""
    cases = {}
    for t in FAMILIES:
        model = _tiny(t)
        model.save_pretrained(tmp_path / t / "hf")
        import_hf(tmp_path / t / "hf", tmp_path / t / "ckpt")
        export_hf(tmp_path / t / "ckpt", tmp_path / t / "out")
        cases[t] = {"out": str(tmp_path / t / "out"), "want": _logits(model, X)}
    torch.save({"x": X, "cases": cases}, tmp_path / "io.pt")
    code = textwrap.dedent(f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        io = torch.load({str(tmp_path / "io.pt")!r})
        for t, case in io["cases"].items():
            m = AutoModelForCausalLM.from_pretrained(case["out"]).eval()
            with torch.no_grad():
                err = (m(io["x"]).logits - case["want"]).abs().max().item()
            print(t, type(m).__name__, err)
        print("physlm_graph" in sys.modules)
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    *rows, imported = run.stdout.split("\n")[:-1]
    assert imported == "False"
    got = {t: (cls, float(err)) for t, cls, err in (r.split() for r in rows)}
    assert {t: cls for t, (cls, _) in got.items()} == CLASSES
    assert all(err < 1e-5 for _, err in got.values()), got


def test_mistral_without_a_window_round_trips_as_full_attention(tmp_path):
    """sliding_window: null (the later Mistral 7B releases) is a value: full attention, and export writes null."""
    model = _tiny("mistral", sliding_window=None)
    model.save_pretrained(tmp_path / "hf")
    cm = import_hf(tmp_path / "hf", tmp_path / "ckpt")
    assert cm.resolved.params["window"] is None
    want = _logits(model, X)
    assert (cm.module(X)["logits"] - want).abs().max().item() < 1e-5
    assert export_hf(tmp_path / "ckpt", tmp_path / "out").model_type == "mistral"
    assert json.loads((tmp_path / "out" / "config.json").read_text())["sliding_window"] is None


def test_gemma2_without_an_attention_cap_imports(tmp_path):
    model = _tiny("gemma2", attn_logit_softcapping=None)
    model.save_pretrained(tmp_path / "hf")
    cm = import_hf(tmp_path / "hf", tmp_path / "ckpt")
    assert cm.resolved.params["attn_cap"] is None
    assert (cm.module(X)["logits"] - _logits(model, X)).abs().max().item() < 1e-5


def _edit_config(tmp_path: Path, model_type: str, **changes) -> Path:
    _tiny(model_type).save_pretrained(tmp_path / "hf")
    path = tmp_path / "hf" / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg, indent=2))
    return path


def _at(path: Path, key: str) -> str:
    lines = path.read_text().splitlines()
    n = next(i for i, ln in enumerate(lines) if f'"{key}"' in ln)
    return f"{path}:{n + 1}:{lines[n].index(chr(34) + key) + 1}"


def test_gemma2_layers_that_do_not_alternate_are_named_missing(tmp_path, capsys):
    path = _edit_config(tmp_path, "gemma2", layer_types=["full_attention", "sliding_attention", "full_attention"],
                        hidden_activation="gelu")
    capsys.readouterr()
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt")]) == 2
    fix = "docs/hugging-face.md lists what each family supports"
    assert capsys.readouterr().err == (
        "2 hugging face errors:\n"
        f"  1. {_at(path, 'hidden_activation')}: hidden_activation: gelu is not supported yet "
        "(gemma2 imports need hidden_activation: gelu_pytorch_tanh)\n"
        f"       fix: {fix}\n"
        f"  2. {_at(path, 'layer_types')}: layer_types: [full_attention, sliding_attention, full_attention] "
        "is not supported yet (gemma2 imports need layer_types: [sliding_attention, full_attention, ...])\n"
        f"       fix: {fix}\n"
    )
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("model_type,key,value,need", [
    ("qwen3", "hidden_act", "gelu", "hidden_act: silu"),
    ("mistral", "hidden_act", "gelu", "hidden_act: silu"),
    ("gemma", "hidden_act", "relu", "hidden_act: gelu_pytorch_tanh"),
    ("olmo2", "hidden_act", "gelu", "hidden_act: silu"),
])
def test_what_a_family_graph_cannot_express_is_named(model_type, key, value, need, tmp_path, capsys):
    path = _edit_config(tmp_path, model_type, **{key: value})
    capsys.readouterr()
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt")]) == 2
    shown = str(value).lower() if isinstance(value, bool) else value
    assert capsys.readouterr().err == (
        f"hugging face error: {_at(path, key)}: {key}: {shown} is not supported yet ({model_type} imports need {need})\n"
        "  fix: docs/hugging-face.md lists what each family supports\n"
    )


def test_gemma2_without_a_final_cap_is_named_missing(tmp_path, capsys):
    path = _edit_config(tmp_path, "gemma2", final_logit_softcapping=None)
    capsys.readouterr()
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt")]) == 2
    assert capsys.readouterr().err == (
        f"hugging face error: {_at(path, 'final_logit_softcapping')}: final_logit_softcapping: null is not supported "
        "yet (gemma2 imports need final_logit_softcapping: a number)\n"
        "  fix: docs/hugging-face.md lists what each family supports\n"
    )
