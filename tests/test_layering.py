"""The layering (compiler core < components < runtime < CLI and Hugging Face): nothing in the
compiler core or the components imports the runtime. Checked statically over every import
statement, function-level imports included."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "physlm_graph"
# the roof: the only places in physlm_graph/ that may import the runtime
ALLOWED = {"cli", "hf.py", "_hf.py", "_hf_import.py", "_hf_export.py"}


def _module_name(path: Path, root: Path, prefix: str) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return prefix + ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def runtime_imports(path: Path, root: Path = PKG.parent, prefix: str = "") -> list[str]:
    """``file:line: statement`` for each import of physlm_graph.runtime in ``path``, a file whose
    module name is ``prefix`` + its path under ``root`` (components/ installs as physlm_graph.components)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    module = _module_name(path, root, prefix)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            targets = [prefix] + [f"{prefix}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) in (
                "__import__", "import_module") and node.args and isinstance(node.args[0], ast.Constant):
            targets = [str(node.args[0].value)]
        if any(t == "physlm_graph.runtime" or t.startswith("physlm_graph.runtime.") for t in targets):
            found.append(f"{path.relative_to(root)}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_the_scan_sees_every_kind_of_import(tmp_path):
    src = ("import physlm_graph.runtime.train\n"
           "def f():\n    from physlm_graph.runtime.checkpoint import load_checkpoint\n"
           "def g():\n    from .runtime import data\n    from . import runtime\n"
           "importlib.import_module('physlm_graph.runtime.study')\n"
           "from physlm_graph import compile_blueprint\nimport physlm_graph._errors\nfrom . import _errors\n")
    target = tmp_path / "physlm_graph" / "_probe.py"
    target.parent.mkdir()
    target.write_text(src, encoding="utf-8")
    lines = [f.split(": ", 1)[0] for f in runtime_imports(target, tmp_path)]
    assert lines == [f"physlm_graph/_probe.py:{n}" for n in (1, 3, 5, 6, 7)]


def test_only_the_cli_and_hugging_face_import_the_runtime():
    offenders = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG)
        if rel.parts[0] in ALLOWED:
            continue
        offenders += runtime_imports(path)
    assert offenders == []


def test_the_components_do_not_import_the_runtime():
    root = PKG.parent
    offenders = []
    for path in sorted((root / "components").rglob("*.py")):
        offenders += runtime_imports(path, root, "physlm_graph.")
    assert offenders == []
