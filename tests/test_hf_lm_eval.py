"""Tools built on transformers run an exported char-level checkpoint unpatched: a batched
text-generation pipeline, and lm-evaluation-harness's HFLM (rolling log-likelihood, prefixed with
the exported BOS, and batched greedy generate_until, left-padded)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

import physlm_graph  # noqa: E402,F401  (registers model_type "physlm")
from physlm_graph import compile_blueprint, export_hf  # noqa: E402
from physlm_graph.runtime.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from physlm_graph.runtime.generate import generate  # noqa: E402
from physlm_graph.runtime.tokenizers import CharTokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONTEXT = 48
TEXT = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.,;:!?\n'-"
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tok = CharTokenizer.from_text(TEXT)
    cm = compile_blueprint(ROOT / "blueprints" / "baby-gpt.yaml", overrides={
        "params.vocab": tok.vocab_size, "params.layers": 1, "params.dim": 32, "params.heads": 2, "params.context": CONTEXT,
        "params.dropout": 0.0, "train.seq_len": CONTEXT})
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in cm.module.parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    root = tmp_path_factory.mktemp("lmeval")
    folder = save_checkpoint(root / "ckpt", cm=cm, tokenizer=tok)
    r = export_hf(folder, root / "hf")
    assert r.model_type == "physlm" and r.tokenizer
    return cm, tok, r.out


def test_the_export_adds_a_boundary_token_the_model_reads_but_never_produces(exported):
    cm, tok, out = exported
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(out)
    V = tok.vocab_size
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (V, V, V)
    assert hf_tok.bos_token == "<|endoftext|>"
    assert hf_tok("To be, or not")["input_ids"] == tok.encode("To be, or not")  # nothing prepended
    assert hf_tok.decode(tok.encode("a\nb"), skip_special_tokens=True) == "a\nb"  # newlines are not special
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([tok.encode("To be, or not")])
    with torch.no_grad():
        logits = model(torch.cat([torch.tensor([[V]]), ids], dim=1)).logits
        torch.testing.assert_close(model(ids).logits[..., :V], cm.module(ids)["logits"])  # the same function
    assert logits.shape[-1] == V + 1 and bool(torch.isneginf(logits[..., V]).all())
    assert load_checkpoint(out).model.hash == model.compiled.hash  # still a physlm checkpoint


def test_a_batched_pipeline_generates_what_each_prompt_generates_alone(exported):
    cm, tok, out = exported
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    pipe = pipeline("text-generation", model=AutoModelForCausalLM.from_pretrained(out),
                    tokenizer=AutoTokenizer.from_pretrained(out, padding_side="left"))
    prompts = ["ROMEO:", "To be, or not", "A"]
    got = pipe(prompts, batch_size=3, max_new_tokens=10, do_sample=False)
    for p, [g] in zip(prompts, got):
        assert g["generated_text"] == tok.decode(generate(cm, tok.encode(p), max_new_tokens=10, temperature=0))


def test_hflm_rolling_loglikelihood_and_batched_generate_until(exported):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    cm, tok, out = exported
    lm = HFLM(pretrained=str(out), batch_size=4, device="cpu")
    V = tok.vocab_size
    text = "To be, or not to be: that is the question."
    [ll] = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)
    ids = tok.encode(text)
    with torch.no_grad():  # the same sum by hand: every character given BOS and the ones before it
        logp = torch.log_softmax(lm.model(torch.tensor([[V] + ids[:-1]])).logits.double(), -1)[0]
    assert math.isclose(ll, float(logp[torch.arange(len(ids)), ids].sum()), rel_tol=1e-5)

    contexts = ["ROMEO:", "To be, or not", "A", "What light through yonder"]  # 4 lengths: left padding
    kwargs = {"until": ["\n\n"], "max_gen_toks": 12, "do_sample": False}
    got = lm.generate_until([Instance("generate_until", {}, (c, dict(kwargs)), i) for i, c in enumerate(contexts)],
                            disable_tqdm=True)
    for c, text_out in zip(contexts, got):
        alone = tok.decode(generate(cm, tok.encode(c), max_new_tokens=12, temperature=0)[len(c):])
        assert text_out == alone.split("\n\n")[0], c
    assert len(set(got)) == 4


def test_a_bytes_checkpoint_exports_with_its_boundary_token_too(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from physlm_graph.runtime.tokenizers import ByteTokenizer

    cm = compile_blueprint(ROOT / "tests/assets/blueprints/valid/tiny.yaml", overrides={"params.vocab": 256})
    r = export_hf(save_checkpoint(tmp_path / "ck", cm=cm, tokenizer=ByteTokenizer()), tmp_path / "hf")
    hf_tok = AutoTokenizer.from_pretrained(r.out)
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (256, 256, 256)
    text = "héllo, wörld \u2603\n"
    assert hf_tok(text)["input_ids"] == list(text.encode("utf-8"))
    assert hf_tok.decode(list(text.encode("utf-8")) + [256], skip_special_tokens=True) == text
    model = AutoModelForCausalLM.from_pretrained(r.out)
    assert model.get_input_embeddings().weight.shape[0] == 257 and model.generation_config.eos_token_id == 256

