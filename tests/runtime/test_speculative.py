"""Self-speculative decoding: drafts from an exit, verified by the rest of the model. Its output
must be full depth's greedy decoding token for token, its caches exact after every round, and
it must refuse what it cannot roll back."""

from __future__ import annotations

import pytest
import torch

from physlm_graph import PhysLMError, compile_blueprint
from physlm_graph.runtime.generate import generate
from physlm_graph.runtime.speculative import SelfSpeculativeDecoder, generate_self_speculative

from .test_early_exit import PROMPT, blueprint, llama, plain, scaled  # noqa: F401  (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cm():
    return scaled(compile_blueprint(blueprint(every=1, block="trunk")))


@pytest.mark.parametrize("draft_exit,draft_len", [(0, 1), (0, 4), (1, 3), (2, 6), ("trunk.1", 2)])
def test_equals_full_depth_greedy(cm, plain, draft_exit, draft_len):  # noqa: F811
    want = generate(plain, PROMPT, max_new_tokens=90, temperature=0, use_cache=True)
    got, stats = generate_self_speculative(cm, PROMPT, max_new_tokens=90, draft_exit=draft_exit, draft_len=draft_len)
    assert len(set(want[len(PROMPT):])) > 5  # a real sequence
    assert got == want  # 100 tokens > context 64: the re-prefill path is covered too
    assert stats.rounds > 0 and 0 < stats.accepted <= stats.drafted
    assert sum(stats.per_round) == stats.tokens


def test_with_random_weights_rejections_happen_and_output_is_still_exact(cm, plain):  # noqa: F811
    """The shallowest exit of a scaled random model disagrees with full depth often: every
    rejection path (a = 0 .. k-1) is taken and the result is still full depth's."""
    want = generate(plain, PROMPT, max_new_tokens=50, temperature=0, use_cache=True)
    got, stats = generate_self_speculative(cm, PROMPT, max_new_tokens=50, draft_exit=0, draft_len=5)
    assert got == want
    assert stats.accepted < stats.drafted  # some drafts were rejected
    assert min(stats.per_round) < max(stats.per_round)


def test_llama_rope_and_grouped_query_heads():
    cm = scaled(compile_blueprint(llama(layers=4, every=1, block="trunk")))
    base = compile_blueprint(llama(layers=4))
    base.module.load_state_dict(cm.module.state_dict())
    want = generate(base, PROMPT, max_new_tokens=40, temperature=0, use_cache=True)
    got, _ = generate_self_speculative(cm, PROMPT, max_new_tokens=40, draft_exit=1, draft_len=3)
    assert got == want


def test_batch_rows_are_each_full_depth_greedy(cm, plain):  # noqa: F811
    prompts = torch.tensor([PROMPT, PROMPT[::-1]])
    want = generate(plain, prompts, max_new_tokens=30, temperature=0, use_cache=True)
    got, _ = generate_self_speculative(cm, prompts, max_new_tokens=30, draft_exit=1, draft_len=4)
    assert torch.equal(got, want)


def test_caches_hold_exactly_the_kept_rows_after_each_round(cm):
    dec = SelfSpeculativeDecoder(cm, draft_exit=0, draft_len=4)
    logits = dec.prefill(torch.tensor([PROMPT]))
    ids = torch.cat([torch.tensor([PROMPT]), logits.argmax(-1, keepdim=True)], 1)
    attns = [m for m in cm.module.modules() if type(m).__name__ == "CausalSelfAttention"]
    assert len(attns) == 4
    for _ in range(8):
        new = dec.round(ids[:, -1:], 4)
        ids = torch.cat([ids, new], 1)
        assert dec.ctx.offset == ids.size(1) - 1  # every token but the pending one is cached
        for m in attns:
            k, v = dec.ctx.get(m)
            assert k.shape[2] == v.shape[2] == dec.ctx.offset


def test_caches_equal_a_fresh_prefill(cm):
    dec = SelfSpeculativeDecoder(cm, draft_exit=0, draft_len=3)
    logits = dec.prefill(torch.tensor([PROMPT]))
    ids = torch.cat([torch.tensor([PROMPT]), logits.argmax(-1, keepdim=True)], 1)
    for _ in range(6):
        ids = torch.cat([ids, dec.round(ids[:, -1:], 3)], 1)
    fresh = SelfSpeculativeDecoder(cm, draft_exit=0)
    fresh.prefill(ids[:, :-1])
    for m in cm.module.modules():
        if type(m).__name__ == "CausalSelfAttention":
            for a, b in zip(dec.ctx.get(m), fresh.ctx.get(m)):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_eos_and_length_limits(cm, plain):  # noqa: F811
    want = generate(plain, PROMPT, max_new_tokens=25, temperature=0, use_cache=True)
    eos = want[len(PROMPT) + 7]
    first = want.index(eos, len(PROMPT))
    got, _ = generate_self_speculative(cm, PROMPT, max_new_tokens=25, draft_exit=0, draft_len=6, eos_id=eos)
    assert got == want[: first + 1]
    got, _ = generate_self_speculative(cm, PROMPT, max_new_tokens=1, draft_len=6)
    assert got == want[: len(PROMPT) + 1]
    seen: list[list[int]] = []
    got, _ = generate_self_speculative(cm, PROMPT, max_new_tokens=13, draft_len=6, on_token=seen.append)
    assert got == want[: len(PROMPT) + 13] and [s[0] for s in seen] == got[len(PROMPT):]


