"""Hugging Face families, the config fields past the basic graphs: tied heads, RoPE scaling in every
family with rotary positions, bf16 checkpoints kept in bf16, and Qwen's per-layer sliding windows.
Each both ways as in tests/test_hf_families.py: a small random transformers model saved with
save_pretrained -> import -> the same logits -> export -> transformers' own class loads it -> the
same logits. Nothing downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from physlm_graph._hf_export import export_hf  # noqa: E402
from physlm_graph._hf_families import FAMILIES, HFError  # noqa: E402
from physlm_graph._hf_import import import_hf  # noqa: E402
from physlm_graph.cli import main  # noqa: E402
from physlm_graph.runtime.checkpoint import load_checkpoint  # noqa: E402
from test_hf_families_moe import decoded_in_pieces_error  # noqa: E402
from test_hf_families_attn import _at  # noqa: E402  (a config.json key's file:line:col)

VOCAB = 97
X = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
FIX = "docs/hugging-face.md lists what each family supports"

_ATTN = dict(num_attention_heads=4, num_key_value_heads=2, intermediate_size=48, rms_norm_eps=1e-5,
             max_position_embeddings=64)
# 2-3 layers, 32 wide, 97 tokens; the hybrids get an attention layer, the MoEs a few experts
_SIZES: dict[str, dict] = {
    "llama": dict(_ATTN), "qwen2": dict(_ATTN), "qwen3": dict(_ATTN, head_dim=16), "mistral": dict(_ATTN),
    "olmo2": dict(_ATTN), "phi3": dict(_ATTN), "gemma": dict(_ATTN, head_dim=16),
    "gemma2": dict(_ATTN, num_hidden_layers=3, head_dim=16, sliding_window=5, query_pre_attn_scalar=10,
                   attn_logit_softcapping=2.0, final_logit_softcapping=3.0),
    "gpt2": dict(n_layer=2, n_embd=32, n_head=4, n_positions=64),
    "gpt_neox": dict(num_attention_heads=4, intermediate_size=48, max_position_embeddings=64),
    "mixtral": dict(_ATTN, head_dim=8, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(_ATTN, moe_intermediate_size=12, shared_expert_intermediate_size=20, num_experts=5,
                      num_experts_per_tok=3),
    "mamba2": dict(expand=2, num_heads=8, head_dim=8, state_size=8, n_groups=2, chunk_size=8, conv_kernel=3,
                   layer_norm_epsilon=1e-5),
    "jamba": dict(_ATTN, num_hidden_layers=3, num_experts=3, num_experts_per_tok=2, expert_layer_period=2,
                  expert_layer_offset=0, attn_layer_period=2, attn_layer_offset=1, mamba_d_state=4, mamba_dt_rank=3),
    "bamba": dict(_ATTN, num_hidden_layers=3, attn_layer_indices=[1], mamba_n_heads=8, mamba_d_state=8,
                  mamba_n_groups=2, mamba_chunk_size=8),
}


def _tiny(model_type: str, *, dtype: torch.dtype = torch.float32, **kw):
    """A small transformers model with every weight random (norms and biases off their defaults)."""
    args = {"num_hidden_layers": 2, "hidden_size": 32, "vocab_size": VOCAB, "bos_token_id": 0, "eos_token_id": 0,
            "pad_token_id": 0, **_SIZES[model_type], **kw}
    if model_type == "gpt2":
        args.pop("num_hidden_layers"), args.pop("hidden_size")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(model_type, **args))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("bias", ".D")) or "norm" in name or "ln_" in name:
                p.normal_(0.0, 0.1 if name.endswith("bias") else 0.5).add_(0.0 if name.endswith("bias") else 1.0)
            elif p.dim() >= 2:
                p.normal_(0.0, 0.5 / p.shape[-1] ** 0.5)
    return model.to(dtype).eval()


def _logits(model, x=X):
    with torch.no_grad():
        return model(x).logits.float()


def _round_trip(model, tmp_path: Path, *, atol: float = 1e-5):
    """save_pretrained -> import -> logits -> export -> from_pretrained -> logits; returns the
    imported model, the exported config and the reloaded transformers model."""
    model.save_pretrained(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "ckpt")
    cm = load_checkpoint(tmp_path / "ckpt").model
    want = _logits(model)
    with torch.no_grad():
        got = cm.module(X)["logits"].float()
    assert (got - want).abs().max().item() < atol
    r = export_hf(tmp_path / "ckpt", tmp_path / "out")
    assert r.model_type == model.config.model_type
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(back) is type(model)  # transformers' own class, not physlm's
    assert (_logits(back) - want).abs().max().item() < atol
    return cm, config, back


def _edit(tmp_path: Path, model, **changes) -> Path:
    model.save_pretrained(tmp_path / "hf")
    path = tmp_path / "hf" / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg, indent=2))
    return path




def _embedding(model):
    return model.get_input_embeddings().weight


# -- tied heads ---------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3"])
def test_a_tied_head_round_trips_tied(model_type, tmp_path):
    model = _tiny(model_type, tie_word_embeddings=True)
    assert model.lm_head.weight is _embedding(model)
    cm, config, back = _round_trip(model, tmp_path)
    assert cm.resolved.params["tie_head"] == "tok"
    assert cm.module.get_submodule("head").weight is cm.module.get_submodule("tok").weight
    assert config["tie_word_embeddings"] is True
    assert back.lm_head.weight is _embedding(back)
    from safetensors.torch import load_file

    assert "lm_head.weight" not in load_file(str(tmp_path / "out" / "model.safetensors"))  # one table


@pytest.mark.parametrize("model_type", sorted(set(FAMILIES) - {"llama", "qwen2", "qwen3"}))
def test_every_family_imports_its_other_head_kind(model_type, tmp_path):
    """Untied where transformers' default ties (GPT-2, Gemma, Gemma 2), tied elsewhere."""
    tied = not transformers.AutoConfig.for_model(model_type).tie_word_embeddings
    model = _tiny(model_type, tie_word_embeddings=tied)
    assert (model.lm_head.weight is _embedding(model)) == tied
    cm, config, back = _round_trip(model, tmp_path, atol=1e-4 if model_type in ("jamba", "bamba", "mamba2") else 1e-5)
    assert cm.resolved.params["tie_head"] == ("tok" if tied else None)
    assert config["tie_word_embeddings"] is tied
    assert (back.lm_head.weight is _embedding(back)) == tied


