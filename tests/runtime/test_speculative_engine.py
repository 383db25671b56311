"""Self-speculative decoding on the decode engine (runtime/speculative_engine.py): the output is
full depth's greedy decoding token for token (learned and rotary positions, grouped-query heads,
a sliding window, an SSM and a gated conv whose states are rolled back), the static caches after
decoding equal a fresh prefill's, the round is one graph with no host sync, and what the engine
cannot serve is refused or falls back, saying so."""

from __future__ import annotations

import pytest
import torch

from physlm_graph import PhysLMError, compile_blueprint
from physlm_graph.runtime.decode_engine import DecodeEngine, logits_only
from physlm_graph.runtime.generate import NonFiniteLogits, generate
from physlm_graph.runtime.speculative import generate_self_speculative
from physlm_graph.runtime.speculative_engine import SpeculativeEngine, generate_speculative_static

from .test_early_exit import PROMPT, blueprint, llama, scaled

pytestmark = pytest.mark.usefixtures("one_thread")
SHORT = [3, 4, 5]


def _window(d: dict) -> dict:
    d["blocks"]["gpt_block"]["nodes"]["attn"]["sliding_window"] = 5
    return d


def _ssm(d: dict) -> dict:
    """Each block gets an SSD mixer after its MLP: a fixed-size state in every layer."""
    nodes = d["blocks"]["gpt_block"]["nodes"]
    nodes["ln3"] = {"use": "norm.layer", "in": "r2"}
    nodes["ssm"] = {"use": "ssm.ssd", "in": "ln3", "d_state": 8, "head_dim": 8, "chunk_size": 4}
    nodes["r3"] = {"use": "add", "in": ["r2", "ssm"]}
    d["blocks"]["gpt_block"]["out"] = "r3"
    return d


def _conv(d: dict) -> dict:
    d["blocks"]["gpt_block"]["nodes"]["attn"] = {"use": "ssm.gated_conv", "in": "ln1"}
    return d


BUILDERS = {
    "gpt2": lambda **ex: blueprint(**ex),
    "llama": lambda **ex: llama(layers=4, **ex),
    "window": lambda **ex: _window(blueprint(**ex)),
    "ssm": lambda **ex: _ssm(blueprint(**ex)),
    "conv": lambda **ex: _conv(blueprint(**ex)),
}


@pytest.fixture(scope="module")
def models():
    """name -> (model with an exit after every layer, the same weights without exits)."""
    out = {}
    for name, make in BUILDERS.items():
        cm = scaled(compile_blueprint(make(every=1, block="trunk")))
        plain = compile_blueprint(make())
        plain.module.load_state_dict(cm.module.state_dict())
        out[name] = (cm, plain)
    return out


@pytest.mark.parametrize("name", list(BUILDERS))
@pytest.mark.parametrize("draft_exit,draft_len", [(0, 3), (1, 1), (2, 5)])
def test_equals_full_depth_greedy(models, name, draft_exit, draft_len):
    cm, plain = models[name]
    want = generate(plain, PROMPT, max_new_tokens=40, temperature=0)
    assert len(set(want[len(PROMPT):])) > 5  # a real sequence
    spec = SpeculativeEngine(cm, batch=1, max_len=64, draft_exit=draft_exit, draft_len=draft_len, prefill_chunk=4)
    assert spec.generate([PROMPT], max_new_tokens=40)[0] == want
    st = spec.stats
    assert st.accepted < st.drafted and st.rounds < 40  # drafts both rejected and kept
    assert spec.generate([PROMPT], max_new_tokens=40)[0] == want  # buffers reused, stale rows hidden


def test_rows_of_different_lengths_each_decode_full_depth_greedy(models):
    cm, plain = models["llama"]
    rows = [PROMPT, SHORT, PROMPT[::-1][:7]]
    got = SpeculativeEngine(cm, batch=3, max_len=64, draft_exit=2, draft_len=3).generate(rows, max_new_tokens=25)
    assert got == [generate(plain, r, max_new_tokens=25, temperature=0) for r in rows]


