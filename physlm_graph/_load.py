"""Stage 1, load: safe YAML to plain data plus the source position of every key and value.

Only the YAML core types are accepted: an unknown tag (``!!python/object``, ``!foo``) is a
``LoadError`` at its position. Duplicate keys are errors (PyYAML would keep the last one
silently). Limits on size, nesting depth and node count protect against hostile files.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from physlm_graph._errors import Diagnostic, LoadError, Loc
from physlm_graph._yaml_errors import syntax_error

__all__ = ["Document", "load_document", "read_scalar", "file_problem", "MAX_BYTES", "MAX_DEPTH", "MAX_NODES"]

MAX_BYTES = 2_000_000
MAX_DEPTH = 48
MAX_NODES = 200_000

Path_ = tuple[str | int, ...]

_STD_TAGS = {
    "tag:yaml.org,2002:str",
    "tag:yaml.org,2002:int",
    "tag:yaml.org,2002:float",
    "tag:yaml.org,2002:bool",
    "tag:yaml.org,2002:null",
    "tag:yaml.org,2002:map",
    "tag:yaml.org,2002:seq",
    "tag:yaml.org,2002:timestamp",
}


class _Loader(yaml.SafeLoader):
    """YAML's safe loader that also reads ``1e-3`` as a number (YAML 1.1 wants ``1.0e-3``; 1.2
    and every user expect a number), so a typed field never sees it as text."""


_Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                              list("-+0123456789"))


def read_scalar(text: str) -> Any:
    """A command-line value read as a blueprint would read it (``4`` an int, ``1e-3`` a float)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


@dataclass
class Document:
    """A loaded blueprint: plain data and where each path came from."""

    data: dict[str, Any]
    file: str
    pos: dict[Path_, Loc] = field(default_factory=dict)
    text: str = ""
    hf_folder: str | None = None  # the Hugging Face folder this document was read from (config.json)

    def loc(self, path: Path_) -> Loc | None:
        """The position of ``path``, or of its nearest ancestor that has one."""
        p = tuple(path)
        while True:
            if p in self.pos:
                return self.pos[p]
            if not p:
                return Loc(self.file) if self.file else None
            p = p[:-1]


def _loc(file: str, mark: Any) -> Loc:
    return Loc(file, mark.line + 1, mark.column + 1)


class _Converter:
    def __init__(self, file: str, loader: _Loader) -> None:
        self.file = file
        self.loader = loader
        self.pos: dict[Path_, Loc] = {}
        self.count = 0

    def construct(self, node: yaml.Node) -> Any:
        """A scalar's value; a value its tag cannot hold (``!!float add``) is a located error."""
        try:
            return self.loader.construct_object(node)
        except (yaml.YAMLError, ValueError, TypeError, OverflowError) as exc:
            what = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise LoadError(f"cannot read this value: {what}", loc=_loc(self.file, node.start_mark)) from None

    def convert(self, node: yaml.Node, path: Path_, depth: int) -> Any:
        self.count += 1
        if self.count > MAX_NODES:
            raise LoadError(
                f"the document has more than {MAX_NODES} YAML nodes",
                loc=_loc(self.file, node.start_mark),
                fix="split it into smaller blueprints, or look for an alias that expands recursively",
            )
        if depth > MAX_DEPTH:
            raise LoadError(
                f"the document nests deeper than {MAX_DEPTH} levels",
                loc=_loc(self.file, node.start_mark),
                fix="flatten the structure; blueprints rarely need more than 6 levels",
            )
        if node.tag not in _STD_TAGS:
            raise LoadError(
                f"unknown or unsafe YAML tag {node.tag!r}",
                loc=_loc(self.file, node.start_mark),
                fix="blueprints are plain YAML: remove the tag (python objects are never constructed)",
            )
        self.pos.setdefault(path, _loc(self.file, node.start_mark))
        if isinstance(node, yaml.MappingNode):
            out: dict[str, Any] = {}
            self.loader.flatten_mapping(node)
            for knode, vnode in node.value:
                if not isinstance(knode, yaml.ScalarNode):
                    raise LoadError("a mapping key must be a plain name", loc=_loc(self.file, knode.start_mark))
                key = self.construct(knode)
                if not isinstance(key, (str, int, float, bool)) or key is None:
                    raise LoadError(f"a mapping key must be a name, got {key!r}", loc=_loc(self.file, knode.start_mark))
                key = str(key) if not isinstance(key, str) else key
                if key in out:
                    raise LoadError(
                        f"duplicate key {key!r}",
                        loc=_loc(self.file, knode.start_mark),
                        fix=f"{key!r} first appears at line {self.pos[path + (key,)].line}; keep one",
                    )
                self.pos[path + (key,)] = _loc(self.file, knode.start_mark)
                out[key] = self.convert(vnode, path + (key,), depth + 1)
                self.pos.setdefault(path + (key, "__value__"), _loc(self.file, vnode.start_mark))
            return out
        if isinstance(node, yaml.SequenceNode):
            items = []
            for i, item in enumerate(node.value):
                self.pos[path + (i,)] = _loc(self.file, item.start_mark)
                items.append(self.convert(item, path + (i,), depth + 1))
            return items
        value = self.construct(node)
        if hasattr(value, "isoformat"):  # timestamps: keep the text
            value = str(node.value)
        return value


