"""PhysLMForCausalLM's cache, padding and positions: a step with past_key_values equals the full
forward, a left-padded batch generates what each prompt generates alone, generate feeds each
token once, and what cannot be honoured is refused or warned about, never silently wrong."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from physlm_graph import PhysLMError, compile_blueprint  # noqa: E402
from physlm_graph._hf import PhysLMForCausalLM  # noqa: E402
from physlm_graph._hf_cache import PhysLMCache  # noqa: E402
from physlm_graph.runtime.generate import generate  # noqa: E402
from transformers.cache_utils import DynamicCache  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONTEXT = 32
pytestmark = pytest.mark.usefixtures("one_thread")


def _scaled(cm):
    """Weights scaled up so greedy decoding varies from token to token."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in cm.module.parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return cm


@pytest.fixture(scope="module")
def cm():
    return _scaled(compile_blueprint(ROOT / "blueprints" / "baby-gpt.yaml", overrides={
        "params.layers": 2, "params.dim": 32, "params.heads": 2, "params.context": CONTEXT,
        "params.dropout": 0.0, "train.seq_len": CONTEXT}))


@pytest.fixture()
def model(cm):
    return PhysLMForCausalLM.from_compiled(cm).eval()


def _ids(*rows):
    return torch.tensor(rows)


