"""Blueprint values take their type strictly: no bool <-> number, no text -> bool or number.

YAML reads ``yes`` as true; pydantic's lax mode would then build ``num_heads: yes`` as 1 head.
Every registered component's parameter model and every document model refuses it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from physlm_graph import PhysLMError, compile_blueprint
from physlm_graph._load import load_text, read_scalar
from physlm_graph._registry import REGISTRY
from physlm_graph._schema import BlueprintDoc, ExitsDoc, GrowthStage, InitDoc, LossDoc, TrainConfig
from physlm_graph._strict import _kinds, scalar_type_error

TINY = (Path(__file__).resolve().parents[1] / "assets" / "blueprints" / "valid" / "tiny.yaml").read_text()


def _wrong_values(annotation) -> list[object]:
    """Values of the wrong scalar kind for a field: empty when the field takes anything."""
    kinds = _kinds(annotation)
    if "other" in kinds:
        return []
    out: list[object] = []
    if kinds & {"int", "float"} and "bool" not in kinds:
        out += [True, False]
    if "bool" in kinds and not kinds & {"int", "float"}:
        out += [1, 0]
    if "str" not in kinds and kinds & {"int", "float", "bool"}:
        out += ["4", "yes"]
    return out


def _cases():
    for info in REGISTRY:
        if not info.examples:
            continue
        for name, field in info.params.model_fields.items():
            for bad in _wrong_values(field.annotation):
                yield pytest.param(info.name, name, bad, id=f"{info.name}.{name}={bad!r}")


@pytest.mark.parametrize("component, field, bad", list(_cases()))
def test_every_component_parameter_refuses_the_wrong_scalar_kind(component, field, bad):
    info = REGISTRY.get(component)
    params = {**info.examples[0].params, field: bad}
    with pytest.raises(ValidationError) as err:
        info.params.model_validate(params)
    assert any(e["loc"][:1] == (field,) for e in err.value.errors())


def test_the_cases_cover_many_components():
    assert len({c.values[0] for c in _cases()}) >= 30


@pytest.mark.parametrize("model", [TrainConfig, InitDoc, ExitsDoc, GrowthStage, LossDoc])
def test_every_document_field_refuses_the_wrong_scalar_kind(model):
    checked = 0
    for name, field in model.model_fields.items():
        for bad in _wrong_values(field.annotation):
            data = {"from": "x"} if model is LossDoc else {}
            with pytest.raises(ValidationError):
                model.model_validate({**data, field.alias or name: bad})
            checked += 1
    assert checked > 0


def test_right_values_still_pass():
    cfg = TrainConfig.model_validate({"steps": 1000, "lr": 3, "betas": [0.9, 0.95], "fused_loss": "auto",
                                      "compile": True, "min_lr": None})
    assert cfg.steps == 1000 and cfg.lr == 3.0 and cfg.betas == (0.9, 0.95)
    assert BlueprintDoc.model_validate({"name": "x", "nodes": {}, "outputs": {"logits": "h"}, "causal": False}).causal is False


def test_messages_say_what_was_expected():
    assert scalar_type_error(int, True) == (
        "expected a whole number, not a boolean (YAML reads yes, no, on, off, true and false as booleans)")
    assert scalar_type_error(bool, 1) == "expected true or false, not a number"
    assert scalar_type_error(float | None, "0.1") == "expected a number, not text"
    assert scalar_type_error(tuple[float, float], [0.9, False]).startswith("item 1: expected a number, not a boolean")
    assert scalar_type_error(int, 4.0) is None  # an integral float from an expression is still a whole number


def test_num_heads_yes_does_not_build_one_head():
    with pytest.raises(PhysLMError) as err:
        compile_blueprint(TINY.replace('num_heads: "${heads}"', "num_heads: yes"), device="meta", build=False)
    assert "num_heads: expected a whole number, not a boolean" in str(err.value)


def test_allow_leak_takes_a_boolean_only():
    text = TINY.replace("tie: tok}", 'tie: tok, allow_leak: "only in eval"}')
    with pytest.raises(PhysLMError) as err:
        compile_blueprint(text, device="meta", build=False)
    assert str(err.value) == ("resolve error: <string>:20:69: `allow_leak` must be true or false (got 'only in eval')\n"
                              "  fix: allow_leak: true builds a component that sees future tokens on purpose")


def test_exponent_numbers_read_as_numbers():
    assert read_scalar("3e-4") == 3e-4 and read_scalar("1_000") == 1000 and read_scalar("e5") == "e5"
    assert load_text("lr: 1e-3\nq: '1e-3'\n", "x").data == {"lr": 1e-3, "q": "1e-3"}
    cm = compile_blueprint(TINY + "train: {lr: 3e-4}\n", overrides=["train.min_lr=1e-5"], device="meta", build=False)
    assert cm.train_config.lr == 3e-4 and cm.train_config.min_lr == 1e-5
