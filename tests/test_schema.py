"""`physlm-graph schema`: every shipped blueprint validates; a wrong parameter does not."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

jsonschema = pytest.importorskip("jsonschema")

from physlm_graph._schema import BlueprintDoc  # noqa: E402
from physlm_graph._schema_export import blueprint_json_schema  # noqa: E402
from physlm_graph.cli import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _blueprints() -> list[Path]:
    files = [*ROOT.glob("blueprints/**/*.yaml"), *ROOT.glob("examples/**/*.yaml"),
             *ROOT.glob("tests/assets/blueprints/valid/*.yaml")]
    out = []
    for f in sorted(files):
        data = yaml.safe_load(f.read_text())
        if isinstance(data, dict) and "physlm" in data:  # examples hold other YAML too (schedules)
            out.append(f)
    return out


@pytest.fixture(scope="module")
def validator():
    schema = blueprint_json_schema()
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


@pytest.mark.parametrize("path", _blueprints(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_blueprint_validates(validator, path):
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(yaml.safe_load(path.read_text()))]
    assert errors == []


def _baby() -> dict:
    return yaml.safe_load((ROOT / "blueprints" / "baby-gpt.yaml").read_text())


def test_a_wrong_param_is_named(validator):
    doc = _baby()
    doc["blocks"]["gpt_block"]["nodes"]["mlp"]["hidden"] = 64  # the param is hidden_dim
    errs = list(validator.iter_errors(doc))
    assert [(list(e.absolute_path), e.message) for e in errs] == [
        (["blocks", "gpt_block", "nodes", "mlp"], "Additional properties are not allowed ('hidden' was unexpected)")]


def test_types_and_required_params_are_checked(validator):
    doc = _baby()
    doc["nodes"]["tok"]["vocab_size"] = "many"  # neither an int nor a ${...} expression
    del doc["nodes"]["head"]["vocab_size"]
    msgs = sorted(e.message for e in validator.iter_errors(doc))
    assert any("'vocab_size' is a required property" in m for m in msgs)
    assert any("'many'" in m for m in msgs)
    ok = _baby()
    ok["nodes"]["tok"]["vocab_size"] = "${vocab * 2}"
    assert list(validator.iter_errors(ok)) == []


def test_every_component_and_document_field_is_described():
    from physlm_graph import REGISTRY

    schema = blueprint_json_schema()
    for info in REGISTRY:
        rule = schema["definitions"][f"component:{info.name}"]
        assert rule["if"]["properties"]["use"]["const"] == info.name
        for name, field in info.params.model_fields.items():
            prop = rule["then"]["properties"][name]
            if field.description:
                assert prop["description"] == field.description
            if not field.is_required() and field.default is not None and isinstance(field.default, (int, float, str)):
                assert prop["default"] == field.default
    assert set(BlueprintDoc.model_fields) <= set(schema["properties"])
    assert {"mlp", "ffn.mlp"} & set(schema["definitions"]["node"]["properties"]["use"]["anyOf"][0]["enum"])


def test_cli_writes_the_schema(tmp_path, capsys):
    out = tmp_path / "physlm.schema.json"
    assert main(["schema", "-o", str(out)]) == 0
    assert json.loads(out.read_text())["title"] == "physlm-graph blueprint"
