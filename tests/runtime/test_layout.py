"""The runtime's import graph has no cycle (imports inside functions count too), and every
runtime module imports in a fresh interpreter."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RUNTIME = ROOT / "runtime"
PACKAGE = "physlm_graph.runtime"


def _modules() -> list[str]:
    return sorted(p.stem for p in RUNTIME.glob("*.py") if p.stem != "__init__")


def import_graph() -> dict[str, set[str]]:
    """Runtime module -> the runtime modules it imports anywhere in its file."""
    names = set(_modules())
    graph: dict[str, set[str]] = {}
    for name in names:
        deps: set[str] = set()
        for node in ast.walk(ast.parse((RUNTIME / f"{name}.py").read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1:
                    mod = (node.module or "").split(".")[0]
                    deps |= {mod} if mod else {a.name for a in node.names}
                elif node.level == 0 and (node.module or "").startswith(PACKAGE + "."):
                    deps.add(node.module.split(".")[2])
                elif node.level == 0 and node.module == PACKAGE:
                    deps |= {a.name for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name.split(".")[2] for a in node.names if a.name.startswith(PACKAGE + ".")}
        graph[name] = (deps & names) - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_runtime_has_no_import_cycle():
    graph = import_graph()
    assert "train" in graph and "growth_part" in graph["train"]  # the graph is read, not empty
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_the_compiler_side_of_growth_does_not_import_the_runtime():
    text = (ROOT / "physlm_graph" / "_growth_ops.py").read_text(encoding="utf-8")
    assert "runtime" not in {n.module.split(".")[1] for n in ast.walk(ast.parse(text))
                             if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("physlm_graph.")}


def test_every_runtime_module_imports_in_a_fresh_interpreter():
    """One interpreter, the modules imported one by one in reverse order (each may be the first)."""
    code = "import importlib\n" + "".join(f"importlib.import_module('{PACKAGE}.{m}')\n" for m in reversed(_modules()))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
