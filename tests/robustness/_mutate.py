"""Hypothesis strategies that break valid blueprints in the ways people (and attackers) do.

A case starts from a seed blueprint that compiles, applies one to three *tree* mutations to its
parsed data (delete, duplicate, rename or retype a key; point a reference at the wrong node;
put a huge number, a deep nest or a hostile ``${}`` expression somewhere), dumps it back to
YAML and then, sometimes, applies a *text* mutation to the bytes (truncation, random bytes,
a duplicated or dropped line, an unsafe tag, an alias, a deep bracket nest).

``write_seeds(folder)`` puts every seed in one folder, so that a case written there as
``case.yaml`` finds the bases its ``extends`` names.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[2]
TINY_TEXT = (ROOT / "tests" / "assets" / "blueprints" / "valid" / "tiny.yaml").read_text(encoding="utf-8")

# A seed that uses the sections tiny.yaml leaves out: losses, extensions, growth, exits, train.
RICH_TEXT = TINY_TEXT.replace("name: tiny", "name: rich").replace(
    "attn: {use: attention.causal, in: ln1, num_heads: \"${heads}\"}",
    "attn: {use: attention.resonance, in: ln1, num_heads: \"${heads}\", dropout: 0.0, allow_leak: true}",
) + """losses: {entropy: {from: "trunk.*.attn.entropy", weight: 0.01}}
extensions: {memory: {use: memory.hcw, at: "trunk.*.ln2", memory_size: 8, memory_key_dim: 8}}
growth: [{until: 10, params: {layers: 1}}, {params: {layers: 2}, grow: zero_init}]
exits: {after: [trunk.0]}
train: {steps: 10, batch_size: 2, seq_len: 16, lr: 0.001}
"""

# A seed that derives from another file: exercises extends / set / replace / remove.
DERIVED_TEXT = """physlm: 1
extends: tiny.yaml
name: derived
set: {params.layers: 3, blocks.block.nodes.attn.num_heads: 2}
replace: {blocks.block.nodes.mlp: {use: ffn.swiglu, in: ln2, hidden_dim: 64}}
remove: [nodes.head.tie]
"""

# A seed with a block pattern, named block ports and a block-level param.
PATTERN_TEXT = """physlm: 1
name: pattern
params: {vocab: 40, dim: 16, heads: 2, layers: 3, context: 12}
blocks:
  attn_block:
    params: {width: "${4 * dim}"}
    nodes:
      n: {use: norm.rms, in: x}
      a: {use: attention.causal, in: n, num_heads: "${heads}"}
      r: {use: add, in: [x, a]}
      f: {use: ffn.swiglu, in: r, hidden_dim: "${width}"}
      o: {use: add, in: [r, f]}
    out: o
  mlp_block:
    nodes:
      n: {use: norm.layer, in: x}
      f: {use: ffn.mlp, in: n, hidden_dim: "${2 * dim}"}
      o: {use: add, in: [x, f]}
    out: o
nodes:
  tok:   {use: embed.token, in: tokens, vocab_size: "${vocab}", embed_dim: "${dim}"}
  trunk: {use: attn_block, pattern: [attn_block, mlp_block], repeat: "${layers}", in: tok, width: 32}
  norm:  {use: norm.rms, in: trunk}
  head:  {use: head.lm, in: norm, vocab_size: "${vocab}"}
