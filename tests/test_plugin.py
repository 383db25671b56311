"""Plugins: a separately installed package adds a component through the entry point, offline."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

BLUEPRINT = """
physlm: 1
name: with-plugin
params: {vocab: 40, dim: 16}
nodes:
  tok:  {use: embed.token, in: tokens, vocab_size: "${vocab}", embed_dim: "${dim}"}
  norm: {use: norm.scale_norm, in: tok, eps: 1.0e-6}
  head: {use: head.lm, in: norm, vocab_size: "${vocab}"}
outputs: {logits: head}
"""

CHECK = """
import json, sys, torch
from importlib.metadata import entry_points
from physlm_graph import REGISTRY, compile_blueprint
from physlm_graph._schema_export import blueprint_json_schema
eps = [e.value for e in entry_points(group="physlm_graph.components")]
cm = compile_blueprint(sys.argv[1])
out = cm.module(torch.randint(0, 40, (2, 5)))["logits"]
info = REGISTRY.get("norm.scale_norm")
schema = blueprint_json_schema()["definitions"]["component:norm.scale_norm"]
print(json.dumps({"eps": eps, "shape": list(out.shape), "source": info.source,
                  "uses": [r.use for r in cm.report], "g": float(cm.module.norm.g),
                  "schema_eps": schema["then"]["properties"]["eps"].get("default")}))
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The example plugin pip-installed (offline, no build isolation) into a throwaway folder."""
    tmp = tmp_path_factory.mktemp("plugin")
    src = shutil.copytree(ROOT / "examples" / "plugin", tmp / "src")  # build files stay out of the checkout
    target = tmp / "site"
    res = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                          "--target", str(target), str(src)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert (target / "physlm_graph_example_plugin-0.1.0.dist-info" / "entry_points.txt").is_file()
    return target


def _env(target: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")])}


def test_an_installed_plugin_component_compiles_and_runs(installed, tmp_path):
    bp = tmp_path / "bp.yaml"
    bp.write_text(BLUEPRINT)
    res = subprocess.run([sys.executable, "-c", CHECK, str(bp)], env=_env(installed), capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert "physlm_graph_example_plugin" in got["eps"]
    assert got["shape"] == [2, 5, 40]
    assert got["source"] == "physlm_graph_example_plugin.build_scale_norm"
    assert "norm.scale_norm" in got["uses"]
    assert got["g"] == pytest.approx(4.0)  # sqrt(16): the plugin's own init ran
    assert got["schema_eps"] == 1e-5  # editors see the plugin's parameters too


def test_without_the_plugin_the_name_is_unknown(tmp_path):
    bp = tmp_path / "bp.yaml"
    bp.write_text(BLUEPRINT)
    res = subprocess.run([sys.executable, "-m", "physlm_graph", "validate", str(bp)], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 2
    assert "norm.scale_norm" in res.stderr and "Traceback" not in res.stderr
