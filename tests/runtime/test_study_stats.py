"""A planted effect is found and a negligible change is not: a variant with a 10x smaller
learning rate differs from the baseline at p < 0.01 over 5 seeds of a tiny CPU model, one with
a 1% larger learning rate does not (p > 0.05)."""

from __future__ import annotations

import csv

import pytest

from physlm_graph.runtime.study import run_study

from ._study_fixtures import DATA, tiny_study

pytestmark = [pytest.mark.skipif(not DATA.is_file(), reason="needs ../shared/data/tinyshakespeare"),
              pytest.mark.usefixtures("one_thread")]


@pytest.mark.slow  # 15 runs of 20 steps: about 30 s on an idle core
def test_planted_effect_is_significant_and_a_no_op_is_not(tmp_path):
    study = tiny_study(tmp_path, variants=[{"name": "base"}, {"name": "lr-div10", "set": {"train.lr": 1e-4}},
                                           {"name": "lr-plus1pct", "set": {"train.lr": 1.01e-3}}],
                       seeds=[0, 1, 2, 3, 4], steps=20, train={"eval_every": 10})
    res = run_study(study, out=tmp_path / "out", device="cpu", progress=False)
    rows = {r["variant"]: r for r in csv.DictReader(open(tmp_path / "out" / "results.csv", encoding="utf-8"))}
    assert float(rows["lr-div10"]["p_value"]) < 0.01
    assert float(rows["lr-div10"]["diff_vs_baseline"]) > 0  # the slower learner ends higher
    assert float(rows["lr-plus1pct"]["p_value"]) > 0.05
    assert rows["base"]["p_value"] == ""  # the baseline is not tested against itself
    for r in rows.values():
        assert int(r["n"]) == 5 and float(r["ci95_low"]) < float(r["mean"]) < float(r["ci95_high"])
    table = {r["variant"]: r for r in res["variants"]}
    assert table["lr-div10"]["seeds_needed"] <= 5 < (table["lr-plus1pct"]["seeds_needed"] or 10**9)