outputs: {logits: head}
"""

SEEDS: dict[str, str] = {
    "tiny.yaml": TINY_TEXT,
    "rich.yaml": RICH_TEXT,
    "derived.yaml": DERIVED_TEXT,
    "pattern.yaml": PATTERN_TEXT,
    "llama-style.yaml": (ROOT / "blueprints" / "llama-style.yaml").read_text(encoding="utf-8"),
    "baby-gpt.yaml": (ROOT / "blueprints" / "baby-gpt.yaml").read_text(encoding="utf-8"),
    "baby-gpt-cpu.yaml": (ROOT / "blueprints" / "baby-gpt-cpu.yaml").read_text(encoding="utf-8"),
}
# Small seeds come up more often: they compile fastest, so the budget buys more cases.
SEED_CHOICES = ["tiny.yaml"] * 4 + ["rich.yaml"] * 2 + ["derived.yaml", "pattern.yaml"] * 2 + [
    "llama-style.yaml", "baby-gpt-cpu.yaml"]

COMPONENTS = ["add", "mul", "concat", "norm.layer", "norm.rms", "attention.causal", "attention.resonance",
              "ffn.mlp", "ffn.swiglu", "embed.token", "embed.learned_position", "embed.rope", "head.lm",
              "memory.hcw", "misc.dropout", "scale", "ssm.gated_conv", "moe.topk", "block", "attn_block",
              "norm.lyer", "attention", "python.os.system", ""]
NAMES = ["x", "x0", "tok", "pos", "trunk", "trunk.0", "trunk.1.attn", "trunk.0.attn.entropy", "trunk.*.ln1",
         "head", "norm", "ln1", "attn", "mlp", "r1", "r2", "tokens", "logits", "dim", "heads", "layers", "vocab",
         "nope", "head.out", "trunk.9", "..", ".", "tok.port", "__class__", "use", "in", "params", "nodes"]
HUGE = [2**31, 2**63, -(2**63), 10**30, 10**400, -1, 0, 4097, 10**6, 1e308, -1e308, float("inf"),
        float("-inf"), float("nan"), 1e-320, 99999999999999999999]
TAGS = [b"!!python/object/apply:os.system ['touch /tmp/physlm-fuzz-pwned'] ", b"!!python/name:os.system ",
        b"!foo ", b"!!binary ", b"!!set ", b"!!omap ", b"!<tag:evil.com,2000:x> ", b"&anchor ", b"*anchor ",
        b"*undefined ", b"!!int ", b"!!float ", b"!!str ", b"<<: "]


# ------------------------------------------------------------------ expressions

_LEAVES = st.one_of(
    st.sampled_from(["dim", "heads", "layers", "vocab", "context", "width", "index", "nope", "True", "none"]),
    st.integers(-3, 70).map(str),
    st.sampled_from(["0", "0.5", "-1", "1e999", "1e15", "10**16", "2**64", "(-8)", "0.0", "'a'", "\"s\"", "[1]",
                     "{}", "dim.__class__", "__import__('os')", "__builtins__", "open('x')", "lambda: 1",
                     "x.real", "().__class__.__bases__[0]", "b'x'", "...", "None", "1j"]),
)
_BINOPS = ["+", "-", "*", "/", "//", "%", "**", "<", "<=", "==", "!=", " and ", " or ", "<<", "@", "&", " in "]


def _combine(children: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.one_of(
        st.tuples(children, st.sampled_from(_BINOPS), children).map(lambda t: f"({t[0]}{t[1]}{t[2]})"),
        st.tuples(st.sampled_from(["-", "+", "not ", "~"]), children).map(lambda t: f"{t[0]}{t[1]}"),
        st.tuples(st.sampled_from(["min", "max", "abs", "int", "round", "float", "ceil", "floor", "pow", "eval"]),
                  st.lists(children, max_size=3)).map(lambda t: f"{t[0]}({', '.join(t[1])})"),
        st.tuples(children, children, children).map(lambda t: f"({t[0]} if {t[1]} else {t[2]})"),
    )


expressions = st.recursive(_LEAVES, _combine, max_leaves=8)
expression_strings = st.one_of(
    expressions.map(lambda e: "${" + e + "}"),
    expressions.map(lambda e: "w${" + e + "}x"),
    st.sampled_from(["${", "${}", "${dim", "${{dim}}", "$dim", "${dim} ${heads}", "${" + "1+" * 150 + "1}",
                     "${" + "(" * 120 + "1" + ")" * 120 + "}", "${" + "-" * 300 + "1}"]),
)

# ------------------------------------------------------------------ values

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 70),
    st.sampled_from(HUGE),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(NAMES + COMPONENTS),
    expression_strings,
)
values = st.recursive(
    _scalars,
    lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(st.sampled_from(NAMES) | st.text(max_size=6), c, max_size=3)),
    max_leaves=6,
)
keys = st.one_of(
    st.sampled_from(NAMES + ["repeat", "pattern", "tie", "out", "blocks", "extends", "set", "replace", "remove",
                             "losses", "growth", "exits", "extensions", "train", "physlm", "name", "outputs",
                             "inputs", "allow_leak", "num_heads", "hidden_dim", "embed_dim", "vocab_size", "about"]),
    st.text(max_size=10),
)


# ------------------------------------------------------------------ tree mutations


def _paths(data: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix] if prefix else []
    if isinstance(data, dict):
        for k, v in data.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            out += _paths(v, prefix + (i,))
    return out


def _parent(data: Any, path: tuple) -> Any:
    for p in path[:-1]:
        data = data[p]
    return data


def _nest(value: Any, depth: int, as_list: bool) -> Any:
    for _ in range(depth):
        value = [value] if as_list else {"k": value}
    return value


@st.composite
def tree_mutation(draw: st.DrawFn, data: dict[str, Any]) -> dict[str, Any]:
    data = copy.deepcopy(data)
    paths = _paths(data)
    if not paths:
        return data
    rnd = draw(st.randoms(use_true_random=False))  # uniform picks: hypothesis favours index 0
    path = rnd.choice(paths)
    parent, last = _parent(data, path), path[-1]
    op = draw(st.sampled_from(["delete", "duplicate", "rename", "retype", "retype", "reference", "huge",
                               "nest", "expression", "use", "swap", "params"]))
    if op == "params" and isinstance(data.get("params"), dict) and data["params"]:
        # a param of the wrong type, used by an expression in another param or in a node
        params = data["params"]
        params[rnd.choice(list(params))] = draw(_scalars)
        target = rnd.choice([p for p in paths if p[0] in ("params", "nodes", "blocks")] or paths)
        _parent(data, target)[target[-1]] = draw(expression_strings)
    elif op == "delete":
        del parent[last]
    elif op == "duplicate":
        if isinstance(parent, list):
            parent.insert(last, copy.deepcopy(parent[last]))
        else:
            parent[draw(keys)] = copy.deepcopy(parent[last])
    elif op == "rename" and isinstance(parent, dict):
        new = draw(st.one_of(keys, st.just(str(last)[:-1]), st.just(str(last) + "s"), st.just(str(last).upper())))
        parent[new] = parent.pop(last)
    elif op == "swap":
        other = rnd.choice(paths)
        oparent = _parent(data, other)
        try:
            parent[last], oparent[other[-1]] = copy.deepcopy(oparent[other[-1]]), copy.deepcopy(parent[last])
        except (KeyError, IndexError, TypeError):
            pass  # the other path went away with the first assignment
    elif op == "reference":
        parent[last] = draw(st.one_of(st.sampled_from(NAMES), st.lists(st.sampled_from(NAMES), max_size=3),
                                      st.dictionaries(st.sampled_from(["x", "z", "q", "side"]), st.sampled_from(NAMES),
                                                      max_size=2)))
    elif op == "huge":
        parent[last] = draw(st.sampled_from(HUGE))
    elif op == "nest":
        parent[last] = _nest(parent[last], draw(st.integers(1, 80)), draw(st.booleans()))
    elif op == "expression":
        parent[last] = draw(expression_strings)
    elif op == "use":
        parent[last] = draw(st.sampled_from(COMPONENTS))
    else:
        parent[last] = draw(values)
    return data


# ------------------------------------------------------------------ text mutations


@st.composite
def text_mutation(draw: st.DrawFn, raw: bytes) -> bytes:
    op = draw(st.sampled_from(["truncate", "bytes", "overwrite", "line_dup", "line_drop", "line_swap", "tag",
                               "indent", "brackets", "bom", "encoding"]))
    n = len(raw)
    rnd = draw(st.randoms(use_true_random=False))
    at = rnd.randrange(max(n, 1))
    lines = raw.split(b"\n")
    li = rnd.randrange(max(len(lines), 1))
    if op == "truncate":
        return raw[:at]
    if op == "bytes":
        return raw[:at] + draw(st.binary(min_size=1, max_size=16)) + raw[at:]
    if op == "overwrite":
        junk = draw(st.binary(min_size=1, max_size=8))
        return raw[:at] + junk + raw[at + len(junk):]
    if op == "line_dup":
        return b"\n".join(lines[: li + 1] + [lines[li]] + lines[li + 1:])
    if op == "line_drop":
        return b"\n".join(lines[:li] + lines[li + 1:])
    if op == "line_swap":
        lj = rnd.randrange(max(len(lines), 1))
        lines[li], lines[lj] = lines[lj], lines[li]
        return b"\n".join(lines)
    if op == "tag":
        colons = [i for i in range(n) if raw.startswith(b": ", i)]
        if not colons:
            return draw(st.sampled_from(TAGS)) + raw
        i = rnd.choice(colons) + 2
        return raw[:i] + draw(st.sampled_from(TAGS)) + raw[i:]
    if op == "indent":
        lines[li] = b" " * draw(st.integers(1, 5)) + lines[li] if draw(st.booleans()) else lines[li].lstrip()
        return b"\n".join(lines)
    if op == "brackets":
        depth = draw(st.sampled_from([49, 200, 3000]))
        return raw + b"\ndeep: " + b"[" * depth + b"1" + b"]" * depth + b"\n"
    if op == "bom":
        return draw(st.sampled_from([b"\xef\xbb\xbf", b"\xff\xfe", b"\x00"])) + raw
    return raw.decode("utf-8").encode(draw(st.sampled_from(["utf-16", "latin-1", "cp1252"])), errors="replace")


def dump(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=100)


@st.composite
def cases(draw: st.DrawFn) -> tuple[str, dict[str, Any] | None, bytes]:
    """A broken blueprint: (seed name, the mutated data or None when the text was mangled, bytes)."""
    seed = draw(st.sampled_from(SEED_CHOICES))
    data = yaml.safe_load(SEEDS[seed])
    for _ in range(draw(st.integers(1, 3))):
        data = draw(tree_mutation(data))
    raw = dump(data).encode("utf-8")
    if draw(st.integers(0, 3)) == 0:
        return seed, None, draw(text_mutation(raw))
    return seed, data, raw


def write_seeds(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in SEEDS.items():
        (folder / name).write_text(text, encoding="utf-8")
