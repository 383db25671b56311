"""Early exit: exit heads in the graph and checkpoints, exit losses, exit rules, the segment
executor (never firing == the model without exits; firing == the teacher-forced policy), and
layers-used accounting."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from torch.nn import functional as F

from physlm_graph import PhysLMError, compile_blueprint
from physlm_graph._context import decoding
from physlm_graph._errors import ResolveError
from physlm_graph.runtime.checkpoint import load_checkpoint, save_checkpoint
from physlm_graph.runtime.early_exit import (
    ExitScorer,
    KV_FILLS,
    ExitStats,
    SegmentExecutor,
    exit_depths,
    exit_fires,
    exit_loss_weights,
    exit_losses,
    exit_score,
    generate_with_exits,
    never_fires,
    policy_logits,
)
from physlm_graph.runtime.generate import generate

ROOT = Path(__file__).resolve().parents[2]
CONTEXT = 64
PROMPT = [5, 17, 30, 2, 44, 9, 12, 60, 1, 33]
RULES = ["top1", "margin", "entropy", "saturation"]


pytestmark = pytest.mark.usefixtures("one_thread")


def blueprint(layers: int = 4, **exits) -> dict:
    d = yaml.safe_load((ROOT / "blueprints" / "baby-gpt.yaml").read_text())
    d["params"].update(layers=layers, dim=32, heads=2, context=CONTEXT, dropout=0.0)
    d["train"]["seq_len"] = CONTEXT
    if exits:
        d["exits"] = exits
    return d


def scaled(cm):
    """Weights scaled up so that greedy decoding varies and exit rules fire now and then."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in cm.module.parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return cm


@pytest.fixture(scope="module")
def cm():
    return scaled(compile_blueprint(blueprint(every=1, block="trunk")))


@pytest.fixture(scope="module")
def plain(cm):
    """The same weights in the same blueprint without exits."""
    p = compile_blueprint(blueprint())
    p.module.load_state_dict(cm.module.state_dict())
    return p


# ---------------------------------------------------------------- the graph


def test_exit_heads_are_graph_outputs_shared_or_own():
    tie = compile_blueprint(blueprint(every=2, block="trunk"))
    out = tie.module(torch.randint(0, 65, (2, 8)))
    assert list(out["exit_logits"]) == ["trunk.1"] and out["exit_logits"]["trunk.1"].shape == (2, 8, 65)
    assert not [n for n, _ in tie.module.named_parameters() if n.startswith("exits.")]  # shared: no new weights
    # tie: the exit readout is the final norm and head applied to the exit's hidden state
    h = out["exit_hidden"]["trunk.1"]
    assert torch.allclose(out["exit_logits"]["trunk.1"], tie.module.head(tie.module.norm(h)))
    own = compile_blueprint(blueprint(every=2, block="trunk", head="own"))
    names = {n for n, _ in own.module.named_parameters()}
    assert {"exits.0.norm.weight", "exits.0.head.weight"} <= names
    assert own.module.get_submodule("exits.0.head").weight is not own.module.get_submodule("head").weight
    nonorm = compile_blueprint(blueprint(every=2, block="trunk", head="own", norm=False))
    assert "exits.0.norm.weight" not in {n for n, _ in nonorm.module.named_parameters()}


