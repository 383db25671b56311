"""Stage 2, resolve: params, ``${...}``, growth-stage selection, blocks with ``repeat`` and
``pattern``, extensions, outputs and losses. The result is a flat graph of component nodes.

Names inside a block resolve first to the block's own nodes and inputs, then outward to the
enclosing scope (so a block may read a top-level ``rope`` or ``mass`` node). Every expanded
node is also addressable by its full path (``trunk.3.attn``), block instances by theirs
(``trunk.3``), and ports by a dotted suffix (``trunk.3.attn.repulsion``).
"""

from __future__ import annotations

import copy
import difflib
import re
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from physlm_graph._errors import Diagnostic, Loc, ResolveError, ValidateError
from physlm_graph._expr import EXPR_RE, ExprError, references, substitute
from physlm_graph._ir import LossSpec, NodeSpec, Ref, Resolved
from physlm_graph._load import Document
from physlm_graph._registry import REGISTRY
from physlm_graph._schema import BLOCK_USE_KEYS, NODE_KEYS, BlueprintDoc, unknown_key_fix

__all__ = ["resolve", "glob_to_regex", "exit_heads", "ExitHeads", "MAX_REPEAT", "MAX_NODES_EXPANDED"]

MAX_REPEAT = 1024  # the deepest published LMs have ~130 layers; shape checks stay quick
MAX_NODES_EXPANDED = 100_000
MAX_BLOCK_DEPTH = 8


def glob_to_regex(pattern: str) -> re.Pattern[str]:
    """``*`` matches one path segment, ``**`` any number; ``{a,b}`` alternatives."""
    out = ""
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            out += ".*"
            i += 2
            continue
        if c == "*":
            out += r"[^.]+"
        elif c == "{":
            j = pattern.find("}", i)
            if j < 0:
                out += re.escape(c)
            else:
                out += "(?:" + "|".join(re.escape(a) for a in pattern[i + 1 : j].split(",")) + ")"
                i = j
        else:
            out += re.escape(c)
        i += 1
    return re.compile(out + r"\Z")


class _Lazy:
    """A reference written in some scope, resolved once every name is known."""

    __slots__ = ("text", "scope", "src")

    def __init__(self, text: str, scope: "_Scope", src: tuple) -> None:
        self.text, self.scope, self.src = text, scope, src


class _Poison:
    """Stands for a name whose definition already failed, so its users add no more errors."""


_POISON = _Poison()


class _Scope:
    def __init__(self, parent: "_Scope | None" = None) -> None:
        self.names: dict[str, Ref | _Lazy | _Poison] = {}
        self.blocks: dict[str, tuple[str, list[str], list[str]]] = {}  # block node: (path, outputs, instances)
        self.parent = parent

    def block(self, name: str) -> tuple[str, list[str], list[str]] | None:
        """The block node ``name`` as the lookup of ``name`` sees it, or None if it is no block node."""
        s: _Scope | None = self
        while s is not None:
            if name in s.names:
                return s.blocks.get(name)
            s = s.parent
        return None

    def lookup(self, name: str) -> Ref | _Lazy | None:
        s: _Scope | None = self
        while s is not None:
            if name in s.names:
                return s.names[name]
            s = s.parent
        return None

    def visible(self) -> list[str]:
        out: list[str] = []
        s: _Scope | None = self
        while s is not None:
            out += list(s.names)
            s = s.parent
        return out