def test_the_round_is_one_graph_with_no_host_sync(models):
    """The round traced whole (``fullgraph``: an ``.item()``, a ``bool(tensor)`` or a shape that
    changes from round to round would fail or recompile), for rows of two lengths."""
    from torch._dynamo.utils import counters

    cm, plain = models["llama"]
    torch._dynamo.reset()
    counters.clear()
    spec = SpeculativeEngine(cm, batch=2, max_len=64, draft_exit=1, draft_len=3)
    spec._round_k = torch.compile(spec._device_round, fullgraph=True, backend="eager", dynamic=False)
    got = spec.generate([PROMPT, SHORT], max_new_tokens=20)
    assert got == [generate(plain, r, max_new_tokens=20, temperature=0) for r in (PROMPT, SHORT)]
    assert spec.stats.rounds > 3 and counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()


def _kv(engine: DecodeEngine) -> list[torch.Tensor]:
    return [t for pair in engine.static._kv.values() for t in pair]


@pytest.mark.parametrize("name", ["gpt2", "ssm"])
def test_caches_and_states_equal_a_fresh_prefill(models, name):
    """After decoding, every key/value up to the pending token's position and every fixed state
    equal those of a full-depth prefill of the same tokens: rejected rows left nothing behind."""
    cm, plain = models[name]
    spec = SpeculativeEngine(cm, batch=1, max_len=64, draft_exit=0, draft_len=4)
    spec.generate([PROMPT], max_new_tokens=30)
    assert spec.stats.accepted < spec.stats.drafted
    n = int(spec.engine.pos[0])  # the pending token's position: every token before it was fed
    assert n >= len(PROMPT) + 29  # the last round may have run past max_new_tokens
    ids = generate(plain, PROMPT, max_new_tokens=n - len(PROMPT), temperature=0)
    fresh = DecodeEngine(cm, batch=1, max_len=64)
    fresh._prefill(torch.tensor([ids[:n]]), torch.tensor([n]))
    for a, b in zip(_kv(spec.engine), _kv(fresh)):
        torch.testing.assert_close(a[:, :, :n], b[:, :, :n], atol=1e-5, rtol=1e-5)
    states = [bufs for _, bufs, _ in spec.engine._states.values()]
    assert bool(states) == (name == "ssm")
    for mine, theirs in zip(states, [bufs for _, bufs, _ in fresh._states.values()]):
        for a, b in zip(mine, theirs):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_eos_length_limits_streaming_and_a_full_buffer(models):
    cm, plain = models["gpt2"]
    want = generate(plain, PROMPT, max_new_tokens=30, temperature=0)
    eos = want[len(PROMPT) + 7]
    first = want.index(eos, len(PROMPT))
    got, _ = generate_speculative_static(cm, PROMPT, max_new_tokens=30, draft_exit=2, draft_len=5, eos_id=eos)
    assert got == want[: first + 1]
    got, _ = generate_speculative_static(cm, PROMPT, max_new_tokens=1, draft_len=6)
    assert got == want[: len(PROMPT) + 1]
    seen: list[list[int]] = []
    got, stats = generate_speculative_static(cm, PROMPT, max_new_tokens=13, draft_exit=2, draft_len=4,
                                             on_token=seen.append)
    assert got == want[: len(PROMPT) + 13] and [s[0] for s in seen] == got[len(PROMPT):]
    assert stats.tokens == 12  # after the prefill's token
    # max_len = prompt + new: the last rounds draft fewer tokens (k shrinks to fit the buffers)
    spec = SpeculativeEngine(cm, batch=1, max_len=len(PROMPT) + 8, draft_exit=0, draft_len=6)
    assert spec.generate([PROMPT], max_new_tokens=8)[0] == want[: len(PROMPT) + 8]
    assert spec.stats.drafted < 6 * spec.stats.rounds


def test_tensor_prompts_return_a_tensor(models):
    cm, plain = models["window"]
    x = torch.tensor([PROMPT, PROMPT[::-1]])
    got, _ = generate_speculative_static(cm, x, max_new_tokens=20, draft_exit=1, draft_len=3)
    assert torch.equal(got, generate(plain, x, max_new_tokens=20, temperature=0))


