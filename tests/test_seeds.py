"""The seed zoo: every seed blueprint builds, its parameter count is the one documented in its
``about`` (and SEEDS.md where it lists one), and a shrunken copy trains and generates."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from physlm_graph import compile_blueprint

ROOT = Path(__file__).resolve().parents[1]
SEEDS = ROOT / "blueprints" / "seeds"
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare" / "input.txt"

# exact counts from `physlm-graph build` (vocab as published); see each blueprint's `about`
COUNTS = {
    "holographic-v2": 227_159_868,  # SEEDS.md §1.0: 227.16M (verified by instantiating the seed)
    "holographic-v2-fixed": 231_282_648,
    "ngt-25m": 25_591_432,  # README: "about 25.6M"
    "ngt-25m-fixed": 25_591_368,
    "ngt-shakespeare-char": 4_049_704,
    "brain-gpt-v1-small": 56_122_240,  # SEEDS.md 56.6M = this + 2 unused language adapters (524,288)
    "brain-gpt-v1-small-fixed": 56_124_928,
    "brain-gpt-v2": 58_316_292,
    "brain-gpt-v2-fixed": 58_474_692,
    "qllm": 76_991_732,
    "qllm-fixed": 76_991_684,
}

# small sizes that keep each architecture's structure (every block kind appears at least once)
TINY = {
    "holographic-v2": ["dim=32", "heads=2", "layers=1", "hidden=64", "context=32"],
    "ngt-25m": ["dim=32", "coord=8", "heads=2", "layers=1", "hidden=64", "context=32"],
    "ngt-shakespeare-char": ["dim=32", "coord=8", "heads=2", "layers=1", "hidden=64", "context=32"],
    "brain-gpt-v1-small": ["dim=64", "heads=2", "dendrites=2", "columns=4", "column_size=16", "layers=1", "context=32"],
    "brain-gpt-v2": ["dim=32", "heads=2", "layers=2", "context=32"],
    "qllm": ["dim=32", "heads=2", "layers=2", "hidden=64", "context=32", "base_dim=16", "memory=8"],
}


def _tiny(name: str) -> list[str]:
    return TINY[name.removesuffix("-fixed")] + ["train.seq_len=32"]


def test_every_seed_blueprint_is_listed():
    assert sorted(p.stem for p in SEEDS.glob("*.yaml")) == sorted(COUNTS)


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_seed_builds_on_meta_with_documented_count(name):
    cm = compile_blueprint(SEEDS / f"{name}.yaml", device="meta", build=False)
    assert cm.num_params == COUNTS[name]
    assert f"{COUNTS[name]:,}" in cm.blueprint["about"]  # the about states the exact count
    assert cm.train_config is not None


def test_published_counts_match_seeds_md():
    assert round(COUNTS["holographic-v2"] / 1e6, 2) == 227.16
    assert round(COUNTS["ngt-25m"] / 1e6, 1) == 25.6
    # Brain GPT V1 small: SEEDS.md's 56.6M instantiates two language adapters (2 x 512 x 256 x 2)
    # that run only when a caller passes language_id; the graph holds no unused nodes
    assert round((COUNTS["brain-gpt-v1-small"] + 2 * 2 * 512 * 256) / 1e6, 1) == 56.6


def test_faithful_seeds_that_leak_opt_in():
    for name in ("holographic-v2", "brain-gpt-v2"):
        cm = compile_blueprint(SEEDS / f"{name}.yaml", device="meta", build=False)
        assert any(n.get("allow_leak") for n in cm.graph["nodes"].values())
    for name in ("holographic-v2-fixed", "brain-gpt-v2-fixed"):
        cm = compile_blueprint(SEEDS / f"{name}.yaml", device="meta", build=False)
        assert not any(n.get("allow_leak") for n in cm.graph["nodes"].values())


def _train_and_generate(name: str, steps: int, tmp_path: Path) -> None:
    from physlm_graph.runtime.generate import generate
    from physlm_graph.runtime.train import train

    text = DATA.read_text(encoding="utf-8")[:20_000]
    data = tmp_path / "slice.txt"
    data.write_text(text, encoding="utf-8")
    out = tmp_path / name
    res = train(SEEDS / f"{name}.yaml", data=str(data), tokenizer="chars", steps=steps, overrides=_tiny(name),
                out_dir=out, device="cpu", seed=0, progress=False, batch_size=4, eval_every=steps, eval_iters=2,
                warmup=2, lr=1e-3, accumulate=1)
    assert res["steps"] == steps
    assert math.isfinite(res["final_loss"]) and math.isfinite(res["val_loss"])
    from physlm_graph.runtime.checkpoint import load_checkpoint

    ck = load_checkpoint(out / "last")
    prompt = ck.tokenizer.encode("ROMEO:")
    ids = generate(ck, prompt, max_new_tokens=12, temperature=0.8, seed=0)
    assert len(ids) == len(prompt) + 12
    assert isinstance(ck.tokenizer.decode(ids[len(prompt):]), str)
    return res


FAST = ["holographic-v2", "ngt-25m", "brain-gpt-v1-small", "brain-gpt-v2", "qllm",
        "holographic-v2-fixed", "ngt-25m-fixed", "brain-gpt-v1-small-fixed", "brain-gpt-v2-fixed", "qllm-fixed",
        "ngt-shakespeare-char"]


@pytest.mark.skipif(not DATA.is_file(), reason="needs ../shared/data/tinyshakespeare beside the repository")
@pytest.mark.parametrize("name", FAST)
def test_seed_smoke_trains_and_generates(name, tmp_path):
    _train_and_generate(name, 5, tmp_path)


@pytest.mark.slow
@pytest.mark.skipif(not DATA.is_file(), reason="needs ../shared/data/tinyshakespeare beside the repository")
@pytest.mark.parametrize("name", FAST)
def test_seed_trains_200_steps_without_nan(name, tmp_path):
    res = _train_and_generate(name, 200, tmp_path)
    assert res["val_loss"] < math.log(65)  # learned something beyond uniform over the characters