def test_an_untied_llama_keeps_its_own_head(tmp_path):
    model = _tiny("llama")
    cm, config, _ = _round_trip(model, tmp_path)
    assert cm.resolved.params["tie_head"] is None
    assert not torch.equal(cm.module.get_submodule("head").weight, cm.module.get_submodule("tok").weight)
    assert config["tie_word_embeddings"] is False


def test_a_checkpoint_without_the_tie_param_still_exports(tmp_path):
    """A llama (and a gpt2) imported before the family had tie_head: the blueprint's default holds."""
    from physlm_graph import compile_blueprint
    from physlm_graph.runtime.checkpoint import save_checkpoint

    for model_type, tied in (("llama", False), ("gpt2", True)):
        _tiny(model_type).save_pretrained(tmp_path / model_type)
        cm = import_hf(tmp_path / model_type, tmp_path / f"{model_type}-ckpt")
        doc = json.loads(json.dumps(cm.blueprint))
        doc["params"].pop("tie_head")
        head = doc["nodes"]["head"]
        if tied:
            head["tie"] = "tok"
        else:
            head.pop("tie")
        old = compile_blueprint(doc)
        old.module.load_state_dict(cm.module.state_dict())
        save_checkpoint(tmp_path / f"{model_type}-old", cm=old)
        r = export_hf(tmp_path / f"{model_type}-old", tmp_path / f"{model_type}-out")
        assert r.model_type == model_type, r.why_physlm
        config = json.loads((tmp_path / f"{model_type}-out" / "config.json").read_text())
        assert config["tie_word_embeddings"] is tied