def test_past_the_context_it_runs_the_old_path_and_says_so(models, capsys):
    cm, plain = models["gpt2"]
    want = generate(plain, PROMPT, max_new_tokens=60, temperature=0)  # 70 tokens > context 64
    got, _ = generate_speculative_static(cm, PROMPT, max_new_tokens=60, draft_exit=1, draft_len=3)
    assert got == want
    assert ("decode engine: self-speculative decoding with 70 tokens, more than the context 64 runs without the "
            "engine") in capsys.readouterr().err


def test_nodes_off_the_static_path_fall_back(models, capsys):
    """``memory.episodic`` keeps a store the engine does not hold in fixed buffers: the engine
    refuses it, the one-call API runs the old path (which refuses what it cannot cut back)."""
    d = blueprint(layers=2, every=1, block="trunk")
    d["blocks"]["gpt_block"]["nodes"]["attn"] = {"use": "memory.episodic", "in": "ln1"}
    cm = compile_blueprint(d)
    with pytest.raises(PhysLMError, match="keep caches that grow: trunk.0.attn"):
        SpeculativeEngine(cm, batch=1, max_len=32)
    with pytest.raises(PhysLMError):
        generate_speculative_static(cm, PROMPT, max_new_tokens=5)
    err = capsys.readouterr().err
    assert "self-speculative decoding with nodes off its static path (trunk.0.attn (memory.episodic)" in err
    assert "the step runs uncaptured" not in err  # refused before an engine is built


def test_bad_arguments(models):
    cm, _ = models["ssm"]
    spec = SpeculativeEngine(cm, batch=2, max_len=40)
    with pytest.raises(PhysLMError, match="different lengths cannot share fixed-state"):
        spec.generate([PROMPT, SHORT], max_new_tokens=5)
    with pytest.raises(PhysLMError, match="batch 2, got 1"):
        spec.generate([PROMPT], max_new_tokens=5)
    with pytest.raises(PhysLMError, match="max_len 40"):
        spec.generate([PROMPT, PROMPT], max_new_tokens=31)
    with pytest.raises(PhysLMError, match="draft_len must be at least 1"):
        SpeculativeEngine(cm, batch=1, max_len=40, draft_len=0)
    with pytest.raises(PhysLMError, match="no exit after 'trunk.9'"):
        SpeculativeEngine(cm, batch=1, max_len=40, draft_exit="trunk.9")
    with pytest.raises(PhysLMError, match="declares no exits"):
        SpeculativeEngine(models["ssm"][1], batch=1, max_len=40)
    with pytest.raises(PhysLMError, match="cuda_graph=True needs a CUDA device"):
        SpeculativeEngine(cm, batch=1, max_len=40, cuda_graph=True)


def test_nan_logits_are_refused_naming_the_weight(models):
    cm, _ = models["gpt2"]
    bad = compile_blueprint(blueprint(every=1, block="trunk"))
    bad.module.load_state_dict(cm.module.state_dict())
    with torch.no_grad():
        bad.module.get_parameter("trunk.3.mlp.fc.weight").fill_(float("nan"))
    with pytest.raises(NonFiniteLogits, match="weight trunk.3.mlp.fc.weight holds 4,096 NaN/inf values"):
        generate_speculative_static(bad, PROMPT, max_new_tokens=20, draft_exit=0, draft_len=3)
    # the weights turn NaN after the prefill: the round's check stops decoding
    with torch.no_grad():
        bad.module.get_parameter("trunk.3.mlp.fc.weight").copy_(cm.module.get_parameter("trunk.3.mlp.fc.weight"))
    seen: list[int] = []

    def poison(ids: list[int]) -> None:
        seen.extend(ids)
        with torch.no_grad():
            bad.module.get_parameter("trunk.3.mlp.fc.weight").fill_(float("nan"))

    with pytest.raises(NonFiniteLogits, match="weight trunk.3.mlp.fc.weight"):
        generate_speculative_static(bad, PROMPT, max_new_tokens=20, draft_exit=0, draft_len=3, on_token=poison)
    assert len(seen) == 1


