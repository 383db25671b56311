"""A built wheel installs physlm_graph, physlm_graph.components and physlm_graph.runtime under
one namespace (nothing called `components` or `runtime` at the top of site-packages), with the
family blueprints that `import` and `export` compile; the sdist carries them too."""

from __future__ import annotations

import subprocess
import sys
import tarfile
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
    families = sorted(p.name for p in (ROOT / "blueprints" / "families").glob("*.yaml"))
    assert families and all(f"physlm_graph/families/{f}" in zipfile.ZipFile(wheel).namelist() for f in families)
    code = ("import physlm_graph, physlm_graph.cli, physlm_graph.runtime.train; from physlm_graph import REGISTRY; "
            "print(physlm_graph.__file__); print(len(REGISTRY.names())); "
            "from physlm_graph._hf_families import FAMILIES, FAMILY_DIR, family_blueprint; print(FAMILY_DIR); "
            "from physlm_graph import compile_blueprint; fam = FAMILIES['llama']; "
            "cm = compile_blueprint(family_blueprint(fam, {'layers': 2}, name='x', about='x'), device='meta'); "
            "print(len(cm.graph['nodes']))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=tmp_path,
                         env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}).stdout.split()
    assert out[0].startswith(str(site))
    assert int(out[1]) == len(REGISTRY.names())
    assert out[2] == str(site / "physlm_graph" / "families")  # found in the installed package, not a checkout
    assert int(out[3]) == 4 + 2 * 6  # tok, rope, norm, head and two decoder layers


def test_sdist_carries_the_family_blueprints(tmp_path):
    subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path), "sdist", "-d", str(tmp_path)],
                   check=True, capture_output=True, cwd=ROOT)  # egg_info kept out of the checkout
    names = tarfile.open(next(tmp_path.glob("*.tar.gz"))).getnames()
    families = sorted(p.name for p in (ROOT / "blueprints" / "families").glob("*.yaml"))
    assert all(any(n.endswith(f"/blueprints/families/{f}") for n in names) for f in families)