# -- RoPE scaling -------------------------------------------------------------------------------

# original_max_position_embeddings 16 < the 24 tokens of X: the scaled bands show in the logits
_ROPE = {
    "linear": {"rope_type": "linear", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 16.0},
}
_ROPE_FAMILIES = ["qwen2", "qwen3", "mistral", "olmo2", "gemma", "gemma2", "mixtral", "qwen2_moe", "gpt_neox", "bamba"]


def _scaled(model_type: str, kind: str, **kw):
    base = transformers.AutoConfig.for_model(model_type).rope_parameters  # rope_theta, partial_rotary_factor
    return _tiny(model_type, rope_parameters={**base, **_ROPE[kind]}, **kw)


@pytest.mark.parametrize("model_type,kind", [(t, "yarn") for t in _ROPE_FAMILIES]
                         + [(t, k) for t in ("qwen2", "qwen3", "mistral", "olmo2") for k in ("linear", "llama3")])
def test_rope_scaling_round_trips_in_every_rotary_family(model_type, kind, tmp_path):
    model = _scaled(model_type, kind)
    cm, config, back = _round_trip(model, tmp_path)
    assert cm.resolved.params["rope_scaling"] == kind
    assert {k: config["rope_parameters"][k] for k in _ROPE[kind]} == _ROPE[kind]
    assert back.config.rope_parameters["rope_type"] == kind


def test_the_scaling_shows_in_the_logits(tmp_path):
    """Without its scaling the imported qwen2 gives other logits: the round trips above test something."""
    from physlm_graph import compile_blueprint

    model = _scaled("qwen2", "yarn")
    model.save_pretrained(tmp_path / "hf")
    cm = import_hf(tmp_path / "hf", tmp_path / "ckpt")
    plain = compile_blueprint(cm.blueprint, overrides={"params.rope_scaling": "none", "params.rope_factor": None,
                                                       "params.rope_original_context": None,
                                                       "params.yarn_beta_fast": None})
    plain.module.load_state_dict(cm.module.state_dict())
    with torch.no_grad():
        assert (plain.module(X)["logits"] - _logits(model)).abs().max().item() > 1e-3


@pytest.mark.parametrize("model_type,rope,shown", [
    ("qwen2", {"rope_type": "dynamic", "factor": 2.0}, "rope_parameters.rope_type: dynamic"),
    ("mistral", {"rope_type": "longrope", "short_factor": [1.0] * 4, "long_factor": [2.0] * 4,
                 "original_max_position_embeddings": 16}, "rope_parameters.rope_type: longrope"),
    ("olmo2", {"rope_type": "dynamic", "factor": 2.0}, "rope_parameters.rope_type: dynamic"),
])
def test_dynamic_and_longrope_are_refused_by_name(model_type, rope, shown, tmp_path, capsys):
    path = _edit(tmp_path, _tiny(model_type), rope_parameters={"rope_theta": 10000.0, **rope})
    capsys.readouterr()
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt")]) == 2
    assert capsys.readouterr().err == (
        f"hugging face error: {_at(path, 'rope_parameters')}: {shown} is not supported yet "
        f"(supported: default, linear, llama3, yarn)\n  fix: {FIX}\n")
    assert not (tmp_path / "ckpt").exists()


def test_yarn_with_deepseek_mscale_is_refused_by_name(tmp_path, capsys):
    path = _edit(tmp_path, _tiny("qwen3"), rope_parameters={"rope_theta": 10000.0, **_ROPE["yarn"], "mscale": 0.7})
    capsys.readouterr()
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt")]) == 2
    assert capsys.readouterr().err == (
        f"hugging face error: {_at(path, 'rope_parameters')}: rope_parameters: {{mscale: 0.7}} is not supported yet "
        f"(qwen3 imports need rope_parameters.mscale: null)\n  fix: {FIX}\n")


