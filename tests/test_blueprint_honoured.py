"""Every key of a blueprint is honoured by every path that reads it, or refused before step 0.

Each test sets a distinctive value on a tiny model, runs one path on the CPU, and checks that the
value changed what the path did (or that the path refused it at the key's line in the file).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from physlm_graph.runtime.train import train

ROOT = Path(__file__).resolve().parents[1]
BASE = yaml.safe_load((ROOT / "blueprints" / "baby-gpt.yaml").read_text(encoding="utf-8"))
BASE["params"].update(layers=1, dim=16, heads=2, context=16, dropout=0.0)
BASE["train"] = {"seq_len": 16, "fit_vocab": True}
RUN = dict(batch_size=2, eval_every=50, eval_iters=1, log_every=1, warmup=1, lr=1e-4, progress=False, device="cpu")
WIDE_LN1 = {"params": ["**.ln1.weight"], "init": "normal", "std": 7.0}  # far from LayerNorm's ones

pytestmark = pytest.mark.usefixtures("one_thread")


def blueprint(**sections) -> dict:
    d = copy.deepcopy(BASE)
    for k, v in sections.items():
        d[k] = {**d[k], **v} if k == "train" else v
    return d


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text("ROMEO:\nBut, soft! what light through yonder window breaks?\n" * 40, encoding="utf-8")
    return path


def test_init_rules_draw_the_layers_growth_adds(tmp_path, text_file):
    """train.init_rules under growth: the layers a zero_init step adds are drawn by the rules like
    the first ones (the operator still zeroes their output projections, so the logits are kept)."""
    bp = blueprint(train={"init_rules": [WIDE_LN1]},
                   growth=[{"until": 2, "params": {"layers": 1}}, {"params": {"layers": 2}, "grow": "zero_init"}])
    train(bp, data=str(text_file), out_dir=tmp_path / "run", steps=3, **RUN)
    w = load_file(tmp_path / "run" / "last" / "model.safetensors")
    assert w["trunk.0.ln1.weight"].std() > 3.0
    assert w["trunk.1.ln1.weight"].std() > 3.0  # was LayerNorm's ones (std 0) before growth honoured the rules
    assert w["trunk.1.attn.proj.weight"].abs().max() < 1e-2  # zero_init's zeroed projection, 1 step of lr 1e-4


MUON_AND_ADAMW = [{"name": "mat", "params": ["**"], "shape": "matrix", "optimizer": "muon", "lr": 0.02},
                  {"name": "vec", "params": ["**"], "shape": "vector", "optimizer": "adamw", "lr": 0.001}]


def test_build_memory_counts_the_state_of_train_optimizers(tmp_path, capsys):
    """train.optimizers under ``build --memory``: Muon keeps one number per parameter, AdamW two;
    the estimate counted AdamW for every parameter whatever the groups said."""
    import json

    from physlm_graph.cli import main

    path = tmp_path / "muon.yaml"
    path.write_text(yaml.safe_dump(blueprint(train={"optimizers": MUON_AND_ADAMW}), sort_keys=False), encoding="utf-8")
    assert main(["build", str(path), "--memory", "--json"]) == 0
    mem = json.loads(capsys.readouterr().out)["memory"]
    from physlm_graph import compile_blueprint

    params = dict(compile_blueprint(str(path), device="meta").module.named_parameters())
    matrices = sum(p.numel() for p in params.values() if p.ndim >= 2)
    assert mem["optimizer"] == "muon + adamw"
    assert mem["optimizer_state"] == 4 * (matrices + 2 * (mem["params"] - matrices))
    assert main(["build", str(path), "--memory", "--json", "--optimizer", "adamw"]) == 0  # the flag: one for all
    assert json.loads(capsys.readouterr().out)["memory"]["optimizer_state"] == 8 * mem["params"]


def _line_of(text: str, needle: str, after: str = "") -> int:
    """1-based line of the first ``needle`` after the line holding ``after``."""
    lines = text.splitlines()
    start = next(i for i, l in enumerate(lines) if after in l) if after else 0
    return next(i for i, l in enumerate(lines) if i > start and needle in l) + 1


def test_init_rules_over_carried_weights_are_refused_before_step_0(tmp_path, text_file, capfd):
    """train.init_rules under --init-from: a rule whose parameters all come from the checkpoint was
    drawn, then overwritten (it did nothing); now it is refused at its line, before step 0."""
    from physlm_graph._errors import TrainingError

    train(blueprint(), data=str(text_file), out_dir=tmp_path / "a", steps=1, **RUN)
    path = tmp_path / "b.yaml"
    path.write_text(yaml.safe_dump(blueprint(train={"init_rules": [WIDE_LN1]}), sort_keys=False), encoding="utf-8")
    with pytest.raises(TrainingError) as err:
        train(str(path), data=str(text_file), out_dir=tmp_path / "b", steps=1, init_from=tmp_path / "a", **RUN)
    msg = str(err.value)
    line = _line_of(path.read_text(encoding="utf-8"), "params", after="init_rules")
    assert f"{path}:{line}:" in msg
    assert "train.init_rules: init rule 0 draws only parameters that --init-from carries" in msg
    assert "trunk.0.ln1.weight" in msg and "drop the rule" in msg
    assert not (tmp_path / "b" / "metrics.jsonl").exists()
    # a rule that also draws fresh parameters runs, and says which of them the checkpoint keeps
    bp = blueprint(train={"init_rules": [WIDE_LN1]}, params={**BASE["params"], "layers": 2})
    capfd.readouterr()
    train(bp, data=str(text_file), out_dir=tmp_path / "c", steps=1, init_from=tmp_path / "a", **RUN)
    assert "rule 0: 1 of its 2 parameters are carried by --init-from" in " ".join(capfd.readouterr().out.split())
    w = load_file(tmp_path / "c" / "last" / "model.safetensors")
    assert w["trunk.1.ln1.weight"].std() > 3.0 and w["trunk.0.ln1.weight"].std() < 0.1


def test_a_blueprint_seed_a_study_never_runs_is_refused(tmp_path):
    """train.seed under ``ablate``: a study without `seeds` ran every variant at seed 0, whatever
    seed its blueprint wrote; now that is an error at the key, and listed seeds that replace it say so."""
    from physlm_graph._study import StudyError, StudySpec, load_study

    bp = tmp_path / "bp.yaml"
    bp.write_text(yaml.safe_dump(blueprint(train={"seed": 7}), sort_keys=False), encoding="utf-8")
    study = {"study": "s", "base": "bp.yaml", "variants": [{"name": "a"}], "budget": {"steps": 1}, "data": "x.txt"}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False), encoding="utf-8")
    with pytest.raises(StudyError) as err:
        StudySpec(*load_study(path), path)
    line = _line_of(bp.read_text(encoding="utf-8"), "seed: 7", after="train:")
    assert str(err.value).startswith(f"study error: {bp}:{line}:3: variant 'a': train.seed 7 is never run: a study "
                                     "runs every variant at its `seeds`, [0] when it lists none")
    path.write_text(yaml.safe_dump({**study, "seeds": [0, 1]}, sort_keys=False), encoding="utf-8")
    notes = StudySpec(*load_study(path), path).notes
    assert notes == ["variant 'a': the study's seeds [0, 1] replace its train.seed 7"]
    path.write_text(yaml.safe_dump({**study, "seeds": [7]}, sort_keys=False), encoding="utf-8")
    assert StudySpec(*load_study(path), path).notes == []


@pytest.mark.parametrize("bound, steps, message", [
    ({"until": 5}, 5, "growth stage 1 starts at step 5, but the run's last step is 4 (train.steps 5): stage 1 would "
                      "never train"),
    ({"until_tokens": 200}, 4, "growth stage 1 starts at 200 tokens (step 7 at 32 a step), but the run's last step "
                               "is 3 (train.steps 4): stage 1 would never train"),
])
def test_a_growth_stage_past_the_last_step_is_refused_before_step_0(tmp_path, text_file, bound, steps, message):
    """growth under ``train``: a run shorter than the schedule stopped in an early stage, never
    growing into the later ones; now the stage's bound is refused at its line."""
    from physlm_graph._growth_ops import GrowthError

    bp = blueprint(growth=[{**bound, "params": {"layers": 1}}, {"params": {"layers": 2}, "grow": "zero_init"}])
    path = tmp_path / "bp.yaml"
    path.write_text(yaml.safe_dump(bp, sort_keys=False), encoding="utf-8")
    with pytest.raises(GrowthError) as err:
        train(str(path), data=str(text_file), out_dir=tmp_path / "run", steps=steps, **RUN)
    line = _line_of(path.read_text(encoding="utf-8"), next(iter(bound)), after="growth:")
    assert str(err.value).startswith(f"growth error: {path}:{line}:") and message in str(err.value)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_ddp_settings_under_fsdp_are_refused_and_on_one_process_noted(tmp_path, text_file):
    """train.ddp_bucket_mb and ddp_bucket_view under FSDP2: not read (only ddp_reduce_dtype was
    refused); now each is an error at its line. On one process none of them applies: a note says so."""
    from physlm_graph.runtime.train import Trainer, TrainingError

    path = tmp_path / "bp.yaml"
    path.write_text(yaml.safe_dump(blueprint(train={"ddp_bucket_mb": 50.0}), sort_keys=False), encoding="utf-8")
    fsdp = Trainer(str(path), data=str(text_file), out_dir=tmp_path / "a", device="cpu", strategy="fsdp")
    with pytest.raises(TrainingError) as err:
        fsdp.setup()
    line = _line_of(path.read_text(encoding="utf-8"), "ddp_bucket_mb", after="train:")
    assert str(err.value).startswith(f"train error: {path}:{line}:3: train.ddp_bucket_mb: 50 sizes DDP's gradient "
                                     "buckets; FSDP2 has none")
    one = Trainer(str(path), data=str(text_file), out_dir=tmp_path / "b", device="cpu", ddp_reduce_dtype="bfloat16",
                  steps=1, **{k: v for k, v in RUN.items() if k not in ("device", "progress")})
    one.setup()
    assert ("train.ddp_reduce_dtype, train.ddp_bucket_mb have no effect: the run is one process, with no gradient "
            "all-reduce (they apply under torchrun with DDP)") in one.notes