def test_refuses_what_it_cannot_roll_back_and_bad_arguments(cm):
    d = blueprint(layers=3, every=1, block="trunk")
    d["blocks"]["gpt_block"]["nodes"]["attn"] = {"use": "ssm.gated_conv", "in": "ln1"}
    conv = compile_blueprint(d)
    with pytest.raises(PhysLMError, match="cannot be cut back"):
        generate_self_speculative(conv, PROMPT, max_new_tokens=5)
    with pytest.raises(PhysLMError, match="no exit after 'trunk.9'"):
        SelfSpeculativeDecoder(cm, draft_exit="trunk.9")
    with pytest.raises(PhysLMError, match="out of range"):
        SelfSpeculativeDecoder(cm, draft_exit=3)
    with pytest.raises(PhysLMError, match="draft_len must be at least 1"):
        SelfSpeculativeDecoder(cm, draft_len=0)
    with pytest.raises(PhysLMError, match="declares no exits|no exits"):
        SelfSpeculativeDecoder(compile_blueprint(blueprint()))


def test_any_prompt_draft_exit_and_length_gives_full_depth_greedy(cm, plain):  # noqa: F811
    """A small property check: random prompts (1 .. 40 tokens), draft exits, draft lengths and
    budgets, including prompts that start near the end of the context."""
    g = torch.Generator().manual_seed(7)
    for _ in range(8):
        n = int(torch.randint(1, 41, (1,), generator=g))
        prompt = torch.randint(0, 65, (n,), generator=g).tolist()
        e, k = int(torch.randint(0, 3, (1,), generator=g)), int(torch.randint(1, 8, (1,), generator=g))
        new = int(torch.randint(1, 60, (1,), generator=g))
        want = generate(plain, prompt, max_new_tokens=new, temperature=0, use_cache=True)
        got, _ = generate_self_speculative(cm, prompt, max_new_tokens=new, draft_exit=e, draft_len=k)
        assert got == want, (n, e, k, new)


def _nan_logits(cm, at: str):
    """A copy of ``cm`` whose weight ``at`` is all NaN."""
    bad = compile_blueprint(blueprint(every=1, block="trunk"))
    bad.module.load_state_dict(cm.module.state_dict())
    with torch.no_grad():
        bad.module.get_parameter(at).fill_(float("nan"))
    return bad


def test_nan_logits_in_the_prefill_are_refused_naming_the_weight(cm):
    from physlm_graph.runtime.generate import NonFiniteLogits

    bad = _nan_logits(cm, "trunk.3.mlp.fc.weight")
    with pytest.raises(NonFiniteLogits) as err:
        generate_self_speculative(bad, PROMPT, max_new_tokens=20, draft_exit=0, draft_len=3)
    assert str(err.value) == ("generate error: the model's logits are not finite (NaN or inf), so no token can be "
                              "chosen: weight trunk.3.mlp.fc.weight holds 4,096 NaN/inf values of 4,096\n"
                              "  fix: use another checkpoint (a run folder's best/), or retrain it with a lower "
                              "learning rate")


def test_nan_logits_in_a_verification_round_are_refused(cm):
    """The weights turn NaN after the prefill (from the first token's callback): the round's check,
    not the prefill's, stops decoding; nothing after it is emitted."""
    from physlm_graph.runtime.generate import NonFiniteLogits

    bad = _nan_logits(cm, "trunk.3.mlp.fc.weight")
    with torch.no_grad():
        bad.module.get_parameter("trunk.3.mlp.fc.weight").copy_(cm.module.get_parameter("trunk.3.mlp.fc.weight"))
    seen: list[int] = []

    def poison(ids: list[int]) -> None:
        seen.extend(ids)
        with torch.no_grad():
            bad.module.get_parameter("trunk.3.mlp.fc.weight").fill_(float("nan"))

    with pytest.raises(NonFiniteLogits, match="weight trunk.3.mlp.fc.weight holds 4,096 NaN/inf values"):
        generate_self_speculative(bad, PROMPT, max_new_tokens=20, draft_exit=0, draft_len=3, on_token=poison)
    assert len(seen) == 1  # the prefill's token; the first round raised
