"""``train --init-from``: an imported llama, hybridized (every second attention replaced by
``ssm.ssd``), trained from the import's weights; and ``compile_blueprint`` of a Hugging Face
folder. Tiny random models, CPU, nothing downloaded."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from physlm_graph import PhysLMError, compile_blueprint  # noqa: E402
from physlm_graph.cli import main  # noqa: E402
from physlm_graph.runtime import train as train_mod  # noqa: E402
from physlm_graph.runtime.checkpoint import load_checkpoint  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

HYBRID = """\
extends: imported/blueprint.yaml
name: llama-ssd-hybrid
blocks:
  ssd_layer:
    nodes:
      n1:  {use: norm.rms, in: x, eps: "${eps}"}
      ssd: {use: ssm.ssd, in: n1, head_dim: 16, d_state: 16, chunk_size: 16}
      r1:  {use: add, in: [x, ssd]}
      n2:  {use: norm.rms, in: r1, eps: "${eps}"}
      ffn: {use: ffn.swiglu, in: n2, hidden_dim: "${hidden}", bias: "${mlp_bias}"}
      r2:  {use: add, in: [r1, ffn]}
    out: r2
replace:
  nodes.trunk: {use: decoder_layer, pattern: [decoder_layer, ssd_layer], repeat: "${layers}", in: tok}
