"""``extends`` with ``set``/``replace``/``remove``, and command-line ``--set path=value``.

A derived blueprint names its base with ``extends: base.yaml`` (relative to its own file) and
changes it:

    extends: ngt.yaml
    name: ngt-no-repulsion
    set:     {params.layers: 4, nodes.head.bias: false}   # set a value (parents must exist)
    replace: {blocks.block.nodes.attn: {use: attention.causal, in: ln1, num_heads: 8}}
    remove:  [losses.repulsion]

Any other top-level key (``name``, ``about``, ``train``...) is merged into the base: mappings
key by key, everything else replaced.
"""

from __future__ import annotations

import copy
import os
import difflib
from pathlib import Path
from typing import Any

import yaml

from physlm_graph._errors import Diagnostic, Loc, ResolveError
from physlm_graph._load import Document, file_problem, load_document, read_scalar
from physlm_graph._paths import key_rule, used_names

__all__ = ["merge_extends", "apply_overrides", "parse_override", "MAX_EXTENDS_DEPTH"]

MAX_EXTENDS_DEPTH = 16
_DERIVE_KEYS = ("extends", "set", "replace", "remove")
_MAPPING_SECTIONS = ("params", "inputs", "blocks", "nodes", "outputs", "losses", "exits", "extensions", "train", "init")


def _split(path: str) -> list[str]:
    return [p for p in str(path).split(".")]


class _PathError(LookupError):
    """A path that names nothing: the message, and the did-you-mean when there is one."""

    def __init__(self, message: str, fix: str | None = None) -> None:
        super().__init__(message)
        self.fix = fix


def _walk(data: Any, parts: list[str], create: bool = False) -> tuple[Any, str | int]:
    """Return (container, last key) for a dotted path; raise KeyError(part index) if missing.

    With ``create``, a missing mapping on the way that the schema allows (``train`` in a
    blueprint without one) is created empty."""
    cur = data
    for i, part in enumerate(parts[:-1]):
        if isinstance(cur, dict) and part in cur:
            cur = cur[part]
        elif isinstance(cur, list) and part.lstrip("-").isdigit() and -len(cur) <= int(part) < len(cur):
            cur = cur[int(part)]
        elif create and isinstance(cur, dict) and _allows(data, parts[:i], part, intermediate=True):
            cur[part] = {}
            cur = cur[part]
        else:
            raise KeyError(i)
    last: str | int = parts[-1]
    if isinstance(cur, list):
        if not str(last).lstrip("-").isdigit():
            raise KeyError(len(parts) - 1)
        last = int(last)
    elif not isinstance(cur, dict):
        raise KeyError(len(parts) - 1)
    return cur, last


def _allows(data: dict[str, Any], parent: list[str], key: str, *, intermediate: bool = False) -> bool:
    rule = key_rule(data, tuple(parent))
    if rule.kind == "open":
        return True
    if intermediate:  # only a section that is a mapping is created on the way (never a list)
        return not parent and key in _MAPPING_SECTIONS
    return rule.kind == "params" or key in rule.allowed


def _container(data: Any, parts: list[str]) -> Any:
    cur = data
    for part in parts:
        cur = cur[part] if isinstance(cur, dict) else cur[int(part)]
    return cur


def _missing(data: Any, parts: list[str], idx: int) -> _PathError:
    """Why ``parts[idx]`` is not there, with the closest keys that are (or may be) there."""
    cur = _container(data, parts[:idx])
    parent = ".".join(parts[:idx])
    if not isinstance(cur, (dict, list)):
        return _PathError(f"{parent} is {cur!r}, not a mapping, so it has no {parts[idx]!r}")
    if isinstance(cur, list):
        return _PathError(f"{parent} has no item {parts[idx]}", fix=f"items 0..{len(cur) - 1}" if cur else None)
    rule = key_rule(data, tuple(parts[:idx]))
    if idx < len(parts) - 1 and parts[idx] in rule.allowed:
        full = ".".join(parts[: idx + 1])
        return _PathError(f"this blueprint has no {full}, so {'.'.join(parts)} cannot be set in it",
                          fix=f"write `{parts[idx]}:` into the blueprint first")
    options = [str(o) for o in cur] + [k for k in rule.allowed if k not in cur]
    prefix = f"{parent}." if parent else ""
    near = [prefix + n for n in difflib.get_close_matches(parts[idx], options, n=3)]
    if not parent and len(parts) == 1 and isinstance(data.get("params"), dict):
        near += [f"params.{n}" for n in difflib.get_close_matches(parts[0], [str(k) for k in data["params"]], n=2)]
    if near:
        fix = f"did you mean {', '.join(near)}?"
    elif rule.allowed and len(rule.allowed) <= 12:
        fix = f"{rule.what or parent} takes: {', '.join(rule.allowed)}"
    else:
        fix = None
    return _PathError(f"{rule.what or parent or 'the top level'} has no key {parts[idx]!r}", fix)