def test_exit_configuration_errors():
    with pytest.raises(ResolveError) as err:
        compile_blueprint(blueprint(every=1, block="trunk", weighting=[1.0, 2.0], head="hed"), build=False)
    text = str(err.value)
    assert "exits.weighting lists 2 weights for 3 exit points" in text
    assert "exits.head 'hed' is not tie, own or a node" in text and "did you mean head?" in text
    d = blueprint(after=["trunk.1", "trunk.1"])
    with pytest.raises(ResolveError, match="exit point\\(s\\) trunk.1 given twice"):
        compile_blueprint(d, build=False)
    d = blueprint(after=["trunk.1"])
    d["nodes"]["head"]["in"] = "trunk"
    del d["nodes"]["norm"]
    with pytest.raises(ResolveError, match="exits.norm is true, but the head 'head' reads trunk.3.r2, not a norm node"):
        compile_blueprint(d, build=False)
    d["exits"]["norm"] = False
    assert compile_blueprint(d, build=False).resolved.exit_points == ["trunk.1"]
    with pytest.raises(PhysLMError, match="declares no exits"):
        generate_with_exits(compile_blueprint(blueprint()), PROMPT, max_new_tokens=2)
    with pytest.raises(PhysLMError, match="unknown exit rule 'confidence'"):
        SegmentExecutor(compile_blueprint(blueprint(every=2, block="trunk")), rule="confidence")


def test_exits_are_ordered_shallowest_first():
    cm = compile_blueprint(blueprint(after=["trunk.2", "trunk.0"], weighting=[0.25, 0.75]))
    out = cm.module(torch.randint(0, 65, (1, 4)))
    assert list(out["exit_logits"]) == list(out["exit_hidden"]) == ["trunk.0", "trunk.2"]
    assert SegmentExecutor(cm).points == ["trunk.0", "trunk.2"]
    assert exit_loss_weights(cm) == {"trunk.2": 0.25, "trunk.0": 0.75}  # a weighting list follows the blueprint


def test_own_heads_are_saved_and_loaded(tmp_path):
    cm = compile_blueprint(blueprint(every=2, block="trunk", head="own"))
    with torch.no_grad():
        cm.module.get_submodule("exits.0.head").weight.add_(1.0)
        cm.module.get_submodule("exits.0.norm").weight.mul_(3.0)
    save_checkpoint(tmp_path / "ck", cm=cm)
    ck = load_checkpoint(tmp_path / "ck")
    for name in ("exits.0.head.weight", "exits.0.norm.weight"):
        assert torch.equal(ck.module.get_parameter(name), cm.module.get_parameter(name)), name
    assert not torch.equal(ck.module.get_parameter("exits.0.head.weight"), ck.module.get_parameter("head.weight"))
    x = torch.randint(0, 65, (1, 8))
    assert torch.equal(ck.module(x)["exit_logits"]["trunk.1"], cm.module.eval()(x)["exit_logits"]["trunk.1"])


# ---------------------------------------------------------------- rules


def test_rules_on_constructed_logits():
    logits = torch.tensor([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25]]).log()  # (2, V): known probabilities
    assert torch.allclose(exit_score("top1", logits), torch.tensor([0.7, 0.4]))
    assert torch.allclose(exit_score("margin", logits).float(), torch.tensor([0.5, 0.05]))
    ent = exit_score("entropy", logits)
    want = torch.tensor([-(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1)),
                         -(0.4 * math.log(0.4) + 0.35 * math.log(0.35) + 0.25 * math.log(0.25))])
    assert torch.allclose(ent, want)
    assert exit_fires("top1", 0.6, exit_score("top1", logits)).tolist() == [True, False]
    assert exit_fires("margin", 0.1, exit_score("margin", logits)).tolist() == [True, False]
    assert exit_fires("entropy", 0.9, ent).tolist() == [True, False]  # low entropy is confident
    h = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    prev = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    sat = exit_score("saturation", logits, h, prev)
    assert torch.allclose(sat, torch.tensor([1.0, 0.0]))
    assert exit_fires("saturation", 0.99, sat).tolist() == [True, False]
    assert exit_score("saturation", logits, h, None).eq(float("-inf")).all()  # the first exit has no previous state
    for rule in RULES:
        assert not exit_fires(rule, never_fires(rule), exit_score(rule, logits, h, prev)).any()