class _Resolver:
    def __init__(self, doc: Document, spec: BlueprintDoc, params: dict[str, Any]) -> None:
        self.doc = doc
        self.spec = spec
        self.params = params
        self.errors: list[Diagnostic] = []
        self.top = _Scope()
        self.nodes: dict[str, NodeSpec] = {}
        self.raw_inputs: dict[str, list[tuple[str | None, _Lazy]]] = {}
        self.instances: dict[str, list[str]] = {}
        self.instance_outputs: dict[str, dict[str, _Lazy | Ref]] = {}

    # -- errors -------------------------------------------------------------------
    def err(self, message: str, src: tuple, **kw: Any) -> None:
        self.errors.append(Diagnostic(message, loc=self.doc.loc(src), **kw))

    # -- references ---------------------------------------------------------------
    def deref(self, target: Ref | _Lazy | _Poison, depth: int = 0) -> Ref | None:
        if isinstance(target, Ref):
            return target
        if isinstance(target, _Poison):
            return None
        if depth > 64:
            self.err(f"reference {target.text!r} loops through block outputs", target.src)
            return None
        return self.lookup_ref(target.text, target.scope, target.src, depth + 1)

    def lookup_ref(self, text: Any, scope: _Scope, src: tuple, depth: int = 0) -> Ref | None:
        if not isinstance(text, str) or not text:
            self.err(f"an input must name a node, got {text!r}", src)
            return None
        parts = text.split(".")
        for k in range(len(parts), 0, -1):
            t = scope.lookup(".".join(parts[:k]))
            if t is None:
                continue
            base = self.deref(t, depth)
            if base is None:
                return None  # the failing definition was already reported
            rest = parts[k:]
            if not rest:
                return base
            block = scope.block(".".join(parts[:k]))
            if block is not None and not self.is_port(base, rest):
                self.bad_block_output(".".join(parts[:k]), block, base, rest[0], src)
                return None
            if len(rest) == 1 and base.port is None:
                return Ref(base.node, rest[0])
            break
        near = difflib.get_close_matches(text, scope.visible(), n=3, cutoff=0.6)
        self.err(
            f"unknown input {text!r}",
            src,
            fix=f"did you mean {', '.join(repr(n) for n in near)}?" if near else "name a node, a block or a graph input",
        )
        return None

    def is_port(self, base: Ref, rest: list[str]) -> bool:
        """Whether ``rest`` names a port of the node ``base`` (``trunk.out``: its output node's)."""
        node = self.nodes.get(base.node)
        info = REGISTRY.get(node.use) if node is not None else None
        return len(rest) == 1 and base.port is None and info is not None and rest[0] in info.outputs

    def bad_block_output(self, name: str, block: tuple[str, list[str], list[str]], base: Ref, wrong: str,
                         src: tuple) -> None:
        full, outputs, instances = block
        node = self.nodes.get(base.node)
        info = REGISTRY.get(node.use) if node is not None else None
        choices = list(outputs) + [str(i) for i in range(len(instances))] + list(info.outputs if info else ())
        near = [f"{name}.{c}" for c in difflib.get_close_matches(wrong, list(dict.fromkeys(choices)), n=3, cutoff=0.6)]
        told = f"outputs: {', '.join(f'{name}.{o}' for o in outputs)}"
        if instances:
            told += f"; instances: {name}.0 .. {name}.{len(instances) - 1}"
        self.err(f"block node {name!r} has no output {wrong!r}", src,
                 fix=f"did you mean {', '.join(near)}?" if near else f"its {told}")

    # -- expansion ------------------------------------------------------------------
    def sub(self, value: Any, names: dict[str, Any], src: tuple) -> Any:
        if isinstance(value, dict):
            return {k: self.sub(v, names, src + (k,)) for k, v in value.items()}
        if isinstance(value, list):
            return [self.sub(v, names, src + (i,)) for i, v in enumerate(value)]
        try:
            return substitute(value, names)
        except ExprError as exc:
            self.err(f"bad expression {value!r}: {exc}", src)
            return None

    def define(self, scope: _Scope, name: str, target: Ref | _Lazy, full: str) -> None:
        scope.names[name] = target
        if scope is not self.top:
            self.top.names.setdefault(full, target)

    def expand(self, name: str, raw: dict[str, Any], scope: _Scope, prefix: str, src: tuple,
               names: dict[str, Any], depth: int, instance: str | None) -> None:
        if not isinstance(raw, dict):
            self.err(f"node {name!r} must be a mapping with `use:`", src)
            return
        select = raw.get("select")  # evaluated per instance, where `index` is known
        raw = self.sub({k: v for k, v in raw.items() if k != "select"}, names, src)
        if select is not None:
            raw["select"] = select
        use = raw.get("use")
        full = f"{prefix}{name}"
        if not isinstance(use, str):
            self.err("this node has no `use:`", src, node=full, fix="add `use: <component or block name>`")
            scope.names[name] = _POISON
            return
        if len(self.nodes) > MAX_NODES_EXPANDED:  # stop at once: going on costs minutes of follow-up errors
            raise ResolveError(f"the graph expands to more than {MAX_NODES_EXPANDED} nodes", loc=self.doc.loc(src),
                               fix="lower `repeat` or the nesting of blocks")
        if use in self.spec.blocks or "pattern" in raw or "repeat" in raw:
            before = len(self.errors)
            self.expand_block(name, raw, scope, prefix, src, depth, names)
            if len(self.errors) > before and scope.lookup(name) is None:
                scope.names[name] = _POISON
            return
        unknown_meta = {"repeat", "pattern", "select"} & set(raw)
        if unknown_meta:
            self.err(f"`{sorted(unknown_meta)[0]}` needs a block in `use`", src)
        ins = raw.get("in")
        pairs: list[tuple[str | None, _Lazy]] = []
        if isinstance(ins, str):
            pairs = [(None, _Lazy(ins, scope, src + ("in",)))]
        elif isinstance(ins, list):
            pairs = [(None, _Lazy(v, scope, src + ("in", i))) for i, v in enumerate(ins)]
        elif isinstance(ins, dict):
            pairs = [(str(k), _Lazy(v, scope, src + ("in", k))) for k, v in ins.items()]
        elif ins is not None:
            self.err(f"`in` must be a node name, a list or a port map, got {ins!r}", src + ("in",))
        params = {k: v for k, v in raw.items() if k not in NODE_KEYS}
        tie = raw.get("tie")
        leak = raw.get("allow_leak", False)
        if not isinstance(leak, bool):
            self.err("`allow_leak` must be true or false", src + ("allow_leak",), got=repr(leak),
                     fix="allow_leak: true builds a component that sees future tokens on purpose")
        node = NodeSpec(path=full, use=use, inputs=[], params=params, src=src,
                        tie=tie if isinstance(tie, str) else None,
                        allow_leak=leak is True, instance=instance)
        if tie is not None and not isinstance(tie, str):
            self.err(f"`tie` must name a node, got {tie!r}", src + ("tie",))
        if full in self.nodes:
            self.err(f"two nodes expand to the same path {full!r}", src)
            return
        self.nodes[full] = node
        self.raw_inputs[full] = pairs
        self.define(scope, name, Ref(full), full)

    def expand_block(self, name: str, raw: dict[str, Any], scope: _Scope, prefix: str, src: tuple,
                     depth: int, outer: dict[str, Any] | None = None) -> None:
        full = f"{prefix}{name}"
        if depth >= MAX_BLOCK_DEPTH:
            self.err(f"blocks nest deeper than {MAX_BLOCK_DEPTH} levels at {full!r}", src)
            return
        pattern = raw.get("pattern")
        if pattern is None:
            pattern = [raw["use"]]
        if isinstance(pattern, str):
            pattern = [pattern]
        if not isinstance(pattern, list) or not pattern:
            self.err("`pattern` must be a list of block names", src + ("pattern",))
            return
        for i, b in enumerate(pattern):
            if not isinstance(b, str) or b not in self.spec.blocks:
                near = difflib.get_close_matches(str(b), list(self.spec.blocks), n=3)
                where = src + (("pattern", i) if "pattern" in raw else ("use",))
                self.err(f"unknown block {b!r}", where,
                         fix=f"did you mean {', '.join(near)}?" if near else f"blocks defined: {', '.join(self.spec.blocks) or 'none'}")
                return
        for b in pattern:
            bdef = self.spec.blocks[b]
            if not bdef.inputs or (isinstance(bdef.out, dict) and not bdef.out):
                key = "inputs" if not bdef.inputs else "out"
                self.err(f"block {b!r}: `{key}` is empty", ("blocks", b, key),
                         fix="a block takes at least one input and gives at least one output")
                return
        repeat = raw.get("repeat")
        if repeat is not None and (not isinstance(repeat, int) or isinstance(repeat, bool) or repeat < 0):
            self.err(f"`repeat` must be a whole number >= 0, got {repeat!r}", src + ("repeat",))
            return
        if repeat is not None and repeat > MAX_REPEAT:
            self.err(f"`repeat` is {repeat}, more than the limit {MAX_REPEAT}", src + ("repeat",),
                     fix="a blueprint with this many layers is almost certainly a typo")
            return
        overrides = {k: v for k, v in raw.items() if k not in BLOCK_USE_KEYS}
        count = 1 if repeat is None else repeat
        chosen = self.select_blocks(raw, pattern, count, src, outer or dict(self.params))
        if chosen is None:
            return
        paths = [full] if repeat is None else [f"{full}.{i}" for i in range(count)]
        first = self.spec.blocks[pattern[0]]
        if raw.get("in") is None:  # reported once here, not again for every instance's inputs
            self.err("a block node needs `in`", src, node=full,
                     fix=f"add `in: <node>`, or a map of the block's inputs ({', '.join(first.inputs)})")
            return
        bindings = self.bind_inputs(first.inputs, raw.get("in"), scope, src)
        prev: dict[str, Ref | _Lazy] = {}
        for i, ipath in enumerate(paths):
            bname = chosen[i]
            bdef = self.spec.blocks[bname]
            bsrc = ("blocks", bname)
            inst = _Scope(parent=scope)
            for inp in bdef.inputs:
                target = prev.get(inp) or bindings.get(inp)
                if target is None:
                    self.err(f"block {bname!r} input {inp!r} is not connected at {ipath!r}", src + ("in",))
                    return
                inst.names[inp] = target
            bparams = {}
            names = dict(self.params)
            for k, v in bdef.params.items():
                bparams[k] = self.sub(overrides.get(k, v), names, src + (k,) if k in overrides else bsrc + ("params", k))
            for k in overrides:
                if k not in bdef.params:
                    near = difflib.get_close_matches(k, list(bdef.params), n=3)
                    self.err(f"block {bname!r} has no param {k!r}", src + (k,),
                             fix=f"did you mean {', '.join(near)}?" if near else "declare it under the block's `params:`")
            names.update(bparams)
            names["index"] = i
            for lname, lraw in bdef.nodes.items():
                self.expand(lname, lraw, inst, ipath + ".", bsrc + ("nodes", lname), names, depth + 1, ipath)
            outs = {bdef.inputs[0]: bdef.out} if isinstance(bdef.out, str) else dict(bdef.out)
            prev = {k: _Lazy(v, inst, bsrc + ("out",)) for k, v in outs.items()}
            self.instance_outputs[ipath] = prev
            if repeat is not None:
                self.top.names[ipath] = prev[next(iter(prev))]
                for k, v in prev.items():
                    self.top.names[f"{ipath}.{k}"] = v
        if repeat is not None:
            self.instances[full] = paths
        if not prev:  # repeat: 0 passes the input through
            prev = dict(bindings)
        default = prev.get(first.inputs[0]) or next(iter(prev.values()), None)
        if default is None:
            self.err(f"block node {full!r} has no output", src)
            return
        self.define(scope, name, default, full)
        for k, v in prev.items():
            self.define(scope, f"{name}.{k}", v, f"{full}.{k}")
        scope.blocks[name] = (full, list(prev), paths if repeat is not None else [])

    def select_blocks(self, raw: dict[str, Any], pattern: list[str], count: int, src: tuple,
                      names: dict[str, Any]) -> list[str] | None:
        """The block of each instance: ``pattern[i % len]``, or ``pattern[select]`` with ``select``
        an expression over the params and ``index`` (the instance's number)."""
        select = raw.get("select")
        if select is None:
            return [pattern[i % len(pattern)] for i in range(count)]
        where = src + ("select",)
        if "pattern" not in raw:
            self.err("`select` picks from `pattern`, and this node has none", where,
                     fix="add `pattern: [block, ...]` for select to index")
            return None
        if not (isinstance(select, str) and EXPR_RE.fullmatch(select.strip())):
            self.err(f"`select` must be one ${{...}} expression over `index`, got {select!r}", where,
                     fix='e.g. select: "${1 if index % 8 == 4 else 0}"')
            return None
        out = []
        for i in range(count):
            try:
                k = substitute(select.strip(), {**names, "index": i})
            except ExprError as exc:
                self.err(f"bad expression {select!r}: {exc}", where)
                return None
            if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < len(pattern):
                self.err(f"`select` gives {k!r} for index {i}, not a position in `pattern`", where,
                         expected=f"a whole number 0 .. {len(pattern) - 1}", got=repr(k))
                return None
            out.append(pattern[k])
        return out

    def bind_inputs(self, names: list[str], ins: Any, scope: _Scope, src: tuple) -> dict[str, _Lazy]:
        if isinstance(ins, str):
            ins = [ins]
        if isinstance(ins, list):
            if len(ins) > len(names):
                self.err(f"the block takes {len(names)} input(s) ({', '.join(names)}), got {len(ins)}", src + ("in",))
            return {n: _Lazy(v, scope, src + ("in", i)) for i, (n, v) in enumerate(zip(names, ins))}
        if isinstance(ins, dict):
            for k in ins:
                if k not in names:
                    self.err(f"the block has no input {k!r}", src + ("in", k), fix=f"its inputs: {', '.join(names)}")
            return {k: _Lazy(v, scope, src + ("in", k)) for k, v in ins.items() if k in names}
        self.err("a block node needs `in`", src)
        return {}

    # -- the whole graph --------------------------------------------------------------
    def run(self) -> Resolved:
        inputs = {k: tuple(v) for k, v in self.spec.inputs.items()}
        for k in inputs:
            self.top.names[k] = Ref(k)
        for name, raw in self.doc.data.get("nodes", {}).items():
            if name in inputs:  # it would shadow the input: its users would read it, and it the input
                self.err(f"node {name!r} has the name of a graph input", ("nodes", name),
                         fix=f"rename the node; graph inputs: {', '.join(inputs)}")
                continue
            self.expand(name, raw, self.top, "", ("nodes", name), dict(self.params), 0, None)
        for path, pairs in self.raw_inputs.items():
            for port, lazy in pairs:
                ref = self.deref(lazy)
                if ref is not None:
                    self.nodes[path].inputs.append((port, ref))
        outputs = {}
        for k, v in self.spec.outputs.items():
            ref = self.lookup_ref(v, self.top, ("outputs", k))
            if ref is not None:
                outputs[k] = ref
        inst_out = {p: {k: r for k, v in outs.items() if (r := self.deref(v)) is not None}
                    for p, outs in self.instance_outputs.items()}
        self.insert_extensions(outputs, inst_out)
        losses = self.resolve_losses()
        exit_points = self.resolve_exits(outputs)
        if self.errors:
            raise ResolveError(self.errors)
        return Resolved(doc=self.doc, spec=self.spec, params=self.params, nodes=self.nodes, inputs=inputs,
                        outputs=outputs, losses=losses, instances=self.instances,
                        instance_outputs=inst_out, exit_points=exit_points)

    def insert_extensions(self, outputs: dict[str, Ref], inst_out: dict[str, dict[str, Ref]]) -> None:
        for ext_name, ext in self.spec.extensions.items():
            src = ("extensions", ext_name)
            pats = [ext.at] if isinstance(ext.at, str) else list(ext.at)
            matched = [p for p in list(self.nodes) if any(glob_to_regex(g).match(p) for g in pats)]
            if not matched:
                shapes = list(dict.fromkeys(re.sub(r"\.\d+(?=\.|$)", ".*", p) for p in self.nodes))
                near = [n for g in pats for n in difflib.get_close_matches(g, shapes, n=1, cutoff=0.6)]
                self.err(f"extension {ext_name!r}: `at` {ext.at!r} matches no node", src + ("at",),
                         fix=f"did you mean {', '.join(repr(n) for n in near)}?" if near
                         else f"node paths look like {', '.join(list(self.nodes)[:4])}")
                continue
            params = {k: v for k, v in (ext.model_extra or {}).items()}
            for m in matched:
                parent = m.rsplit(".", 1)[0] + "." if "." in m else ""
                new = f"{parent}{ext_name}"
                if new in self.nodes:
                    self.err(f"extension {ext_name!r} would create {new!r}, which exists", src)
                    continue
                old = Ref(m)
                for node in self.nodes.values():
                    node.inputs = [(p, Ref(new) if r == old else r) for p, r in node.inputs]
                for k, r in list(outputs.items()):
                    outputs[k] = Ref(new) if r == old else r
                for outs in inst_out.values():
                    for k, r in list(outs.items()):
                        outs[k] = Ref(new) if r == old else r
                self.nodes[new] = NodeSpec(path=new, use=ext.use, inputs=[(None, old)], params=dict(params),
                                           src=src, instance=self.nodes[m].instance)
                self.top.names[new] = Ref(new)

    def port_paths(self) -> list[tuple[str, Ref]]:
        out = []
        for path, node in self.nodes.items():
            info = REGISTRY.get(node.use)
            ports = info.outputs if info is not None else ("out",)
            for p in ports:
                out.append((f"{path}.{p}", Ref(path, p)))
        return out

    def resolve_losses(self) -> list[LossSpec]:
        losses = []
        candidates = None
        for name, ldoc in self.spec.losses.items():
            src = ("losses", name)
            pats = [ldoc.from_] if isinstance(ldoc.from_, str) else list(ldoc.from_)
            refs: list[Ref] = []
            for pat in pats:
                if "*" not in pat and "{" not in pat:
                    ref = self.lookup_ref(pat, self.top, src + ("from",))
                    if ref is not None:
                        refs.append(ref)
                    continue
                candidates = candidates if candidates is not None else self.port_paths()
                rx = glob_to_regex(pat)
                hits = [r for p, r in candidates if rx.match(p)]
                if not hits:
                    self.err(f"loss {name!r}: {pat!r} matches no output port", src + ("from",),
                             fix="ports look like trunk.*.attn.repulsion (node path, then port)")
                refs += hits
            losses.append(LossSpec(name=name, refs=refs, weight=ldoc.weight, reduce=ldoc.reduce, src=src))
        return losses

    def resolve_exits(self, outputs: dict[str, Ref]) -> list[str]:
        ex = self.spec.exits
        if ex is None:
            return []
        points: list[str] = []
        if ex.every is not None:
            inst = self.instances.get(ex.block or "")
            if inst is None:
                self.err(f"exits.block {ex.block!r} is not a repeated block node", ("exits", "block"),
                         fix=f"repeated blocks: {', '.join(self.instances) or 'none'}")
                return []
            points += [inst[i] for i in range(ex.every - 1, len(inst) - 1, ex.every)]
        for i, p in enumerate(ex.after):
            if p not in self.instance_outputs and p not in self.nodes:
                near = difflib.get_close_matches(p, list(self.instance_outputs) + list(self.nodes), n=3)
                self.err(f"exit point {p!r} is neither a block instance nor a node", ("exits", "after", i),
                         fix=f"did you mean {', '.join(near)}?" if near else "e.g. trunk.1")
            else:
                points.append(p)
        if len(set(points)) != len(points):
            dup = sorted({p for p in points if points.count(p) > 1})
            self.err(f"exit point(s) {', '.join(dup)} given twice", ("exits",),
                     fix="list each exit once (`every` already includes its instances)")
        if isinstance(ex.weighting, list) and len(ex.weighting) != len(points):
            self.err(f"exits.weighting lists {len(ex.weighting)} weights for {len(points)} exit points",
                     ("exits", "weighting"), fix=f"give one weight per exit ({', '.join(points)}), or use depth")
        if points and ex.head == "own" and "exits" in self.nodes:
            self.err("a node named `exits` clashes with the own exit heads (exits.<i>.head)", ("nodes", "exits"),
                     fix="rename the node")
        if points:
            _, problems = exit_heads(self.spec, self.nodes, outputs)
            for msg, src, fix in problems:
                self.err(msg, src, fix=fix)
        return points


