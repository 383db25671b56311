"""Developmental growth: exact function preservation, weight copies, optimizer carry-over,
located errors, the mask ramp, and training across stage boundaries (with resume)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch.nn import functional as F

from physlm_graph import PhysLMError, compile_blueprint
from physlm_graph.runtime.growth import (
    GrowthError,
    carry_optimizer_state,
    depth_plan,
    grow,
    mask_residuals,
    set_mask,
    stage_at,
    unmask_residuals,
)
from physlm_graph.runtime.optim import make_optimizer, node_components

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "examples" / "growth" / "tiny-growth.yaml"
BRAIN = ROOT / "examples" / "growth" / "brain-gpt-stages.yaml"
LLAMA = ROOT / "blueprints" / "llama-style.yaml"
SHAKESPEARE = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


pytestmark = pytest.mark.usefixtures("one_thread")


def _schedule(op: str | None = None, where=None, old: int = 2, new: int = 4, **extra) -> dict:
    second = {"params": {"layers": new}, **extra}
    if op is not None:
        second["grow"] = op
    if where is not None:
        second["where"] = where
    return {"growth": [{"until": 5, "params": {"layers": old}}, second]}


def _perturb(module: torch.nn.Module, seed: int = 1) -> None:
    """Move every weight off its init (norm gains away from 1, zero biases away from 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def _logits(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    module.eval()
    with torch.no_grad():
        return module(x)["logits"]


def _grown(source, overrides: dict, x: torch.Tensor):
    cm = compile_blueprint(source, overrides=overrides, stage=0)
    _perturb(cm.module)
    before = _logits(cm.module, x)
    g = grow(cm, 1)
    return cm, g, before, _logits(g.model.module, x)


# ---------------------------------------------------------------- exact at growth

WHERE = ["end", "start", "interleave", [0, 3]]
MODELS = {
    "baby-gpt": (TINY, {}),
    "llama-style": (LLAMA, {"params.vocab": 64, "params.dim": 32, "params.heads": 4, "params.kv_heads": 2,
                            "params.hidden": 64, "params.context": 16}),
    "brain-gpt": (BRAIN, {"params.vocab": 64, "params.dim": 32, "params.heads": 4, "params.context": 16,
                          "params.columns": 4, "params.column_size": 8, "train.seq_len": 16}),
}


@pytest.mark.parametrize("op", ["zero_init", "mask"])
@pytest.mark.parametrize("where", WHERE, ids=str)
@pytest.mark.parametrize("model", list(MODELS))
def test_function_preserving_growth_keeps_logits(op, where, model):
    source, overrides = MODELS[model]
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    _, g, before, after = _grown(source, {**overrides, **_schedule(op, where)}, x)
    assert len(g.new_instances) == 2
    assert (after - before).abs().max().item() <= 1e-6
    if op == "zero_init":
        assert g.prepared and "growth_mask" not in g.model.module.code  # zeroed tensors, no masks
    else:
        assert len(g.prepared) == 4 and "growth_mask" in g.model.module.code


def test_zero_init_zeroes_the_output_projections_only():
    x = torch.randint(0, 64, (1, 8))
    cm, g, _, _ = _grown(TINY, _schedule("zero_init", "end"), x)
    assert g.prepared == ["trunk.2.attn.proj.weight", "trunk.2.mlp.proj.weight",
                        "trunk.3.attn.proj.weight", "trunk.3.mlp.proj.weight"]
    sd = g.model.module.state_dict()
    assert sd["trunk.2.attn.qkv.weight"].abs().sum() > 0  # initialised normally, not copied or zeroed
    assert not torch.equal(sd["trunk.2.attn.qkv.weight"], cm.module.state_dict()["trunk.0.attn.qkv.weight"])


def test_llama_zero_init_finds_swiglu_w2():
    source, overrides = MODELS["llama-style"]
    x = torch.randint(0, 64, (1, 8))
    _, g, _, _ = _grown(source, {**overrides, **_schedule("zero_init")}, x)
    assert "trunk.2.ffn.w2.weight" in g.prepared and "trunk.2.attn.proj.weight" in g.prepared


def test_surviving_weights_follow_their_layer():
    x = torch.randint(0, 64, (1, 8))
    cm, g, _, _ = _grown(TINY, _schedule("zero_init", [0, 3]), x)
    assert g.renamed == {"trunk.0": "trunk.1", "trunk.1": "trunk.2"}
    assert g.names["trunk.2.mlp.fc.weight"] == "trunk.1.mlp.fc.weight"
    old, new = cm.module.state_dict(), g.model.module.state_dict()
    assert torch.equal(new["trunk.2.mlp.fc.weight"], old["trunk.1.mlp.fc.weight"])
    assert torch.equal(new["tok.weight"], old["tok.weight"])


def test_a_mid_training_model_grows_without_a_loss_jump():
    """Train stage 0 a little, then compare the loss just before and after growing on one batch."""
    cm = compile_blueprint(TINY, overrides=_schedule("zero_init", "interleave"), stage=0)
    opt = make_optimizer(cm.module, lr=3e-3, weight_decay=0.1, betas=(0.9, 0.99), owners=node_components(cm))
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 65, (4, 17), generator=gen).split([16, 1], dim=1)
    y = torch.cat([x[:, 1:], y], dim=1)
    for _ in range(10):
        loss = F.cross_entropy(cm.module(x)["logits"].flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    before = F.cross_entropy(_logits(cm.module, x).flatten(0, 1), y.flatten()).item()
    g = grow(cm, 1)
    after = F.cross_entropy(_logits(g.model.module, x).flatten(0, 1), y.flatten()).item()
    assert abs(after - before) <= 1e-6


# ---------------------------------------------------------------- copies


def test_stack_repeats_the_trained_stack():
    x = torch.randint(0, 64, (1, 8))
    cm, g, before, after = _grown(TINY, _schedule("stack", old=2, new=5), x)
    old, new = cm.module.state_dict(), g.model.module.state_dict()
    assert g.new_instances == ["trunk.2", "trunk.3", "trunk.4"]
    for j, src in ((2, 0), (3, 1), (4, 0)):
        for name in ("ln1.weight", "attn.qkv.weight", "attn.proj.weight", "mlp.proj.weight"):
            assert torch.equal(new[f"trunk.{j}.{name}"], old[f"trunk.{src}.{name}"])
    assert not torch.allclose(before, after)  # stacking changes the function


def test_interpolate_puts_each_copy_after_its_source():
    x = torch.randint(0, 64, (1, 8))
    cm, g, _, _ = _grown(TINY, _schedule("interpolate", old=2, new=4), x)
    old, new = cm.module.state_dict(), g.model.module.state_dict()
    assert g.new_instances == ["trunk.1", "trunk.3"]
    for j, src in ((0, 0), (1, 0), (2, 1), (3, 1)):
        assert torch.equal(new[f"trunk.{j}.attn.qkv.weight"], old[f"trunk.{src}.attn.qkv.weight"])


def test_depth_plans():
    assert depth_plan(2, 4, "zero_init", "end") == ({0: 0, 1: 1}, {2: None, 3: None})
    assert depth_plan(2, 4, "zero_init", "start") == ({0: 2, 1: 3}, {0: None, 1: None})
    assert depth_plan(2, 4, "mask", "interleave") == ({0: 0, 1: 2}, {1: None, 3: None})
    assert depth_plan(4, 6, "zero_init", "interleave") == ({0: 0, 1: 1, 2: 3, 3: 4}, {2: None, 5: None})
    assert depth_plan(2, 3, "zero_init", [1]) == ({0: 0, 1: 2}, {1: None})
    assert depth_plan(4, 6, "stack", "end") == ({0: 0, 1: 1, 2: 2, 3: 3}, {4: 0, 5: 1})
    assert depth_plan(1, 3, "interpolate", "end") == ({0: 0}, {1: 0, 2: 0})


# ---------------------------------------------------------------- the mask


def test_mask_ramp_and_removal():
    x = torch.randint(0, 64, (2, 8))
    _, g, before, at_zero = _grown(TINY, _schedule("mask", "end"), x)
    gm = g.model.module
    assert torch.equal(before, at_zero)
    set_mask(gm, g.new_instances, 0.5)
    half = _logits(gm, x)
    set_mask(gm, g.new_instances, 1.0)
    full = _logits(gm, x)
    assert not torch.allclose(half, before) and not torch.allclose(half, full)
    assert "growth_mask" in gm.code
    assert unmask_residuals(gm) == 4
    assert "growth_mask" not in gm.code and "trunk.2.growth_mask" not in dict(gm.named_buffers())
    assert torch.equal(_logits(gm, x), full)  # a mask of 1 is inert: removing it changes nothing


def test_mask_patch_is_not_saved_with_the_weights():
    cm = compile_blueprint(TINY, overrides=_schedule(), stage=1)
    mask_residuals(cm, ["trunk.3"])
    assert "trunk.3.growth_mask" not in cm.module.state_dict()


# ---------------------------------------------------------------- the optimizer


def test_optimizer_state_is_carried_by_name():
    cm = compile_blueprint(TINY, overrides=_schedule("zero_init", "start"), stage=0)
    opt = make_optimizer(cm.module, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.99), owners=node_components(cm))
    x = torch.randint(0, 65, (2, 8))
    for _ in range(3):
        opt.zero_grad()
        cm.module(x)["logits"].square().mean().backward()
        opt.step()
    g = grow(cm, 1)
    new = make_optimizer(g.model.module, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.99), owners=node_components(g.model))
    carried = carry_optimizer_state(opt, new, g.names)
    old_p = {n: p for grp in opt.param_groups for n, p in zip(grp["names"], grp["params"])}
    new_p = {n: p for grp in new.param_groups for n, p in zip(grp["names"], grp["params"])}
    assert "trunk.2.attn.qkv.weight" in carried and "trunk.0.attn.qkv.weight" not in carried
    moved, src = new.state[new_p["trunk.2.attn.qkv.weight"]], opt.state[old_p["trunk.0.attn.qkv.weight"]]
    assert torch.equal(moved["exp_avg"], src["exp_avg"]) and torch.equal(moved["exp_avg_sq"], src["exp_avg_sq"])
    assert float(moved["step"]) == 3.0
    assert new_p["trunk.0.attn.qkv.weight"] not in new.state  # new: fresh state
    assert set(carried) == {n for n in new_p if not n.startswith(("trunk.0.", "trunk.1."))}