@pytest.mark.parametrize("rule", RULES)
def test_decode_time_test_agrees_with_the_scores(rule):
    from physlm_graph.runtime.early_exit import _fires_now

    g = torch.Generator().manual_seed(1)
    logits, h, prev = torch.randn(200, 1, 7, generator=g) * 3, torch.randn(200, 1, 5, generator=g), torch.randn(200, 1, 5, generator=g)
    scores = exit_score(rule, logits[:, 0], h[:, 0], prev[:, 0])
    for threshold in scores.quantile(torch.tensor([0.2, 0.5, 0.8], dtype=scores.dtype)).tolist():
        want = exit_fires(rule, threshold, scores).tolist()
        got = [_fires_now(rule, threshold, logits[i], h[i], prev[i]) for i in range(200)]
        assert got == want and 0 < sum(got) < 200


def test_policy_takes_the_first_exit_that_fires():
    sure, unsure = torch.tensor([10.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 0.0])
    e0 = torch.stack([sure, unsure, unsure])[None]  # (1, T=3, V=3)
    e1 = torch.stack([unsure, sure, unsure])[None]
    final = torch.stack([unsure, unsure, unsure])[None] + 1.0
    out = {"logits": final, "exit_logits": {"a": e0, "b": e1}, "exit_hidden": {}}
    logits, where = policy_logits(out, "top1", 0.9)
    assert where.tolist() == [[0, 1, 2]]
    assert torch.equal(logits[0, 0], sure) and torch.equal(logits[0, 1], sure) and torch.equal(logits[0, 2], final[0, 2])


# ---------------------------------------------------------------- generation


@pytest.mark.parametrize("kv_fill", KV_FILLS)
@pytest.mark.parametrize("rule", RULES)
def test_never_firing_equals_the_model_without_exits(cm, plain, rule, kv_fill):
    want = generate(plain, PROMPT, max_new_tokens=60, temperature=0, use_cache=True)
    got, stats = generate_with_exits(cm, PROMPT, max_new_tokens=60, rule=rule, threshold=never_fires(rule),
                                     kv_fill=kv_fill)
    assert len(set(want[len(PROMPT):])) > 5  # a real sequence, not one repeated token
    assert got == want  # 70 tokens > context 64: the crop and re-prefill are covered too
    assert stats.counts == [0, 0, 0, 60] and stats.mean_layers == stats.full_layers == 4
    assert stats.kv_fill == kv_fill and stats.kv_rows == 0 and stats.kv_note is None


def test_own_heads_never_firing_equal_the_final_head(cm, plain):
    own = scaled(compile_blueprint(blueprint(every=2, block="trunk", head="own")))
    base = compile_blueprint(blueprint())
    base.module.load_state_dict({k: v for k, v in own.module.state_dict().items() if not k.startswith("exits.")})
    want = generate(base, PROMPT, max_new_tokens=50, temperature=0)
    got, stats = generate_with_exits(own, PROMPT, max_new_tokens=50, rule="margin", threshold=never_fires("margin"))
    assert got == want and stats.counts == [0, 50]


@pytest.mark.parametrize("rule,threshold", [("top1", 0.3), ("margin", 0.2), ("entropy", 2.5)])
def test_exiting_generation_matches_the_teacher_forced_policy(cm, rule, threshold):
    """Skipped layers are completed lazily, so every cache is exact: the tokens generated with
    exits are those the full forward under the same policy predicts."""
    ids, stats = generate_with_exits(cm, PROMPT, max_new_tokens=50, rule=rule, threshold=threshold)
    assert len(ids) <= CONTEXT  # no crop: one forward covers it
    assert sum(stats.counts[:-1]) > 5 and stats.mean_layers < stats.full_layers  # exits did fire
    with torch.no_grad():
        out = cm.module.eval()(torch.tensor(ids[:-1])[None])
    logits, where = policy_logits(out, rule, threshold)
    assert logits.argmax(-1)[0, len(PROMPT) - 1 :].tolist() == ids[len(PROMPT) :]
    assert torch.bincount(where[0, len(PROMPT) - 1 :], minlength=4).tolist() == stats.counts


