"""Model-level diffs: `physlm-graph diff` compares compiled models, not texts."""

from __future__ import annotations

import json
from pathlib import Path

from physlm_graph._diff import diff_blueprints
from physlm_graph.cli import main

SEEDS = Path(__file__).resolve().parents[1] / "blueprints" / "seeds"
HOLO, HOLO_FIXED = str(SEEDS / "holographic-v2.yaml"), str(SEEDS / "holographic-v2-fixed.yaml")


def test_holographic_faithful_vs_fixed_lists_exactly_the_changed_nodes():
    d = diff_blueprints(HOLO, HOLO_FIXED)
    expected = {}
    for i in range(12):
        expected[f"trunk.{i}.attn"] = "mode: faithful -> fixed"
        expected[f"trunk.{i}.topo"] = "allow_leak: True -> <unset>; mode: faithful -> fixed"
        expected[f"trunk.{i}.moe"] = "allow_leak: True -> <unset>; mode: faithful -> fixed"
    assert {n.path: n.describe() for n in d.nodes} == expected
    assert all(n.kind == "changed" and not n.rewired for n in d.nodes)
    per = {n.path: n.params_delta for n in d.nodes}
    assert per["trunk.0.attn"] == 12 and per["trunk.0.topo"] == 688_898 - 345_345 and per["trunk.0.moe"] == 0
    assert d.params == (227_159_868, 231_282_648)
    assert list(d.sections) == ["losses"] and sorted(d.sections["losses"]) == ["balance", "z_loss"]
    assert d.summary() == "36 changed; losses: balance, z_loss; params +4,122,780"


def test_diff_is_about_the_model_not_the_text(tmp_path):
    # the same model spelled differently: a derived file that sets a value to what it already is
    same = tmp_path / "same.yaml"
    same.write_text(f"physlm: 1\nextends: {HOLO}\nname: other-name\nabout: reworded\n"
                    "set: {blocks.holo_block.nodes.moe.num_experts: 3}\n", encoding="utf-8")
    d = diff_blueprints(HOLO, str(same))
    assert d.identical and d.summary() == "identical"


def test_added_removed_rewired_and_shapes(tmp_path):
    base = SEEDS.parent / "baby-gpt.yaml"
    other = tmp_path / "other.yaml"
    other.write_text(
        f"physlm: 1\nextends: {base}\nname: rewired\n"
        "replace: {nodes.trunk.in: x0}\n"          # skip the embedding dropout: rewired
        "remove: [nodes.drop]\n"                   # removed
        "set: {params.dim: 192, nodes.final_drop: {use: misc.dropout, in: norm, p: 0.1}, "
        "nodes.head.in: final_drop}\n", encoding="utf-8")
    d = diff_blueprints(str(base), str(other), overrides=["layers=1"])
    kinds = {n.path: n.kind for n in d.nodes}
    assert kinds["drop"] == "removed" and kinds["final_drop"] == "added"
    by = {n.path: n for n in d.nodes}
    assert by["trunk.0.ln1"].rewired and by["trunk.0.ln1"].inputs == (["drop"], ["x0"])
    assert by["head"].inputs == (["norm"], ["final_drop"])
    assert by["tok"].shapes == ({"out": "[batch, seq, 384]"}, {"out": "[batch, seq, 192]"})
    assert by["tok"].params_delta == 65 * 192 - 65 * 384


def test_cli_exit_codes_and_json(capsys):
    assert main(["diff", HOLO, HOLO]) == 0
    assert "identical" in capsys.readouterr().out
    assert main(["diff", HOLO, HOLO_FIXED, "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["params_delta"] == 4_122_780 and len(data["nodes"]) == 36
    assert data["nodes"][0]["params"] == {"mode": {"old": "faithful", "new": "fixed"}}


def test_cli_diff_reports_errors_without_traceback(tmp_path, capsys):
    assert main(["diff", str(tmp_path / "missing.yaml"), HOLO]) == 2
    assert "Traceback" not in capsys.readouterr().err
