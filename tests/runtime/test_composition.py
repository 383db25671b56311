"""Blueprint features x entry points: every cell honours the whole blueprint.

Rows: plain, growth, exits, growth + exits, extensions (tiny baby GPTs). Columns: ``train()``,
a one-variant ``ablate`` study (equal to ``train()``), resume across the growth boundary, two gloo
ranks under torchrun (slow), ``generate`` from the checkpoint, ``from_pretrained``. Growth must really grow (the stage history is in the
checkpoint), exits must be trained and logged (``exit/<point>/ce``).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from physlm_graph.runtime.checkpoint import load_checkpoint
from physlm_graph.runtime.train import train

ROOT = Path(__file__).resolve().parents[2]
BASE = yaml.safe_load((ROOT / "blueprints" / "baby-gpt.yaml").read_text(encoding="utf-8"))
BASE["params"].update(layers=2, dim=16, heads=2, context=16, dropout=0.1)
BASE["train"] = {"seq_len": 16, "fit_vocab": True}  # baby-gpt's vocab 65 -> the bytes tokenizer's 256
GROWTH = [{"until": 3, "params": {"layers": 1}}, {"params": {"layers": 2}, "grow": "zero_init"}]
EXITS = {"every": 1, "block": "trunk"}
EXTENSIONS = {"memory": {"use": "memory.hcw", "at": "trunk.*.ln2", "memory_size": 8, "memory_key_dim": 8}}
VARIANTS = {
    "plain": {},
    "growth": {"growth": GROWTH},
    "exits": {"exits": EXITS},
    "growth+exits": {"growth": GROWTH, "exits": EXITS},
    "extensions": {"extensions": EXTENSIONS},
}
RUN = dict(steps=6, batch_size=2, eval_every=3, eval_iters=1, log_every=1, warmup=1, progress=False, device="cpu")

pytestmark = pytest.mark.usefixtures("one_thread")


def variant(name: str) -> dict:
    d = copy.deepcopy(BASE)
    d.update(copy.deepcopy(VARIANTS[name]))
    return d


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n"
                    "ROMEO:\nBut, soft! what light through yonder window breaks?\n" * 40, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, text_file):
    """Each variant trained once, uninterrupted (``train()``), on demand."""
    done: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in done:
            out = tmp_path_factory.mktemp(name.replace("+", "_")) / "run"
            train(variant(name), data=str(text_file), out_dir=out, **RUN)
            done[name] = out
        return done[name]

    return get


def check_honoured(name: str, out: Path) -> None:
    """The run followed its blueprint: growth grew at step 3, exits were trained and logged."""
    state = json.loads((out / "last" / "trainer_state.json").read_text())
    metrics = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert state["step"] == 6 and all("loss" in r and "objective" in r for r in metrics)
    if "growth" in name:
        assert state["stage"] == 1 and [h["step"] for h in state["growth_history"]] == [3]
        assert [r["stage"] for r in metrics] == [0, 0, 0, 1, 1, 1]
    else:
        assert "growth_history" not in state
    exit_keys = {k for r in metrics for k in r if k.startswith("exit/")}
    if "exits" in name:
        # growth + exits: stage 0 has one layer, so no exit (the last layer is the final head's)
        with_exits = [r for r in metrics if r.get("stage", 1) >= 1]
        assert all(any(k.startswith("exit/") for k in r) for r in with_exits)
        assert all(r["objective"] > r["loss"] for r in with_exits)
    else:
        assert not exit_keys
    if name == "extensions":
        assert "trunk.0.memory" in dict(load_checkpoint(out / "last").model.module.named_modules())


@pytest.mark.parametrize("name", list(VARIANTS))
def test_train(name, runs):
    check_honoured(name, runs(name))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_ablate(name, runs, tmp_path, text_file):
    """A study of the variant runs it through the same trainer: the run honours the blueprint and
    ends with the same weights as ``train()`` with the same options."""
    from physlm_graph.runtime.study import run_study

    (tmp_path / "bp.yaml").write_text(yaml.safe_dump(variant(name), sort_keys=False), encoding="utf-8")
    study = tmp_path / "study.yaml"
    train_opts = {k: RUN[k] for k in ("batch_size", "eval_every", "eval_iters", "log_every", "warmup")}
    study.write_text(yaml.safe_dump({
        "study": "one", "base": "bp.yaml", "variants": [{"name": "v"}], "seeds": [1337],
        "budget": {"steps": RUN["steps"]}, "data": str(text_file), "tokenizer": "bytes", "train": train_opts,
    }, sort_keys=False), encoding="utf-8")
    res = run_study(study, out=tmp_path / "out", device="cpu", progress=False)
    assert res["ran"] == 1
    out = tmp_path / "out" / "runs" / "v" / "seed1337"
    check_honoured(name, out)
    ours, theirs = load_file(out / "last" / "model.safetensors"), load_file(runs(name) / "last" / "model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_resume_across_the_growth_boundary(name, runs, tmp_path, text_file):
    straight = runs(name)
    out = tmp_path / "run"
    first = train(variant(name), data=str(text_file), out_dir=out, stop_after=2, **RUN)
    assert first["steps"] == 2
    train(variant(name), data=str(text_file), out_dir=out, resume=True, **RUN)
    check_honoured(name, out)
    a = load_file(str(straight / "last" / "model.safetensors"))
    b = load_file(str(out / "last" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_generate(name, runs):
    from physlm_graph.runtime.generate import generate

    ck = load_checkpoint(runs(name) / "last")
    ids = generate(ck, ck.tokenizer.encode("ROMEO:"), max_new_tokens=4, temperature=0.0)
    assert len(ids) == len("ROMEO:") + 4
    if "exits" in name:
        from physlm_graph.runtime.early_exit import generate_with_exits

        ids2, stats = generate_with_exits(ck.model, ck.tokenizer.encode("ROMEO:"), max_new_tokens=4, threshold=2.0)
        assert ids2 == ids and sum(stats.counts) == 4  # a threshold no rule reaches: the full model's tokens


@pytest.mark.parametrize("name", list(VARIANTS))
def test_from_pretrained(name, runs):
    from physlm_graph.hf import PhysLMForCausalLM

    folder = runs(name) / "last"
    model = PhysLMForCausalLM.from_pretrained(str(folder))
    ck = load_checkpoint(folder)
    x = torch.randint(0, ck.tokenizer.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(x).logits, ck.model.module(x)["logits"])
    if "growth" in name:
        assert model.config.growth_stage == 1


@pytest.mark.slow
@pytest.mark.parametrize("name", list(VARIANTS))
def test_two_gloo_ranks(name, tmp_path, text_file):
    src = tmp_path / "variant.yaml"
    src.write_text(yaml.safe_dump(variant(name), sort_keys=False), encoding="utf-8")
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "physlm_graph", "train", str(src), "--data", str(text_file), "--out", str(out),
           "--device", "cpu", "--no-progress", "--gpus", "2", "--steps", "6", "--batch-size", "2",
           "--set", "train.eval_every=3", "--set", "train.eval_iters=1", "--set", "train.log_every=1",
           "--set", "train.warmup=1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "2 processes (ddp)" in proc.stdout
    check_honoured(name, out)


def test_metric_names_say_what_they_are(tmp_path, text_file, capsys):
    """`loss` is the final cross-entropy, each auxiliary term is `aux/<name>` (unweighted), the
    optimized total is `objective`, and the summary lists the terms with their weights."""
    d = variant("exits")
    d["blocks"]["gpt_block"]["nodes"]["attn"] = {"use": "attention.resonance", "in": "ln1", "num_heads": 2,
                                                 "dropout": 0.0, "mode": "fixed"}
    d["losses"] = {"entropy": {"from": "trunk.*.attn.entropy", "weight": 0.01}}
    out = tmp_path / "run"
    train(d, data=str(text_file), out_dir=out, **{**RUN, "steps": 3})
    printed = capsys.readouterr().out
    assert "loss + 0.01 x aux/entropy + 1 x exit/trunk.0/ce" in printed, printed
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        assert {"loss", "objective", "aux/entropy", "exit/trunk.0/ce"} <= set(r) and "ce" not in r and "entropy" not in r
        assert r["objective"] == pytest.approx(r["loss"] + 0.01 * r["aux/entropy"] + r["exit/trunk.0/ce"], rel=1e-5)
    assert f"train loss {rows[-1]['loss']:.4f}" in printed  # the printed train loss is the final cross-entropy


def test_ablate_grows_the_growth_variant(tmp_path, text_file):
    """A study of the growth blueprint against the same with `remove: [growth]`: the grown run
    records its stages and the two runs differ."""
    from physlm_graph.runtime.study import run_study

    (tmp_path / "growth.yaml").write_text(yaml.safe_dump(variant("growth"), sort_keys=False), encoding="utf-8")
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump({
        "study": "growth-vs-fixed", "base": "growth.yaml",
        "variants": [{"name": "grown"}, {"name": "fixed", "remove": ["growth"]}],
        "seeds": [0], "budget": {"steps": 6}, "data": str(text_file), "tokenizer": "chars",
        "train": {"batch_size": 2, "eval_every": 3, "eval_iters": 1, "warmup": 1},
    }, sort_keys=False), encoding="utf-8")
    res = run_study(study, out=tmp_path / "out", device="cpu", progress=False)
    assert res["ran"] == 2
    runs = {n: tmp_path / "out" / "runs" / n / "seed0" for n in ("grown", "fixed")}
    grown = json.loads((runs["grown"] / "last" / "trainer_state.json").read_text())
    fixed = json.loads((runs["fixed"] / "last" / "trainer_state.json").read_text())
    assert [h["stage"] for h in grown["growth_history"]] == [1] and "growth_history" not in fixed
    assert grown["last_val_loss"] != fixed["last_val_loss"]