def test_sampling_with_exits_is_seeded(cm):
    kw = dict(max_new_tokens=30, rule="top1", threshold=0.4, temperature=1.0, top_k=10, seed=3)
    a, _ = generate_with_exits(cm, PROMPT, **kw)
    b, _ = generate_with_exits(cm, PROMPT, **kw)
    assert a == b and len(a) == len(PROMPT) + 30


def test_layers_used_accounting():
    cm6 = compile_blueprint(blueprint(layers=6, every=2, block="trunk"))
    depths, full = exit_depths(cm6)
    assert depths == {"trunk.1": 2, "trunk.3": 4} and full == 6
    s = ExitStats(points=["trunk.1", "trunk.3"], depths=[2, 4, 6], counts=[3, 1, 4], layer_rows=60, tokens=10)
    assert s.mean_layers == (3 * 2 + 1 * 4 + 4 * 6) / 8
    assert s.layers_run_per_token == 6.0
    assert s.as_dict()["exit_counts"] == {"trunk.1": 3, "trunk.3": 1, "final": 4}
    ex = SegmentExecutor(cm6)
    assert ex.cut.seg_layers == [2, 2, 2]


def test_never_firing_runs_every_layer_once_per_token(cm):
    _, stats = generate_with_exits(cm, PROMPT, max_new_tokens=20, rule="top1", threshold=2.0)
    assert stats.tokens == 19 and stats.layer_rows == 19 * 4  # the first token comes from the prefill


def test_deferred_layers_are_counted(cm):
    """Every decoded row runs every segment once, now or later: rows still waiting make up the rest."""
    ex = SegmentExecutor(cm, rule="top1", threshold=0.3)
    logits = ex.prefill(torch.tensor([PROMPT]))
    for _ in range(40):
        logits = ex.step(logits.argmax(-1)[:, None])
    full = ex.stats.full_layers
    waiting = sum(g.length * (full - ex.depths[g.done]) for g in ex.pending)
    assert sum(ex.stats.counts[:-1]) > 5
    assert ex.stats.layer_rows + waiting == ex.stats.tokens * full
    assert len(ex.pending) <= len(ex.points)  # neighbours at one depth are merged
    assert [g.done for g in ex.pending] == sorted((g.done for g in ex.pending), reverse=True)


# ---------------------------------------------------------------- propagate: skipped layers' K/V from the exit state


def llama(layers: int = 3, **exits) -> dict:
    """A small llama-style blueprint: rope, grouped-query attention (4 query heads, 2 K/V heads), RMSNorm."""
    d = yaml.safe_load((ROOT / "blueprints" / "llama-style.yaml").read_text())
    d["params"].update(vocab=65, dim=32, heads=4, kv_heads=2, layers=layers, hidden=64, context=CONTEXT)
    d.setdefault("train", {})["seq_len"] = CONTEXT
    if exits:
        d["exits"] = exits
    return d


def _attentions(cm) -> list[tuple[int, torch.nn.Module]]:
    """(segment, module) of every attention.causal node, in graph order."""
    ex = SegmentExecutor(cm)
    return [(s, cm.module.get_submodule(n.target)) for n in cm.module.graph.nodes for s, seg in enumerate(ex.cut.seg_nodes)
            if n in seg and n.op == "call_module" and cm.resolved.nodes[n.target].use == "attention.causal"]


def test_propagate_never_firing_equals_llama_without_exits():
    cm = scaled(compile_blueprint(llama(every=1, block="trunk")))
    plain = compile_blueprint(llama())
    plain.module.load_state_dict(cm.module.state_dict())
    want = generate(plain, PROMPT, max_new_tokens=60, temperature=0, use_cache=True)
    got, stats = generate_with_exits(cm, PROMPT, max_new_tokens=60, rule="top1", threshold=2.0, kv_fill="propagate")
    assert got == want and stats.kv_fill == "propagate"


