"""A model whose weights cannot fit is refused from its inferred shapes, before the build
allocates: located at the node of the largest tensor, naming it and its shape."""

from __future__ import annotations

from pathlib import Path

import pytest

from physlm_graph import BuildError, compile_blueprint
from physlm_graph._infer import infer_shapes
from physlm_graph._load import load_document
from physlm_graph._fits import available_bytes, check_fits
from physlm_graph._merge import apply_overrides, merge_extends
from physlm_graph._resolve import resolve
from physlm_graph._validate import validate

ROOT = Path(__file__).parents[2]
BABY = ROOT / "blueprints" / "baby-gpt-cpu.yaml"


def _inferred(overrides: dict):
    res = resolve(apply_overrides(merge_extends(load_document(BABY)), overrides))
    return infer_shapes(res, validate(res))


def test_a_vocabulary_that_cannot_fit_is_refused_before_allocating():
    """2e9 x 4096 float32 is 29.8 TiB: refused at once (no allocator error, no OOM kill)."""
    with pytest.raises(BuildError) as err:
        compile_blueprint(BABY, overrides={"params.vocab": 2_000_000_000, "params.dim": 4096})
    msg = str(err.value)
    assert msg.startswith(f"build error: {ROOT}/blueprints/baby-gpt.yaml:22:3: tok: the weights do not fit: "
                          "8,192,805,605,376 parameters need 29.8 TiB in float32, more than the "), msg
    assert msg.endswith("; the largest tensor is tok.weight [2000000000, 4096] (29.8 TiB)\n"
                        "  fix: make the model smaller (vocab, dim, layers), or check it without weights on the meta "
                        "device (`physlm-graph build`, compile_blueprint(..., device=\"meta\"))"), msg
    meta = compile_blueprint(BABY, overrides={"params.vocab": 2_000_000_000, "params.dim": 4096}, device="meta")
    assert meta.num_params == 8_192_805_605_376  # on meta it is only a report


def test_the_budget_is_compared_with_the_parameters_in_float32():
    inf = _inferred({})
    need = inf.total_params * 4
    check_fits(inf, "cpu", available=(need, "in a test budget"))  # exactly enough
    with pytest.raises(BuildError) as err:
        check_fits(inf, "cpu", available=(need - 1, "in a test budget"))
    with pytest.raises(BuildError) as err:
        check_fits(inf, "cpu", available=(need // 2, "in a test budget"))
    assert str(err.value) == (
        f"build error: {ROOT}/blueprints/baby-gpt.yaml:17:7: trunk.0.mlp: the weights do not fit: 804,096 parameters "
        "need 3.1 MiB in float32, more than the 1.5 MiB in a test budget; the largest tensor is trunk.0.mlp.fc.weight "
        "[512, 128] (256.0 KiB)\n  fix: make the model smaller (vocab, dim, layers), or check it without weights on the meta "
        "device (`physlm-graph build`, compile_blueprint(..., device=\"meta\"))")
    check_fits(inf, "meta", available=(0, "nothing"))  # meta allocates nothing


def test_the_cpu_budget_is_read():
    got = available_bytes("cpu")
    assert got is None or (got[0] > 0 and got[1])
