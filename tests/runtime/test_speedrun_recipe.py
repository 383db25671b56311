"""The speedrun recipe through the trainer (train.optimizers, train.init_rules, schedule: wsd,
loss_reduction: sum): the blueprint trained by ``Trainer`` against the program written by hand
(benchmarks/_handspeedrun.py), exact resume with Muon groups, and the recipe's errors."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from physlm_graph import TrainingError
from physlm_graph.runtime.objective import Objective
from physlm_graph.runtime.plan import make_plan
from physlm_graph.runtime.recipe import OptimizerSet, describe_optimizers
from physlm_graph.runtime.shards import write_shard
from physlm_graph.runtime.train import Trainer, train

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _handspeedrun import HandSpeedrun, hand_optimizers, hand_step, load_blueprint_state  # noqa: E402

BLUEPRINT = ROOT / "blueprints" / "speedrun-track3.yaml"
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
SMALL = {"params.vocab": 256, "params.layers": 2, "params.dim": 64, "params.head_dim": 32, "params.context": 32,
         "train.seq_len": 32, "params.embed_dtype": "float32"}
RUN = dict(tokenizer="bytes", overrides=SMALL, device="cpu", compile=False, progress=False, dtype="float32",
           batch_size=2, accumulate=3, eval_iters=1)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shard(tmp_path_factory) -> Path:
    """40,000 byte ids of text (so a few steps lower the loss) as a token shard."""
    if SHAKESPEARE.is_file():
        ids = np.frombuffer(SHAKESPEARE.read_bytes()[:40_000], dtype=np.uint8)
    else:  # the project must not need the shared data at run time
        ids = np.frombuffer(b"ROMEO:\nBut, soft! what light through yonder window breaks?\n" * 700, dtype=np.uint8)
    return write_shard(tmp_path_factory.mktemp("data") / "train.bin", ids)


def _hand_losses(t: Trainer, steps: int, *, cooldown: float = 0.7) -> list[float]:
    hand = HandSpeedrun(vocab=256, dim=64, layers=2, head_dim=32, embed_dtype=torch.float32)
    load_blueprint_state(hand, {k: v.detach().clone() for k, v in t.model.state_dict().items()})
    opts = hand_optimizers(hand)
    batches = t.make_batches()  # the trainer's, from the start: the shard in order (train.data_order)
    tokens = 3 * 2 * 32
    return [float(hand_step(hand, opts, batches, step=s, steps=steps, accumulate=3, cooldown=cooldown)) / tokens
            for s in range(steps)]


def _trainer_losses(tmp_path: Path, shard: Path, steps: int) -> tuple[Trainer, list[float]]:
    t = Trainer(BLUEPRINT, out_dir=tmp_path / "run", data=str(shard), steps=steps, **RUN)
    t.setup()
    start = {k: v.detach().clone() for k, v in t.model.state_dict().items()}
    losses = [t.resolve(t.train_step(s))["objective"] for s in range(steps)]
    t.model.load_state_dict(start)  # for the hand-written model to start from the same weights
    return t, losses


def _trained_alike(tmp_path: Path, shard: Path) -> tuple[np.ndarray, np.ndarray]:
    t, ours = _trainer_losses(tmp_path, shard, 6)
    good = np.abs(np.array(ours) - _hand_losses(t, 6))
    bad = np.abs(np.array(ours) - _hand_losses(t, 6, cooldown=0.5))  # another schedule
    assert ours[-1] < ours[0] - 0.5  # the steps do train
    return good, bad


def test_trainer_trains_the_blueprint_as_the_hand_written_program(tmp_path, shard):
    """Same weights, data and recipe: 6 steps of the trainer (torch.optim.Muon on proj and MLP
    matrices, runtime/muon.py on the split q, k, v) give the hand-written program's losses; torch's
    Newton-Schulz rounds its bf16 products apart from the program's, hence 2e-4 and not less (1.3e-4
    at step 6 on the shard read in order; the next test, with the program's Newton-Schulz, agrees
    to 5e-6 on the same batches)."""
    good, bad = _trained_alike(tmp_path, shard)
    assert good.max() < 2e-4, good
    assert bad.max() > 1e-3, bad  # the comparison sees a schedule that differs


def test_with_our_muon_the_trainer_is_the_program_to_float_rounding(tmp_path, shard, monkeypatch):
    """Without torch.optim.Muon (torch < 2.9) every Muon group takes runtime/muon.py, whose
    Newton-Schulz is the program's arithmetic: the losses then agree to float32 rounding."""
    monkeypatch.delattr(torch.optim, "Muon")
    good, _ = _trained_alike(tmp_path, shard)
    assert good.max() < 5e-6, good