def _set(data: dict[str, Any], path: str, value: Any, *, must_exist: bool,
         new_params: list[tuple[list[str], str]] | None = None) -> None:
    """Write ``value`` at ``path``. Unless ``must_exist``, the last key may also be one the
    schema documents; a new name in a ``params`` mapping is recorded in ``new_params``, to be
    checked once every change is in (``_unused_params``)."""
    parts = _split(path)
    try:
        cur, last = _walk(data, parts, create=not must_exist)
    except KeyError as exc:
        raise _missing(data, parts, exc.args[0]) from None
    if isinstance(cur, list):
        if not -len(cur) <= int(last) < len(cur):
            raise _missing(data, parts, len(parts) - 1)
    elif last not in cur:
        if must_exist or not _allows(data, parts[:-1], str(last)):
            raise _missing(data, parts, len(parts) - 1)
        if key_rule(data, tuple(parts[:-1])).kind == "params" and new_params is not None:
            new_params.append((parts[:-1], str(last)))
    cur[last] = copy.deepcopy(value)


def _unused_params(data: dict[str, Any], new: list[tuple[list[str], str]]) -> list[tuple[int, _PathError]]:
    """The new params (by index in ``new``) that no ``${...}`` uses: they would change nothing."""
    used = used_names(data)
    out = []
    for i, (parent, key) in enumerate(new):
        if key in used:
            continue
        try:
            existing = [str(k) for k in _container(data, parent) if k != key]
        except (KeyError, IndexError, ValueError, TypeError):
            existing = []
        where = ".".join(parent)
        near = [f"{where}.{n}" for n in difflib.get_close_matches(key, existing, n=3)]
        fix = f"did you mean {', '.join(near)}?" if near else "use it in an expression, e.g. ${" + key + "}"
        out.append((i, _PathError(f"{where} has no key {key!r}, and no ${{...}} uses it", fix)))
    return out


def _remove(data: dict[str, Any], path: str) -> None:
    parts = _split(path)
    try:
        cur, last = _walk(data, parts)
    except KeyError as exc:
        raise _missing(data, parts, exc.args[0]) from None
    if isinstance(cur, dict):
        if last not in cur:
            raise _missing(data, parts, len(parts) - 1)
        del cur[last]
    elif -len(cur) <= int(last) < len(cur):
        del cur[int(last)]
    else:
        raise _missing(data, parts, len(parts) - 1)


def _params_mappings(data: dict[str, Any]) -> list[tuple[str, ...]]:
    """The paths of the params mappings a document writes: ``params`` and each block's."""
    out: list[tuple[str, ...]] = [("params",)]
    blocks = data.get("blocks")
    if isinstance(blocks, dict):
        out += [("blocks", str(b), "params") for b, bdef in blocks.items() if isinstance(bdef, dict)]
    return out


def _at(data: Any, path: tuple[str, ...]) -> Any:
    for part in path:
        data = data.get(part) if isinstance(data, dict) else None
    return data


def _deep_merge(base: Any, over: Any) -> Any:
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            out[k] = _deep_merge(base[k], v) if k in base else copy.deepcopy(v)
        return out
    return copy.deepcopy(over)


def _shown(path: Path) -> str:
    """A path as the user would type it: relative to the working folder when that is shorter."""
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return str(path)
    return rel if not rel.startswith("..") else str(path)