def test_build_memory_says_a_fitted_vocabulary_is_not_the_estimated_one(tmp_path, capsys):
    """train.fit_vocab under ``build --memory``: the run's logits are the tokenizer's size, the
    estimate's are params.vocab; the estimate now says which vocabulary it counted."""
    from physlm_graph.cli import main

    path = tmp_path / "bp.yaml"
    path.write_text(yaml.safe_dump(blueprint(), sort_keys=False), encoding="utf-8")
    assert main(["build", str(path), "--memory", "--json"]) == 0
    err = capsys.readouterr().err
    assert ("note: train.fit_vocab: a run sets params.vocab to its tokenizer's size; this estimate is at params.vocab "
            "65 (--set vocab=N estimates another)") in " ".join(err.split())
    path.write_text(yaml.safe_dump(blueprint(train={"fit_vocab": False}), sort_keys=False), encoding="utf-8")
    assert main(["build", str(path), "--memory", "--json"]) == 0
    assert "fit_vocab" not in capsys.readouterr().err


def test_a_fresh_hugging_face_model_follows_train_init_rules():
    """train.init_rules under ``PhysLMForCausalLM(config)``: a model built fresh from a config (to
    train with transformers' Trainer) started from the components' init; now the rules draw it."""
    pytest.importorskip("transformers")
    from physlm_graph import compile_blueprint
    from physlm_graph._hf import PhysLMConfig, PhysLMForCausalLM

    cm = compile_blueprint(blueprint(train={"init_rules": [WIDE_LN1]}), device="meta", build=False)
    fresh = PhysLMForCausalLM(PhysLMConfig(blueprint=cm.blueprint_text))
    assert fresh.model.get_parameter("trunk.0.ln1.weight").std() > 3.0
    # weights copied in replace the draw: compile_blueprint alone leaves LayerNorm's ones
    ruled = compile_blueprint(blueprint(train={"init_rules": [WIDE_LN1]}), device="cpu")
    loaded = PhysLMForCausalLM.from_compiled(ruled)
    assert torch.equal(loaded.model.get_parameter("trunk.0.ln1.weight"), torch.ones(16))


