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


# ------------------------------------------------------------------ names


def _norm_reads(ref: str, text: str = TINY) -> str:
    return text.replace("  norm:  {use: norm.layer, in: trunk}", f"  norm:  {{use: norm.layer, in: {ref}}}")


def test_a_block_output_typo_suggests_the_block_outputs():
    assert _error(_norm_reads("trunk.outt")) == (
        "resolve error: <string>:19:28: block node 'trunk' has no output 'outt'\n  fix: did you mean trunk.out?")
    assert _error(_norm_reads("trunk.7")) == (
        "resolve error: <string>:19:28: block node 'trunk' has no output '7'\n"
        "  fix: its outputs: trunk.x; instances: trunk.0 .. trunk.1")
    named = TINY.replace("    out: r2", "    out: {x: r2, aux: attn}")
    assert _error(_norm_reads("trunk.auxx", named)) == (
        "resolve error: <string>:19:28: block node 'trunk' has no output 'auxx'\n  fix: did you mean trunk.aux?")
    for ok in ("trunk.x", "trunk.out", "trunk.1", "trunk.1.x"):  # outputs, the output node's port, instances
        compile_blueprint(_norm_reads(ok), device="meta", build=False)


def test_a_node_named_like_a_graph_input_is_a_clash_not_a_cycle():
    text = TINY.replace("  x0:    {use: add, in: [tok, pos]}", "  tokens: {use: add, in: [tok, pos]}").replace(
        "in: x0}", "in: tokens}")
    assert _error(text) == ("resolve error: <string>:17:3: node 'tokens' has the name of a graph input\n"
                            "  fix: rename the node; graph inputs: tokens")


def test_an_extension_matching_nothing_shows_its_pattern():
    assert _error(TINY + "extensions:\n  mem: {use: norm.layer, at: 'trunk.*.atn'}\n") == (
        "resolve error: <string>:23:26: extension 'mem': `at` 'trunk.*.atn' matches no node\n"
        "  fix: did you mean 'trunk.*.attn'?")
    assert _error(TINY + "extensions:\n  mem: {use: norm.layer, at: [zzz]}\n") == (
        "resolve error: <string>:23:26: extension 'mem': `at` ['zzz'] matches no node\n"
        "  fix: node paths look like tok, pos, x0, trunk.0.ln1")


def test_a_huge_vocabulary_is_refused_before_allocating():
    err = _error(TINY.replace("vocab: 50", "vocab: 100000000000"))
    assert err.startswith("2 validate errors:\n  1. <string>:15:41: tok: vocab_size: far larger than any model's size "
                          "(at most 2,147,483,647; no weights were allocated) (got 100000000000)")


# ------------------------------------------------------------------ YAML syntax


@pytest.mark.parametrize("old, new, expected", [
    ('params: {vocab: 50,', 'params: {v: 50, vocab: ${v},',
     "load error: <string>:3:25: YAML syntax error: expected ',' or '}', but got '{' (the unquoted ${v} is read as "
     "YAML, not as an expression)\n"
     '  fix: quote it: "${v}"; an expression inside {...} or [...] must always be quoted'),
    ("      r1:   {use: add", "        r1:   {use: add",
     "load error: <string>:9:9: YAML syntax error: this line is indented by 8 spaces, which matches no enclosing "
     "block (expected <block end>, but found '<block mapping start>')\n"
     "  fix: indent it like the lines of its block (line 8 has 6 spaces), or quote a value that contains ': '"),
    ("  tok:", "\ttok:",
     "load error: <string>:15:1: YAML syntax error: found character '\\t' that cannot start any token\n"
     "  fix: indent with spaces: YAML does not allow tabs"),
    ("name: tiny", "name: 'tiny",
     "load error: <string>:22:1: YAML syntax error: found unexpected end of stream (a quote opened at line 2 is "
     "never closed)\n  fix: close the quote"),
    ("name: tiny", "name: tiny: small",
     "load error: <string>:2:11: YAML syntax error: mapping values are not allowed here\n"
     "  fix: quote a value that contains ': ' (key: \"a: b\"), or put the nested key on its own line"),
    ("outputs: {logits: head}", "outputs: {logits: head",
     "load error: <string>:22:1: YAML syntax error: expected ',' or '}', but got '<stream end>' (in the flow "
     "mapping {...} opened at 21:10)\n"
     "  fix: separate its items with commas, close it, and quote any item that holds { } [ ] , or a colon"),
], ids=["unquoted-expression", "misindented", "tab", "unclosed-quote", "colon-in-value", "unclosed-flow"])
def test_yaml_syntax_errors_say_which_mistake_and_the_fix(old, new, expected):
    assert old in TINY
    assert _error(TINY.replace(old, new, 1)) == expected