def test_propagate_fills_skipped_layers_from_the_exit_state():
    """An exit at trunk.0: layer 0's cache row is the exact one, layers 1 and 2 get the K/V of
    their pre-norm applied to the exit hidden state (rope and grouped-query heads included)."""
    cm = scaled(compile_blueprint(llama(every=1, block="trunk")))
    ex = SegmentExecutor(cm, rule="top1", threshold=0.0, kv_fill="propagate")  # every token exits at trunk.0
    logits = ex.prefill(torch.tensor([PROMPT]))
    ex.step(logits.argmax(-1)[:, None])
    assert ex.stats.counts[0] == 2 and ex.stats.layer_rows == 1 and ex.stats.kv_rows == 2
    ids = torch.tensor([PROMPT + [int(logits.argmax())]])
    gm = cm.module.eval()
    with torch.no_grad():
        h = gm(ids)["exit_hidden"]["trunk.0"][:, -1:]  # (1, 1, D): the exit state of the new token
    for j in range(3):
        attn = gm.get_submodule(f"trunk.{j}.attn")
        k, v = ex.ctx.get(attn)
        assert k.shape == v.shape == (1, 2, len(PROMPT) + 1, 8)
        with torch.no_grad(), decoding() as ctx:  # the exact full forward's K/V of layer 0, the exit state's of later ones
            ctx.offset = len(PROMPT)
            x = gm.get_submodule(f"trunk.{j}.n1")(h) if j else gm.get_submodule("trunk.0.n1")(gm.tok(ids[:, -1:]))
            attn(x, gm.rope(ids[:, -1:]))
            want_k, want_v = ctx.get(attn)
        assert torch.allclose(k[:, :, -1:], want_k, atol=1e-5) and torch.allclose(v[:, :, -1:], want_v, atol=1e-5)


def test_propagate_saves_layer_compute(cm):
    """With exits firing, propagate runs only the layers up to each token's exit (plus K/V-only
    projections of the skipped ones); lazy runs every layer for every token, later."""
    runs = {}
    for kv_fill in KV_FILLS:
        ex = SegmentExecutor(cm, rule="top1", threshold=0.3, kv_fill=kv_fill)
        logits = ex.prefill(torch.tensor([PROMPT]))
        first = list(ex.stats.counts)
        for _ in range(40):
            logits = ex.step(logits.argmax(-1)[:, None])
        st = ex.stats
        decoded = [c - f for c, f in zip(st.counts, first)]  # exits of the decoded tokens (not the prefill's)
        assert sum(decoded[:-1]) > 5
        if kv_fill == "propagate":
            assert not ex.pending
            assert st.layer_rows == sum(c * d for c, d in zip(decoded, st.depths))
            assert st.kv_rows == sum(c * (st.full_layers - d) for c, d in zip(decoded, st.depths))
            assert st.layers_run_per_token < st.full_layers
        runs[kv_fill] = st.layers_run_per_token
    assert runs["propagate"] < runs["lazy"]


@pytest.mark.parametrize("kv_fill", KV_FILLS)
def test_cache_shapes_stay_consistent(cm, kv_fill):
    """Across many steps and past the context crop (a re-prefill at full depth), every attention
    cache holds one row per position, less (lazy) the rows waiting for its segment."""
    attns = _attentions(cm)
    ex = SegmentExecutor(cm, rule="top1", threshold=0.3, kv_fill=kv_fill)
    ids = torch.tensor([PROMPT])
    logits, crops = ex.prefill(ids), 0
    for _ in range(150):
        ids = torch.cat([ids, logits.argmax(-1)[:, None]], dim=1)
        if ex.ctx.offset + 1 > CONTEXT:  # as generate_with_exits does
            logits, crops = ex.prefill(ids[:, -CONTEXT:]), crops + 1
        else:
            logits = ex.step(ids[:, -1:])
        for s, attn in attns:
            k, v = ex.ctx.get(attn)
            waiting = sum(g.length for g in ex.pending if g.done < s)
            assert k.shape == v.shape == (1, 2, ex.ctx.offset - waiting, 16)
        assert ex.ctx.offset <= CONTEXT
    assert crops >= 2 and sum(ex.stats.counts[:-1]) > 20
    if kv_fill == "propagate":
        assert not ex.pending