# ---------------------------------------------------------------- errors


def _error(overrides: dict, stage: int = 1, source=TINY) -> str:
    """The error a schedule gets: from the compiler when it is a spec error (the compiler checks
    every stage), else from growing at run time."""
    with pytest.raises(PhysLMError) as err:
        grow(compile_blueprint(source, overrides=overrides, stage=stage - 1), stage)
    return str(err.value)


def test_width_growth_is_refused_with_a_location():
    msg = _error({"growth": [{"until": 5, "params": {"layers": 1}}, {"params": {"layers": 2, "dim": 64}}]})
    assert "tok.weight: growth stage 1 changes its shape ([65, 32] -> [65, 64]): `zero_init` grows depth only (the repeat count of block nodes), not width, heads, context or vocabulary" in msg


def test_errors_point_into_the_blueprint_file(tmp_path):
    doc = yaml.safe_load(TINY.read_text())
    doc["extends"] = str(ROOT / "blueprints" / "baby-gpt.yaml")
    doc["growth"] = [{"until": 5, "params": {"layers": 2}}, {"params": {"layers": 4}, "grow": "stack", "where": "start"}]
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    with pytest.raises(PhysLMError) as err:
        compile_blueprint(path, stage=0)
    assert str(err.value).startswith(f"validate error: {path}:")
    assert "`stack` copies the trained stack on top of itself, so `where` must be end (expected end, got 'start')" in str(err.value)


