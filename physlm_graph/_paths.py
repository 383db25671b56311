"""Which dotted paths an override may name: keys of the document, or keys its schema allows.

``--set``, an extends file's ``set:`` and its ``params:`` write into the merged document by path
(``train.warmup``, ``blocks.block.nodes.attn.num_heads``, ``growth.1.until``). A path must name
a key the document has, or a *documented optional key*: a field of the section's schema that
this document leaves out (``train.warmup``, ``init.std``, ``exits.every``), or a parameter of
the node's component (``nodes.head.bias``). Mappings whose keys the user names (``nodes``,
``blocks``, ``losses``, ``outputs``...) take new keys; ``params`` takes a new name only when
some ``${...}`` uses it, since a param nothing reads changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from physlm_graph._expr import references
from physlm_graph._registry import REGISTRY
from physlm_graph._schema import (BLOCK_USE_KEYS, NODE_KEYS, BlockDoc, BlueprintDoc, ExitsDoc, GrowthStage,
                                  InitDoc, LossDoc, TrainConfig)

__all__ = ["KeyRule", "key_rule", "used_names", "fields_of"]

# mappings whose keys are names the user chooses
_OPEN = {("inputs",), ("outputs",), ("nodes",), ("blocks",), ("losses",), ("extensions",)}
_SECTIONS: dict[tuple[str, ...], type[BaseModel]] = {
    (): BlueprintDoc, ("train",): TrainConfig, ("init",): InitDoc, ("exits",): ExitsDoc,
}


def fields_of(model: type[BaseModel]) -> list[str]:
    """The YAML keys of a schema model (aliases where a field has one: ``from``)."""
    return [f.alias or name for name, f in model.model_fields.items()]


@dataclass(frozen=True)
class KeyRule:
    """What keys a mapping in the document may take beyond those it has.

    ``kind`` is ``open`` (any name), ``params`` (a name some ``${...}`` uses) or ``fields``
    (only ``allowed``, the documented keys: none for a mapping the schema does not describe).
    """

    kind: str
    allowed: tuple[str, ...] = ()
    what: str = ""  # how the mapping is called in messages, e.g. "nodes.head (head.lm)"


def _node_rule(node: Any, blocks: Any, what: str) -> KeyRule:
    use = node.get("use") if isinstance(node, dict) else None
    if not isinstance(use, str):
        return KeyRule("open")
    block_names = blocks if isinstance(blocks, dict) else {}
    if use in block_names or (isinstance(node, dict) and ("pattern" in node or "repeat" in node)):
        pattern = node.get("pattern", [use]) if isinstance(node, dict) else [use]
        pattern = [pattern] if isinstance(pattern, str) else pattern if isinstance(pattern, list) else []
        params: list[str] = []
        for b in pattern:
            bdef = block_names.get(b) if isinstance(b, str) else None
            if isinstance(bdef, dict) and isinstance(bdef.get("params"), dict):
                params += [k for k in bdef["params"] if k not in params]
        return KeyRule("fields", tuple(sorted(BLOCK_USE_KEYS)) + tuple(params), f"{what} (block {use})")
    info = REGISTRY.get(use)
    if info is None:  # validate names the unknown component; its keys cannot be checked here
        return KeyRule("open")
    return KeyRule("fields", tuple(sorted(NODE_KEYS)) + tuple(fields_of(info.params)), f"{what} ({use})")


def key_rule(data: dict[str, Any], parts: tuple[str, ...]) -> KeyRule:
    """The rule for new keys of the mapping at ``parts`` (a path of string keys) in ``data``."""
    what = ".".join(parts) or "the top level"
    if parts in _SECTIONS:
        return KeyRule("fields", tuple(fields_of(_SECTIONS[parts])), what)
    if parts in _OPEN:
        return KeyRule("open")
    if parts == ("params",):
        return KeyRule("params", what=what)
    n = len(parts)
    blocks = data.get("blocks")
    if n == 2 and parts[0] == "nodes":
        return _node_rule((data.get("nodes") or {}).get(parts[1]), blocks, what)
    if n == 2 and parts[0] == "blocks":
        return KeyRule("fields", tuple(fields_of(BlockDoc)), what)
    if n == 3 and parts[0] == "blocks" and parts[2] == "params":
        return KeyRule("params", what=what)
    if n == 3 and parts[0] == "blocks" and parts[2] in ("nodes", "out"):
        return KeyRule("open")
    if n == 4 and parts[0] == "blocks" and parts[2] == "nodes":
        bdef = (blocks or {}).get(parts[1]) if isinstance(blocks, dict) else None
        nodes = bdef.get("nodes") if isinstance(bdef, dict) else None
        return _node_rule((nodes or {}).get(parts[3]) if isinstance(nodes, dict) else None, blocks, what)
    if (n == 3 and parts[0] == "nodes" or n == 5 and parts[0] == "blocks") and parts[-1] == "in":
        return KeyRule("open")  # a port map: validate checks the port names
    if n == 2 and parts[0] == "losses":
        return KeyRule("fields", tuple(fields_of(LossDoc)), what)
    if n == 2 and parts[0] == "extensions":
        ext = (data.get("extensions") or {}).get(parts[1])
        info = REGISTRY.get(ext.get("use")) if isinstance(ext, dict) and isinstance(ext.get("use"), str) else None
        if info is None:
            return KeyRule("open")
        return KeyRule("fields", ("use", "at") + tuple(fields_of(info.params)), f"{what} ({ext['use']})")
    if n == 2 and parts[0] == "growth":
        return KeyRule("fields", tuple(fields_of(GrowthStage)), what)
    if n == 3 and parts[0] == "growth" and parts[2] == "params":
        params = data.get("params")
        return KeyRule("fields", tuple(params) if isinstance(params, dict) else (), what)
    return KeyRule("fields", (), what)


def used_names(data: Any) -> set[str]:
    """Every name a ``${...}`` anywhere in ``data`` refers to."""
    out: set[str] = set()
    stack = [data]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
        elif isinstance(v, str) and "${" in v:
            out |= references(v)
    return out
