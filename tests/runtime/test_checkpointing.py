"""``train.checkpointing``: recomputing blocks (all, every k-th) or chosen components in the
backward pass changes memory, never the numbers: the same weights, bit for bit, as without it;
and what cannot be honoured is refused before step 0."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from physlm_graph import compile_blueprint
from physlm_graph._errors import PhysLMError
from physlm_graph.runtime.train import train

ROOT = Path(__file__).resolve().parents[2]
BASE = yaml.safe_load((ROOT / "blueprints" / "baby-gpt.yaml").read_text(encoding="utf-8"))
BASE["params"].update(layers=3, dim=16, heads=2, context=16, dropout=0.0)
BASE["train"] = {"seq_len": 16, "fit_vocab": True}  # baby-gpt's vocab 65 -> the bytes tokenizer's 256
RUN = dict(steps=4, batch_size=2, eval_every=4, eval_iters=1, log_every=1, warmup=1, progress=False, device="cpu")

pytestmark = pytest.mark.usefixtures("one_thread")


def with_checkpointing(spec) -> dict:
    d = copy.deepcopy(BASE)
    d["train"]["checkpointing"] = spec
    return d


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text("To be, or not to be, that is the question:\n" * 60, encoding="utf-8")
    return path


def weights(out: Path) -> dict:
    return load_file(str(out / "last" / "model.safetensors"))


def test_same_weights_with_and_without_checkpointing(tmp_path, text_file, capsys):
    train(with_checkpointing("none"), data=str(text_file), out_dir=tmp_path / "plain", **RUN)
    ref = weights(tmp_path / "plain")
    for i, spec in enumerate(["blocks", {"every": 2}, {"nodes": ["trunk.*.attn", "trunk.0.mlp"]}]):
        capsys.readouterr()
        out = tmp_path / f"ck{i}"
        train(with_checkpointing(spec), data=str(text_file), out_dir=out, **RUN)
        printed = capsys.readouterr().out
        got = weights(out)
        assert got.keys() == ref.keys(), spec
        assert all((got[k] == ref[k]).all() for k in ref), spec
        n = {0: 3, 1: 1, 2: 4}[i]
        assert f"checkpointing" in printed and f"{n} " in printed.split("checkpointing", 1)[1][:40], spec


@pytest.mark.parametrize("spec,message", [
    ({"nodes": ["trunk.*.atn"]}, "'trunk.*.atn' matches no node"),
    ({"every": 4}, "only 3 block instances"),
    ({"every": 0}, "whole number >= 1"),
    ({"every": 2.0}, "whole number >= 1"),
    ("all", "expected none, blocks"),
    ({"nodes": []}, "non-empty list"),
    ({"blocks": True}, "expected none, blocks"),
])
def test_refused_at_compile_time(spec, message):
    with pytest.raises(PhysLMError, match=message.replace("(", r"\(").replace("*", r"\*")):
        compile_blueprint(with_checkpointing(spec), device="meta", build=False)


def test_refused_with_exits_or_growth():
    d = with_checkpointing("blocks")
    d["exits"] = {"every": 1, "block": "trunk"}
    with pytest.raises(PhysLMError, match="not supported together with early exits"):
        compile_blueprint(d, device="meta", build=False)
    d = with_checkpointing("blocks")
    d["growth"] = [{"until": 2, "params": {"layers": 1}}, {"params": {"layers": 3}, "grow": "zero_init"}]
    with pytest.raises(PhysLMError, match="not supported together with growth"):
        compile_blueprint(d, device="meta", build=False)