@dataclass(frozen=True)
class ExitHeads:
    """How every exit reads out logits: ``head`` (and ``norm`` before it, None for no norm) are
    the final head's node paths; ``own`` heads are copies of them (``exits.<i>.norm`` and
    ``exits.<i>.head``), shared ones call the very same modules."""

    norm: str | None
    head: str
    own: bool


def exit_heads(spec: BlueprintDoc, nodes: dict[str, NodeSpec],
               outputs: dict[str, Ref]) -> tuple[ExitHeads | None, list[tuple[str, tuple, str | None]]]:
    """The exit readout plan and the problems with it (message, document path, fix)."""
    ex = spec.exits
    assert ex is not None
    if ex.head in ("tie", "own"):
        ref = outputs.get("logits")
        if ref is None:
            return None, [("exits need a final head to tie or copy, but the blueprint has no `logits` output",
                           ("exits", "head"), "name the head node: exits.head: <node>")]
        head = ref.node
    elif ex.head in nodes:
        head = ex.head
    else:
        near = difflib.get_close_matches(ex.head, list(nodes), n=3)
        return None, [(f"exits.head {ex.head!r} is not tie, own or a node", ("exits", "head"),
                       f"did you mean {', '.join(near)}?" if near else "use tie, own or the head node's name")]
    norm = None
    if ex.norm:
        srcs = nodes[head].inputs
        before = srcs[0][1].node if len(srcs) == 1 else None
        if before is None or before not in nodes or not nodes[before].use.startswith("norm."):
            got = ", ".join(str(r) for _, r in srcs) or "nothing"
            return None, [(f"exits.norm is true, but the head {head!r} reads {got}, not a norm node",
                           ("exits", "norm"), "set exits.norm: false, or put a norm.* node right before the head")]
        norm = before
    return ExitHeads(norm=norm, head=head, own=ex.head == "own"), []