def _type_name(loader: _Loader, node: yaml.Node) -> str:
    """The Python type a root node would load as (its tag when that cannot be constructed)."""
    if node.tag not in _STD_TAGS:
        return node.tag
    try:
        return type(loader.construct_object(node)).__name__
    except (yaml.YAMLError, ValueError, TypeError, OverflowError):
        return node.tag


def _is_path_like(source: str) -> bool:
    return "\n" not in source and (source.endswith((".yaml", ".yml")) or os.path.lexists(source))


def file_problem(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` cannot be read as a blueprint file, said of it (``is a folder, not a
    blueprint file``); None when it can (a regular file, or a pipe such as /dev/stdin)."""
    try:
        st = os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "is a symlink loop (following its links leads back to a link already followed)"
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return "does not exist"
        return f"cannot be opened: {exc.strerror or exc}"
    except ValueError as exc:  # a NUL byte in the name
        return f"cannot be opened: {exc}"
    if stat.S_ISDIR(st.st_mode):
        return "is a folder, not a blueprint file"
    if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        return "is a device, not a blueprint file"
    return None


_TOO_LARGE_FIX = "a blueprint describes a model; use `repeat` and `blocks` instead of writing layers out"


def _too_large(head: bytes, file: str) -> LoadError:
    """The size limit, located where the text crosses it (``head`` is the text up to there)."""
    line = head.count(b"\n") + 1
    col = len(head[head.rfind(b"\n") + 1 :].decode("utf-8", "replace")) + 1
    return LoadError(f"the blueprint is larger than {MAX_BYTES // 1_000_000} MB (the limit is crossed here)",
                     loc=Loc(file, line, col), fix=_TOO_LARGE_FIX)


def _too_deep(text: str, file: str, loader: _Loader) -> Loc:
    """Where nesting first passes the limit, found by the (iterative) scanner: the opening
    token at depth MAX_DEPTH + 1 below the top mapping; where the parser stopped otherwise."""
    opens = (yaml.BlockMappingStartToken, yaml.BlockSequenceStartToken, yaml.FlowMappingStartToken,
             yaml.FlowSequenceStartToken)
    closes = (yaml.BlockEndToken, yaml.FlowMappingEndToken, yaml.FlowSequenceEndToken)
    depth = 0
    try:
        for tok in yaml.scan(text, Loader=_Loader):
            if isinstance(tok, opens):
                depth += 1
                if depth > MAX_DEPTH + 1:
                    return _loc(file, tok.start_mark)
            elif isinstance(tok, closes):
                depth -= 1
    except yaml.YAMLError:
        pass
    return _loc(file, loader.get_mark())


def load_text(text: str, file: str) -> Document:
    raw = text.encode("utf-8", "replace")
    if len(raw) > MAX_BYTES:
        raise _too_large(raw[:MAX_BYTES], file)
    try:
        loader = _Loader(text)
    except yaml.reader.ReaderError as exc:  # a control character: the reader checks the whole text first
        before = text[: exc.position]
        line, col = before.count("\n") + 1, exc.position - (before.rfind("\n") + 1) + 1
        raise LoadError(f"YAML cannot hold the control character #x{exc.character:04x}",
                        loc=Loc(file, line, col), fix="remove it; a blueprint is plain text") from None
    try:
        node = loader.get_single_node()
        if node is None:
            raise LoadError("the blueprint is empty", loc=Loc(file, 1, 1), fix="start from blueprints/baby-gpt.yaml")
        if not isinstance(node, yaml.MappingNode):
            raise LoadError(
                "a blueprint must be a YAML mapping (name: ..., nodes: ...)",
                loc=_loc(file, node.start_mark),
                expected="a mapping",
                got=_type_name(loader, node),
            )
        conv = _Converter(file, loader)
        data = conv.convert(node, (), 0)
    except yaml.MarkedYAMLError as exc:
        raise LoadError(syntax_error(text, file, exc)) from None
    except yaml.YAMLError as exc:
        raise LoadError(f"YAML error: {exc}", loc=Loc(file)) from None
    except RecursionError:  # the YAML parser recursed before the depth check saw the node
        raise LoadError(f"the document nests deeper than {MAX_DEPTH} levels", loc=_too_deep(text, file, loader),
                        fix="flatten the structure; blueprints rarely need more than 6 levels") from None
    finally:
        loader.dispose()
    return Document(data=data, file=file, pos=conv.pos, text=text)


def load_document(source: str | os.PathLike[str] | dict[str, Any]) -> Document:
    """Load a blueprint from a path, YAML text, or an already-parsed dict. A folder with a
    ``config.json`` (a transformers ``save_pretrained`` folder) loads as its family blueprint
    with the config's params, as ``physlm-graph import`` writes it."""
    if isinstance(source, dict):
        import copy

        return Document(data=copy.deepcopy(source), file="<dict>")
    if isinstance(source, os.PathLike) or (isinstance(source, str) and _is_path_like(source)):
        path = Path(source)
        problem = file_problem(path)
        if problem == "does not exist":
            raise LoadError(f"no such blueprint file: {path}", loc=Loc(str(path)), fix="check the path")
        if problem == "is a folder, not a blueprint file" and (path / "config.json").is_file():
            from physlm_graph._hf_import import hf_blueprint  # a save_pretrained folder: its family blueprint

            return Document(data=hf_blueprint(path), file=str(path / "config.json"), hf_folder=str(path))
        if problem == "is a folder, not a blueprint file":
            raise LoadError(f"{path} {problem}", loc=Loc(str(path)),
                            fix="pass a blueprint file, or a Hugging Face model folder (config.json + *.safetensors)")
        if problem is not None:
            raise LoadError(f"{path} {problem}", loc=Loc(str(path)))
        try:
            with open(path, "rb") as f:
                raw = f.read(MAX_BYTES + 1)  # never more: the path may be a device or a huge file
        except (OSError, ValueError) as exc:  # no permission, a name too long, a NUL byte
            raise LoadError(f"cannot read the blueprint: {getattr(exc, 'strerror', None) or exc}",
                            loc=Loc(str(path))) from None
        if len(raw) > MAX_BYTES:
            raise _too_large(raw[:MAX_BYTES], str(path))
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = raw[: exc.start].count(b"\n") + 1
            raise LoadError(
                f"the file is not UTF-8 text (bad byte at offset {exc.start})",
                loc=Loc(str(path), line, 1),
                fix="save the blueprint as UTF-8",
            ) from None
        if "\x00" in text:
            raise LoadError("the file is binary, not a YAML blueprint", loc=Loc(str(path)))
        return load_text(text, str(path))
    if isinstance(source, str):
        return load_text(source, "<string>")
    raise LoadError(
        Diagnostic(f"cannot load a blueprint from a {type(source).__name__}", expected="a path, YAML text or a dict")
    )