def merge_extends(doc: Document, _depth: int = 0, _seen: tuple[str, ...] = ()) -> Document:
    """Resolve ``extends`` recursively; return one self-contained document."""
    data = doc.data
    if "extends" not in data:
        for key in ("set", "replace", "remove"):
            if key in data:
                raise ResolveError(
                    f"`{key}` only works together with `extends`",
                    loc=doc.loc((key,)),
                    fix="add `extends: base.yaml`, or edit the values directly",
                )
        return doc
    ext = data["extends"]
    loc = doc.loc(("extends",))
    if not isinstance(ext, str) or not ext:
        raise ResolveError("`extends` must be a file name", loc=loc, got=repr(ext))
    if _depth >= MAX_EXTENDS_DEPTH:
        raise ResolveError(f"`extends` chains deeper than {MAX_EXTENDS_DEPTH} files", loc=loc)
    base_dir = Path(doc.file).parent if doc.file not in ("<string>", "<dict>") else Path.cwd()
    shown = repr(ext) if len(ext) <= 80 else repr(ext[:80]) + "..."
    try:
        base_path = Path(os.path.realpath(base_dir / ext))  # never raises on a symlink loop
    except (OSError, ValueError) as exc:  # a name too long for the file system, a NUL byte
        raise ResolveError(f"the base blueprint cannot be opened: {getattr(exc, 'strerror', None) or exc}", loc=loc,
                           got=shown) from None
    if str(base_path) in _seen:
        raise ResolveError(f"`extends` forms a cycle through {base_path.name}", loc=loc)
    problem = file_problem(base_dir / ext)
    if problem == "does not exist":
        raise ResolveError(
            f"the base blueprint {ext!r} does not exist",
            loc=loc,
            fix=f"looked for {_shown(base_path)}; paths are relative to the blueprint that extends",
        )
    if problem is not None:
        if problem.startswith("cannot be opened"):
            raise ResolveError(f"the base blueprint {problem}", loc=loc, got=shown)
        raise ResolveError(f"the base blueprint {shown} {problem}", loc=loc,
                           fix="`extends` names one blueprint file, relative to the blueprint that extends")
    base = merge_extends(load_document(base_path), _depth + 1, _seen + (str(base_path),))
    merged = copy.deepcopy(base.data)
    pos = dict(base.pos)
    own = {k: v for k, v in data.items() if k not in _DERIVE_KEYS}
    merged = _deep_merge(merged, own)
    pos.update({p: l for p, l in doc.pos.items() if p and p[0] not in _DERIVE_KEYS})
    errors: list[Diagnostic] = []
    new_params: list[tuple[list[str], str]] = []
    new_where: list[tuple[Loc | None, str]] = []  # where each new param was written, and how
    for parent in _params_mappings(data):  # a param this file adds must be used, or it is a typo
        own, old = _at(data, parent), _at(base.data, parent)
        if isinstance(own, dict) and isinstance(old, dict):
            for k in own:
                if k not in old:
                    new_params.append((list(parent), str(k)))
                    new_where.append((doc.loc(parent + (k,)), ".".join(parent + (k,))))
    for key, must_exist in (("set", False), ("replace", True)):
        section = data.get(key, {}) or {}
        if not isinstance(section, dict):
            errors.append(Diagnostic(f"`{key}` must map paths to values", loc=doc.loc((key,))))
            continue
        for path, value in section.items():
            before = len(new_params)
            try:
                _set(merged, path, value, must_exist=must_exist, new_params=new_params)
                for p, l in doc.pos.items():  # positions of the new value come from this file
                    if p[:2] == (key, path):
                        pos[tuple(_split(path)) + p[2:]] = l
            except _PathError as exc:
                errors.append(Diagnostic(f"cannot {key} {path}: {exc}", loc=doc.loc((key, path)), fix=exc.fix))
            new_where += [(doc.loc((key, path)), f"cannot {key} {path}")] * (len(new_params) - before)
    removes = data.get("remove", []) or []
    if not isinstance(removes, list):
        errors.append(Diagnostic("`remove` must be a list of paths", loc=doc.loc(("remove",))))
        removes = []
    for i, path in enumerate(removes):
        try:
            _remove(merged, str(path))
        except _PathError as exc:
            errors.append(Diagnostic(f"cannot remove {path}: {exc}", loc=doc.loc(("remove", i)), fix=exc.fix))
    for i, exc in _unused_params(merged, new_params):
        loc, what = new_where[i]
        errors.append(Diagnostic(f"{what}: {exc}", loc=loc, fix=exc.fix))
    if errors:
        raise ResolveError(errors)
    return Document(data=merged, file=doc.file, pos=pos, text=doc.text)


def parse_override(item: str) -> tuple[str, Any]:
    """``a.b=v`` -> (``a.b``, v) with v read as a YAML scalar (``4`` is an int, ``x`` a string)."""
    if "=" not in item:
        raise ResolveError(f"--set {item!r}: expected path=value", loc=Loc("<command line>"),
                           fix="e.g. --set params.layers=4")
    path, _, raw = item.partition("=")
    path = path.strip()
    if not path:
        raise ResolveError(f"--set {item!r}: the path is empty", loc=Loc("<command line>"))
    try:
        value = read_scalar(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return path, value


def _as_typed(path: str, value: Any) -> str:
    """An override as one would type it on the command line: ``params.layers=4``."""
    if isinstance(value, str):
        return f"{path}={value}"
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return f"{path}={text.removesuffix('...').strip()}"


def apply_overrides(doc: Document, overrides: dict[str, Any] | list[str] | None) -> Document:
    """Apply ``--set`` overrides. A bare name that is a param (``layers=4``) sets ``params.layers``.

    Each path must name a key of the document or one its schema documents (``train.warmup``
    in a blueprint without ``train:``); anything else is an error with the closest names."""
    if not overrides:
        return doc
    if isinstance(overrides, list):
        items = [(*parse_override(o), str(o)) for o in overrides]
    else:
        items = [(str(k), v, _as_typed(str(k), v)) for k, v in overrides.items()]
    data = copy.deepcopy(doc.data)
    errors = []
    new_params: list[tuple[list[str], str]] = []
    typed: list[str] = []
    for path, value, shown in items:
        params = data.get("params")
        if "." not in path and path not in data and isinstance(params, dict) and path in params:
            path = f"params.{path}"
        before = len(new_params)
        try:
            _set(data, path, value, must_exist=False, new_params=new_params)
        except _PathError as exc:
            errors.append(Diagnostic(f"--set {shown}: {exc}", loc=Loc("<command line>"), fix=exc.fix))
        typed += [shown] * (len(new_params) - before)
    for i, exc in _unused_params(data, new_params):
        errors.append(Diagnostic(f"--set {typed[i]}: {exc}", loc=Loc("<command line>"), fix=exc.fix))
    if errors:
        raise ResolveError(errors)
    return Document(data=data, file=doc.file, pos=doc.pos, text=doc.text)
