"""The compiler's growth checks: the stage facts on ``CompiledModel``, the tensor names the
checks compare, the depth plans, and that the compiler (not the runtime) refuses a schedule."""

from __future__ import annotations

from pathlib import Path

import pytest

from physlm_graph import PhysLMError, compile_blueprint
from physlm_graph import _growth_spec
from physlm_graph._growth_spec import _tensor_shapes, depth_plan
from physlm_graph.cli import main

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "examples" / "growth" / "tiny-growth.yaml"
EXITS = ROOT / "examples" / "early-exit" / "baby-gpt-exits.yaml"
SMALL = {"params.dim": 16, "params.heads": 2, "params.layers": 4}


def _two(second: dict, first: dict | None = None) -> dict:
    return {"growth": [first or {"until": 5, "params": {"layers": 2}}, {"params": {"layers": 4}, **second}]}


def test_growth_stages_are_facts_of_the_compiled_model():
    cm = compile_blueprint(TINY, device="meta", build=False)
    phases = cm.growth_stages
    assert [p.layers for p in phases] == [1, 2, 3]
    assert [(p.until, p.grow, p.rewarmup) for p in phases] == [(20, "zero_init", 0), (40, "zero_init", 5), (None, "zero_init", 0)]
    for p in phases:
        one = compile_blueprint(TINY, stage=p.index, device="meta", build=False)
        assert p.num_params == one.num_params and p.flops_per_token == one.flops_per_token
    # stage 2 grows 2 -> 3 with where: start: the new layer is trunk.0, the old ones move up
    assert phases[2].new_instances == {"trunk.0": None}
    assert phases[2].moved == {"trunk.0": "trunk.1", "trunk.1": "trunk.2"}
    assert compile_blueprint(ROOT / "blueprints" / "baby-gpt.yaml", device="meta", build=False).growth_stages == []


@pytest.mark.parametrize("second", [{"grow": "zero_init", "where": "start"}, {"grow": "zero_init", "where": "interleave"},
                                    {"grow": "mask", "where": [0, 3]}, {"grow": "stack"}, {"grow": "interpolate"}])
def test_the_compiler_plans_the_moves_growth_makes(second):
    from physlm_graph.runtime.growth import grow

    over = {**SMALL, **_two(second)}
    phase = compile_blueprint(TINY, overrides=over, device="meta", build=False).growth_stages[1]
    g = grow(compile_blueprint(TINY, overrides=over, stage=0), 1)
    assert sorted(phase.new_instances) == g.new_instances
    assert {k: v for k, v in phase.moved.items() if k != v} == g.renamed
    copies = {}
    for key in g.names.keys() | g.copied.keys():
        inst = next((i for i in phase.new_instances if key.startswith(i + ".")), None)
        if inst is not None and phase.new_instances[inst] is not None:
            copies[key] = phase.new_instances[inst] + key[len(inst):]
    assert copies == g.copied


@pytest.mark.parametrize("source, over", [(TINY, {}), (EXITS, {"exits.head": "own", **SMALL}),
                                          (ROOT / "blueprints" / "llama-style.yaml", {"params.layers": 2})])
def test_tensor_names_are_those_of_the_built_model(source, over):
    cm = compile_blueprint(source, overrides=over, device="meta")
    built = {k: tuple(v.shape) for k, v in cm.module.state_dict().items()}
    assert _tensor_shapes(cm.inferred) == built


def test_depth_plans():
    assert depth_plan(2, 4, "zero_init", "interleave") == ({0: 0, 1: 2}, {1: None, 3: None})
    assert depth_plan(4, 6, "mask", "interleave") == ({0: 0, 1: 1, 2: 3, 3: 4}, {2: None, 5: None})
    assert depth_plan(2, 3, "zero_init", "start") == ({0: 1, 1: 2}, {0: None})
    assert depth_plan(2, 5, "stack", "end") == ({0: 0, 1: 1}, {2: 0, 3: 1, 4: 0})
    assert depth_plan(2, 4, "interpolate", "end") == ({0: 0, 1: 2}, {1: 0, 3: 1})
    assert depth_plan(2, 4, "zero_init", [0, 2]) == ({0: 1, 1: 3}, {0: None, 2: None})


def test_every_compile_checks_the_schedule_even_of_one_stage():
    bad = {**SMALL, **_two({"params": {"layers": 4, "dim": 32}})}
    for stage in (None, 0, 1):
        with pytest.raises(PhysLMError, match="growth stage 1 changes its shape"):
            compile_blueprint(TINY, overrides=bad, stage=stage, device="meta", build=False)


def test_broken_rules_are_listed_together():
    bad = {"growth": [{"params": {"layers": 1}, "rewarmup": 3}, {"until": 9, "params": {"layers": 2}, "ramp_steps": 4}]}
    with pytest.raises(PhysLMError) as err:
        compile_blueprint(TINY, overrides=bad, device="meta", build=False)
    text = str(err.value)
    assert text.startswith("4 validate errors:")
    for part in ("the last growth stage (1) has `until`", "growth stage 0 has no end", "growth stage 0 sets `rewarmup`",
                 "`ramp_steps` is used by `grow: mask` only"):
        assert part in text


def test_stages_are_compiled_once_per_document(monkeypatch):
    calls = []
    real = _growth_spec._infer_stage
    monkeypatch.setattr(_growth_spec, "_infer_stage", lambda doc, i: calls.append(i) or real(doc, i))
    over = {**SMALL, "params.dropout": 0.125}  # a document no other test compiled
    for stage in (None, 0, 1, 2):
        compile_blueprint(TINY, overrides=over, stage=stage, device="meta", build=False)
    assert calls == [0, 1, 2]


def test_build_stages_reads_the_compiled_stages(capsys):
    assert main(["build", str(TINY), "--stages", "--json"]) == 0
    import json

    rows = json.loads(capsys.readouterr().out)
    assert [(r["stage"], r["until"], r["grow"], r["layers"]) for r in rows] == [(0, 20, "-", 1), (1, 40, "zero_init", 2),
                                                                             (2, "end", "zero_init", 3)]


@pytest.mark.parametrize("command", [["validate"], ["build"], ["build", "--stages"]])
def test_a_study_file_is_named_as_one(command, capsys):
    study = ROOT / "examples" / "ablations" / "tiny-smoke.yaml"
    assert main([command[0], str(study), *command[1:]]) == 2
    err = capsys.readouterr().err
    assert err == (f"validate error: {study}:2:1: this is an ablation study file, not a blueprint\n"
                   f"  fix: run it with `physlm-graph ablate {study} --out DIR`; `validate`, `build` and `train` "
                   "take blueprints\n")
