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