def _eval_params(raw: dict[str, Any], doc: Document, src: tuple = ("params",)) -> dict[str, Any]:
    """Evaluate params that refer to each other, in dependency order; a cycle is an error."""
    errors = []
    done: dict[str, Any] = {}
    pending = dict(raw)
    while pending:
        progressed = False
        for k, v in list(pending.items()):
            deps = references(v) if isinstance(v, str) else set()
            if deps & set(pending) - {k} or k in deps:
                if k in deps:
                    errors.append(Diagnostic(f"param {k!r} refers to itself", loc=doc.loc(src + (k,))))
                    pending.pop(k)
                    progressed = True
                continue
            try:
                done[k] = substitute(v, {**done, **{n: None for n in ()}})
            except ExprError as exc:
                errors.append(Diagnostic(f"bad expression in param {k!r}: {exc}", loc=doc.loc(src + (k,)),
                                         got=repr(v)))
            pending.pop(k)
            progressed = True
        if not progressed:
            names = ", ".join(sorted(pending))
            errors.append(Diagnostic(f"params refer to each other in a cycle: {names}",
                                     loc=doc.loc(src + (sorted(pending)[0],))))
            break
    if errors:
        raise ResolveError(errors)
    return done


def _pydantic_errors(exc: ValidationError, doc: Document, prefix: tuple = ()) -> list[Diagnostic]:
    diags = []
    for e in exc.errors():
        loc = tuple(x for x in e["loc"] if not (isinstance(x, str) and x.startswith(("function-", "union["))))
        path = prefix + tuple("from" if x == "from_" else x for x in loc)
        where = ".".join(str(x) for x in path) or "the document"
        msg = e["msg"].removeprefix("Value error, ")
        got = fix = None
        if e["type"] == "extra_forbidden":
            msg = f"unknown key {path[-1]!r}"
            fix = unknown_key_fix(path)
        elif e["type"] == "missing":
            msg = f"missing required key {path[-1]!r}"
        elif "input" in e and not isinstance(e["input"], (dict, list)):
            got = repr(e["input"])
        diags.append(Diagnostic(f"{where}: {msg}", loc=doc.loc(path), got=got, expected=None, fix=fix))
    return diags