def test_propagate_falls_back_to_lazy_for_other_cached_components():
    d = blueprint(layers=3, every=1, block="trunk")
    d["blocks"]["gpt_block"]["nodes"]["attn"] = {"use": "ssm.gated_conv", "in": "ln1"}
    cm = compile_blueprint(d)
    with pytest.warns(UserWarning, match="falls back to 'lazy'.*ssm|falls back to 'lazy'.*trunk_1_attn"):
        ids, stats = generate_with_exits(cm, PROMPT, max_new_tokens=20, rule="top1", threshold=0.0,
                                         kv_fill="propagate")
    assert stats.kv_fill == "lazy" and "other than attention.causal" in stats.kv_note
    want, _ = generate_with_exits(cm, PROMPT, max_new_tokens=20, rule="top1", threshold=0.0)
    assert ids == want
    with pytest.raises(PhysLMError, match="unknown kv_fill 'copy'"):
        SegmentExecutor(cm, kv_fill="copy")


# ---------------------------------------------------------------- training and evaluation


def test_exit_losses_are_weighted_and_each_is_reported():
    for weighting, want in [("depth", [2 / 6, 4 / 6]), ("uniform", [0.5, 0.5]), ([0.3, 0.1], [0.3, 0.1])]:
        cm6 = compile_blueprint(blueprint(layers=6, every=2, block="trunk", weighting=weighting, weight=2.0))
        assert list(exit_loss_weights(cm6).values()) == pytest.approx([2.0 * w for w in want])
    x, y = torch.randint(0, 65, (2, 8)), torch.randint(0, 65, (2, 8))
    out = cm6.module(x)
    total, parts = exit_losses(cm6, out, y)
    ce = {p: F.cross_entropy(out["exit_logits"][p].reshape(-1, 65), y.reshape(-1)) for p in ("trunk.1", "trunk.3")}
    assert set(parts) == {"exit/trunk.1/ce", "exit/trunk.3/ce"}
    assert torch.allclose(parts["exit/trunk.1/ce"], ce["trunk.1"])
    assert torch.allclose(total, 2.0 * (0.3 * ce["trunk.1"] + 0.1 * ce["trunk.3"]))


def test_trainer_adds_and_logs_exit_losses(tmp_path, capsys):
    from physlm_graph.runtime.train import Trainer

    data = tmp_path / "text.txt"
    data.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 50, encoding="utf-8")
    d = blueprint(layers=2, every=1, block="trunk")
    d["params"]["context"] = d["train"]["seq_len"] = 16
    t = Trainer(d, data=str(data), out_dir=tmp_path / "run", device="cpu", steps=4, batch_size=2, eval_every=2,
                eval_iters=1, log_every=1, warmup=1, progress=False)
    result = t.fit()
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert result["steps"] == 4 and all("exit/trunk.0/ce" in r and math.isfinite(r["exit/trunk.0/ce"]) for r in lines)
    # `loss` is the final head's cross-entropy; the optimized total is `objective`
    assert all(r["objective"] > r["loss"] for r in lines)
    w = exit_loss_weights(t.cm)["trunk.0"]
    assert all(r["objective"] == pytest.approx(r["loss"] + w * r["exit/trunk.0/ce"], rel=1e-5) for r in lines)
    x, y = next(t.batches)
    out = t.model(x)
    total, parts = t.compute_loss(out, y)
    extra, _ = exit_losses(t.cm, out, y)
    assert torch.allclose(total, parts["loss"] + extra) and "exit/trunk.0/ce" in parts
    _check_commands(tmp_path / "run", data, capsys)