def test_the_engine_runs_no_exit_head(models):
    cm, plain = models["gpt2"]
    pruned = logits_only(cm.module)
    assert sum(n.op == "call_module" for n in pruned.graph.nodes) == \
        sum(n.op == "call_module" for n in plain.module.graph.nodes)
    x = torch.tensor([PROMPT])
    assert torch.equal(pruned(x)["logits"], cm.module(x)["logits"])
    assert logits_only(plain.module) is plain.module


def test_same_stats_as_the_old_path(models):
    """Same tokens, same rounds: the engine and ``runtime/speculative.py`` accept the same drafts
    (within the context, where neither re-prefills) but in the last round, where the old path
    drafts only as many tokens as are still wanted and the engine a whole round."""
    cm, _ = models["gpt2"]
    old, a = generate_self_speculative(cm, PROMPT, max_new_tokens=40, draft_exit=1, draft_len=3)
    new, b = generate_speculative_static(cm, PROMPT, max_new_tokens=40, draft_exit=1, draft_len=3)
    assert new == old and b.per_round == a.per_round and b.tokens == a.tokens == 39
    assert b.accepted >= a.accepted and b.drafted >= a.drafted


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("name", ["llama", "ssm"])
def test_cuda_graph_round_equals_full_depth_greedy(models, name, compile):
    """On the GPU in float32 against the CPU's greedy tokens. cuDNN's TF32 is off here: by default
    it runs the SSM's float32 depthwise convolution in TF32, whose 10-bit mantissa parts these
    large test weights' greedy tokens from the CPU's within a few dozen tokens."""
    cm, plain = models[name]
    cm.module.cuda()
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        want = generate(plain, PROMPT, max_new_tokens=40, temperature=0)
        spec = SpeculativeEngine(cm, batch=1, max_len=64, draft_exit=2, draft_len=4, compile=compile)
        assert spec.cuda_graph
        assert spec.generate([PROMPT], max_new_tokens=40)[0] == want
        assert spec._graph is not None
        assert spec.generate([PROMPT], max_new_tokens=40)[0] == want  # the captured round replays again
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
        cm.module.cpu()


def test_cli_generate_compile_honours_speculate_and_exit_threshold(models, tmp_path, capsys):
    """``--compile --speculate K`` runs the speculative round on the engine and ``--compile
    --exit-threshold T`` the exits on its caches: the same ids as without ``--compile``."""
    import json

    from physlm_graph.cli import main
    from physlm_graph.runtime.checkpoint import save_checkpoint
    from physlm_graph.runtime.tokenizers import CharTokenizer

    tok = CharTokenizer([chr(c) for c in range(32, 97)])
    folder = save_checkpoint(tmp_path / "ck", cm=models["gpt2"][0], tokenizer=tok)
    base = ["generate", str(folder), "--prompt", "ROMEO:", "--temperature", "0", "--max-new-tokens", "30",
            "--device", "cpu", "--json"]
    runs = {}
    for how in (["--speculate", "3", "--draft-exit", "trunk.2"], ["--exit-threshold", "0.3", "--exit-rule", "top1"]):
        for flag in ([], ["--compile"]):
            assert main([*base, *how, *flag]) == 0
            runs[how[0], bool(flag)] = json.loads(capsys.readouterr().out)
    assert main([*base]) == 0
    full = json.loads(capsys.readouterr().out)["ids"]
    spec, eng = runs["--speculate", False], runs["--speculate", True]
    assert eng["ids"] == spec["ids"] == full and eng["engine"] and not spec["engine"]
    assert eng["speculative"]["tokens_per_round"] > 1 and spec["speculative"]["tokens_per_round"] > 1
    exits, eng = runs["--exit-threshold", False], runs["--exit-threshold", True]
    assert eng["ids"] == exits["ids"] != full and eng["exits"] == exits["exits"]
    assert main([*base, "--compile", "--speculate", "2", "--temperature", "0.8"]) == 2
    assert "--speculate decodes greedily with the KV cache; it cannot be combined with --temperature 0.8" in \
        capsys.readouterr().err