def test_hugging_face_training_loss_is_the_blueprints_objective():
    """exits (and losses) under ``PhysLMForCausalLM(labels=...)`` in training mode: the loss was the
    cross-entropy alone, so transformers' Trainer never trained the exits; now it is the objective
    ``physlm-graph train`` optimizes. Left-padded rows (run apart) are refused."""
    pytest.importorskip("transformers")
    import torch.nn.functional as F

    from physlm_graph import PhysLMError, compile_blueprint
    from physlm_graph._hf import PhysLMForCausalLM
    from physlm_graph.runtime.objective import Objective

    torch.manual_seed(0)
    cm = compile_blueprint(blueprint(exits={"every": 1, "block": "trunk"}, params={**BASE["params"], "layers": 2}))
    model = PhysLMForCausalLM.from_compiled(cm).train()
    ids = torch.randint(0, 65, (2, 8))
    loss = model(input_ids=ids, labels=ids).loss
    y = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], dim=1)
    want, terms = Objective(cm.loss_weights)(cm, cm.module(ids), y)
    assert any(k.startswith("exit/") for k in terms) and torch.allclose(loss, want)
    ce = F.cross_entropy(cm.module(ids)["logits"][:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    assert loss > ce + 1e-3
    assert torch.allclose(model.eval()(input_ids=ids, labels=ids).loss, ce)  # eval: the cross-entropy
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, :2] = 0
    with pytest.raises(PhysLMError, match="left-padded rows run apart"):
        model.train()(input_ids=ids, attention_mask=mask, labels=ids)
