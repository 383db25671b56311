"""The decode engine (runtime/decode_engine.py): static buffers, the same greedy tokens.

Engine greedy output == ``generate()``'s cached greedy output == full recomputation, for a
GPT-2-style model (learned positions, tied head), a LLaMA-style one (rotary positions,
grouped-query attention) and a hybrid whose SSM and gated-conv nodes carry a fixed-size state;
rows of different prompt lengths decode side by side; nodes off the static path fall back.
On CPU the engine runs its static path eagerly; the GPU test captures the step as a CUDA graph.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from physlm_graph import PhysLMError, compile_blueprint
from physlm_graph.runtime.decode_engine import DecodeEngine, generate_static, sample_on_device, static_plan
from physlm_graph.runtime.generate import NonFiniteLogits, generate

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = [5, 17, 30, 2, 44, 9, 12, 60, 1, 33]
SHORT = [3, 4, 5]

HYBRID = """
physlm: 1
name: hybrid-tiny
params: {vocab: 64, dim: 32, context: 64}
inputs: {tokens: [batch, seq]}
nodes:
  tok:  {use: embed.token, in: tokens, vocab_size: "${vocab}", embed_dim: "${dim}"}
  pos:  {use: embed.learned_position, in: tokens, max_seq_len: "${context}", embed_dim: "${dim}"}
  x0:   {use: add, in: [tok, pos]}
  ln1:  {use: norm.layer, in: x0}
  ssm:  {use: ssm.ssd, in: ln1, d_state: 8, head_dim: 8, chunk_size: 4}
  r1:   {use: add, in: [x0, ssm]}
  ln2:  {use: norm.layer, in: r1}
  attn: {use: attention.causal, in: ln2, num_heads: 2}
  r2:   {use: add, in: [r1, attn]}
  ln3:  {use: norm.layer, in: r2}
  conv: {use: ssm.gated_conv, in: ln3, d_state: 4}
  r3:   {use: add, in: [r2, conv]}
  norm: {use: norm.layer, in: r3}
  head: {use: head.lm, in: norm, vocab_size: "${vocab}"}
outputs: {logits: head}
"""


def _scaled(cm):
    """Weights scaled up so that greedy decoding wanders (random small weights repeat one token)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in cm.module.parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return cm.module.eval() and cm


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    hybrid = tmp_path_factory.mktemp("bp") / "hybrid.yaml"
    hybrid.write_text(HYBRID)
    return {
        "gpt2": _scaled(compile_blueprint(ROOT / "blueprints" / "baby-gpt.yaml", overrides={
            "params.layers": 2, "params.dim": 32, "params.heads": 2, "params.context": 64, "train.seq_len": 64})),
        "llama": _scaled(compile_blueprint(ROOT / "blueprints" / "llama-style.yaml", overrides={
            "params.layers": 2, "params.dim": 32, "params.heads": 4, "params.kv_heads": 2, "params.hidden": 64,
            "params.context": 64, "params.vocab": 97})),
        "hybrid": _scaled(compile_blueprint(hybrid, seed=0)),
    }