@pytest.mark.parametrize("overrides, text", [
    ({"growth": [{"until": 5, "params": {"layers": 1}}, {"until": 9, "params": {"layers": 2}}]},
     "the last growth stage (1) has `until`: it lasts to the end of training"),
    ({"growth": [{"params": {"layers": 1}}, {"params": {"layers": 2}}]}, "growth stage 0 has no end"),
    ({"growth": [{"until": 5, "params": {"layers": 1}, "grow": "mask"}, {"params": {"layers": 2}}]},
     "growth stage 0 sets `grow`, but stage 0 is where training starts"),
    ({"growth": [{"until": 5, "params": {"layers": 1}}, {"params": {"layers": 2}, "ramp_steps": 9}]},
     "`ramp_steps` is used by `grow: mask` only"),
    ({"growth": [{"until": 5, "params": {"layers": 1}}, {"params": {"layers": 2}, "grow": "interpolate", "where": "end"}]},
     "`interpolate` puts each copy right after its source; `where` does not apply"),
    (_schedule("zero_init", [0, 9]), "`where` must list the 2 new positions of 'trunk' (2 -> 4 layers): 9 is outside 0..3"),
    (_schedule("zero_init", [1]), "`where` must list the 2 new positions of 'trunk' (2 -> 4 layers): 1 given"),
    (_schedule("zero_init", old=3, new=2), "growth stage 1 shrinks 'trunk' from 3 to 2 instances; growth only adds"),
    (_schedule("mask", "start", old=2, new=2), "growth stage 1 adds no layers, so `grow` does not apply"),
])
def test_schedule_errors(overrides, text):
    assert text in _error(overrides)


