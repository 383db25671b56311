"""Hugging Face: a physlm checkpoint opens with AutoModelForCausalLM, generates as the runtime does,
and save_pretrained round-trips (both ways), with the tokenizer in HF form."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

import physlm_graph  # noqa: E402,F401  (registers model_type "physlm")
from physlm_graph import CheckpointError, compile_blueprint  # noqa: E402
from physlm_graph.runtime.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from physlm_graph.runtime.generate import generate  # noqa: E402
from physlm_graph.runtime.tokenizers import CharTokenizer  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONTEXT = 32
TEXT = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.,;:!?\n'-"
PROMPT = "To be, or not"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny baby-gpt, weights scaled up so greedy decoding varies, saved by the runtime."""
    cm = compile_blueprint(ROOT / "blueprints" / "baby-gpt.yaml", overrides={
        "params.layers": 1, "params.dim": 32, "params.heads": 2, "params.context": CONTEXT,
        "train.seq_len": CONTEXT})
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in cm.module.parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    cm.module.eval()
    tok = CharTokenizer.from_text(TEXT)
    folder = save_checkpoint(tmp_path_factory.mktemp("hf") / "ckpt", cm=cm, tokenizer=tok)
    return cm, tok, folder


def test_auto_classes_open_a_runtime_checkpoint(ckpt):
    cm, tok, folder = ckpt
    assert type(AutoConfig.from_pretrained(folder)).__name__ == "PhysLMConfig"
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert type(model).__name__ == "PhysLMForCausalLM"
    assert model.config.blueprint == (folder / "blueprint.yaml").read_text()
    ids = torch.tensor([tok.encode(PROMPT)])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, cm.module(ids)["logits"])
        labels = ids.clone()
        out = model(ids, labels=labels)
        want = torch.nn.functional.cross_entropy(out.logits[0, :-1], ids[0, 1:])
    assert torch.allclose(out.loss, want)


def test_greedy_generate_equals_runtime_across_the_context(ckpt):
    cm, tok, folder = ckpt
    model = AutoModelForCausalLM.from_pretrained(folder)
    hf_tok = AutoTokenizer.from_pretrained(folder, subfolder="tokenizer")
    assert isinstance(hf_tok, PreTrainedTokenizerFast)
    enc = hf_tok(PROMPT, return_tensors="pt")
    assert enc["input_ids"][0].tolist() == tok.encode(PROMPT)
    out = model.generate(**enc, max_new_tokens=40, do_sample=False)  # 13 + 40 > CONTEXT: crops
    ref = generate(cm, tok.encode(PROMPT), max_new_tokens=40, temperature=0)
    assert len(ref) > CONTEXT and len(set(ref[len(PROMPT):])) > 3
    assert out[0].tolist() == ref
    assert hf_tok.decode(out[0]) == tok.decode(ref)


def test_save_pretrained_round_trips_both_ways(ckpt, tmp_path):
    cm, tok, folder = ckpt
    model = AutoModelForCausalLM.from_pretrained(folder)
    model.save_pretrained(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["model_type"] == "physlm" and cfg["architectures"] == ["PhysLMForCausalLM"]
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    for (k, a), (k2, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    # the folder is also a physlm checkpoint, and the tokenizer sits at its top in HF form
    back = load_checkpoint(tmp_path / "hf")
    assert back.model.hash == cm.hash
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tok(PROMPT)["input_ids"] == tok.encode(PROMPT)
    ids = tok.encode(PROMPT)
    assert generate(back, ids, max_new_tokens=10, temperature=0) == \
        again.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False)[0].tolist()


def test_from_pretrained_names_a_missing_folder(tmp_path):
    from physlm_graph.hf import PhysLMForCausalLM

    with pytest.raises(CheckpointError) as err:  # (AutoModel fails earlier, in transformers' own config lookup)
        PhysLMForCausalLM.from_pretrained(tmp_path / "nope")
    assert "not a local checkpoint folder" in str(err.value) and "nope" in str(err.value)
    assert "snapshot_download" in str(err.value)


PG_FIRST = """
import sys
import physlm_graph
assert "transformers" not in sys.modules, "import physlm_graph must not import transformers (slow)"
from transformers import AutoModelForCausalLM
print(type(AutoModelForCausalLM.from_pretrained(sys.argv[1])).__name__)
"""
TF_FIRST = """
import sys
from transformers import AutoModelForCausalLM
import physlm_graph
print(type(AutoModelForCausalLM.from_pretrained(sys.argv[1])).__name__)
"""

PIPELINE_FIRST = """
import sys, warnings
warnings.simplefilter("error")  # the hook must not give up while transformers imports itself
import physlm_graph
from transformers import pipeline  # loads the auto config module halfway through modeling_utils
from transformers import AutoModelForCausalLM
print(type(AutoModelForCausalLM.from_pretrained(sys.argv[1])).__name__)
"""


@pytest.mark.slow  # fresh interpreters importing torch and transformers: ~20 s each on 2 cores
@pytest.mark.parametrize("code", [PG_FIRST, TF_FIRST, PIPELINE_FIRST],
                         ids=["physlm_graph-first", "transformers-first", "pipeline-first"])
def test_registration_works_in_either_import_order(ckpt, code):
    _, _, folder = ckpt
    res = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == "PhysLMForCausalLM"


def test_autoconfig_alone_reads_the_blueprint_from_a_runtime_checkpoint(tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    from physlm_graph import compile_blueprint
    from physlm_graph.runtime.checkpoint import save_checkpoint
    from physlm_graph.runtime.tokenizers import ByteTokenizer

    cm = compile_blueprint(Path(__file__).parent / "assets/blueprints/valid/tiny.yaml", overrides={"params.vocab": 256})
    save_checkpoint(tmp_path / "ck", cm=cm, tokenizer=ByteTokenizer())
    cfg = AutoConfig.from_pretrained(tmp_path / "ck")
    assert cfg.model_type == "physlm" and "name: tiny" in cfg.blueprint
    tok = AutoTokenizer.from_pretrained(tmp_path / "ck")
    assert tok("hi")["input_ids"] == [104, 105]