@pytest.mark.parametrize("name", ["gpt2", "llama", "hybrid"])
@pytest.mark.parametrize("chunk", [256, 3])
def test_engine_greedy_equals_generate_and_full_recompute(models, name, chunk):
    cm = models[name]
    want = generate(cm, PROMPT, max_new_tokens=40, temperature=0)
    assert want == generate(cm, PROMPT, max_new_tokens=40, temperature=0, use_cache=False)
    assert len(set(want[len(PROMPT):])) > 4  # a real sequence, not one repeated token
    engine = DecodeEngine(cm, batch=1, max_len=60, prefill_chunk=chunk, check_every=7)
    assert engine.generate([PROMPT], max_new_tokens=40)[0] == want
    assert engine.generate([PROMPT], max_new_tokens=40)[0] == want  # buffers reused, stale tails hidden


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_written_out_attention_decodes_as_sdpa_does(models, name):
    """``attention="math"`` (q k^T, masked softmax, times v; grouped heads by reshape) gives the
    same logits as the SDPA path over the same buffers, for ragged rows and chunked prefill."""
    cm = models[name]
    rows = [PROMPT, SHORT]
    runs = {}
    for attention in ("sdpa", "math"):
        engine = DecodeEngine(cm, batch=2, max_len=40, prefill_chunk=4, attention=attention)
        runs[attention] = engine.generate(rows, max_new_tokens=16, temperature=0)
        ids = torch.tensor([PROMPT])
        with torch.inference_mode():
            first = engine._prefill(torch.tensor([PROMPT, PROMPT]), torch.tensor([len(PROMPT)] * 2))
        runs[attention + " logits"] = first
    assert runs["math"] == runs["sdpa"] == [generate(cm, r, max_new_tokens=16, temperature=0) for r in rows]
    torch.testing.assert_close(runs["math logits"], runs["sdpa logits"], atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        full = cm.module(ids)["logits"][:, -1]
    torch.testing.assert_close(runs["math logits"][:1], full, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="attention must be one of"):
        DecodeEngine(cm, batch=1, max_len=40, attention="flash")


def test_the_step_is_one_graph_with_no_host_sync(models):
    """The one-token step traced whole (``fullgraph``: an ``.item()``, a ``bool(tensor)`` or a
    shape that changes from token to token would fail or recompile), for rows of two lengths."""
    from torch._dynamo.utils import counters

    cm = models["llama"]
    torch._dynamo.reset()
    counters.clear()
    engine = DecodeEngine(cm, batch=2, max_len=40)
    engine._device_step = torch.compile(engine._device_step, fullgraph=True, backend="eager", dynamic=False)
    got = engine.generate([PROMPT, SHORT], max_new_tokens=12)
    assert got == [generate(cm, r, max_new_tokens=12, temperature=0) for r in (PROMPT, SHORT)]
    assert counters["stats"]["unique_graphs"] == 1  # traced once, replayed for every token
    torch._dynamo.reset()


def test_the_plan_names_how_each_node_decodes(models):
    plan, other = static_plan(models["hybrid"])
    assert other == []
    assert plan["attn"] == plan["pos"] == "static" and plan["ssm"] == plan["conv"] == "state"
    assert plan["ln1"] == "stateless"


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_rows_of_different_lengths_decode_together(models, name):
    cm = models[name]
    rows = [PROMPT, SHORT, PROMPT[::-1][:7]]
    got = DecodeEngine(cm, batch=3, max_len=40, prefill_chunk=4).generate(rows, max_new_tokens=20)
    assert got == [generate(cm, r, max_new_tokens=20, temperature=0) for r in rows]
    assert generate_static(cm, rows, max_new_tokens=20, temperature=0) == got


def test_a_carried_state_with_ragged_prompts_goes_row_by_row(models):
    cm = models["hybrid"]
    rows = [PROMPT, SHORT]
    with pytest.raises(PhysLMError, match="different lengths"):
        DecodeEngine(cm, batch=2, max_len=40).generate(rows, max_new_tokens=5)
    got = generate_static(cm, rows, max_new_tokens=12, temperature=0)
    assert got == [generate(cm, r, max_new_tokens=12, temperature=0) for r in rows]


def test_batched_tensor_prompt_and_eos_match_generate(models):
    cm = models["gpt2"]
    x = torch.tensor([PROMPT, PROMPT[::-1]])
    full = generate(cm, x, max_new_tokens=30, temperature=0)
    assert torch.equal(generate_static(cm, x, max_new_tokens=30, temperature=0), full)
    # an EOS that both rows emit, at different steps: generation stops once both have
    new = full[:, len(PROMPT):].tolist()
    eos = next(t for t in new[0][3:] if t in new[1][3:])
    want = generate(cm, x, max_new_tokens=30, temperature=0, eos_id=eos)
    assert want.shape[1] < full.shape[1]
    for every in (1, 4, 64):
        steps = []
        got = generate_static(cm, x, max_new_tokens=30, temperature=0, eos_id=eos, check_every=every,
                              on_token=steps.append)
        assert torch.equal(got, want)
        assert steps == got[:, len(PROMPT):].T.tolist()  # every step streamed once, in order


def _tiny_seed(name):
    import sys

    sys.path.insert(0, str(ROOT / "tests" / "components"))
    from test_decode_seeds import tiny_seed

    return tiny_seed(name)


def test_nodes_off_the_static_path_keep_their_caches_and_say_so(capsys):
    cm = _tiny_seed("brain-gpt-v2-fixed")  # selective attention's cache grows: not static; ssm.ssd is
    prompt = torch.randint(0, 97, (1, 7), generator=torch.Generator().manual_seed(3)).tolist()
    engine = DecodeEngine(cm, batch=1, max_len=40)
    assert "attention.selective" in capsys.readouterr().err and not engine.cuda_graph
    assert engine.plan["trunk.1.mix"] == "state"
    assert engine.generate(prompt, max_new_tokens=16)[0] == generate(cm, prompt[0], max_new_tokens=16, temperature=0)


@pytest.mark.parametrize("name", ["brain-gpt-v1-small-fixed", "holographic-v2-fixed", "ngt-25m-fixed", "qllm-fixed"])
def test_every_fixed_seed_decodes_through_the_engine(name):
    """The other fixed seeds (their mixers keep growing caches, their embeddings read the offset)
    give generate()'s greedy tokens through the engine too, with two prompts of one length."""
    cm = _tiny_seed(name)
    prompts = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(3))
    got = generate_static(cm, prompts, max_new_tokens=12, temperature=0)
    assert torch.equal(got, generate(cm, prompts, max_new_tokens=12, temperature=0))