def _check_commands(run: Path, data: Path, capsys) -> None:
    """`physlm-graph eval/generate --exit-threshold` on the checkpoint just trained."""
    from physlm_graph.cli import main

    capsys.readouterr()
    assert main(["eval", str(run), "--data", str(data), "--device", "cpu", "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main(["eval", str(run), "--data", str(data), "--device", "cpu", "--json", "--exit-threshold", "2",
                 "--exit-rule", "top1"]) == 0
    never = json.loads(capsys.readouterr().out)
    assert never["perplexity"] == pytest.approx(plain["perplexity"], rel=1e-6)
    assert never["mean_layers"] == never["full_layers"] == 2 and never["exit_counts"]["final"] == plain["tokens_scored"]
    assert main(["eval", str(run), "--data", str(data), "--device", "cpu", "--json", "--exit-threshold", "0",
                 "--exit-rule", "top1"]) == 0
    eager = json.loads(capsys.readouterr().out)
    assert eager["mean_layers"] == 1 and eager["perplexity"] != plain["perplexity"]
    args = ["generate", str(run), "--prompt", "First", "--max-new-tokens", "12", "--temperature", "0", "--device", "cpu",
            "--json"]
    assert main(args) == 0
    want = json.loads(capsys.readouterr().out)
    assert main(args + ["--exit-threshold", "2", "--exit-rule", "margin"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["ids"] == want["ids"] and got["exits"]["mean_layers"] == 2 and "exits" not in want
    assert got["exits"]["kv_fill"] == "lazy"
    assert main(args + ["--exit-threshold", "2", "--exit-kv", "propagate"]) == 0
    prop = json.loads(capsys.readouterr().out)
    assert prop["ids"] == want["ids"] and prop["exits"]["kv_fill"] == "propagate"
    assert main(args + ["--exit-kv", "propagate"]) == 2
    assert "--exit-kv needs --exit-threshold" in capsys.readouterr().err
    assert main(args + ["--exit-threshold", "0.5", "--no-cache"]) == 2
    assert "cannot be combined with --no-cache" in capsys.readouterr().err
    assert main(args + ["--speculate", "3"]) == 0  # self-speculative: full depth's greedy tokens
    spec = json.loads(capsys.readouterr().out)
    assert spec["ids"] == want["ids"] and spec["speculative"]["draft_exit"] == "trunk.0"
    assert 0 <= spec["speculative"]["acceptance"] <= 1
    assert main(args[:-1] + ["--speculate", "2", "--draft-exit", "trunk.0"]) == 0
    assert "self-speculative: drafts from trunk.0" in capsys.readouterr().err
    assert main(args[:-1] + ["--speculate", "2", "--draft-exit", "0"]) == 0  # an index works too
    assert "self-speculative: drafts from trunk.0" in capsys.readouterr().err
    assert main(args + ["--speculate", "2", "--draft-exit", "trunk.7"]) == 2
    assert "no exit after 'trunk.7'" in capsys.readouterr().err
    assert main(args[:6] + ["--temperature", "0.8", "--speculate", "3"]) == 2
    assert "cannot be combined with --temperature 0.8" in capsys.readouterr().err
    assert main(args + ["--draft-exit", "trunk.0"]) == 2
    assert "--draft-exit needs --speculate" in capsys.readouterr().err


def test_eval_scorer_counts_exits(cm):
    x = torch.tensor([PROMPT + PROMPT[:5]])
    y = torch.roll(x, -1, dims=1)
    never = ExitScorer(cm, rule="top1", threshold=2.0)
    nll, n = never(cm.module.eval(), x, y)
    with torch.no_grad():
        want = F.cross_entropy(cm.module(x)["logits"][0], y[0], reduction="sum")
    assert n == 15 and nll == pytest.approx(float(want), rel=1e-5)
    assert never.report()["mean_layers"] == 4 and never.report()["exit_counts"]["final"] == 15
    eager = ExitScorer(cm, rule="top1", threshold=0.0)  # every position exits at the first exit
    eager(cm.module, x, y)
    assert eager.report()["mean_layers"] == 1 and eager.report()["exit_counts"]["trunk.0"] == 15
