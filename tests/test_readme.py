"""The README's main-job command runs (shortened here; the full 2000-step run is slow-marked)
and every physlm-graph command it shows parses."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from physlm_graph.cli import main

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()
DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


def main_job() -> list[list[str]]:
    """The physlm-graph commands of the README's set-up-and-run line, in order."""
    block = re.search(r"Set up and run the main job.*?```bash\n(.*?)\n```", README, re.S)
    assert block, "README has no main-job block"
    parts = [p.strip() for p in block.group(1).split("&&")]
    assert parts[0] == "pip install torch==2.13.0"
    return [shlex.split(p)[1:] for p in parts if p.startswith("physlm-graph ")]


def test_readme_has_exactly_the_two_commands():
    blocks = re.findall(r"```bash\n(.*?)\n```", README, re.S)
    assert len(blocks) == 2
    assert blocks[1] == "python -m pytest"
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1] == blocks[1]


@pytest.mark.skipif(not DATA.exists(), reason="needs ../shared/data")
def test_main_job_runs_shortened(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    train, generate = main_job()
    out = tmp_path / "run"
    train = [a if a != "runs/baby-gpt-cpu" else str(out) for a in train]
    assert main(train + ["--steps", "30", "--set", "train.eval_every=15", "--no-progress"]) == 0
    generate = [a if a != "runs/baby-gpt-cpu" else str(out) for a in generate]
    assert main(generate + ["--max-new-tokens", "20", "--seed", "0"]) == 0
    assert capsys.readouterr().out.count("ROMEO:") >= 1


@pytest.mark.slow
@pytest.mark.skipif(not DATA.exists(), reason="needs ../shared/data")
def test_main_job_full_reaches_nanogpt_quality(tmp_path, monkeypatch):
    import json

    monkeypatch.chdir(ROOT)
    train, _ = main_job()
    out = tmp_path / "run"
    train = [a if a != "runs/baby-gpt-cpu" else str(out) for a in train]
    assert main(train + ["--no-progress"]) == 0
    state = json.loads((out / "best" / "trainer_state.json").read_text())
    assert state["best_val_loss"] <= 1.90