def _substitute_sections(data: dict[str, Any], params: dict[str, Any], doc: Document) -> dict[str, Any]:
    errors = []

    def sub(v: Any, path: tuple) -> Any:
        if isinstance(v, dict):
            return {k: sub(x, path + (k,)) for k, x in v.items()}
        if isinstance(v, list):
            return [sub(x, path + (i,)) for i, x in enumerate(v)]
        try:
            return substitute(v, params)
        except ExprError as exc:
            errors.append(Diagnostic(f"bad expression {v!r}: {exc}", loc=doc.loc(path)))
            return v

    out = dict(data)
    for key in ("train", "losses", "exits", "extensions", "inputs", "outputs", "init"):
        if key in out:
            out[key] = sub(out[key], (key,))
    if isinstance(out.get("growth"), list):
        out["growth"] = [
            {k: (v if k == "params" else sub(v, ("growth", i, k))) for k, v in st.items()} if isinstance(st, dict) else st
            for i, st in enumerate(out["growth"])
        ]
    if errors:
        raise ResolveError(errors)
    return out


def resolve(doc: Document, *, stage: int | None = None) -> Resolved:
    """Resolve a merged document (``extends`` and overrides already applied)."""
    data = doc.data
    raw_params = data.get("params") or {}
    if not isinstance(raw_params, dict):
        raise ValidateError("`params` must be a mapping of names to values", loc=doc.loc(("params",)))
    raw_params = dict(raw_params)
    growth = data.get("growth") or []
    if stage is not None:
        if not isinstance(growth, list) or not growth:
            raise ResolveError(f"stage {stage} was asked for, but the blueprint has no `growth` stages",
                               loc=doc.loc(("growth",)))
        if not 0 <= stage < len(growth):
            raise ResolveError(f"there is no stage {stage}", loc=doc.loc(("growth",)),
                               expected=f"0..{len(growth) - 1}", got=str(stage))
        stage_params = (growth[stage] or {}).get("params", {}) if isinstance(growth[stage], dict) else {}
        for k, v in stage_params.items():
            if k not in raw_params:
                near = difflib.get_close_matches(k, list(raw_params), n=3)
                raise ResolveError(f"growth stage {stage} sets unknown param {k!r}",
                                   loc=doc.loc(("growth", stage, "params", k)),
                                   fix=f"did you mean {', '.join(near)}?" if near else "declare it in `params`")
            raw_params[k] = v
    params = _eval_params(raw_params, doc)
    data = _substitute_sections(data, params, doc)
    try:
        spec = BlueprintDoc.model_validate(data)
    except ValidationError as exc:
        raise ValidateError(_pydantic_errors(exc, doc)) from None
    for i, st in enumerate(spec.growth):
        for k in st.params:
            if k not in (data.get("params") or {}):
                raise ValidateError(f"growth stage {i} sets unknown param {k!r}",
                                    loc=doc.loc(("growth", i, "params", k)), fix="declare it in `params`")
    resolved = _Resolver(Document(data=data, file=doc.file, pos=doc.pos, text=doc.text), spec, params).run()
    resolved.doc = doc
    resolved.stage = stage
    return resolved


def deepcopy_doc(doc: Document) -> Document:
    return Document(data=copy.deepcopy(doc.data), file=doc.file, pos=doc.pos, text=doc.text)


_ = Loc  # re-exported for type users
