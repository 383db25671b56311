"""Safe loading and the limits that protect against hostile blueprints, each with its own message.

- YAML: only the core tags; ``!!python/...`` and unknown tags are refused (and never run).
- Limits: document size, nesting depth, YAML node count (alias bombs), ``repeat``, the number
  of expanded nodes, ``extends`` chains, and expression length.
- ``${}``: arithmetic on params and nothing else (attributes, calls, dunders, strings, huge
  powers are refused with a message saying what).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from physlm_graph import LoadError, PhysLMError, ResolveError, compile_blueprint
from physlm_graph import _load, _resolve
from physlm_graph._expr import MAX_EXPR_LEN, ExprError, evaluate
from physlm_graph._load import MAX_BYTES, MAX_DEPTH, MAX_NODES
from physlm_graph._merge import MAX_EXTENDS_DEPTH
from physlm_graph._resolve import MAX_REPEAT

ROOT = Path(__file__).resolve().parents[2]
TINY = (ROOT / "tests" / "assets" / "blueprints" / "valid" / "tiny.yaml").read_text(encoding="utf-8")
NESTS_DEEPER = f"the document nests deeper than {MAX_DEPTH} levels\n  fix: flatten the structure; blueprints rarely need more than 6 levels"


def _error(source: object, kind: type = PhysLMError) -> PhysLMError:
    with pytest.raises(kind) as info:
        compile_blueprint(source, device="meta", build=False)
    return info.value


# ------------------------------------------------------------------ tags


@pytest.mark.parametrize("tag, shown", [
    ("!!python/object/apply:os.system", "tag:yaml.org,2002:python/object/apply:os.system"),
    ("!!python/object/new:subprocess.Popen", "tag:yaml.org,2002:python/object/new:subprocess.Popen"),
    ("!!python/name:os.system", "tag:yaml.org,2002:python/name:os.system"),
    ("!!python/module:os", "tag:yaml.org,2002:python/module:os"),
    ("!!python/tuple", "tag:yaml.org,2002:python/tuple"),
    ("!foo", "!foo"),
    ("!<tag:evil.example,2024:x>", "tag:evil.example,2024:x"),
    ("!!binary", "tag:yaml.org,2002:binary"),
    ("!!set", "tag:yaml.org,2002:set"),
])
def test_unsafe_and_unknown_tags_are_refused_and_never_run(tag, shown, tmp_path):
    marker = tmp_path / "pwned"
    text = f"name: x\nnodes: {tag} ['touch {marker}']\n"
    err = _error(text, LoadError)
    assert str(err) == (f"load error: <string>:2:8: unknown or unsafe YAML tag {shown!r}\n"
                        "  fix: blueprints are plain YAML: remove the tag (python objects are never constructed)")
    assert not marker.exists()


def test_a_tag_deep_inside_a_file_is_located(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.yaml"
    path.write_text(TINY.replace('num_heads: "${heads}"',
                                 f"num_heads: !!python/object/apply:os.system ['touch {marker}']"), encoding="utf-8")
    err = _error(path, LoadError)
    assert str(err).startswith(f"load error: {path}:8:57: unknown or unsafe YAML tag "
                               "'tag:yaml.org,2002:python/object/apply:os.system'")
    assert not marker.exists()


def test_a_value_its_tag_cannot_hold_is_a_load_error():
    assert str(_error("name: !!float add\n", LoadError)) == (
        "load error: <string>:1:7: cannot read this value: could not convert string to float: 'add'")


def test_control_characters_are_a_load_error():
    assert str(_error("name: a\nabout: x\x0fy\n", LoadError)) == (
        "load error: <string>:2:9: YAML cannot hold the control character #x000f\n"
        "  fix: remove it; a blueprint is plain text")


# ------------------------------------------------------------------ size, depth, node count


def test_document_size_limit_text():
    text = "name: x\nabout: '" + "a" * MAX_BYTES + "'\n"
    col = MAX_BYTES - len("name: x\n") + 1  # located where the text crosses the limit
    assert str(_error(text, LoadError)) == (
        f"load error: <string>:2:{col}: the blueprint is larger than {MAX_BYTES // 1_000_000} MB "
        "(the limit is crossed here)\n"
        "  fix: a blueprint describes a model; use `repeat` and `blocks` instead of writing layers out")


def test_document_size_limit_file(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_bytes(b"name: x\n" * 3 + "about: 'é".encode() + b"a" * MAX_BYTES + b"'\n")
    col = MAX_BYTES - 3 * len("name: x\n") - len("about: 'é".encode()) + len("about: 'é") + 1  # characters, not bytes
    assert str(_error(path, LoadError)) == (
        f"load error: {path}:4:{col}: the blueprint is larger than 2 MB (the limit is crossed here)\n"
        "  fix: a blueprint describes a model; use `repeat` and `blocks` instead of writing layers out")


@pytest.mark.parametrize("text, col", [
    ("a: " + "[" * (MAX_DEPTH + 12) + "1" + "]" * (MAX_DEPTH + 12) + "\n", 4 + MAX_DEPTH),
    ("a: " + "{b: " * (MAX_DEPTH + 12) + "1" + "}" * (MAX_DEPTH + 12) + "\n", 4 + 4 * MAX_DEPTH),
])
def test_nesting_depth_limit(text, col):
    assert str(_error(text, LoadError)) == f"load error: <string>:1:{col}: {NESTS_DEEPER}"


def test_nesting_depth_limit_block_style():
    text = "".join("  " * i + f"k{i}:\n" for i in range(MAX_DEPTH + 5)) + "  " * (MAX_DEPTH + 5) + "v: 1\n"
    err = _error(text, LoadError)
    assert str(err).endswith(NESTS_DEEPER) and err.diagnostics[0].loc.line == MAX_DEPTH + 2


def test_depth_exactly_at_the_limit_loads():
    from physlm_graph._load import load_text

    doc = load_text("a: " + "[" * (MAX_DEPTH - 1) + "1" + "]" * (MAX_DEPTH - 1) + "\n", "<string>")
    assert doc.data["a"] is not None


@pytest.mark.parametrize("text, loc", [
    ("a: " + "[" * 3000 + "1" + "]" * 3000 + "\n", f"1:{4 + MAX_DEPTH}"),
    ("x: 1\na: " + "{b: " * 3000 + "1" + "}" * 3000 + "\n", f"2:{4 + 4 * MAX_DEPTH}"),
])
def test_nesting_beyond_the_parser_recursion_is_located(text, loc):
    """The YAML parser recurses past Python's limit before the depth check sees the node: the
    scanner finds where the nesting passes the limit, with the same message."""
    assert str(_error(text, LoadError)) == f"load error: <string>:{loc}: {NESTS_DEEPER}"


def _alias_bomb(levels: int) -> str:
    text = 'a: &a ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]\n'
    prev = "a"
    for name in "bcdefghij"[:levels]:
        text += f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 10) + "]\n"
        prev = name
    return text


def test_node_count_limit_stops_an_alias_bomb(monkeypatch):
    monkeypatch.setattr(_load, "MAX_NODES", 5_000)  # the real limit: test_node_count_limit_real (slow)
    assert str(_error(_alias_bomb(8), LoadError)) == (
        "load error: <string>:1:48: the document has more than 5000 YAML nodes\n"
        "  fix: split it into smaller blueprints, or look for an alias that expands recursively")


@pytest.mark.slow
def test_node_count_limit_real():
    assert f"the document has more than {MAX_NODES} YAML nodes" in str(_error(_alias_bomb(8), LoadError))


# ------------------------------------------------------------------ repeat, expansion, extends


def test_repeat_limit():
    text = TINY.replace('repeat: "${layers}"', f"repeat: {MAX_REPEAT + 1}")
    assert str(_error(text, ResolveError)) == (
        f"resolve error: <string>:18:23: `repeat` is {MAX_REPEAT + 1}, more than the limit {MAX_REPEAT}\n"
        "  fix: a blueprint with this many layers is almost certainly a typo")


@pytest.mark.parametrize("value, shown", [("-1", "-1"), ("2.5", "2.5"), ("true", "True"), ("lots", "'lots'")])
def test_repeat_must_be_a_whole_number(value, shown):
    text = TINY.replace('repeat: "${layers}"', f"repeat: {value}")
    assert str(_error(text, ResolveError)) == (
        f"resolve error: <string>:18:23: `repeat` must be a whole number >= 0, got {shown}")


def _nested_repeats(inner: int, outer: int) -> str:
    return TINY.replace("blocks:\n", f"""blocks:
  inner:
    nodes: {{n: {{use: norm.layer, in: x}}}}
    out: n
  outer:
    nodes: {{i: {{use: inner, repeat: {inner}, in: x}}}}
    out: i
