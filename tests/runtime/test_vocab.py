"""The model's vocabulary against the tokenizer's: ``params.vocab`` kept as written (a padded
vocabulary when it is larger), refused when smaller, fitted with ``train.fit_vocab``; padding ids
are never generated (``generate``, the decode engine, a Hugging Face export)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from physlm_graph import TrainingError
from physlm_graph.cli import main
from physlm_graph.runtime.checkpoint import load_checkpoint
from physlm_graph.runtime.decode_engine import generate_static
from physlm_graph.runtime.generate import generate
from physlm_graph.runtime.plan import make_plan
from physlm_graph.runtime.train import train

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = """\
physlm: 1
name: tiny-vocab
params:
  vocab: {vocab}
  dim: 16
inputs: {{tokens: [batch, seq]}}
nodes:
  tok:  {{use: embed.token, in: tokens, vocab_size: "${{vocab}}", embed_dim: "${{dim}}"}}
  head: {{use: head.lm, in: tok, vocab_size: "${{vocab}}", bias: true}}
outputs: {{logits: head}}
train: {{seq_len: 8, batch_size: 2, steps: 2, eval_every: 2, eval_iters: 1, log_every: 1{train}}}
"""
RUN = dict(device="cpu", progress=False)


def _blueprint(folder: Path, vocab: int, train_extra: str = "") -> Path:
    path = folder / "tiny.yaml"
    path.write_text(TINY.format(vocab=vocab, train=train_extra), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text("ROMEO:\nBut, soft! what light through yonder window breaks?\n" * 20, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def padded(tmp_path_factory, text) -> Path:
    """A run of a blueprint with vocab 300 under the bytes tokenizer (256 ids): 44 padding ids."""
    folder = tmp_path_factory.mktemp("padded")
    train(_blueprint(folder, 300), data=str(text), out_dir=folder / "run", **RUN)
    return folder / "run"


def test_a_vocabulary_above_the_tokenizers_is_kept(padded, capsys):
    ck = load_checkpoint(padded)
    assert ck.tokenizer.vocab_size == 256
    assert ck.config["vocab_size"] == 300 and ck.module.tok.weight.shape[0] == 300
    assert yaml.safe_load((ck.path / "blueprint.yaml").read_text())["params"]["vocab"] == 300


def test_the_kept_padding_is_said_before_step_0(tmp_path, text, capsys):
    train(_blueprint(tmp_path, 260), data=str(text), out_dir=tmp_path / "run", **RUN, steps=1)
    out = " ".join(capsys.readouterr().out.split())
    assert "params.vocab 260 is kept for the tokenizer's 256 ids: ids 256..259 are padding (never a target, " \
           "never sampled)" in out


def test_a_vocabulary_below_the_tokenizers_is_refused_at_params_vocab(tmp_path, text, capsys):
    """Exit 2 before step 0, at the line of ``vocab:`` in the blueprint file, with both numbers and the fixes."""
    bp = _blueprint(tmp_path, 200)
    code = main(["train", str(bp), "--data", str(text), "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"{bp}:4:3: params.vocab is 200, but tokenizer 'bytes' has 256 ids" in err
    assert "fix: write `vocab: 256` (or more: the extra ids are padding) in params, or --set vocab=256; or add " \
           "`fit_vocab: true` under train: to take the tokenizer's size" in err
    assert "Traceback" not in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists() and not (tmp_path / "run" / "last").exists()


def test_fit_vocab_takes_the_tokenizers_size(tmp_path, text, capsys):
    for vocab in (200, 300):  # smaller or larger, the table becomes the tokenizer's
        out = tmp_path / f"run{vocab}"
        train(_blueprint(tmp_path, vocab, ", fit_vocab: true"), data=str(text), out_dir=out, **RUN)
        assert load_checkpoint(out).config["vocab_size"] == 256
        said = " ".join(capsys.readouterr().out.split())
        assert f"params.vocab set to 256 (the tokenizer's vocabulary; the blueprint said {vocab})" in said


def test_fit_vocab_needs_a_vocab_param(tmp_path, text):
    doc = yaml.safe_load(TINY.format(vocab=256, train=", fit_vocab: true"))
    del doc["params"]["vocab"]
    doc["nodes"]["tok"]["vocab_size"] = doc["nodes"]["head"]["vocab_size"] = 256
    with pytest.raises(TrainingError, match="train.fit_vocab is true, but the blueprint has no params.vocab to set"):
        train(doc, data=str(text), out_dir=tmp_path / "run", **RUN)


def test_vocab_multiple_needs_fit_vocab(tmp_path):
    with pytest.raises(TrainingError, match="vocab_multiple 64 rounds the tokenizer's size that fit_vocab: true gives "
                                            "params.vocab; without fit_vocab params.vocab is kept as written"):
        make_plan(_blueprint(tmp_path, 300), vocab_multiple=64)
    assert make_plan(_blueprint(tmp_path, 300), vocab_multiple=64, fit_vocab=True).config.vocab_multiple == 64


def test_the_speedrun_blueprint_keeps_50304_under_gpt2s_50257_ids():
    plan = make_plan(ROOT / "blueprints" / "speedrun-track3.yaml",
                     overrides={"layers": 1, "dim": 64, "head_dim": 32, "context": 32, "train.seq_len": 32})
    from physlm_graph.runtime.checkpoint import model_vocab

    cm, notes = plan.model(vocab=50257, device="meta", tokenizer="gpt2")
    assert model_vocab(cm) == 50304
    assert any("params.vocab 50304 is kept for the tokenizer's 50257 ids" in n for n in notes), notes
    with pytest.raises(TrainingError, match="params.vocab is 50304, but tokenizer 'big' has 50305 ids") as err:
        plan.model(vocab=50305, device="meta", tokenizer="big")
    line = (ROOT / "blueprints" / "speedrun-track3.yaml").read_text().splitlines().index("  vocab: 50304") + 1
    assert str(err.value.diagnostics[0].loc).endswith(f"speedrun-track3.yaml:{line}:3")


def _favour_padding(ck) -> None:
    """Make every padding id the model's first choice by far: a generator that does not mask them picks them."""
    with torch.no_grad():
        ck.module.head.bias[256:] = 50.0