def test_the_speedrun_train_section_builds_its_groups(tmp_path, shard):
    t = Trainer(BLUEPRINT, out_dir=tmp_path / "run", data=str(shard), steps=2, **RUN)
    t.setup()
    assert isinstance(t.optimizer, OptimizerSet)
    lines = describe_optimizers(t.optimizer)
    assert lines == [
        "blocks: torch.optim.Muon lr 0.025, weight decay 0.05, 6 tensors, 73,728 parameters",
        "qkv: runtime.muon.Muon lr 0.025, weight decay 0.05, split 3, 2 tensors, 24,576 parameters",
        "embed: torch.optim.AdamW lr 0.7, weight decay 0.001, 1 tensors, 16,384 parameters",
        "head: torch.optim.AdamW lr 0.004, weight decay 0.001, 1 tensors, 16,384 parameters",
        "vectors: torch.optim.AdamW lr 0.015, weight decay 0.001, 15 tensors, 1,792 parameters",
    ]
    sd = t.model.state_dict()  # the init rules ran
    assert not sd["trunk.1.mlp.proj.weight"].any() and not sd["head.weight"].any() and not sd["head.bias"].any()
    assert torch.equal(sd["x0.weight"], torch.ones(64))
    assert abs(sd["trunk.0.mlp.fc.weight"].std().item() - (0.33 / 64) ** 0.5) < 0.01
    adamw = t.optimizer.optimizers[-1]
    assert adamw.param_groups[0]["betas"] == (0.8, 0.95) and adamw.param_groups[0]["eps"] == 1e-10
    t.train_step(0)
    t.train_step(2)  # the wsd factor: 1 until 30% of the steps, then (1 - step / steps) / 0.7
    assert [g["lr"] for g in t.optimizer.param_groups] == [0.025 * (1 - 2 / 2) / 0.7] * 2 + [0.0] * 3


def test_resume_restores_every_optimizers_state_bit_for_bit(tmp_path, shard):
    kw = dict(data=str(shard), steps=6, eval_every=3, log_every=3, **RUN)
    train(BLUEPRINT, out_dir=tmp_path / "a", **kw)
    train(BLUEPRINT, out_dir=tmp_path / "b", stop_after=3, **kw)
    mid = load_file(str(tmp_path / "b" / "last" / "optimizer.safetensors"))
    assert any(k.endswith(".momentum_buffer") and "qkv" in k for k in mid)  # runtime/muon.py's state
    assert any(k.endswith(".momentum_buffer") and "mlp.fc" in k for k in mid)  # torch.optim.Muon's
    assert any(k.endswith(".exp_avg_sq") for k in mid)  # AdamW's
    train(BLUEPRINT, out_dir=tmp_path / "b", resume=True, **kw)
    for f in ("model.safetensors", "optimizer.safetensors"):
        a, b = load_file(str(tmp_path / "a" / "last" / f)), load_file(str(tmp_path / "b" / "last" / f))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (f, k)


def test_summed_loss_is_the_sum_over_tokens_and_micro_batches():
    y = torch.tensor([[1, 2, -100, 3]])
    mean = torch.tensor(2.0)
    assert float(Objective({}, reduction="sum", accumulate=8).micro_loss(mean, y)) == 6.0  # 3 targets
    assert float(Objective({}, reduction="sum", accumulate=8, world=2).micro_loss(mean, y)) == 12.0  # DDP averages
    assert float(Objective({}, reduction="mean", accumulate=8).micro_loss(mean, y)) == 0.25


# ---------------------------------------------------------------- the recipe's errors, before any data


def _blueprint(tmp_path: Path, old: str, new: str) -> Path:
    text = BLUEPRINT.read_text(encoding="utf-8")
    assert old in text
    path = tmp_path / "bp.yaml"
    path.write_text(text.replace(old, new), encoding="utf-8")
    return path


HEAD = "params: [head.weight], optimizer: adamw"


@pytest.mark.parametrize(("old", "new", "message"), [
    (HEAD, "params: [head.weights], optimizer: adamw",
     "bp.yaml:82:20: train.optimizers: optimizer group 'head': params ['head.weights'] match no parameter\n"
     "  fix: did you mean 'head.weight', 'x0.weight'?"),
    (HEAD, "params: [head.weight, tok.weight], optimizer: adamw",
     "bp.yaml:82:20: train.optimizers: parameter tok.weight is in two optimizer groups: 'embed' and 'head'\n"
     "  fix: narrow the patterns (or `shape`) so each parameter is in one group"),
    ('params: ["**"], shape: vector, optimizer: adamw', 'params: ["trunk.**"], shape: vector, optimizer: adamw',
     "bp.yaml:75:3: train.optimizers: no optimizer group takes parameter(s) x0.weight, norm.weight, head.bias\n"
     "  fix: add a group for them (a last group with params ['**'] takes the rest)"),
    ('params: ["trunk.*.attn.proj.weight", "trunk.*.mlp.*.weight"], optimizer: muon',
     'params: ["trunk.*.attn.proj.weight", "trunk.*.mlp.*.weight"], shape: vector, optimizer: muon',
     "bp.yaml:78:84: train.optimizers: optimizer group 'blocks': params ['trunk.*.attn.proj.weight', "
     "'trunk.*.mlp.*.weight'] match trunk.0.attn.proj.weight, trunk.0.mlp.fc.weight, trunk.0.mlp.proj.weight, "
     "trunk.1.attn.proj.weight, trunk.1.mlp.fc.weight, ... (6 in all), but no vector\n"
     "  fix: drop `shape`, or change the patterns"),
    ("{params: [tok.weight], init: normal", "{params: [embed.weight], init: normal",
     "bp.yaml:88:8: train.init_rules: init rule 1: params ['embed.weight'] match no parameter\n"
     "  fix: did you mean 'head.weight', 'norm.weight'?"),
    ('{params: ["**.bias"], init: zeros}', '{params: [head.weight], init: zeros}',
     "bp.yaml:89:8: train.init_rules: init rule 2 takes no parameter: earlier rules took head.weight\n"
     "  fix: remove the rule, or put it before the rules that take its parameters"),
])
def test_a_rule_that_does_not_fit_the_model_is_refused_where_it_is_written(tmp_path, old, new, message):
    with pytest.raises(TrainingError) as err:
        make_plan(_blueprint(tmp_path, old, new), overrides={"params.layers": 2})
    assert str(err.value).split(str(tmp_path) + "/", 1)[1] == message


