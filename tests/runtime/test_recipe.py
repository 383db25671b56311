"""The speedrun recipe's pure pieces (runtime/recipe.py): groups and init by name pattern, the
warmup-stable-decay schedule, and torch.optim.Muon set up as the program's Muon."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from physlm_graph import compile_blueprint
from physlm_graph.runtime.recipe import (
    SPEEDRUN_GROUPS,
    SPEEDRUN_INIT,
    GroupRule,
    InitRule,
    apply_init_rules,
    describe_optimizers,
    make_optimizers,
    select_groups,
    wsd_lr,
)

ROOT = Path(__file__).resolve().parents[2]
SMALL = {"params.layers": 2, "params.dim": 64, "params.head_dim": 32, "params.vocab": 128, "params.context": 32,
         "train.seq_len": 32}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return compile_blueprint(ROOT / "blueprints" / "speedrun-track3.yaml", overrides=SMALL).module


def test_speedrun_groups(model):
    groups = {g["group"]: g for g in select_groups(model, SPEEDRUN_GROUPS)}
    assert list(groups) == ["qkv", "blocks", "embed", "head", "vectors"]
    assert groups["qkv"]["names"] == ["trunk.0.attn.qkv.weight", "trunk.1.attn.qkv.weight"] and groups["qkv"]["split"] == 3
    assert groups["blocks"]["names"] == [f"trunk.{i}.{m}.weight" for i in range(2)
                                         for m in ("attn.proj", "mlp.fc", "mlp.proj")]
    assert groups["embed"]["names"] == ["tok.weight"] and groups["head"]["names"] == ["head.weight"]
    vectors = groups["vectors"]["names"]
    assert "head.bias" in vectors and "x0.weight" in vectors and "trunk.1.n2.weight" in vectors
    assert all(p.ndim == 1 for p in groups["vectors"]["params"])
    assert sum(len(g["params"]) for g in groups.values()) == len(list(model.parameters()))
    assert (groups["blocks"]["lr"], groups["blocks"]["weight_decay"]) == (0.025, 0.05)
    assert groups["embed"]["betas"] == (0.8, 0.95) and groups["embed"]["eps"] == 1e-10


def test_a_parameter_no_rule_matches_is_named(model):
    rules = [GroupRule("blocks", ("trunk.**",), "muon", {"lr": 0.1}, shape="matrix")]
    with pytest.raises(ValueError, match=r"no optimizer group takes parameter\(s\) tok.weight, x0.weight, "
                                         r"trunk.0.n1.weight, trunk.0.attn.qkv.bias, trunk.0.attn.proj.bias, \.\.\."):
        select_groups(model, rules)
    with pytest.raises(ValueError, match="no init rule takes parameter"):
        apply_init_rules(model, [InitRule(("**.bias",), "zeros")])


def test_wsd_lr_is_the_programs_schedule():
    steps = 3250
    for step in (0, 1, 974, 975, 976, 2000, 3249):
        progress = step / steps
        eta = 1.0 if progress < 0.3 else (1 - progress) / 0.7  # the speedrun's set_hparams
        assert wsd_lr(step, lr=0.025, steps=steps) == pytest.approx(0.025 * eta, rel=1e-12)
    assert wsd_lr(3, lr=1.0, steps=100, warmup=9) == pytest.approx(0.4)
    assert wsd_lr(100, lr=1.0, steps=100, min_lr=0.1) == pytest.approx(0.1)
    assert wsd_lr(90, lr=1.0, steps=100, decay_frac=0.0) == 1.0


def test_speedrun_init(model):
    torch.manual_seed(0)
    apply_init_rules(model, SPEEDRUN_INIT)
    sd = model.state_dict()
    for name in ("trunk.0.attn.proj.weight", "trunk.1.mlp.proj.weight", "head.weight", "head.bias", "trunk.0.mlp.fc.bias"):
        assert not sd[name].any(), name
    for name in ("x0.weight", "norm.weight", "trunk.1.n1.weight"):
        assert torch.equal(sd[name], torch.ones_like(sd[name])), name
    assert sd["tok.weight"].dtype == torch.bfloat16 and abs(sd["tok.weight"].float().std().item() - 1.0) < 0.05
    for name, fan_in in (("trunk.0.attn.qkv.weight", 64), ("trunk.0.mlp.fc.weight", 64)):
        assert abs(sd[name].std().item() - math.sqrt(0.33 / fan_in)) < 0.1 * math.sqrt(0.33 / fan_in), name


def _program_muon_step(p, grad, buf, *, lr, wd, mu=0.95):
    """The simple baseline's Muon update, written out here."""
    buf.mul_(mu).add_(grad, alpha=1 - mu)
    g = (1 - mu) * grad + mu * buf
    x = g.bfloat16()
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    x = x / (x.norm() + 1e-7)
    for _ in range(12):
        a = x @ x.T
        x = 2 * x + (-1.5 * a + 0.5 * a @ a) @ x
    x = (x.T if tall else x).float() * max(1, grad.shape[0] / grad.shape[1]) ** 0.5
    p.mul_(1 - lr * wd).add_(x, alpha=-lr)