def _block(**nodes) -> dict:
    base = {"ln1": {"use": "norm.layer", "in": "x"}, "attn": {"use": "attention.causal", "in": "ln1", "num_heads": 2},
            "r1": {"use": "add", "in": ["x", "attn"]}, "ln2": {"use": "norm.layer", "in": "r1"},
            "mlp": {"use": "ffn.mlp", "in": "ln2", "hidden_dim": 64}, "r2": {"use": "add", "in": ["r1", "mlp"]}}
    return {"blocks.gpt_block.nodes": {**base, **nodes}}


def test_post_norm_blocks_are_refused_for_zero_init_and_mask():
    post_norm = _block(attn={"use": "attention.causal", "in": "x", "num_heads": 2}, ln1={"use": "norm.layer", "in": "r1"},
                       mlp={"use": "ffn.mlp", "in": "ln1", "hidden_dim": 64}, r2={"use": "add", "in": ["ln1", "mlp"]},
                       ln2={"use": "norm.layer", "in": "r2"})
    for op in ("zero_init", "mask"):
        msg = _error({**post_norm, "blocks.gpt_block.out": "ln2", **_schedule(op)})
        assert "block instance 'trunk.2' is not a pre-norm residual block: its output trunk.2.ln2 is not the residual stream" in msg
        assert "fix: zero_init and mask need x + branch(norm(x)) blocks; grow with stack or interpolate" in msg
    grow(compile_blueprint(TINY, overrides={**post_norm, "blocks.gpt_block.out": "ln2", **_schedule("stack")}, stage=0), 1)


def test_a_branch_without_an_output_projection_is_refused():
    msg = _error({**_block(mlp={"use": "norm.layer", "in": "ln2"}), **_schedule("zero_init")})
    assert "trunk.2.mlp: zero_init: norm.layer has no output projection to zero: no nn.Linear with out_features 32" in msg
    assert "fix: grow with `mask` (exact for any branch) or stack/interpolate" in msg


def test_growth_goes_one_stage_at_a_time():
    cm = compile_blueprint(TINY, stage=0)
    with pytest.raises(GrowthError, match="growth goes one stage at a time: the model is at stage 0, asked for 2"):
        grow(cm, 2)


