"""The study's table from run results (no training): each metric, the statistics against the
baseline, one seed reported as undefined, missing runs failing the study unless allowed, the
CSV columns, and curves with intervals."""

from __future__ import annotations

import csv
import json
import math
import types
from pathlib import Path

import pytest

from physlm_graph._study import StudyError, StudySpec, load_study
from physlm_graph.cli import main
from physlm_graph.runtime import study as study_mod
from physlm_graph.runtime.stats import welch
from physlm_graph.runtime.study import StudyRuns, run_study
from physlm_graph.runtime.study_report import aggregate, run_metric, write_reports

from ._study_fixtures import DATA, tiny_study

pytestmark = pytest.mark.skipif(not DATA.is_file(), reason="needs ../shared/data/tinyshakespeare")


def _result(variant: str, seed: int, losses: list[float], *, fpt: float = 10.0, tokens_per_eval: int = 100) -> dict:
    curve = [[i + 1, (i + 1) * tokens_per_eval, x] for i, x in enumerate(losses)]
    return {"variant": variant, "seed": seed, "key": f"{variant}{seed}", "params": 100, "flops_per_token": fpt,
            "steps": len(losses), "tokens": len(losses) * tokens_per_eval, "val_loss": losses[-1],
            "best_val_loss": min(losses), "tokens_per_s": 1.0, "peak_memory_bytes": 2**20,
            "peak_memory_kind": "process peak RSS", "curve": curve, "growth_history": []}


@pytest.fixture
def runs(tmp_path):
    path = tiny_study(tmp_path, variants=[{"name": "a"}, {"name": "b"}, {"name": "c"}], seeds=[0, 1, 2], steps=3)
    spec, root = load_study(path)
    (tmp_path / "out").mkdir()
    return StudyRuns(StudySpec(spec, root, path), tmp_path / "out")


def test_metrics_of_one_run():
    r = _result("a", 0, [4.0, 3.0, 2.5, 2.4])  # FLOPs at the evaluations: 1000, 2000, 3000, 4000
    assert run_metric("final", r, common_flops=0, target=0) == 2.4
    assert run_metric("best", _result("a", 0, [4.0, 2.0, 2.5]), common_flops=0, target=0) == 2.0
    assert run_metric("loss_at_flops", r, common_flops=2500.0, target=0) == pytest.approx(2.75)
    assert run_metric("flops_to_baseline", r, common_flops=0, target=2.8) == pytest.approx(2000 + 1000 * 0.2 / 0.5)
    assert math.isnan(run_metric("flops_to_baseline", r, common_flops=0, target=1.0))  # never reached


def test_table_against_the_baseline(runs):
    a = [[4.0, 3.0, x] for x in (2.50, 2.52, 2.49)]
    b = [[4.0, 3.1, x] for x in (2.70, 2.68, 2.75)]
    results = ([_result("a", s, c) for s, c in enumerate(a)] + [_result("b", s, c) for s, c in enumerate(b)]
               + [_result("c", 0, [4.0, 3.0, 2.6])])  # c has one seed
    rows = {r["variant"]: r for r in aggregate(runs, results, metric="final", baseline="a")}
    w = welch([2.50, 2.52, 2.49], [2.70, 2.68, 2.75])
    assert rows["b"]["diff_vs_baseline"] == pytest.approx(w.diff) and rows["b"]["p_value"] == pytest.approx(w.p_value)
    assert rows["b"]["ci95_low"] < rows["b"]["mean"] < rows["b"]["ci95_high"] and rows["b"]["seeds_needed"] >= 2
    assert rows["a"]["baseline"] and rows["a"]["p_value"] is None
    c = rows["c"]
    assert (c["n"], c["std"], c["ci95_low"], c["p_value"], c["seeds_needed"]) == (1, None, None, None, None)

    write_reports(runs, list(rows.values()), results)
    csv_rows = {r["variant"]: r for r in csv.DictReader(open(runs.out / "results.csv", encoding="utf-8"))}
    assert {"p_value", "ci95_low", "ci95_high", "seeds_needed", "diff_vs_baseline"} <= set(csv_rows["a"])
    assert csv_rows["c"]["std"] == csv_rows["c"]["ci95_low"] == csv_rows["c"]["p_value"] == ""
    md = (runs.out / "results.md").read_text(encoding="utf-8")
    assert "2.6000 (1 seed: std, CI undefined)" in md and "± 0.0000" not in md
    assert (runs.out / "curves.png").read_bytes()[:4] == b"\x89PNG"

    # FLOPs to reach a's mean final loss (2.5033): b never gets there, nor a's seed that ended at 2.52
    rows = {r["variant"]: r for r in aggregate(runs, results, metric="flops_to_baseline", baseline="a")}
    assert rows["b"]["n"] == 0 and rows["a"]["n"] == 2 and rows["a"]["seeds"] == 3


def test_loss_at_equal_flops_uses_the_smallest_budget(runs):
    # b costs twice the FLOPs per token: compared at a's total FLOPs, its loss halfway along its curve
    results = [_result("a", 0, [3.0, 2.0]), _result("b", 0, [3.0, 1.0], fpt=20.0)]
    rows = {r["variant"]: r for r in aggregate(runs, results, metric="loss_at_flops", baseline="a")}
    assert rows["a"]["mean"] == 2.0  # a's budget: 2000 FLOPs, its last evaluation
    assert rows["b"]["mean"] == 3.0  # b reaches 2000 FLOPs at its first evaluation


