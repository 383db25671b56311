"""Mistakes a user makes get a located message with the cause, never a wrong or missing place.

Paths that cannot be blueprints (a folder, a device, a symlink loop) name the file and the
line that asked for them; block outputs, extension patterns and huge sizes are named as what
they are.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from physlm_graph import PhysLMError, compile_blueprint
from physlm_graph.cli import main

TINY_PATH = Path(__file__).resolve().parents[1] / "assets" / "blueprints" / "valid" / "tiny.yaml"
TINY = TINY_PATH.read_text()
EXTENDS_FIX = "  fix: `extends` names one blueprint file, relative to the blueprint that extends"


def _error(source, **kw) -> str:
    with pytest.raises(PhysLMError) as info:
        compile_blueprint(source, device="meta", build=False, **kw)
    return str(info.value)


# ------------------------------------------------------------------ paths


def test_a_symlink_loop_is_called_one(tmp_path, capsys):
    os.symlink(tmp_path / "a", tmp_path / "b")
    os.symlink(tmp_path / "b", tmp_path / "a")
    loop = "is a symlink loop (following its links leads back to a link already followed)"
    assert _error(tmp_path / "a") == f"load error: {tmp_path}/a: {tmp_path}/a {loop}"
    assert main(["validate", str(tmp_path / "a")]) == 2  # a path without .yaml is still a path, not YAML text
    assert capsys.readouterr().err == f"load error: {tmp_path}/a: {tmp_path}/a {loop}\n"
    (tmp_path / "d.yaml").write_text("name: d\nextends: a\n")
    assert _error(tmp_path / "d.yaml") == f"resolve error: {tmp_path}/d.yaml:2:1: the base blueprint 'a' {loop}\n{EXTENDS_FIX}"


def test_extends_of_a_folder_names_the_extending_file_and_line(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "d.yaml").write_text("physlm: 1\nextends: sub\nname: d\n")
    assert _error(tmp_path / "d.yaml") == (
        f"resolve error: {tmp_path}/d.yaml:2:1: the base blueprint 'sub' is a folder, not a blueprint file\n{EXTENDS_FIX}")