def test_stage_at():
    cm = compile_blueprint(TINY, build=False, stage=0)
    assert [stage_at(cm, s, 0) for s in (0, 19, 20, 39, 40, 1000)] == [0, 0, 1, 1, 2, 2]
    by_tokens = {"growth": [{"until_tokens": 1000, "params": {"layers": 1}}, {"until": 50, "params": {"layers": 2}},
                            {"params": {"layers": 3}}]}
    cm = compile_blueprint(TINY, overrides=by_tokens, build=False, stage=0)
    assert [stage_at(cm, s, t) for s, t in ((99, 999), (0, 1000), (49, 5000), (50, 1000))] == [0, 1, 1, 2]


# ---------------------------------------------------------------- training


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "slice.txt"
    if SHAKESPEARE.is_file():
        path.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:20_000], encoding="utf-8")
    else:  # the project must not need the shared data at run time
        path.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 300, encoding="utf-8")
    return path


SHORT = {"growth": [{"until": 6, "params": {"layers": 1}},
                    {"until": 12, "params": {"layers": 2}, "grow": "zero_init", "rewarmup": 3},
                    {"params": {"layers": 3}, "grow": "mask", "where": "start", "ramp_steps": 4}],
         "params.dropout": 0.1}
RUN = dict(steps=20, batch_size=2, eval_every=5, eval_iters=1, log_every=5, warmup=2, progress=False)


def _train(out: Path, data: Path, **kw):
    from physlm_graph.runtime.train import Trainer

    t = Trainer(TINY, data=str(data), overrides=SHORT, out_dir=out, device="cpu", **{**RUN, **kw})
    return t, t.fit()