""").replace('trunk: {use: block, repeat: "${layers}", in: x0}', f"trunk: {{use: outer, repeat: {outer}, in: x0}}")


def test_expanded_node_limit(monkeypatch):
    monkeypatch.setattr(_resolve, "MAX_NODES_EXPANDED", 500)  # the real limit: test_expanded_node_limit_real (slow)
    assert str(_error(_nested_repeats(100, 10), ResolveError)) == (
        "resolve error: <string>:6:13: the graph expands to more than 500 nodes\n"
        "  fix: lower `repeat` or the nesting of blocks")


@pytest.mark.slow
def test_expanded_node_limit_real():
    """MAX_REPEAT x 40 nested repeats: refused in seconds (it took minutes before the resolver stopped at once)."""
    import time

    t0 = time.perf_counter()
    err = _error(_nested_repeats(MAX_REPEAT, 40), ResolveError)
    assert str(err).startswith(f"resolve error: <string>:6:13: the graph expands to more than {_resolve.MAX_NODES_EXPANDED} nodes")
    assert len(err.diagnostics) == 1
    assert time.perf_counter() - t0 < 60


def test_extends_chain_limit(tmp_path):
    (tmp_path / "b0.yaml").write_text(TINY, encoding="utf-8")
    for i in range(1, MAX_EXTENDS_DEPTH + 3):
        (tmp_path / f"b{i}.yaml").write_text(f"extends: b{i - 1}.yaml\nname: b{i}\n", encoding="utf-8")
    err = _error(tmp_path / f"b{MAX_EXTENDS_DEPTH + 2}.yaml", ResolveError)
    assert str(err) == f"resolve error: {tmp_path}/b2.yaml:1:1: `extends` chains deeper than {MAX_EXTENDS_DEPTH} files"


# ------------------------------------------------------------------ expressions

PARAMS = {"dim": 384, "heads": 6, "act": "gelu", "none": None, "sizes": [1, 2]}


@pytest.mark.parametrize("expr, message", [
    # attribute access, dunders, calls: nothing outside arithmetic is reachable
    ("dim.__class__", "attribute access .__class__ is not allowed (only arithmetic on params)"),
    ("dim.__class__.__bases__", "attribute access .__bases__ is not allowed (only arithmetic on params)"),
    ("dim.real", "attribute access .real is not allowed (only arithmetic on params)"),
    ("__builtins__", "unknown name '__builtins__'"),
    ("__import__", "unknown name '__import__'"),
    ("__import__('os').system('true')", "a call to an expression is not allowed (only arithmetic on params)"),
    ("open('/etc/passwd')", "a call to open is not allowed (only arithmetic on params)"),
    ("eval('1')", "a call to eval is not allowed (only arithmetic on params)"),
    ("globals()", "a call to globals is not allowed (only arithmetic on params)"),
    ("(lambda: 1)()", "a call to an expression is not allowed (only arithmetic on params)"),
    ("max(dim, key=abs)", "functions take positional arguments only"),
    ("sizes[0]", "Subscript is not allowed (only arithmetic on params)"),
    ("[d for d in (1,)]", "ListComp is not allowed (only arithmetic on params)"),
    ("dim << 40", "BinOp is not allowed (only arithmetic on params)"),
    # huge numbers
    ("10 ** 100", "10 ** 100 is too large"),
    ("9 ** 9 ** 9", "9 ** 387420489 is too large"),
    ("2 ** 2 ** 2 ** 2 ** 2", "2 ** 65536 is too large"),
    ("10 ** 15 * 10", "the result 1e+16 is too large"),
    ("1e999", "the result is not a finite number"),
    ("1e308 * 1e308", "the result 1e+308 is too large"),
    ("0 ** -1", "0 cannot be raised to a negative power"),
    ("(-8) ** 0.5", "the result is not a real number"),
    ("dim / 0", "division by zero"),
    ("dim % 0", "modulo by zero"),
    # strings and other non-numbers
    ("'a' * 3", "only numbers are allowed, not 'a'"),
    ("'abc'.upper()", "a call to an expression is not allowed (only arithmetic on params)"),
    ("f'{dim}'", "JoinedStr is not allowed (only arithmetic on params)"),
    ("act * 2", "arithmetic needs numbers"),
    ("-act", "arithmetic needs numbers"),
    ("-none", "arithmetic needs numbers"),
    ("act < 1", "cannot compare str with int"),
    ("none >= dim", "cannot compare NoneType with int"),
    ("sizes + sizes", "arithmetic needs numbers"),
    ("abs(act)", "abs(...) failed: bad operand type for abs(): 'str'"),
    # size of the expression itself
    ("1 + " * 60 + "1", f"expression longer than {MAX_EXPR_LEN} characters"),
    ("+".join(["1"] * 60), "expression has too many parts"),
    ("", "empty expression"),
    ("dim +", "not a valid expression: invalid syntax"),
])
def test_expression_refusals(expr, message):
    with pytest.raises(ExprError) as info:
        evaluate(expr, PARAMS)
    assert str(info.value) == message


@pytest.mark.parametrize("expr, value", [
    ("4 * dim", 1536), ("dim / heads", 64), ("dim // 5", 76), ("2 ** 10", 1024), ("-dim", -384),
    ("min(dim, 100) + max(1, 2)", 102), ("dim if heads > 4 else 0", 384), ("ceil(dim / 5)", 77),
    ("10 ** 15", 10**15), ("1 < heads < 8", True), ("not heads", False),
])
def test_expression_arithmetic_still_works(expr, value):
    assert evaluate(expr, PARAMS) == value


def test_expression_errors_are_located_in_the_blueprint(tmp_path):
    marker = tmp_path / "pwned"
    text = TINY.replace('hidden_dim: "${4 * dim}"', f"hidden_dim: \"${{__import__('os').system('touch {marker}')}}\"")
    err = _error(text, ResolveError)
    assert err.diagnostics[0].loc is not None and (err.diagnostics[0].loc.line, err.diagnostics[0].loc.col) == (11, 37)
    assert str(err).endswith("a call to an expression is not allowed (only arithmetic on params)")
    assert not marker.exists()


def test_expression_length_limit_in_a_blueprint():
    long = "${" + "1 + " * 60 + "dim}"
    err = _error(TINY.replace('"${4 * dim}"', f'"{long}"'), ResolveError)
    assert str(err) == (f"resolve error: <string>:11:37: bad expression {long!r}: "
                        f"expression longer than {MAX_EXPR_LEN} characters")


def test_string_param_in_arithmetic_is_located():
    text = TINY.replace("context: 16}", "context: 16, act: gelu}").replace('"${4 * dim}"', '"${-act}"')
    assert str(_error(text, ResolveError)) == (
        "resolve error: <string>:11:37: bad expression '${-act}': arithmetic needs numbers")
