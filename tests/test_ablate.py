"""`physlm-graph ablate`: studies validate with located errors, run every variant through `train()`
(growth grows), are keyed by what defines a run, run end to end, and resume."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from physlm_graph._study import StudyError, StudySpec, load_study
from physlm_graph.cli import main
from physlm_graph.runtime.study import StudyRuns, run_one, run_study

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "examples" / "ablations" / "tiny-smoke.yaml"
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


@pytest.mark.parametrize("name", ["tiny-smoke", "ngt", "seed-zoo"])
def test_example_studies_validate_and_compile(name, tmp_path):
    study, root = load_study(ROOT / "examples" / "ablations" / f"{name}.yaml")
    runs = StudyRuns(StudySpec(study, root), tmp_path)
    assert set(runs.variants) == {v.name for v in study.variants}
    assert all(s >= 1 for s in runs.steps.values())
    keys = {runs.key(n, s) for n, s in runs.runs()}
    assert len(keys) == len(runs.runs())  # every run its own definition


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
    taken = tmp_path / "taken.yaml"
    taken.write_text("study: t\nbase: nope.yaml\nvariants: [{name: a}]\ntrain: {data: x.txt, lr: 0.1}\n",
                     encoding="utf-8")
    with pytest.raises(StudyError, match="`train` may not set data: the study says it with `budget`, `seeds`, "
                                         "`data` and `tokenizer`"):
        load_study(taken)


def test_a_blueprint_given_to_ablate_says_so(capsys):
    bp = ROOT / "examples" / "growth" / "tiny-growth.yaml"
    assert main(["ablate", str(bp)]) == 2
    err = capsys.readouterr().err
    assert err == (f"study error: {bp}:1:1: this is a blueprint, not an ablation study file\n"
                   f"  fix: train it with `physlm-graph train {bp}` or check it with `physlm-graph validate {bp}`; "
                   "a study file has `study:`, `base:` and `variants:` (docs/ablations.md)\n")


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
    assert json.loads(done.read_text(encoding="utf-8"))["key"] == result["key"]
    again = list(csv.DictReader(open(out / "results.csv", encoding="utf-8")))
    assert again == rows


# ------------------------------------------------------------------ tiny studies of tiny blueprints
needs_data = pytest.mark.skipif(not DATA.is_file(), reason="needs ../shared/data/tinyshakespeare beside the repository")

GROWTH = """\
growth:
  - {until: 3, params: {layers: 1}}
  - {until: 6, params: {layers: 2}, grow: zero_init}
  - {params: {layers: 3}, grow: zero_init, where: start}
"""


def _blueprint(folder: Path, name: str, *, growth: bool) -> Path:
    """A 3-layer baby GPT of width 16 whose train: section names the data (a slice of Shakespeare
    in data/, relative to the blueprint) and the chars tokenizer; optionally growing 1 -> 2 -> 3."""
    (folder / "data").mkdir(exist_ok=True)
    (folder / "data" / "text.txt").write_text(DATA.read_text(encoding="utf-8")[:40_000], encoding="utf-8")
    path = folder / "blueprints" / f"{name}.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(f"physlm: 1\nextends: {ROOT / 'blueprints' / 'baby-gpt.yaml'}\nname: {name}\n"
                    "params: {vocab: 65, dim: 16, heads: 2, layers: 3, context: 16, dropout: 0.0}\n"
                    + (GROWTH if growth else "")
                    + "train: {data: ../data/text.txt, tokenizer: chars, steps: 100, batch_size: 2, seq_len: 16, "
                      "warmup: 1, eval_every: 4, eval_iters: 1}\n", encoding="utf-8")
    return path


def _study(path: Path, body: str) -> Path:
    path.write_text(body, encoding="utf-8")
    return path


@needs_data
def test_growth_study_grows_and_uses_the_blueprints_train_defaults(tmp_path):
    """The study of a growth blueprint against itself without growth: the grown run goes through
    stages 1 and 2 (its history says where), the losses differ, and with no data or tokenizer in
    the study both runs train on the blueprint's train.data with its chars tokenizer."""
    bp = _blueprint(tmp_path, "grow", growth=True)
    study = _study(tmp_path / "study.yaml", f"study: growth-vs-fixed\nbase: {bp.relative_to(tmp_path)}\n"
                   "variants:\n  - name: grown\n  - name: fixed\n    remove: [growth]\nbudget: {steps: 8}\n")
    res = run_study(study, out=tmp_path / "out", device="cpu", progress=False)
    assert res["ran"] == 2
    grown, fixed = (json.loads((tmp_path / "out" / "runs" / n / "seed0" / "done.json").read_text(encoding="utf-8"))
                    for n in ("grown", "fixed"))
    assert [(h["stage"], h["step"], h["new_instances"]) for h in grown["growth_history"]] == [
        (1, 3, ["trunk.1"]), (2, 6, ["trunk.0"])]
    assert fixed["growth_history"] == []
    assert grown["params"] == fixed["params"]  # both end with 3 layers
    assert grown["val_loss"] != fixed["val_loss"]
    assert grown["steps"] == fixed["steps"] == 8
    state = json.loads((tmp_path / "out" / "runs" / "grown" / "seed0" / "last" / "trainer_state.json")
                       .read_text(encoding="utf-8"))
    assert state["stage"] == 2
    md = (tmp_path / "out" / "results.md").read_text(encoding="utf-8")
    assert "| 0 -> 1 @3 -> 2 @6 |" in md and "growth removed" in md
    for r in (grown, fixed):
        assert r["data"] == str(tmp_path / "data" / "text.txt") and r["tokenizer"] == "chars"
    tok = json.loads((tmp_path / "out" / "runs" / "fixed" / "seed0" / "last" / "tokenizer" / "physlm_tokenizer.json")
                     .read_text(encoding="utf-8"))
    assert tok["kind"] == "chars"


