"""The run plan: the blueprint is read once per run, and the plan carries everything the trainer follows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from physlm_graph import TrainingError
from physlm_graph.runtime.plan import make_plan
from physlm_graph.runtime.train import train

ROOT = Path(__file__).resolve().parents[2]
TINY_GROWTH = ROOT / "examples" / "growth" / "tiny-growth.yaml"
BABY = ROOT / "blueprints" / "baby-gpt.yaml"

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_growing_run_reads_the_blueprint_file_once(tmp_path, monkeypatch):
    """One `train` across a growth boundary: the file is loaded once (the stage-0 model, the grown
    model and the checkpoints are compiled from the plan's merged document)."""
    import physlm_graph._compile as compile_mod

    reads = []
    real = compile_mod.load_document

    def counting(source):
        if not isinstance(source, dict):
            reads.append(str(source))
        return real(source)

    monkeypatch.setattr(compile_mod, "load_document", counting)
    data = tmp_path / "text.txt"
    data.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 80, encoding="utf-8")
    out = tmp_path / "run"
    train(TINY_GROWTH, data=str(data), out_dir=out, device="cpu", progress=False, steps=4, batch_size=2, eval_every=4,
          eval_iters=1, overrides={"growth": [{"until": 2, "params": {"layers": 1}}, {"params": {"layers": 2}}]})
    assert reads == [str(TINY_GROWTH)]
    state = json.loads((out / "last" / "trainer_state.json").read_text())
    assert state["stage"] == 1 and state["growth_history"][0]["step"] == 2


def test_the_plan_holds_the_options_and_the_blueprint_facts():
    plan = make_plan(BABY, overrides={"layers": 2, "train.warmup": 7}, steps=5, compile=True)
    assert plan.config.steps == 5 and plan.config.warmup == 7 and plan.config.compile == "default"
    assert plan.stages == [] and plan.exits == [] and plan.extensions == [] and plan.loss_weights == {}
    assert plan.blueprint["params"]["layers"] == 2
    assert make_plan(BABY, overrides={"exits": {"every": 1, "block": "trunk"}}).exits
    assert make_plan(BABY, overrides={"train.compile": "reduce-overhead"}).config.compile == "reduce-overhead"
    assert make_plan(BABY, compile=False).config.compile is False


def test_the_plan_refuses_unknown_and_invalid_options():
    with pytest.raises(TrainingError, match="unknown training option\\(s\\): stepz"):
        make_plan(BABY, stepz=3)
    with pytest.raises(TrainingError, match="invalid training option: steps"):
        make_plan(BABY, steps=0)


def test_a_trainer_runs_a_plan_made_beforehand(tmp_path):
    from physlm_graph.runtime.train import Trainer

    data = tmp_path / "text.txt"
    data.write_text("ROMEO:\nBut, soft! what light through yonder window breaks?\n" * 60, encoding="utf-8")
    plan = make_plan(BABY, overrides={"layers": 1, "dim": 16, "heads": 2, "context": 16, "train.seq_len": 16},
                     steps=2, batch_size=2,
                     eval_every=2, eval_iters=1)
    result = Trainer(plan, data=str(data), out_dir=tmp_path / "run", device="cpu", progress=False).fit()
    assert result["steps"] == 2
    with pytest.raises(TrainingError, match="a RunPlan already holds the overrides and training options"):
        Trainer(plan, out_dir=tmp_path / "other", steps=3)


def test_a_model_that_cannot_fit_is_located_in_the_blueprint_file_not_the_merged_dict():
    """The plan compiles its merged document (a dict); the fit check's location still names the
    blueprint file and the node's line there."""
    from physlm_graph import BuildError

    root = Path(__file__).parents[2]
    plan = make_plan(root / "blueprints" / "baby-gpt-cpu.yaml", overrides={"params.dim": 1 << 20})
    with pytest.raises(BuildError) as err:
        plan.model(vocab=65)
    msg = str(err.value)
    assert "<dict>" not in msg
    assert msg.startswith(f"build error: {root}/blueprints/baby-gpt.yaml:17:7: trunk.0.mlp: the weights do not fit"), msg
