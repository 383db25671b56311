"""benchmarks/growth.py's reading of saved outputs: where a grown run first reaches the fixed run's
final loss, per seed and on the seed-averaged curves (the figures quoted for issue #7)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def growth():
    spec = importlib.util.spec_from_file_location("growth_bench", ROOT / "benchmarks" / "growth.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _log(path: Path, fixed: list[float], grown: list[float]) -> Path:
    lines = []
    for run in (fixed, grown):
        lines.append("train baby-gpt")
        lines += [f"step {25 * (i + 1)}: train loss 9.0000, val loss {v:.4f}" for i, v in enumerate(run)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _run(growth, capsys, tmp_path, *logs: Path) -> list[str]:
    data = tmp_path / "data.txt"
    data.write_text("abc")
    argv = ["--small", "--steps", "100", "--grow", "stack", "--bounds", "0.1,0.2", "--data", str(data),
            "--from-log", *map(str, logs)]
    assert growth.main(argv) == 0
    return capsys.readouterr().out.splitlines()


def test_per_seed_and_averaged_reach(growth, capsys, tmp_path):
    # seed a reaches its fixed run's 2.00 at step 75; seed b never goes below its 2.10 before step 100
    a = _log(tmp_path / "a.txt", [3.0, 2.5, 2.2, 2.0], [3.2, 2.6, 1.99, 1.9])
    b = _log(tmp_path / "b.txt", [3.0, 2.5, 2.2, 2.1], [3.2, 2.6, 2.15, 2.11])
    out = _run(growth, capsys, tmp_path, a, b)
    size = {k: dict(v) for k, v in growth.SMALL.items()}
    size["train"]["steps"] = 100
    tokens = size["train"]["batch_size"] * size["train"]["seq_len"]
    fixed = growth.flops_per_step(growth.overrides(size, None), 100, tokens)
    grown = growth.flops_per_step(growth.overrides(size, growth.schedule(100, "stack", fractions=(0.1, 0.2))),
                                  100, tokens)
    assert sum(grown) < sum(fixed)  # the grown run spends less: its first steps have 2 and 4 layers
    frac_75 = sum(grown[:75]) / sum(fixed)
    assert any("at step 75 " in line and f"= {frac_75:.0%} of" in line for line in out), out
    assert any("not at or below it by step 100" in line for line in out), out
    summary = next(line for line in out if line.startswith("2 outputs:"))
    assert f"{frac_75:.0%}, not reached" in summary and f"median {frac_75:.1%}" in summary
    # averaged: fixed final (2.0 + 2.1) / 2 = 2.05; grown (1.99 + 2.15) / 2 = 2.07 at 75, 2.005 at 100
    averaged = next(line for line in out if line.startswith("seed-averaged"))
    assert "fixed final val loss 2.0500" in averaged and f"at step 100: {sum(grown) / sum(fixed):.1%}" in averaged


def test_a_cut_fixed_run_is_refused(growth, capsys, tmp_path):
    cut = _log(tmp_path / "cut.txt", [3.0, 2.5], [3.2])
    data = tmp_path / "data.txt"
    data.write_text("abc")
    assert growth.main(["--small", "--steps", "100", "--data", str(data), "--from-log", str(cut)]) == 2
    assert "needs a complete fixed run of 100 steps" in capsys.readouterr().err


def test_runs_apart_join_into_a_readable_log(growth, capsys, tmp_path):
    """--runs fixed and --runs grown as two processes (here two calls): joined, --from-log reads them."""
    data = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
    if not data.is_file():
        pytest.skip("no tiny Shakespeare beside the checkout")
    common = ["--small", "--steps", "20", "--grow", "stack", "--bounds", "0.1,0.2", "--data", str(data),
              "--device", "cpu"]
    outs = []
    for run in ("fixed", "grown"):
        assert growth.main([*common, "--runs", run]) == 0
        outs.append(capsys.readouterr().out)
        assert "one kind of run only: no table" in outs[-1] and "┃ run" not in outs[-1]
    joined = tmp_path / "joined.txt"
    joined.write_text("".join(outs))
    runs = growth.read_log(joined)
    assert len(runs) == 2 and runs[0][-1][0] == 20 and runs[1][-1][0] == 20
    assert growth.main([*common, "--from-log", str(joined)]) == 0
    assert "grown run evaluated up to step 20 of 20" in capsys.readouterr().out