@pytest.mark.parametrize("shape", [(16, 8), (8, 24)])
def test_muon_is_the_programs_update(shape):
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(shape))
    ref, buf = w.detach().clone(), torch.zeros(shape)
    (opt,) = make_optimizers([{"group": "m", "optimizer": "muon", "params": [w], "names": ["w"], "lr": 0.05,
                               "weight_decay": 0.1}])
    assert type(opt) is torch.optim.Muon
    for _ in range(3):
        grad = torch.randn(shape)
        w.grad = grad.clone()
        opt.step()
        _program_muon_step(ref, grad, buf, lr=0.05, wd=0.1)
        torch.testing.assert_close(w.detach(), ref, atol=2e-2 * 0.05, rtol=0)  # bf16 iterations, two orders


def test_torchs_default_muon_is_not_the_programs():
    """The comparison above can fail: torch's own quintic iteration moves the weights differently."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(16, 8))
    ref, buf = w.detach().clone(), torch.zeros(16, 8)
    (opt,) = make_optimizers([{"group": "m", "optimizer": "muon", "params": [w], "names": ["w"], "lr": 0.05,
                               "weight_decay": 0.1}], muon={"ns_coefficients": (3.4445, -4.775, 2.0315), "ns_steps": 5})
    w.grad = torch.randn(16, 8)
    _program_muon_step(ref, w.grad.clone(), buf, lr=0.05, wd=0.1)
    opt.step()
    assert (w.detach() - ref).abs().max() > 5e-3


def test_a_few_recipe_steps_lower_the_summed_loss(model):
    torch.manual_seed(0)
    apply_init_rules(model, SPEEDRUN_INIT)
    opts = make_optimizers(select_groups(model, SPEEDRUN_GROUPS))
    lines = describe_optimizers(opts)
    assert lines[0].startswith("blocks: torch.optim.Muon lr 0.025, weight decay 0.05, 6 tensors, ")
    assert lines[1].startswith("qkv: runtime.muon.Muon lr 0.025, weight decay 0.05, split 3, 2 tensors, ")
    assert [ln.split(":")[0] for ln in lines] == ["blocks", "qkv", "embed", "head", "vectors"]
    assert lines[2].startswith("embed: torch.optim.AdamW lr 0.7, weight decay 0.001, 1 tensors, 8,192 parameters")
    x = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    losses = []
    for step in range(6):
        loss = F.cross_entropy(model(x[:, :-1])["logits"].reshape(-1, 128), x[:, 1:].reshape(-1), reduction="sum")
        loss.backward()
        for opt in opts:
            for g in opt.param_groups:
                g["lr"] = wsd_lr(step, lr=g["initial_lr"], steps=6)
            opt.step()
            opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[0] == pytest.approx(4 * 31 * math.log(128), rel=1e-4)  # a zero head: uniform logits
    assert losses[-1] < 0.9 * losses[0]


def test_our_muon_is_the_programs_update_and_splits_a_fused_matrix():
    """runtime/muon.py: the written-out update above, and ``split: 3`` on a (3r, c) matrix moves
    each r-row block as Muon moves that block alone."""
    from physlm_graph.runtime.muon import Muon

    torch.manual_seed(0)
    fused = nn.Parameter(torch.randn(24, 8))
    alone = [nn.Parameter(b.detach().clone()) for b in fused.detach().chunk(3)]
    refs, bufs = [b.detach().clone() for b in alone], [torch.zeros(8, 8) for _ in range(3)]
    opt = Muon([{"params": [fused], "split": 3}], lr=0.05, weight_decay=0.1)
    each = Muon(alone, lr=0.05, weight_decay=0.1)
    for _ in range(3):
        grad = torch.randn(24, 8)
        fused.grad = grad.clone()
        for p, g in zip(alone, grad.chunk(3)):
            p.grad = g.clone()
        opt.step()
        each.step()
        for ref, buf, g in zip(refs, bufs, grad.chunk(3)):
            _program_muon_step(ref, g, buf, lr=0.05, wd=0.1)
    torch.testing.assert_close(fused.detach(), torch.cat([p.detach() for p in alone]), atol=1e-6, rtol=0)
    torch.testing.assert_close(fused.detach(), torch.cat(refs), atol=2e-2 * 0.05, rtol=0)
    whole = nn.Parameter(torch.cat(refs).clone())  # unsplit, the same gradient: another update
    whole.grad = torch.randn(24, 8)
    with pytest.raises(ValueError, match=r"Muon takes 2-D matrices whose rows split into 5 equal blocks; got shape \(24, 8\)"):
        Muon([{"params": [whole], "split": 5}])


def test_optimizer_set_state_round_trips_by_parameter():
    from physlm_graph.runtime.recipe import OptimizerSet

    torch.manual_seed(0)
    a, b, v = nn.Parameter(torch.randn(6, 4)), nn.Parameter(torch.randn(4, 4)), nn.Parameter(torch.randn(4))
    groups = [{"group": "m", "optimizer": "muon", "params": [a, b], "names": ["a", "b"], "lr": 0.02, "weight_decay": 0.0},
              {"group": "v", "optimizer": "adamw", "params": [v], "names": ["v"], "lr": 0.01, "weight_decay": 0.0}]
    opts = OptimizerSet(make_optimizers(groups))
    for p in (a, b, v):
        p.grad = torch.randn_like(p)
    opts.step()
    sd = opts.state_dict()
    assert sorted(sd["state"]) == [0, 1, 2] and [g["params"] for g in sd["param_groups"]] == [[0, 1], [2]]
    other = OptimizerSet(make_optimizers(groups))
    other.load_state_dict(sd)
    assert torch.equal(other.state[b]["momentum_buffer"], opts.state[b]["momentum_buffer"])
    assert torch.equal(other.state[v]["exp_avg_sq"], opts.state[v]["exp_avg_sq"])
    with pytest.raises(ValueError, match="the state has 1 param groups, the optimizers 2"):
        other.load_state_dict({"state": {}, "param_groups": sd["param_groups"][:1]})
    swapped = [{**g, "optimizer": "adamw"} for g in groups]  # the matrices' group moved from Muon to AdamW
    with pytest.raises(ValueError, match=r"^group 'm' was saved with other settings \(.*betas.*\) than group 'm' has: "
                                         r"the optimizers changed$"):
        OptimizerSet(make_optimizers(swapped)).load_state_dict(sd)


def test_the_trainers_schedule_wsd_with_and_without_groups():
    from physlm_graph._schema import TrainConfig
    from physlm_graph.runtime.step import scheduled_lr

    plain = TrainConfig(schedule="wsd", lr=0.5, warmup=2, min_lr=0.05, decay_frac=0.5)
    assert [scheduled_lr(plain, s, 10) for s in (0, 1, 2, 4, 5, 8)] == pytest.approx(
        [0.5 / 3, 1.0 / 3, 0.5, 0.5, 0.05 + 0.45 * 0.5 / 0.5, 0.05 + 0.45 * 0.2 / 0.5])
    groups = TrainConfig(schedule="wsd", warmup=0, optimizers=[
        {"name": "all", "params": ["**"], "optimizer": "adamw", "lr": 0.1}])
    assert [scheduled_lr(groups, s, 10) for s in (0, 2, 3, 9)] == pytest.approx([1.0, 1.0, 1.0, (1 - 0.9) / 0.7])
    cosine = TrainConfig(warmup=0, optimizers=[{"name": "all", "params": ["**"], "optimizer": "adamw", "lr": 0.1}])
    assert scheduled_lr(cosine, 10, 10) == pytest.approx(0.1)  # the default floor: a tenth of each group's lr


def test_muon_on_a_vector_or_an_unsplittable_matrix_is_named(model):
    rules = [GroupRule("all", ("**",), "muon", {"lr": 0.1})]
    with pytest.raises(ValueError, match=r"^optimizer group 'all': Muon takes 2-D matrices; it holds x0.weight \(64,\), "
                                         r"trunk.0.n1.weight \(64,\), .*, \.\.\. \(15 in all\)$") as err:
        select_groups(model, rules)
    assert err.value.rule == 0 and err.value.key == "shape"
    rules = [GroupRule("qkv", ("trunk.*.attn.qkv.weight",), "muon", {"lr": 0.1, "split": 5}),
             GroupRule("rest", ("{tok,x0,norm,head}.**", "trunk.*.{n1,n2,mlp}.**", "trunk.*.attn.proj.*",
                                "trunk.*.attn.qkv.bias"), "adamw", {"lr": 0.1})]
    with pytest.raises(ValueError, match=r"optimizer group 'qkv': Muon takes 2-D matrices whose rows split into 5 equal "
                                         r"blocks; it holds trunk.0.attn.qkv.weight \(192, 64\)") as err:
        select_groups(model, rules)
    assert err.value.key == "split"
