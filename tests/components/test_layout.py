"""The component library's layout: a component's file sits at the path of its registered name.

``memory.hcw`` is defined in ``components/memory/hcw.py``: the family is the folder, the rest of
the name the file. The built-in elementwise ops (``add``, ``mul``, ...) have no family in their
name and live in ``components/ops/``. Files whose name starts with ``_`` are private helpers and
register nothing; every other module registers at least one component. Components registered
from outside the library (entry-point plugins, tests) are not the library's layout and are left out.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from pathlib import Path

import physlm_graph.components as library
from physlm_graph import REGISTRY

ROOT = Path(library.__file__).resolve().parent


def _defining_module(info) -> str:
    return (info.builder or info.function).__module__


def _library_components():
    prefix = library.__name__ + "."
    return [info for info in REGISTRY if _defining_module(info).startswith(prefix)]


def _expected_path(name: str) -> str:
    if "." not in name:
        return "ops/"
    family, leaf = name.split(".", 1)
    return f"{family}/{leaf}.py"


def _relative_file(module_name: str) -> str:
    path = Path(inspect.getsourcefile(importlib.import_module(module_name))).resolve()
    return path.relative_to(ROOT).as_posix()


def test_the_library_registers_components():
    assert len(_library_components()) > 30


def test_every_component_file_sits_at_the_path_of_its_name():
    wrong = []
    for info in _library_components():
        got, want = _relative_file(_defining_module(info)), _expected_path(info.name)
        if not (got.startswith(want) if want.endswith("/") else got == want):
            wrong.append(f"{info.name}: defined in components/{got}, expected components/{want}")
    assert wrong == []


def test_every_public_module_registers_a_component_and_private_ones_none():
    registering = {_defining_module(info) for info in _library_components()}
    wrong = []
    for mod in pkgutil.walk_packages(library.__path__, prefix=library.__name__ + "."):
        if mod.ispkg:
            continue
        private = mod.name.rsplit(".", 1)[-1].startswith("_")
        if private == (mod.name in registering):
            wrong.append(f"{mod.name} ({'private, registers' if private else 'public, registers nothing'})")
    assert wrong == []