"""
SHORT = ["--steps", "3", "--batch-size", "2", "--set", "train.seq_len=32", "--set", "train.eval_iters=1",
         "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> Path:
    """A 4-layer random LlamaForCausalLM (vocab 256: the bytes tokenizer's) saved by
    save_pretrained, imported with `physlm-graph import`; a training text beside it."""
    root = tmp_path_factory.mktemp("flow")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(num_hidden_layers=4, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=48, vocab_size=256, max_position_embeddings=64, rms_norm_eps=1e-5)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.1)  # not the default ones, so a fresh norm differs from a carried one
    model.save_pretrained(root / "hf")
    assert main(["import", str(root / "hf"), "--out", str(root / "imported")]) == 0
    words = ["to", "be", "or", "not", "the", "question", "whether", "tis", "nobler"]
    g = torch.Generator().manual_seed(0)
    (root / "text.txt").write_text(" ".join(words[int(i)] for i in torch.randint(len(words), (3000,), generator=g)))
    (root / "hybrid.yaml").write_text(HYBRID)
    return root


def test_compile_blueprint_of_a_hf_folder_is_the_imported_model(imported):
    cm = compile_blueprint(imported / "hf")
    ck = load_checkpoint(imported / "imported")
    assert cm.hash == ck.model.hash and cm.name == "llama-import"
    ours, theirs = cm.module.state_dict(), ck.module.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    meta = compile_blueprint(imported / "hf", device="meta")  # checks and reports; reads no weights
    assert meta.num_params == cm.num_params


def test_a_folder_without_config_json_is_a_located_error(tmp_path):
    with pytest.raises(PhysLMError) as err:
        compile_blueprint(tmp_path)
    assert str(err.value) == (f"load error: {tmp_path}: {tmp_path} is a folder, not a blueprint file\n"
                              "  fix: pass a blueprint file, or a Hugging Face model folder (config.json + *.safetensors)")


def test_init_from_carries_unchanged_nodes_and_starts_replaced_ones_fresh(imported, tmp_path, monkeypatch):
    monkeypatch.chdir(imported)
    start = {}
    real = train_mod.carry_weights

    def snapshot(t, cm):  # the weights the run starts from: after the init-from, before step 0
        out = real(t, cm)
        start.update({k: v.detach().clone() for k, v in cm.module.state_dict().items()})
        return out

    monkeypatch.setattr(train_mod, "carry_weights", snapshot)
    run = tmp_path / "run"
    assert main(["train", "hybrid.yaml", "--init-from", "imported", "--data", "text.txt", "--out", str(run)] + SHORT) == 0
    imp = load_checkpoint(imported / "imported").module.state_dict()
    carried = [k for k in start if k in imp]
    assert len(carried) == 27 and all(torch.equal(start[k], imp[k]) for k in carried)
    fresh = compile_blueprint(imported / "hybrid.yaml", seed=1337).module.state_dict()  # train.seed's init
    new = [k for k in start if k not in imp]
    assert new and all(k.startswith(("trunk.1.ssd.", "trunk.3.ssd.")) for k in new)
    assert all(torch.equal(start[k], fresh[k]) for k in new)
    record = json.loads((run / "init_from.json").read_text())
    assert record["fresh"] == ["trunk.1.ssd", "trunk.3.ssd"] and record["partial"] == {}
    assert record["tensors_carried"] == 27 and "trunk.1.n1" in record["carried"] and "trunk.2.attn" in record["carried"]
    assert record["unused"] == ["trunk.1.attn.proj.weight", "trunk.1.attn.qkv.weight", "trunk.3.attn.proj.weight",
                                "trunk.3.attn.qkv.weight"]
    trained = load_checkpoint(run).module.state_dict()
    assert not torch.equal(trained["trunk.0.attn.qkv.weight"], imp["trunk.0.attn.qkv.weight"])  # it trained


def test_diff_shows_the_hybridization(imported, monkeypatch, capsys):
    monkeypatch.chdir(imported)
    assert main(["diff", "imported/blueprint.yaml", "hybrid.yaml"]) == 1  # like diff(1): 1 when they differ
    out = capsys.readouterr().out
    assert "trunk.*.attn (x2)" in out and "trunk.*.ssd (x2)" in out and "2 changed, 2 added, 2 removed" in out


def test_a_name_with_another_shape_is_refused_naming_both_shapes(imported, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(imported)
    (tmp_path / "wider.yaml").write_text(f"extends: {imported}/imported/blueprint.yaml\nparams: {{hidden: 64}}\n")
    assert main(["train", str(tmp_path / "wider.yaml"), "--init-from", "imported", "--data", "text.txt",
                 "--out", str(tmp_path / "run")] + SHORT) == 2
    err = capsys.readouterr().err
    assert err.startswith("3 checkpoint errors:\n")  # w1, w3 and w2, each in the 4 layers
    assert ("  1. imported/model.safetensors: trunk.0.ffn (and 3 more: trunk.1.ffn, trunk.2.ffn, ...): tensor "
            "trunk.0.ffn.w1.weight is in the checkpoint with another shape (expected [64, 32] (this model), got "
            "[48, 32] (the checkpoint))\n       fix: rename the node so it starts fresh, or give it the checkpoint's "
            "shape\n") in err
    assert not (tmp_path / "run" / "last").exists()


def test_nothing_to_carry_is_refused(imported, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(imported)
    (tmp_path / "other.yaml").write_text(textwrap.dedent("""\
        name: other
        params: {vocab: 256}
        inputs: {tokens: [batch, seq]}
        nodes:
          emb: {use: embed.token, in: tokens, vocab_size: "${vocab}", embed_dim: 16}
          out: {use: head.lm, in: emb, vocab_size: "${vocab}"}
        outputs: {logits: out}
        train: {seq_len: 16}
        """))
    assert main(["train", str(tmp_path / "other.yaml"), "--init-from", "imported", "--data", "text.txt",
                 "--out", str(tmp_path / "run")] + SHORT[:6] + SHORT[8:]) == 2
    assert capsys.readouterr().err == (
        "checkpoint error: imported: --init-from: no tensor of the checkpoint fits this model by name, so nothing "
        "would be carried\n  fix: start from a checkpoint whose blueprint this one extends (node paths are the "
        "tensor names), or drop --init-from\n")


def test_init_from_with_resume_is_refused(imported, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(imported)
    assert main(["train", "hybrid.yaml", "--init-from", "imported", "--resume", "--data", "text.txt",
                 "--out", str(tmp_path / "run")] + SHORT) == 2
    assert capsys.readouterr().err == (
        "train error: --init-from starts a new run from a checkpoint's weights; --resume continues a run with its "
        "own: they cannot be combined\n  fix: drop --resume (new run), or drop --init-from (continue the run in --out)\n")


def test_a_hugging_face_folder_is_named_as_one(imported, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(imported)
    assert main(["train", "hybrid.yaml", "--init-from", "hf", "--data", "text.txt", "--out", str(tmp_path / "r")]
                + SHORT) == 2
    assert capsys.readouterr().err == (
        "checkpoint error: hf: --init-from: this is a Hugging Face model folder, not a physlm checkpoint\n"
        "  fix: import it first: physlm-graph import hf --out DIR, then --init-from DIR\n")


def test_tied_tensors_carry_under_every_name(tmp_path):
    """A checkpoint stores a tied head once (under one name); an untied model takes it for both."""
    from physlm_graph.runtime.checkpoint import save_checkpoint
    from physlm_graph.runtime.init_from import InitFrom

    doc = {"name": "tied", "params": {"vocab": 64}, "inputs": {"tokens": ["batch", "seq"]},
           "nodes": {"tok": {"use": "embed.token", "in": "tokens", "vocab_size": "${vocab}", "embed_dim": 16},
                     "head": {"use": "head.lm", "in": "tok", "vocab_size": "${vocab}", "tie": "tok"}},
           "outputs": {"logits": "head"}}
    save_checkpoint(tmp_path / "ck", cm=compile_blueprint(doc, seed=1))
    untied = {**doc, "nodes": {**doc["nodes"], "head": {k: v for k, v in doc["nodes"]["head"].items() if k != "tie"}}}
    cm = compile_blueprint(untied, seed=2)
    report = InitFrom(tmp_path / "ck").apply(cm)
    src = compile_blueprint(doc, seed=1).module
    assert torch.equal(cm.module.head.weight, src.tok.weight) and torch.equal(cm.module.tok.weight, src.tok.weight)
    assert report.carried == ["tok", "head"] and report.fresh == [] and report.unused == []