def test_phi3_longrope_is_refused_by_name(tmp_path, capsys):
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 1.0,
            "short_factor": [1.0] * 4, "long_factor": [2.0] * 4, "original_max_position_embeddings": 16}
    path = _edit(tmp_path, _tiny("phi3"), rope_parameters=rope)
    capsys.readouterr()
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt")]) == 2
    assert capsys.readouterr().err == (
        f"hugging face error: {_at(path, 'rope_parameters')}: rope_parameters: {{rope_type: longrope}} is not "
        f"supported yet (phi3 imports need rope_parameters.rope_type: default)\n  fix: {FIX}\n")


# -- bfloat16 / float16 checkpoints -------------------------------------------------------------


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "gpt2"])
def test_a_bf16_checkpoint_stays_bf16_through_import_and_export(model_type, tmp_path):
    model = _tiny(model_type, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
    theirs = _tensors(tmp_path / "hf" / "model.safetensors")
    cm = import_hf(tmp_path / "hf", tmp_path / "ckpt")
    assert {p.dtype for p in cm.module.parameters()} == {torch.bfloat16}
    stored = _tensors(tmp_path / "ckpt" / "model.safetensors")
    assert {t.dtype for t in stored.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["torch_dtype"] == "bfloat16"

    # the references: the folder as transformers loads it, by default (bf16) and in float32
    ref16 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ref32 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert ref16.dtype == torch.bfloat16
    ck = load_checkpoint(tmp_path / "ckpt")
    assert {p.dtype for p in ck.model.module.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        got = ck.model.module(X)["logits"]
    assert got.dtype == torch.bfloat16
    want = _logits(ref16)
    assert (got.float() - want).abs().max().item() < 0.05 * want.abs().max().item()  # bf16 rounding, two op orders
    with torch.no_grad():  # the same weights: in float32 both compute the same function
        assert (ck.model.module.float()(X)["logits"] - _logits(ref32)).abs().max().item() < 1e-5

    export_hf(tmp_path / "ckpt", tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    back_tensors = _tensors(tmp_path / "out" / "model.safetensors")
    assert set(back_tensors) == set(theirs)
    assert all(back_tensors[k].dtype == torch.bfloat16 and torch.equal(back_tensors[k], theirs[k]) for k in theirs)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert back.dtype == torch.bfloat16
    assert torch.equal(_logits(back), want)  # the same bf16 weights, the same bf16 model


def test_dtype_float32_widens_a_bf16_checkpoint_exactly(tmp_path, capsys):
    model = _tiny("qwen2", dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "hf")
    capsys.readouterr()
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt"), "--dtype", "float32", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["dtype"] == "float32"
    ck = load_checkpoint(tmp_path / "ckpt")
    assert {p.dtype for p in ck.model.module.parameters()} == {torch.float32}
    theirs = _tensors(tmp_path / "hf" / "model.safetensors")
    assert torch.equal(ck.model.module.get_parameter("tok.weight"), theirs["model.embed_tokens.weight"].float())
    ref32 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        assert (ck.model.module(X)["logits"] - _logits(ref32)).abs().max().item() < 1e-5
    export_hf(tmp_path / "ckpt", tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "float32"


def test_a_float16_checkpoint_imports_as_float16_and_bf16_can_be_asked_for(tmp_path, capsys):
    model = _tiny("mistral", dtype=torch.float16)
    model.save_pretrained(tmp_path / "hf")
    cm = import_hf(tmp_path / "hf", tmp_path / "ckpt")
    assert {p.dtype for p in cm.module.parameters()} == {torch.float16}
    assert {p.dtype for p in load_checkpoint(tmp_path / "ckpt").model.module.parameters()} == {torch.float16}
    cm = import_hf(tmp_path / "hf", tmp_path / "ckpt16", dtype="bfloat16")
    assert {p.dtype for p in cm.module.parameters()} == {torch.bfloat16}
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "x"), "--dtype", "float64"])
    assert exit_.value.code == 2 and "argument --dtype: invalid choice: 'float64'" in capsys.readouterr().err
    with pytest.raises(HFError, match="unknown dtype 'float64'"):
        import_hf(tmp_path / "hf", tmp_path / "x", dtype="float64")
    assert not (tmp_path / "x").exists()


def test_a_float32_import_and_a_training_init_stay_float32(tmp_path):
    """A float32 checkpoint imports as before; train --init-from reads a bf16 import into its float32 model."""
    from physlm_graph import compile_blueprint
    from physlm_graph.runtime.init_from import InitFrom

    _tiny("llama").save_pretrained(tmp_path / "hf32")
    assert {p.dtype for p in import_hf(tmp_path / "hf32", tmp_path / "ck32").module.parameters()} == {torch.float32}
    _tiny("llama", dtype=torch.bfloat16).save_pretrained(tmp_path / "hf")
    imported = import_hf(tmp_path / "hf", tmp_path / "ckpt")
    run = compile_blueprint(imported.blueprint)
    InitFrom(tmp_path / "ckpt").apply(run)
    assert {p.dtype for p in run.module.parameters()} == {torch.float32}
    assert torch.equal(run.module.get_parameter("tok.weight"), imported.module.get_parameter("tok.weight").float())


def test_a_dtype_an_import_cannot_keep_is_located(tmp_path, capsys):
    path = _edit(tmp_path, _tiny("llama"), dtype="float64")
    capsys.readouterr()
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt")]) == 2
    assert capsys.readouterr().err == (
        f"hugging face error: {_at(path, 'dtype')}: config.json records dtype float64, which an import does not keep "
        "(expected float32, bfloat16, float16, got float64)\n"
        "  fix: import with --dtype float32 (or bfloat16, float16)\n")
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt"), "--dtype", "float32"]) == 0


def test_transformers_opens_a_bf16_import_in_bf16_by_default(tmp_path):
    """AutoModelForCausalLM on the physlm checkpoint (after import physlm_graph): dtype auto is the
    stored dtype, as for transformers' own models; float32 when asked."""
    _tiny("llama", dtype=torch.bfloat16).save_pretrained(tmp_path / "hf")
    cm = import_hf(tmp_path / "hf", tmp_path / "ckpt")
    m = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    assert m.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.equal(m(X).logits, cm.module.eval()(X)["logits"])
    m32 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32)
    assert m32.dtype == torch.float32


# -- Qwen's sliding window from max_window_layers on ----------------------------------------------


@pytest.mark.parametrize("model_type,start", [("qwen2", 2), ("qwen3", 2), ("qwen2", 0), ("qwen3", 4)])
def test_qwen_sliding_layers_from_max_window_layers_round_trip(model_type, start, tmp_path):
    """Layers below max_window_layers attend to everything, the others to a window of 5 (of 24 tokens)."""
    model = _tiny(model_type, num_hidden_layers=4, use_sliding_window=True, sliding_window=5, max_window_layers=start)
    assert model.config.layer_types == ["full_attention"] * start + ["sliding_attention"] * (4 - start)
    cm, config, back = _round_trip(model, tmp_path)
    windows = [cm.module.get_submodule(f"trunk.{i}.attn").sliding_window for i in range(4)]
    assert windows == [None] * start + [5] * (4 - start)
    assert (config["use_sliding_window"], config["sliding_window"], config["max_window_layers"]) == (True, 5, start)
    assert back.config.layer_types == model.config.layer_types


def test_qwen_without_use_sliding_window_is_full_attention_everywhere(tmp_path):
    """use_sliding_window: false (the released Qwen2 and Qwen3 configs) nulls the window whatever
    sliding_window says; export writes it so, and the window shows in the logits when on."""
    model = _tiny("qwen2", num_hidden_layers=4, use_sliding_window=False, sliding_window=5, max_window_layers=2)
    cm, config, _ = _round_trip(model, tmp_path)
    assert [cm.module.get_submodule(f"trunk.{i}.attn").sliding_window for i in range(4)] == [None] * 4
    assert (config["use_sliding_window"], config["sliding_window"]) == (False, None)
    windowed = _tiny("qwen2", num_hidden_layers=4, use_sliding_window=True, sliding_window=5, max_window_layers=2)
    assert (_logits(windowed) - _logits(model)).abs().max().item() > 1e-3  # the same weights, another function


@pytest.mark.parametrize("start,windows", [(3, [5, None, 5, None]), (1, [5, None, None, None])])
def test_qwen2_moe_slides_in_the_even_layers_below_max_window_layers(start, windows, tmp_path):
    """Qwen2-MoE derives its layer_types the other way round from Qwen2: the even layers below
    max_window_layers slide; use_sliding_window: false writes sliding_window 0 (no layer slides)."""
    model = _tiny("qwen2_moe", num_hidden_layers=4, use_sliding_window=True, sliding_window=5, max_window_layers=start)
    cm, config, back = _round_trip(model, tmp_path / "on")
    assert [cm.module.get_submodule(f"trunk.{i}.attn").sliding_window for i in range(4)] == windows
    assert back.config.layer_types == model.config.layer_types
    off = _tiny("qwen2_moe", num_hidden_layers=4, use_sliding_window=False, sliding_window=5, max_window_layers=start)
    cm, config, _ = _round_trip(off, tmp_path / "off")
    assert [cm.module.get_submodule(f"trunk.{i}.attn").sliding_window for i in range(4)] == [None] * 4
    assert (config["use_sliding_window"], config["sliding_window"]) == (False, 0)
    assert (_logits(model) - _logits(off)).abs().max().item() > 1e-3


def test_qwen_layer_types_other_than_derived_are_refused_by_name(tmp_path, capsys):
    model = _tiny("qwen3", num_hidden_layers=3, use_sliding_window=True, sliding_window=5, max_window_layers=1)
    path = _edit(tmp_path, model, layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    capsys.readouterr()
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt")]) == 2
    assert capsys.readouterr().err == (
        f"hugging face error: {_at(path, 'layer_types')}: layer_types: [sliding_attention, full_attention, "
        "sliding_attention] is not supported yet (qwen3 imports need layer_types: [full_attention, "
        f"sliding_attention, sliding_attention])\n  fix: {FIX}\n")
    moe = _tiny("qwen2_moe", num_hidden_layers=3, use_sliding_window=True, sliding_window=5, max_window_layers=3)
    path = _edit(tmp_path / "moe", moe, layer_types=["full_attention", "sliding_attention", "full_attention"])
    capsys.readouterr()
    assert main(["import", str(tmp_path / "moe" / "hf"), "--out", str(tmp_path / "ckpt")]) == 2
    assert capsys.readouterr().err == (
        f"hugging face error: {_at(path, 'layer_types')}: layer_types: [full_attention, sliding_attention, "
        "full_attention] is not supported yet (qwen2_moe imports need layer_types: [sliding_attention, "
        f"full_attention, sliding_attention])\n  fix: {FIX}\n")


def test_qwen_sliding_layers_decode_token_by_token_as_the_full_forward(tmp_path):
    model = _tiny("qwen2", num_hidden_layers=3, use_sliding_window=True, sliding_window=5, max_window_layers=1)
    model.save_pretrained(tmp_path / "hf")
    cm = import_hf(tmp_path / "hf", tmp_path / "ckpt")
    assert decoded_in_pieces_error(cm, X) < 1e-5


def test_a_qwen2_checkpoint_from_before_ties_scaling_and_windows_still_exports(tmp_path):
    """The qwen2 blueprint as imports wrote it before tie_head, the rope_* params and the windows:
    the family's defaults fill them in, and it is still qwen2."""
    from physlm_graph import compile_blueprint
    from physlm_graph.runtime.checkpoint import save_checkpoint

    model = _tiny("qwen2")
    model.save_pretrained(tmp_path / "hf")
    cm = import_hf(tmp_path / "hf", tmp_path / "ckpt")
    doc = json.loads(json.dumps(cm.blueprint))
    new = {"tie_head", "use_window", "window", "window_layers"}
    new |= {k for k in doc["params"] if k.startswith(("rope_", "yarn_")) and k != "rope_base"}
    doc["params"] = {k: v for k, v in doc["params"].items() if k not in new}
    del doc["blocks"]["window_layer"]
    doc["nodes"]["trunk"] = {"use": "decoder_layer", "repeat": "${layers}", "in": "tok"}
    doc["nodes"]["head"].pop("tie")
    doc["nodes"]["rope"] = {k: v for k, v in doc["nodes"]["rope"].items()
                            if k in ("use", "in", "head_dim", "max_seq_len", "base", "style")}
    old = compile_blueprint(doc)
    old.module.load_state_dict(cm.module.state_dict())
    save_checkpoint(tmp_path / "old", cm=old)
    r = export_hf(tmp_path / "old", tmp_path / "out")
    assert r.model_type == "qwen2", r.why_physlm
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert (_logits(back) - _logits(model)).abs().max().item() < 1e-5


@pytest.mark.slow  # a second process starting transformers: about 15 s on a shared CPU
def test_the_exports_load_in_a_process_without_physlm_graph(tmp_path):
    """One export of each kind above (tied, scaled, bf16, windowed) opened by plain transformers."""
    import os
    import subprocess
    import sys
    import textwrap

    models = {
        "tied": _tiny("qwen3", tie_word_embeddings=True),
        "yarn": _scaled("mistral", "yarn"),
        "bf16": _tiny("llama", dtype=torch.bfloat16),
        "window": _tiny("qwen2", num_hidden_layers=4, use_sliding_window=True, sliding_window=5, max_window_layers=2),
    }
    cases = {}
    for name, model in models.items():
        model.save_pretrained(tmp_path / name / "hf")
        import_hf(tmp_path / name / "hf", tmp_path / name / "ckpt")
        export_hf(tmp_path / name / "ckpt", tmp_path / name / "out")
        ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / name / "hf").eval()
        cases[name] = {"out": str(tmp_path / name / "out"), "want": _logits(ref)}
    torch.save({"x": X, "cases": cases}, tmp_path / "io.pt")
    code = textwrap.dedent(f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        io = torch.load({str(tmp_path / "io.pt")!r})
        for name, case in io["cases"].items():
            m = AutoModelForCausalLM.from_pretrained(case["out"]).eval()
            with torch.no_grad():
                err = (m(io["x"]).logits.float() - case["want"]).abs().max().item()
            print(name, type(m).__name__, str(m.dtype).replace("torch.", ""), err)
        print("physlm_graph" in sys.modules)
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    *rows, imported = run.stdout.split("\n")[:-1]
    assert imported == "False"
    got = {name: (cls, dtype, float(err)) for name, cls, dtype, err in (r.split() for r in rows)}
    assert {n: g[:2] for n, g in got.items()} == {"tied": ("Qwen3ForCausalLM", "float32"),
                                                  "yarn": ("MistralForCausalLM", "float32"),
                                                  "bf16": ("LlamaForCausalLM", "bfloat16"),
                                                  "window": ("Qwen2ForCausalLM", "float32")}
    assert all(err < 1e-5 for _, _, err in got.values()), got
