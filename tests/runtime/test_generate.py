"""Generation (KV cache == recompute, across the crop boundary) and strided evaluation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from physlm_graph import PhysLMError, compile_blueprint
from physlm_graph.runtime.checkpoint import save_checkpoint
from physlm_graph.runtime.evaluate import evaluate
from physlm_graph.runtime.generate import can_cache, generate
from physlm_graph.runtime.tokenizers import CharTokenizer

ROOT = Path(__file__).resolve().parents[2]
CONTEXT = 64


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cm():
    """A tiny randomly initialised baby-gpt, weights scaled up so greedy decoding varies."""
    cm = compile_blueprint(ROOT / "blueprints" / "baby-gpt.yaml", overrides={
        "params.layers": 2, "params.dim": 32, "params.heads": 2, "params.context": CONTEXT, "train.seq_len": CONTEXT})
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in cm.module.parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return cm


PROMPT = [5, 17, 30, 2, 44, 9, 12, 60, 1, 33]


def test_greedy_with_cache_equals_without_across_the_crop(cm):
    assert can_cache(cm)
    cached = generate(cm, PROMPT, max_new_tokens=100, temperature=0, use_cache=True)
    full = generate(cm, PROMPT, max_new_tokens=100, temperature=0, use_cache=False)
    assert len(cached) == len(PROMPT) + 100 > CONTEXT  # crossed the context: the cache was reset
    assert cached[: len(PROMPT)] == PROMPT
    assert len(set(cached[len(PROMPT):])) > 5  # a real sequence, not one repeated token
    assert cached == full


def test_seeded_sampling_is_reproducible_and_cache_agnostic(cm):
    kw = dict(max_new_tokens=40, temperature=1.0, top_k=20, top_p=0.9, repetition_penalty=1.3, seed=7)
    a = generate(cm, PROMPT, use_cache=True, **kw)
    assert a == generate(cm, PROMPT, use_cache=True, **kw) == generate(cm, PROMPT, use_cache=False, **kw)
    assert generate(cm, PROMPT, max_new_tokens=10, temperature=1.0, top_k=1) == \
        generate(cm, PROMPT, max_new_tokens=10, temperature=0)


def test_batched_prompts_and_eos(cm):
    x = torch.tensor([PROMPT, PROMPT[::-1]])
    out = generate(cm, x, max_new_tokens=8, temperature=0)
    assert out.shape == (2, len(PROMPT) + 8)
    assert out[0].tolist() == generate(cm, PROMPT, max_new_tokens=8, temperature=0)
    first = generate(cm, PROMPT, max_new_tokens=1, temperature=0)[-1]
    assert generate(cm, PROMPT, max_new_tokens=8, temperature=0, eos_id=first) == PROMPT + [first]


def test_bad_arguments(cm):
    with pytest.raises(PhysLMError, match="temperature must be >= 0"):
        generate(cm, PROMPT, max_new_tokens=1, temperature=-1)
    with pytest.raises(PhysLMError, match="the prompt is empty"):
        generate(cm, [], max_new_tokens=1)


def test_generate_and_evaluate_from_a_checkpoint(cm, tmp_path):
    tok = CharTokenizer([chr(c) for c in range(32, 97)])
    folder = save_checkpoint(tmp_path / "ck", cm=cm, tokenizer=tok)
    assert generate(folder, PROMPT, max_new_tokens=5, temperature=0) == \
        generate(cm, PROMPT, max_new_tokens=5, temperature=0)
    text = tmp_path / "t.txt"
    text.write_text("".join(chr(32 + (i * 7) % 60) for i in range(500)))
    r1 = evaluate(folder, text, stride=CONTEXT, batch_size=4)
    r2 = evaluate(folder, text, stride=16, batch_size=4)
    assert r1["tokens_scored"] == r2["tokens_scored"] == 499  # each target scored exactly once
    assert r1["windows"] == 8 and r2["windows"] > r1["windows"]
    assert r1["perplexity"] > 1 and r1["peak_memory_bytes"] > 0 and r1["tokens_per_s"] > 0
