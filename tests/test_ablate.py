"""`physlm-graph ablate`: studies validate with located errors, run end to end, and resume."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from physlm_graph._study import StudyError, load_study, run_study
from physlm_graph.cli import main

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "examples" / "ablations" / "tiny-smoke.yaml"
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


@pytest.mark.parametrize("name", ["tiny-smoke", "ngt", "seed-zoo"])
def test_example_studies_validate_and_compile(name, tmp_path):
    from physlm_graph._study import Plan

    study, root = load_study(ROOT / "examples" / "ablations" / f"{name}.yaml")
    plan = Plan(study, root, tmp_path)
    assert set(plan.models) == {v.name for v in study.variants}
    assert all(s >= 1 for s in plan.steps.values())


def test_study_errors_are_located(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("study: bad\nbase: nope.yaml\nvariants:\n  - {name: a, sett: {}}\n  - {name: a}\n"
                   "budget: {steps: 1, tokens: 5}\ndata: x.txt\n", encoding="utf-8")
    with pytest.raises(StudyError) as err:
        load_study(bad)
    text = str(err.value)
    assert "bad.yaml:4:" in text and "unknown key 'sett'" in text
    assert "give exactly one of `steps` or `tokens`" in text
    dup = tmp_path / "dup.yaml"
    dup.write_text("study: dup\nbase: nope.yaml\nvariants: [{name: a}, {name: a}]\nbudget: {steps: 1}\n"
                   "data: x.txt\n", encoding="utf-8")
    with pytest.raises(StudyError, match="variant names must be unique; repeated: a"):
        load_study(dup)


def test_missing_base_is_located(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("study: bad\nbase: nope.yaml\nvariants: [{name: a}]\nbudget: {steps: 1}\ndata: x.txt\n",
                   encoding="utf-8")
    with pytest.raises(StudyError, match=r"bad.yaml:2:\d+: base: no such blueprint 'nope.yaml'"):
        load_study(bad)
    assert main(["ablate", str(bad)]) == 2


@pytest.mark.skipif(not DATA.is_file(), reason="needs ../shared/data/tinyshakespeare beside the repository")
def test_tiny_smoke_runs_end_to_end_and_resumes(tmp_path):
    out = tmp_path / "study"
    res = run_study(SMOKE, out=out, device="cpu", progress=False)
    assert res["ran"] == 2 and res["skipped"] == 0
    for f in ("results.md", "results.csv", "runs.csv", "curves.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader(open(out / "results.csv", encoding="utf-8")))
    assert [r["variant"] for r in rows] == ["layernorm", "rmsnorm"]
    assert rows[0]["diff"] == "identical" and rows[1]["diff"].startswith("2 changed")
    assert all(float(r["val_loss_mean"]) > 0 and int(r["steps"]) == 20 for r in rows)
    md = (out / "results.md").read_text(encoding="utf-8")
    assert "| layernorm |" in md and "| rmsnorm |" in md and "curves.png" in md
    done = out / "runs" / "rmsnorm" / "seed0" / "done.json"
    stamp = done.stat().st_mtime_ns
    result = json.loads(done.read_text(encoding="utf-8"))
    assert result["curve"] and result["curve"][-1][0] == 20

    # the second invocation re-runs nothing and rewrites the same table
    assert main(["ablate", str(SMOKE), "--out", str(out), "--device", "cpu", "--json"]) == 0
    assert done.stat().st_mtime_ns == stamp
    again = list(csv.DictReader(open(out / "results.csv", encoding="utf-8")))
    assert again == rows


@pytest.mark.skipif(not DATA.is_file(), reason="needs ../shared/data/tinyshakespeare beside the repository")
def test_interrupted_run_resumes_from_last(tmp_path):
    from physlm_graph._study import Plan, run_one

    study, root = load_study(SMOKE)
    plan = Plan(study, root, tmp_path)
    from physlm_graph.runtime.train import train

    folder = plan.run_dir("layernorm", 0)
    folder.mkdir(parents=True)
    (folder / "variant.yaml").write_text(json.dumps(plan.variants["layernorm"]), encoding="utf-8")
    train(str(folder / "variant.yaml"), data=plan.data, tokenizer=plan.tokenizer, steps=20, overrides=plan.overrides,
          out_dir=folder, device="cpu", seed=0, progress=False, stop_after=10, cache_dir=tmp_path / "cache",
          **study.train)
    res = run_one(plan, "layernorm", 0, device="cpu", progress=False)
    assert res["resumed"] is True and res["steps"] == 20
