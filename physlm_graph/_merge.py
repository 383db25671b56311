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
from physlm_graph._load import Document, load_document

__all__ = ["merge_extends", "apply_overrides", "parse_override", "MAX_EXTENDS_DEPTH"]

MAX_EXTENDS_DEPTH = 16
_DERIVE_KEYS = ("extends", "set", "replace", "remove")


def _split(path: str) -> list[str]:
    return [p for p in str(path).split(".")]


def _walk(data: Any, parts: list[str], create: bool = False) -> tuple[Any, str | int]:
    """Return (container, last key) for a dotted path; raise KeyError(part index) if missing."""
    cur = data
    for i, part in enumerate(parts[:-1]):
        if isinstance(cur, dict) and part in cur:
            cur = cur[part]
        elif isinstance(cur, list) and part.lstrip("-").isdigit() and -len(cur) <= int(part) < len(cur):
            cur = cur[int(part)]
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


def _missing(data: Any, parts: list[str], idx: int) -> str:
    cur = data
    for part in parts[:idx]:
        cur = cur[part] if isinstance(cur, dict) else cur[int(part)]
    options = list(cur) if isinstance(cur, dict) else []
    near = difflib.get_close_matches(parts[idx], [str(o) for o in options], n=3)
    where = ".".join(parts[:idx]) or "the top level"
    hint = f"; did you mean {', '.join(near)}?" if near else ""
    return f"{where} has no {parts[idx]!r}{hint}"


def _set(data: dict[str, Any], path: str, value: Any, *, must_exist: bool) -> None:
    parts = _split(path)
    try:
        cur, last = _walk(data, parts)
    except KeyError as exc:
        raise LookupError(_missing(data, parts, exc.args[0])) from None
    if isinstance(cur, list):
        if not -len(cur) <= int(last) < len(cur):
            raise LookupError(f"{'.'.join(parts[:-1])} has no item {last}")
    elif must_exist and last not in cur:
        raise LookupError(_missing(data, parts, len(parts) - 1))
    cur[last] = copy.deepcopy(value)


def _remove(data: dict[str, Any], path: str) -> None:
    parts = _split(path)
    try:
        cur, last = _walk(data, parts)
    except KeyError as exc:
        raise LookupError(_missing(data, parts, exc.args[0])) from None
    if isinstance(cur, dict):
        if last not in cur:
            raise LookupError(_missing(data, parts, len(parts) - 1))
        del cur[last]
    else:
        del cur[int(last)]


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
    try:
        base_path = (base_dir / ext).resolve()
        exists = base_path.exists()
    except (OSError, ValueError) as exc:  # a name too long for the file system, a NUL byte
        raise ResolveError(f"the base blueprint cannot be opened: {getattr(exc, 'strerror', None) or exc}", loc=loc,
                           got=repr(ext) if len(ext) <= 80 else repr(ext[:80]) + "...") from None
    if str(base_path) in _seen:
        raise ResolveError(f"`extends` forms a cycle through {base_path.name}", loc=loc)
    if not exists:
        raise ResolveError(
            f"the base blueprint {ext!r} does not exist",
            loc=loc,
            fix=f"looked for {_shown(base_path)}; paths are relative to the blueprint that extends",
        )
    base = merge_extends(load_document(base_path), _depth + 1, _seen + (str(base_path),))
    merged = copy.deepcopy(base.data)
    pos = dict(base.pos)
    own = {k: v for k, v in data.items() if k not in _DERIVE_KEYS}
    merged = _deep_merge(merged, own)
    pos.update({p: l for p, l in doc.pos.items() if p and p[0] not in _DERIVE_KEYS})
    errors: list[Diagnostic] = []
    for key, must_exist in (("set", False), ("replace", True)):
        section = data.get(key, {}) or {}
        if not isinstance(section, dict):
            errors.append(Diagnostic(f"`{key}` must map paths to values", loc=doc.loc((key,))))
            continue
        for path, value in section.items():
            try:
                _set(merged, path, value, must_exist=must_exist)
                for p, l in doc.pos.items():  # positions of the new value come from this file
                    if p[:2] == (key, path):
                        pos[tuple(_split(path)) + p[2:]] = l
            except LookupError as exc:
                errors.append(Diagnostic(f"cannot {key} {path}: {exc}", loc=doc.loc((key, path))))
    removes = data.get("remove", []) or []
    if not isinstance(removes, list):
        errors.append(Diagnostic("`remove` must be a list of paths", loc=doc.loc(("remove",))))
        removes = []
    for i, path in enumerate(removes):
        try:
            _remove(merged, str(path))
        except LookupError as exc:
            errors.append(Diagnostic(f"cannot remove {path}: {exc}", loc=doc.loc(("remove", i))))
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
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return path, value


def apply_overrides(doc: Document, overrides: dict[str, Any] | list[str] | None) -> Document:
    """Apply ``--set`` overrides. A bare name that is a param (``layers=4``) sets ``params.layers``."""
    if not overrides:
        return doc
    items = [parse_override(o) for o in overrides] if isinstance(overrides, list) else list(overrides.items())
    data = copy.deepcopy(doc.data)
    errors = []
    for path, value in items:
        params = data.get("params")
        if "." not in path and path not in data and isinstance(params, dict) and path in params:
            path = f"params.{path}"
        try:
            _set(data, path, value, must_exist=False)
        except LookupError as exc:
            errors.append(Diagnostic(f"--set {path}: {exc}", loc=Loc("<command line>")))
    if errors:
        raise ResolveError(errors)
    return Document(data=data, file=doc.file, pos=doc.pos, text=doc.text)
