"""A built wheel installs physlm_graph, physlm_graph.components and physlm_graph.runtime under
one namespace (nothing called `components` or `runtime` at the top of site-packages)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from physlm_graph import REGISTRY

ROOT = Path(__file__).parents[1]


def test_wheel_has_one_namespace_and_imports(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", str(ROOT), "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "whl")], check=True, capture_output=True)
    wheel = next((tmp_path / "whl").glob("*.whl"))
    tops = {n.split("/")[0] for n in zipfile.ZipFile(wheel).namelist()}
    assert tops == {"physlm_graph", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    code = ("import physlm_graph, physlm_graph.cli, physlm_graph.runtime.train; from physlm_graph import REGISTRY; "
            "print(physlm_graph.__file__); print(len(REGISTRY.names()))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=tmp_path,
                         env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}).stdout.split()
    assert out[0].startswith(str(site))
    assert int(out[1]) == len(REGISTRY.names())
