"""Every broken blueprint in tests/assets/blueprints/invalid/ gives exactly its expected message.

Each ``NAME.yaml`` has a ``NAME.expected`` holding the exact text `physlm-graph validate` prints
on stderr (run from that folder, so paths are bare file names); the exit code must be 2 and no
traceback may appear.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from physlm_graph.cli import main

INVALID = Path(__file__).parents[1] / "assets" / "blueprints" / "invalid"
CASES = sorted(INVALID.glob("*.yaml"))


def test_there_are_at_least_25_cases():
    assert len(CASES) >= 25
    assert all(p.with_suffix(".expected").exists() for p in CASES)


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_validate_reports_exact_message(path, capsys, monkeypatch):
    monkeypatch.chdir(INVALID)
    code = main(["validate", path.name])
    out = capsys.readouterr()
    assert code == 2
    assert "Traceback" not in out.err + out.out
    assert out.err == path.with_suffix(".expected").read_text()