def test_one_step_with_past_key_values_equals_the_full_forward(model):
    ids = torch.randint(0, 65, (3, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits  # (3, 12, V)
        out = model(ids[:, :8], use_cache=True)
        cache = out.cache
        assert isinstance(cache, PhysLMCache) and cache.get_seq_length() == 8
        torch.testing.assert_close(out.logits, full[:, :8], rtol=1e-5, atol=1e-5)
        for t in range(8, 12):  # one token at a time, each with the cache the previous call returned
            step = model(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            torch.testing.assert_close(step.logits[:, 0], full[:, t], rtol=1e-5, atol=1e-5)
            cache = step.cache
    assert cache.get_seq_length() == 12


def test_a_left_padded_batch_generates_what_each_prompt_generates_alone(model):
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [20, 21, 22, 23, 24]]
    width = max(map(len, prompts))
    ids = _ids(*[[0] * (width - len(p)) + p for p in prompts])
    mask = _ids(*[[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
        for i, p in enumerate(prompts):  # the padded forward's real columns are the prompt's own logits
            alone = model(_ids(p)).logits[0]
            torch.testing.assert_close(logits[i, width - len(p):], alone, rtol=1e-5, atol=1e-5)
    for use_cache in (True, False):
        with pytest.warns(UserWarning, match=f"longer than the model's context of {CONTEXT} tokens"):
            out = model.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False, pad_token_id=0,
                                 use_cache=use_cache)  # 7 + 30 > CONTEXT: the longest row passes the context
        for i, p in enumerate(prompts):
            alone = model.generate(_ids(p), max_new_tokens=30, do_sample=False, use_cache=use_cache)[0].tolist()
            assert out[i, width - len(p):].tolist() == alone, (use_cache, i)
            assert alone == generate(model.compiled, p, max_new_tokens=30, temperature=0)  # the runtime's answer
            assert len(set(alone[len(p):])) > 3


def test_a_prompt_longer_than_the_context_generates_as_the_runtime_does(model):
    prompt = torch.randint(0, 65, (1, 40), generator=torch.Generator().manual_seed(2))
    want = generate(model.compiled, prompt[0].tolist(), max_new_tokens=6, temperature=0)
    for use_cache in (True, False):
        with pytest.warns(UserWarning, match=f"longer than the model's context of {CONTEXT} tokens"):
            out = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=use_cache)
        assert out[0].tolist() == want, use_cache
    out = model(prompt[:, :4], use_cache=True)
    with pytest.raises(PhysLMError, match="the cache holds 1 rows but input_ids has 2"):
        model(prompt[:, :2].repeat(2, 1), past_key_values=out.cache)


def test_generate_feeds_each_token_once(model):
    fed = []
    hook = model.model.register_forward_pre_hook(lambda m, args: fed.append(args[0].numel()))
    prompt = _ids([5, 6, 7, 8, 9], [9, 8, 7, 6, 5])
    try:
        out = model.generate(prompt, max_new_tokens=20, do_sample=False, use_cache=True)
        assert out.shape == (2, 25)
        assert fed == [10] + [2] * 19  # the prompt once, then one token per row and step
        fed.clear()
        model.generate(prompt, max_new_tokens=20, do_sample=False, use_cache=False)
        assert sum(fed) == 2 * sum(range(5, 25))  # recompute: the whole sequence every step
    finally:
        hook.remove()


def test_the_cache_a_client_passes_is_used_or_refused(model):
    ids = _ids([5, 6, 7, 8])
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids, past_key_values=DynamicCache(), use_cache=True)  # an empty HF cache: ours replaces it
        torch.testing.assert_close(out.logits, full)
        assert isinstance(out.cache, PhysLMCache)
        filled = DynamicCache()
        filled.update(torch.zeros(1, 2, 3, 16), torch.zeros(1, 2, 3, 16), 0)
        with pytest.raises(PhysLMError, match="DynamicCache holding 3 positions"):
            model(ids, past_key_values=filled, use_cache=True)
        with pytest.raises(PhysLMError, match="cache_position .* does not continue the cache, which holds 4"):
            model(_ids([9]), cache=out.cache, cache_position=torch.tensor([7]))


def test_position_ids_and_masks_that_the_graph_cannot_follow_are_refused(model):
    ids = _ids([5, 6, 7, 8], [0, 0, 7, 8])
    mask = _ids([1, 1, 1, 1], [0, 0, 1, 1])
    with torch.no_grad():
        ok = model(ids, attention_mask=mask, position_ids=_ids([0, 1, 2, 3], [1, 1, 0, 1])).logits  # pads: free
        torch.testing.assert_close(ok, model(ids, attention_mask=mask).logits)
        with pytest.raises(PhysLMError, match=r"position_ids row 1 is \[0, 1, 2, 3\].*\['-', '-', 0, 1\]"):
            model(ids, attention_mask=mask, position_ids=_ids([0, 1, 2, 3], [0, 1, 2, 3]))
        with pytest.raises(PhysLMError, match="attention_mask row 0 has zeros between ones"):
            model(ids, attention_mask=_ids([1, 0, 1, 1], [1, 1, 1, 1]))
        with pytest.raises(PhysLMError, match="right padding .* with a cache"):
            model(ids, attention_mask=_ids([1, 1, 1, 0], [1, 1, 1, 1]), use_cache=True)
        with pytest.raises(PhysLMError, match=f"40 tokens in one call, more than the model's context of {CONTEXT}"):
            model(torch.zeros(1, 40, dtype=torch.long))
        with pytest.raises(PhysLMError, match="does not support reordering rows"):
            model.generate(_ids([5, 6]), num_beams=2, max_new_tokens=3, do_sample=False)
        with pytest.raises(PhysLMError, match="cache_implementation='static': a PhysLMForCausalLM keeps"):
            model.generate(_ids([5, 6]), cache_implementation="static", max_new_tokens=3, do_sample=False)
        with pytest.raises(PhysLMError, match="does not support output_hidden_states=True"):
            model(ids, output_hidden_states=True)


def test_a_graph_that_cannot_decode_recomputes_with_a_warning():
    text = (ROOT / "tests/assets/blueprints/valid/tiny.yaml").read_text().replace(
        'attn: {use: attention.causal, in: ln1, num_heads: "${heads}"}',
        'attn: {use: attention.sparse_topk, in: ln1, num_heads: "${heads}", top_k: 2}')
    cm = compile_blueprint(text)
    model = PhysLMForCausalLM.from_compiled(cm).eval()
    assert not model.can_cache and not model.generation_config.use_cache
    prompt = _ids([1, 2, 3])
    want = generate(cm, [1, 2, 3], max_new_tokens=6, temperature=0)
    with pytest.warns(UserWarning, match="attention.sparse_topk; every step runs the whole sequence"):
        out = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True)
    assert out[0].tolist() == want
    with pytest.raises(PhysLMError, match="cannot decode incrementally: attention.sparse_topk"):
        model(prompt, past_key_values=PhysLMCache())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a plain call asks for no cache: nothing to warn about
        assert model(prompt).cache is None