def _fake_run_one(fail: set):
    """Stands in for training: writes a done.json of the run's definition, or raises."""
    def run_one(runs, name, seed, **_kw):
        if (name, seed) in fail:
            raise study_mod.StudyError(f"{name} seed {seed} exploded")
        r = {**_result(name, seed, [3.0, 2.0 + 0.01 * seed]), "key": runs.key(name, seed)}
        (runs.run_dir(name, seed) / "done.json").write_text(json.dumps(r), encoding="utf-8")
        return r
    return run_one


def test_missing_runs_fail_the_table_unless_allowed(tmp_path, monkeypatch, capsys):
    path = tiny_study(tmp_path, variants=[{"name": "a"}, {"name": "b"}], seeds=[0, 1], steps=2)
    monkeypatch.setattr(study_mod, "run_one", _fake_run_one({("b", 1)}))
    with pytest.raises(StudyError, match=r"1 of 4 runs missing or failed: b seed 1 \(study error: b seed 1 exploded\)"):
        run_study(path, out=tmp_path / "out", device="cpu", progress=False)
    assert not (tmp_path / "out" / "results.csv").exists()
    res = run_study(path, out=tmp_path / "out", device="cpu", progress=False, allow_missing=True)
    assert res["ran"] == 1 and res["missing"] == ["b seed 1 (study error: b seed 1 exploded)"]
    rows = {r["variant"]: r for r in csv.DictReader(open(tmp_path / "out" / "results.csv", encoding="utf-8"))}
    assert rows["b"]["seeds"] == "1" and rows["b"]["p_value"] == ""
    assert "**Incomplete**" in (tmp_path / "out" / "results.md").read_text(encoding="utf-8")
    # the CLI says the same with exit 2
    assert main(["ablate", str(path), "--out", str(tmp_path / "out"), "--device", "cpu", "--json"]) == 2
    assert "--allow-missing" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--address", "x:1"], "--address, --cpus-per-run, --gpus-per-run and --max-retries are for --backend ray"),
    (["--backend", "ray", "--workers", "2"], "--workers is for --backend local"),
    (["--backend", "ray", "--device", "cpu", "--gpus-per-run", "1"], "--device cpu with --gpus-per-run 1"),
    (["--backend", "ray", "--gpus-per-run", "1.5"], "--gpus-per-run above 1 must be a whole number, got 1.5"),
])
def test_backend_options_are_checked(tmp_path, capsys, argv, message):
    path = tiny_study(tmp_path, variants=[{"name": "a"}], seeds=[0], steps=2)
    assert main(["ablate", str(path), "--out", str(tmp_path / "out"), *argv]) == 2
    assert message in capsys.readouterr().err


def test_baseline_must_be_a_variant(tmp_path):
    path = tiny_study(tmp_path, variants=[{"name": "a"}, {"name": "b"}], seeds=[0], steps=2, baseline="z")
    with pytest.raises(StudyError, match="baseline 'z' is not a variant; the variants are: a, b"):
        load_study(path)


def test_the_study_baseline_and_metric_reach_the_table(tmp_path, monkeypatch):
    path = tiny_study(tmp_path, variants=[{"name": "a"}, {"name": "b"}], seeds=[0, 1], steps=2, baseline="b")
    monkeypatch.setattr(study_mod, "run_one", _fake_run_one(set()))
    res = run_study(path, out=tmp_path / "out", device="cpu", progress=False, metric="best")
    assert res["baseline"] == "b" and [r["baseline"] for r in res["variants"]] == [False, True]
    assert all(r["metric"] == "best" for r in res["variants"])
    with pytest.raises(StudyError, match="unknown metric 'worst'"):
        run_study(path, out=tmp_path / "out", metric="worst")


def test_the_cli_table_with_one_seed_says_undefined(tmp_path, monkeypatch, capsys):
    path = tiny_study(tmp_path, variants=[{"name": "a"}, {"name": "b"}], seeds=[0], steps=2)
    monkeypatch.setattr(study_mod, "run_one", _fake_run_one(set()))
    assert main(["ablate", str(path), "--out", str(tmp_path / "out"), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "undefined (1 seed)" in out and "± 0.0000" not in out and "baseline" in out
    md = (tmp_path / "out" / "results.md").read_text(encoding="utf-8")
    assert md.count("(1 seed: std, CI undefined)") == 2 and "| undefined | undefined |" in md


def test_provenance_names_the_commit_torch_and_device():
    import subprocess

    import torch

    import physlm_graph
    from physlm_graph.runtime.study import provenance

    p = provenance(blueprint_hash="00c226927c3f579b", seed=3, device=torch.device("cpu"))
    assert (p["blueprint_hash"], p["seed"], p["device"]) == ("00c226927c3f579b", 3, "cpu")
    assert (p["torch_version"], p["package_version"]) == (torch.__version__, physlm_graph.__version__)
    root = Path(__file__).resolve().parents[2]
    head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        assert p["git_commit"] == head.stdout.strip() and isinstance(p["git_dirty"], bool)
    else:  # not a git checkout: said, not guessed
        assert p["git_commit"] is None