def test_what_the_engine_cannot_serve_runs_generate(models, capsys):
    cm = models["gpt2"]
    kw = dict(max_new_tokens=12, temperature=0.9, top_k=20, repetition_penalty=1.3, seed=4)
    assert generate_static(cm, PROMPT, **kw) == generate(cm, PROMPT, **kw)
    assert "repetition penalty" in capsys.readouterr().err
    long = generate_static(cm, PROMPT, max_new_tokens=60, temperature=0)  # 70 tokens > context 64
    assert long == generate(cm, PROMPT, max_new_tokens=60, temperature=0)
    assert "more than the context 64" in capsys.readouterr().err


def test_sampling_on_the_device(models):
    cm = models["llama"]
    kw = dict(max_new_tokens=20, temperature=1.0, top_k=20, top_p=0.9, seed=7)
    a = generate_static(cm, PROMPT, **kw)
    assert a == generate_static(cm, PROMPT, **kw)  # seeded: reproducible
    assert a != generate_static(cm, PROMPT, **{**kw, "seed": 8})
    greedy = generate_static(cm, PROMPT, max_new_tokens=20, temperature=0)
    assert generate_static(cm, PROMPT, max_new_tokens=20, temperature=1.0, top_k=1, seed=1) == greedy
    # the exponential race draws each id with its probability
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0]]).expand(40000, 4)
    picks = sample_on_device(logits, temperature=1.0, top_k=None, top_p=None, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(picks, minlength=4).float() / picks.numel()
    torch.testing.assert_close(freq, logits[0].softmax(-1), atol=0.01, rtol=0)
    top2 = sample_on_device(logits, temperature=1.0, top_k=2, top_p=None, generator=torch.Generator().manual_seed(0))
    assert set(top2.tolist()) == {1, 2}


def test_bad_inputs_and_non_finite_logits(models):
    cm = models["gpt2"]
    with pytest.raises(PhysLMError, match="context 64"):
        DecodeEngine(cm, batch=1, max_len=65)
    with pytest.raises(PhysLMError, match="cuda_graph=True needs a CUDA device"):
        DecodeEngine(cm, batch=1, max_len=20, cuda_graph=True)
    engine = DecodeEngine(cm, batch=1, max_len=20)
    with pytest.raises(PhysLMError, match="max_len 20"):
        engine.generate([PROMPT], max_new_tokens=11)
    with pytest.raises(PhysLMError, match="batch 1, got 2"):
        engine.generate([PROMPT, PROMPT], max_new_tokens=2)
    with pytest.raises(PhysLMError, match="temperature"):
        generate_static(cm, PROMPT, max_new_tokens=2, temperature=-1)
    with pytest.raises(PhysLMError, match="empty"):
        generate_static(cm, [PROMPT, []], max_new_tokens=2)
    broken = compile_blueprint(ROOT / "blueprints" / "baby-gpt.yaml", overrides={
        "params.layers": 1, "params.dim": 16, "params.heads": 2, "params.context": 32, "train.seq_len": 32})
    with torch.no_grad():
        broken.module.get_submodule("norm").weight.fill_(float("nan"))
    with pytest.raises(NonFiniteLogits, match="NaN"):
        generate_static(broken, PROMPT, max_new_tokens=5, temperature=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compile", [False, True])
def test_cuda_graph_step_equals_eager_generate(models, compile):
    cm = models["llama"]
    cm.module.cuda()
    try:
        want = generate(cm, PROMPT, max_new_tokens=40, temperature=0)
        engine = DecodeEngine(cm, batch=2, max_len=60, compile=compile)
        assert engine.cuda_graph
        rows = [PROMPT, SHORT]
        got = engine.generate(rows, max_new_tokens=40)
        assert got[0] == want and got[1] == generate(cm, SHORT, max_new_tokens=40, temperature=0)
        assert engine.generate(rows, max_new_tokens=40) == got  # the captured step replays again
        # the sampling step is captured apart; top-k 1 samples the greedy token
        assert engine.generate(rows, max_new_tokens=40, temperature=1.0, top_k=1, seed=0) == got
        assert sorted(engine._graphs) == [False, True]
    finally:
        cm.module.cpu()


def test_cli_generate_compile_prints_the_same_greedy_text(models, tmp_path, capsys):
    import json

    from physlm_graph.cli import main
    from physlm_graph.runtime.checkpoint import save_checkpoint
    from physlm_graph.runtime.tokenizers import CharTokenizer

    tok = CharTokenizer([chr(c) for c in range(32, 97)])
    folder = save_checkpoint(tmp_path / "ck", cm=models["gpt2"], tokenizer=tok)
    runs = {}
    for flag in ([], ["--compile"]):
        assert main(["generate", str(folder), "--prompt", "ROMEO:", "--temperature", "0", "--max-new-tokens", "20",
                     "--device", "cpu", "--json", *flag]) == 0
        runs[bool(flag)] = json.loads(capsys.readouterr().out)
    assert runs[True]["ids"] == runs[False]["ids"] and len(runs[True]["ids"]) == 20
    assert runs[True]["engine"] and not runs[False]["engine"]
    assert main(["generate", str(folder), "--prompt", "x", "--compile", "--no-cache"]) == 2
    assert "--compile decodes with the engine's static cache; it cannot be combined with --no-cache" in \
        capsys.readouterr().err