@pytest.mark.parametrize(("old", "new", "message"), [
    ("lr: 0.004, betas", "lr: 0.004, momentum: 0.9, betas",
     "bp.yaml:82:7: train.optimizers.3: momentum is not a setting of adamw (its settings: lr, weight_decay, betas, eps)"),
    ("lr: 0.004, betas", "lr: 0.004, beta: [0.9, 0.9], betas",
     "bp.yaml:82:72: train.optimizers.3.beta: unknown key 'beta'\n  fix: did you mean betas?"),
    ("schedule: wsd ", "schedule: cosine",
     "bp.yaml:61:1: train: decay_frac is a setting of schedule: wsd, not cosine"),
    ("  warmup: 0\n", "  warmup: 0\n  lr: 0.1\n",
     "bp.yaml:61:1: train: lr is for the default AdamW; with optimizers each group has its own lr and weight_decay "
     "(and its schedule ends at the default floor), so leave them out"),
    ("init: fan_in, scale: 0.33", "init: fan_in, std: 0.33",
     "bp.yaml:91:7: train.init_rules.4: std is a setting of init: normal, not fan_in"),
])
def test_a_malformed_group_or_rule_is_a_located_schema_error(tmp_path, old, new, message):
    from physlm_graph import PhysLMError

    with pytest.raises(PhysLMError) as err:
        make_plan(_blueprint(tmp_path, old, new))
    assert str(err.value).split(str(tmp_path) + "/", 1)[1] == message


def test_the_cli_refuses_a_wrong_rule_before_reading_data(tmp_path, capsys):
    from physlm_graph.cli import main

    bp = _blueprint(tmp_path, HEAD, "params: [head.weights], optimizer: adamw")
    code = main(["train", str(bp), "--data", str(tmp_path / "missing.bin"), "--out", str(tmp_path / "out")])
    out = capsys.readouterr()
    assert code == 2
    assert "train.optimizers: optimizer group 'head': params ['head.weights'] match no parameter" in out.err + out.out
    assert not (tmp_path / "out").exists()


def test_hand_init_is_the_programs():
    from _handspeedrun import hand_init

    hand = HandSpeedrun(vocab=256, dim=64, layers=2, head_dim=32)
    hand_init(hand, seed=0)
    sd = hand.state_dict()
    for name in ("proj.weight", "blocks.0.attn.proj.weight", "blocks.1.proj.weight", "blocks.0.fc.bias", "proj.bias"):
        assert not sd[name].any(), name
    assert torch.equal(sd["norm0.gain"], torch.ones(64))
    assert sd["embed.weight"].dtype == torch.bfloat16 and abs(sd["embed.weight"].float().std().item() - 1) < 0.05
    assert abs(sd["blocks.0.attn.q.weight"].std().item() - (0.33 / 64) ** 0.5) < 0.01
    assert abs(sd["blocks.0.fc.weight"].std().item() - (0.33 / 64) ** 0.5) < 0.01


class _Poisoned(Trainer):
    """The loss of 0-based step 2 times nan."""

    def compute_loss(self, out, y, ce=None):
        total, parts = super().compute_loss(out, y, ce=ce)
        return (total * float("nan"), parts) if self.step == 2 else (total, parts)


def test_a_nan_step_with_muon_groups_stops_naming_it_and_keeps_the_last_good_checkpoint(tmp_path, shard):
    """Muon cannot skip a step on the device, so these steps defer their check only under
    nan_policy stop: the run stops at the next resolve, naming the step, before saving anything."""
    t = _Poisoned(BLUEPRINT, out_dir=tmp_path / "run", data=str(shard), steps=6, save_every=2, log_every=3,
                  eval_every=6, **RUN)
    with pytest.raises(TrainingError, match=r"the loss is nan at step 3; the last good checkpoint is kept in "):
        t.fit()
    assert t.deferred()
    state = (tmp_path / "run" / "last" / "trainer_state.json").read_text()
    assert '"step": 2,' in state
    weights = load_file(str(tmp_path / "run" / "last" / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