def test_generation_never_picks_a_padding_id(padded):
    ck = load_checkpoint(padded)
    _favour_padding(ck)
    prompt = [72, 105]
    unmasked = generate(ck.model, prompt, max_new_tokens=8, temperature=0)  # a bare model knows no tokenizer
    assert min(unmasked[2:]) >= 256
    for temperature in (0.0, 3.0):
        for ids in (generate(ck, prompt, max_new_tokens=40, temperature=temperature, seed=0),
                    generate(ck, prompt, max_new_tokens=40, temperature=temperature, seed=0, use_cache=False),
                    generate_static(ck, prompt, max_new_tokens=40, temperature=temperature, seed=0),
                    generate(ck.model, prompt, max_new_tokens=40, temperature=temperature, seed=0, vocab_limit=256),
                    generate_static(ck.model, prompt, max_new_tokens=40, temperature=temperature, seed=0,
                                    vocab_limit=256)):
            assert len(ids) == 42 and max(ids[2:]) < 256, ids
    with pytest.raises(Exception, match="vocab_limit 301 is outside 1..300"):
        generate(ck.model, prompt, max_new_tokens=1, vocab_limit=301)


@pytest.mark.parametrize("engine", [[], ["--compile"]])
def test_the_cli_generates_no_padding_id(padded, tmp_path, capsys, engine):
    """``physlm-graph generate`` on a copy of the checkpoint whose padding ids were made the likeliest."""
    import shutil

    from safetensors.torch import save_file

    from physlm_graph.runtime.checkpoint import MANIFEST, write_manifest

    folder = tmp_path / "ck"
    shutil.copytree(load_checkpoint(padded).path, folder)
    ck = load_checkpoint(folder)
    _favour_padding(ck)
    save_file({k: v.contiguous() for k, v in ck.module.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / MANIFEST).unlink()
    write_manifest(folder)
    code = main(["generate", str(folder), "--prompt", "Hi", "--max-new-tokens", "20", "--temperature", "0", "--json",
                 *engine])
    out = capsys.readouterr()
    assert code == 0, out.err
    ids = json.loads(out.out.strip().splitlines()[-1])["ids"]
    assert len(ids) == 20 and max(ids) < 256, ids


def test_a_hugging_face_export_suppresses_the_padding_ids(padded, tmp_path):
    transformers = pytest.importorskip("transformers")
    from physlm_graph._hf_export import export_hf

    export_hf(padded, tmp_path / "hf")
    gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert gen["suppress_tokens"] == list(range(256, 300))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))
    assert model.get_input_embeddings().weight.shape[0] == 300
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if n.endswith("head.bias"))[256:] = 50.0
    out = model.generate(torch.tensor([[72, 105]]), max_new_tokens=20, do_sample=False)
    assert out.shape[1] == 22 and int(out[0, 2:].max()) < 256, out


@pytest.fixture(scope="module")
def padded_exits(tmp_path_factory, text) -> Path:
    """A baby GPT with an exit after each block, vocab 300 under the bytes tokenizer, its padding
    ids made every head's first choice (a head bias of 50), saved as a checkpoint."""
    from safetensors.torch import save_file

    from physlm_graph.runtime.checkpoint import MANIFEST, write_manifest

    out = tmp_path_factory.mktemp("exits") / "run"
    ov = {"params.layers": 2, "params.dim": 16, "params.heads": 2, "params.context": 16, "train.seq_len": 16,
          "params.dropout": 0.0, "params.vocab": 300, "train.fit_vocab": False, "nodes.head.bias": True,
          "nodes.head.tie": None, "exits": {"every": 1, "block": "trunk"}}
    train(ROOT / "blueprints" / "baby-gpt.yaml", data=str(text), overrides=ov, out_dir=out, tokenizer="bytes", steps=2,
          batch_size=2, eval_every=2, eval_iters=1, warmup=0, **RUN)
    ck = load_checkpoint(out / "last")
    _favour_padding(ck)
    save_file({k: v.contiguous() for k, v in ck.module.state_dict().items()}, str(ck.path / "model.safetensors"))
    (ck.path / MANIFEST).unlink()
    write_manifest(ck.path)
    return ck.path


@pytest.mark.parametrize("how", [["--exit-threshold", "0.0"], ["--speculate", "2"]])
def test_early_exit_and_self_speculative_generation_pick_no_padding_id(padded_exits, capsys, how):
    from physlm_graph.runtime.early_exit import generate_with_exits
    from physlm_graph.runtime.speculative import generate_self_speculative

    model = load_checkpoint(padded_exits).model
    if how[0] == "--exit-threshold":
        unmasked = generate_with_exits(model, [72, 105], max_new_tokens=6, threshold=0.0)[0]
    else:
        unmasked = generate_self_speculative(model, [72, 105], max_new_tokens=6)[0]
    assert min(unmasked[2:]) >= 256  # unmasked, the padding ids win
    code = main(["generate", str(padded_exits), "--prompt", "Hi", "--max-new-tokens", "12", "--temperature", "0",
                 "--json", *how])
    out = capsys.readouterr()
    assert code == 0, out.err
    ids = json.loads(out.out.strip().splitlines()[-1])["ids"]
    assert len(ids) == 12 and max(ids) < 256, ids