def test_training_grows_and_records_the_history(tmp_path, text_file):
    t, result = _train(tmp_path / "a", text_file)
    assert result["steps"] == 20 and t.growth.stage == 2
    state = json.loads((tmp_path / "a" / "last" / "trainer_state.json").read_text())
    assert state["stage"] == 2
    hist = state["growth_history"]
    assert [(h["stage"], h["step"], h["grow"], h["new_instances"]) for h in hist] == [
        (1, 6, "zero_init", ["trunk.1"]), (2, 12, "mask", ["trunk.0"])]
    assert hist[1]["renamed"] == {"trunk.0": "trunk.1", "trunk.1": "trunk.2"}
    stored = yaml.safe_load((tmp_path / "a" / "last" / "blueprint.yaml").read_text())
    assert [s["params"]["layers"] for s in stored["growth"]] == [1, 2, 3]  # the merged doc, every stage
    assert "growth_mask" not in t.model.code  # the ramp (4 steps) ended and the mask was removed
    metrics = [json.loads(l) for l in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [(m["step"], m["stage"]) for m in metrics] == [(5, 0), (10, 1), (15, 2), (20, 2)]
    # re-warmup: the lr at the boundary restarts at 1/(rewarmup + 1) of the schedule
    from physlm_graph.runtime.optim import lr_at

    t.growth.history = hist[:1]  # as it was in stage 1
    c = t.cfg
    plain = {s: lr_at(s, lr=c.lr, min_lr=c.min_lr, warmup=c.warmup, steps=c.steps, schedule=c.schedule) for s in (6, 9)}
    assert t.lr_at(6) == pytest.approx(plain[6] / 4)
    assert t.lr_at(9) == pytest.approx(plain[9])


@pytest.mark.parametrize("stop", [6, 9, 13])  # at a boundary, inside stage 1, inside the mask ramp
def test_resume_across_growth_matches_an_uninterrupted_run(tmp_path, text_file, stop):
    _train(tmp_path / "a", text_file)
    _, first = _train(tmp_path / "b", text_file, stop_after=stop)
    assert first["steps"] == stop
    _, second = _train(tmp_path / "b", text_file, resume=True)
    assert second["steps"] == 20
    a = load_file(str(tmp_path / "a" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "last" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    sa = json.loads((tmp_path / "a" / "last" / "trainer_state.json").read_text())
    sb = json.loads((tmp_path / "b" / "last" / "trainer_state.json").read_text())
    assert sa["growth_history"] == sb["growth_history"]


# ---------------------------------------------------------------- the examples


def test_brain_gpt_example_has_the_readme_stages(capsys):
    from physlm_graph.cli import main

    assert main(["build", str(BRAIN), "--stages", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["layers"] for r in rows] == [2, 4, 8, 12, 16]
    assert [r["until"] for r in rows] == [5000, 10000, 20000, 30000, "end"]


def test_the_plan_knows_the_growth_stages():
    from physlm_graph.runtime.plan import make_plan

    assert [s.params["layers"] for s in make_plan(TINY).stages] == [1, 2, 3]
    assert make_plan(ROOT / "blueprints" / "baby-gpt.yaml").stages == []
    assert len(make_plan(ROOT / "blueprints" / "baby-gpt.yaml", overrides={"growth": SHORT["growth"]}).stages) == 3


def test_load_checkpoint_rebuilds_the_recorded_stage(tmp_path, text_file):
    from physlm_graph.runtime.checkpoint import load_checkpoint

    _train(tmp_path / "a", text_file, stop_after=8)  # stage 1: 2 of the 3 layers
    ck = load_checkpoint(tmp_path / "a")
    assert ck.trainer_state["stage"] == 1 and len(ck.model.resolved.instances["trunk"]) == 2


def test_the_trainer_stops_when_growth_changes_the_function(tmp_path, text_file, monkeypatch):
    import dataclasses

    from physlm_graph._growth_ops import GROWTH_OPS

    broken = dataclasses.replace(GROWTH_OPS["zero_init"], prepare=lambda cm, inst: [])  # zeroes nothing
    monkeypatch.setitem(GROWTH_OPS, "zero_init", broken)
    with pytest.raises(GrowthError, match="growth into stage 1 by zero_init changed the logits by"):
        _train(tmp_path / "a", text_file)
    t, result = _train(tmp_path / "b", text_file, check_growth=False)
    assert result["steps"] == 20


def test_the_train_command_grows_the_example(tmp_path, text_file):
    from physlm_graph.cli import main

    out = tmp_path / "run"
    assert main(["train", str(TINY), "--data", str(text_file), "--steps", "41", "--out", str(out), "--device", "cpu",
                 "--no-progress", "--set", "train.batch_size=2"]) == 0
    state = json.loads((out / "last" / "trainer_state.json").read_text())
    assert state["step"] == 41 and state["stage"] == 2 and [h["step"] for h in state["growth_history"]] == [20, 40]


def test_growth_operators_come_from_the_registry():
    from pydantic import ValidationError

    from physlm_graph._growth_ops import GROWTH_OPS, growth_op, growth_op_lines, growth_op_names
    from physlm_graph._schema import GrowthStage, blueprint_json_schema_stage_enum

    for name in growth_op_names():  # the schema accepts exactly the registered names
        assert GrowthStage(grow=name).grow == name
    with pytest.raises(ValidationError, match="Input should be 'zero_init', 'mask', 'stack' or 'interpolate'"):
        GrowthStage(grow="grow_wide")
    assert blueprint_json_schema_stage_enum() == list(growth_op_names())  # editors complete the same names
    assert [op.name for op in GROWTH_OPS.values() if op.exact] == ["zero_init", "mask"]
    assert all(line.split(": ", 1)[1] for line in growth_op_lines())  # each has its doc line
    with pytest.raises(GrowthError, match="unknown growth operator 'grow_wide'") as err:
        growth_op("grow_wide")
    assert "zero_init, mask, stack, interpolate" in str(err.value)
    doc = (ROOT / "docs" / "growth.md").read_text(encoding="utf-8").split("## The operators")[1].split("\n## ")[0]
    table = [line.split("`")[1] for line in doc.splitlines() if line.startswith("| `")]
    assert sorted(table) == sorted(growth_op_names())  # the docs' table lists the registered operators
    assert depth_plan(2, 4, "stack", "end") == ({0: 0, 1: 1}, {2: 0, 3: 1})
    assert depth_plan(2, 4, "interpolate", "end") == ({0: 0, 1: 2}, {1: 0, 3: 1})