def _keyed_study(tmp_path: Path, steps: int, b_dim: int) -> Path:
    bp = _blueprint(tmp_path, "plain", growth=False)
    return _study(tmp_path / "study.yaml", f"study: keyed\nbase: {bp}\nvariants:\n  - name: a\n  - name: b\n"
                  f"    set: {{params.dim: {b_dim}}}\nbudget: {{steps: {steps}}}\n"
                  "train: {eval_every: 3}\n")


def _done(out: Path, name: str, folder: str = "seed0") -> dict:
    return json.loads((out / "runs" / name / folder / "done.json").read_text(encoding="utf-8"))


@needs_data
def test_runs_are_keyed_by_their_definition(tmp_path):
    out = tmp_path / "out"
    first = run_study(_keyed_study(tmp_path, 3, 24), out=out, device="cpu", progress=False)
    assert first["ran"] == 2
    a0, b0 = _done(out, "a"), _done(out, "b")
    stamp = (out / "runs" / "a" / "seed0" / "done.json").stat().st_mtime_ns

    # unchanged: both reused, nothing trains, nothing moves
    again = run_study(_keyed_study(tmp_path, 3, 24), out=out, device="cpu", progress=False)
    assert (again["ran"], again["skipped"], again["reused"]) == (0, 2, ["a/seed0", "b/seed0"])
    assert (out / "runs" / "a" / "seed0" / "done.json").stat().st_mtime_ns == stamp
    assert sorted(p.name for p in (out / "runs" / "a").iterdir()) == ["seed0"]

    # the budget changed (3 -> 5 steps): both run afresh; the old runs are kept aside, unchanged
    longer = run_study(_keyed_study(tmp_path, 5, 24), out=out, device="cpu", progress=False)
    assert longer["ran"] == 2
    for name, old in (("a", a0), ("b", b0)):
        assert _done(out, name)["steps"] == 5 and _done(out, name)["key"] != old["key"]
        assert _done(out, name, f"seed0.old-{old['key']}") == old
    rows = list(csv.DictReader(open(out / "results.csv", encoding="utf-8")))
    assert [int(r["steps"]) for r in rows] == [5, 5]
    assert "budget 5 steps per run" in (out / "results.md").read_text(encoding="utf-8")

    # variant b changed: only b reruns, with its new blueprint; a is reused
    a1, b1 = _done(out, "a"), _done(out, "b")
    changed = run_study(_keyed_study(tmp_path, 5, 32), out=out, device="cpu", progress=False)
    assert (changed["ran"], changed["reused"]) == (1, ["a/seed0"])
    assert _done(out, "a") == a1
    b2 = _done(out, "b")
    assert b2["key"] != b1["key"] and b2["params"] > b1["params"]
    assert _done(out, "b", f"seed0.old-{b1['key']}") == b1
    assert "params.dim: 32" in (out / "runs" / "b" / "seed0" / "variant.yaml").read_text(encoding="utf-8")
    rows = {r["variant"]: r for r in csv.DictReader(open(out / "results.csv", encoding="utf-8"))}
    assert int(rows["b"]["params"]) == b2["params"] and int(rows["a"]["params"]) == a1["params"]
    runs = {r["variant"]: r["key"] for r in csv.DictReader(open(out / "runs.csv", encoding="utf-8"))}
    assert runs == {"a": a1["key"], "b": b2["key"]}


@needs_data
def test_an_interrupted_run_resumes_without_counting_twice(tmp_path):
    study = _keyed_study(tmp_path, 7, 24)
    out = tmp_path / "out"
    spec, root = load_study(study)
    runs = StudyRuns(StudySpec(spec, root, study), out)
    part = run_one(runs, "a", 0, device="cpu", progress=False, stop_after=3)  # checkpoint `last` at step 3
    folder = out / "runs" / "a" / "seed0"
    assert part["steps"] == 3 and not (folder / "done.json").exists()
    # as a run killed later leaves it: steps 4-6 logged (evaluated at 6) after the checkpoint, a line cut short
    with open(folder / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"step": 6, "loss": 9.0, "val_loss": 9.0, "tokens": 6 * 32}) + '\n{"step": 7, "lo')
    res = run_study(study, out=out, device="cpu", progress=False)
    assert res["ran"] == 2
    done = _done(out, "a")
    assert done["resumed"] is True and _done(out, "b")["resumed"] is False
    assert done["steps"] == 7 and done["tokens"] == 7 * 2 * 16
    assert [c[0] for c in done["curve"]] == [3, 6, 7]  # each evaluation once
    assert all(c[2] < 9.0 for c in done["curve"])  # the killed run's step-6 record does not count
    assert sorted(p.name for p in (out / "runs" / "a").iterdir()) == ["seed0"]  # resumed, not set aside
