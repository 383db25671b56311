"""benchmarks/ddp_scaling.py's --configs parsing (the runs themselves need GPUs): train keys and
env.NAME=VALUE pairs; a malformed config stops the script with it named, not a traceback."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ddp_scaling():
    spec = importlib.util.spec_from_file_location("ddp_scaling_bench", ROOT / "benchmarks" / "ddp_scaling.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_configs_parse(ddp_scaling):
    assert ddp_scaling.parse_config("default") == ("default", {})
    assert ddp_scaling.parse_config("b:accumulate=2,env.NCCL_ALGO=Ring,strategy=fsdp") == (
        "b", {"accumulate": "2", "env.NCCL_ALGO": "Ring", "strategy": "fsdp"})


@pytest.mark.parametrize("bad", ["a:oops", "a:env.=1", "a:=3"])
def test_malformed_config_is_named(ddp_scaling, bad):
    with pytest.raises(SystemExit, match=f"--configs '{bad}'"):
        ddp_scaling.parse_config(bad)


def test_blueprint_batch_in_the_header(ddp_scaling, tmp_path):
    assert ddp_scaling.blueprint_batch(ROOT / "blueprints" / "gpt2-124m.yaml") == "32 (the blueprint's)"
    bp = tmp_path / "b.yaml"
    bp.write_text("physlm: 1\nname: x\n")
    assert ddp_scaling.blueprint_batch(bp) == "the blueprint's"
