"""A repeated block node's `select`: each instance's block is pattern[select], an expression over
the params and `index` (hybrid layer orders that follow params: Jamba's period and offset, Bamba's
list of attention layers)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from physlm_graph import ResolveError, compile_blueprint
from physlm_graph._expr import ExprError, evaluate

TINY = Path(__file__).parents[2] / "tests" / "assets" / "blueprints" / "valid" / "tiny.yaml"


def _doc(select, pattern=("mlp_only", "block"), **params) -> dict:
    d = yaml.safe_load(TINY.read_text())
    d["blocks"]["mlp_only"] = {"nodes": {"n": {"use": "norm.rms", "in": "x"},
                                         "f": {"use": "ffn.swiglu", "in": "n", "hidden_dim": 64},
                                         "r": {"use": "add", "in": ["x", "f"]}}, "out": "r"}
    d["params"].update(params)
    d["nodes"]["trunk"] = {"use": "block", "repeat": 6, "in": "x0", "select": select}
    if pattern is not None:
        d["nodes"]["trunk"]["pattern"] = list(pattern)
    return d


def _attn_layers(cm) -> list[int]:
    return [i for i in range(6) if f"trunk.{i}.attn" in cm.resolved.nodes]


def test_select_by_period_and_offset_follows_the_params():
    cm = compile_blueprint(_doc("${1 if index % period == offset else 0}", period=4, offset=1))
    assert _attn_layers(cm) == [1, 5]
    cm = compile_blueprint(_doc("${1 if index % period == offset else 0}", period=4, offset=1),
                           overrides={"params.period": 2, "params.offset": 0})
    assert _attn_layers(cm) == [0, 2, 4]
    assert cm.module(torch.randint(0, 50, (1, 8)))["logits"].shape == (1, 8, 50)


def test_select_by_a_list_param():
    assert _attn_layers(compile_blueprint(_doc("${1 if index in attn else 0}", attn=[0, 3, 4]))) == [0, 3, 4]
    assert _attn_layers(compile_blueprint(_doc("${1 if index in attn else 0}", attn=[]))) == []
    assert _attn_layers(compile_blueprint(_doc("${0 if index not in attn else 1}", attn=[5]))) == [5]


@pytest.mark.parametrize("select,pattern,msg", [
    ("${index}", ("mlp_only", "block"), "`select` gives 2 for index 2, not a position in `pattern`"),
    ("${index > 2}", ("mlp_only", "block"), "`select` gives False for index 0, not a position in `pattern`"),
    ("${1}", None, "`select` picks from `pattern`, and this node has none"),
    ("1", ("mlp_only", "block"), "`select` must be one ${...} expression over `index`, got '1'"),
    ("${index % nope}", ("mlp_only", "block"), "unknown name 'nope'"),
])
def test_a_bad_select_is_a_located_error(select, pattern, msg, tmp_path):
    path = tmp_path / "bp.yaml"
    path.write_text(yaml.safe_dump(_doc(select, pattern), sort_keys=False))
    line = next(n for n, text in enumerate(path.read_text().splitlines(), 1) if text.strip().startswith("select:"))
    with pytest.raises(ResolveError) as exc:
        compile_blueprint(path)
    assert str(exc.value).startswith(f"resolve error: {path}:{line}:")
    assert msg in str(exc.value)


def test_in_needs_a_list_on_the_right():
    assert evaluate("2 in xs", {"xs": [1, 2]}) is True
    assert evaluate("2 not in xs", {"xs": [1, 2]}) is False
    with pytest.raises(ExprError, match="`in` tests a number against a list param"):
        evaluate("2 in 3", {})
