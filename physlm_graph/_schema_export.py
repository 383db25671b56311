"""The blueprint format as a JSON Schema, for editors (VS Code's YAML extension, JetBrains).

``blueprint_json_schema()`` builds a draft-07 schema from the document models in ``_schema``
and from every registered component's parameter model (plugins included), so an editor
completes and checks each node's parameters by its ``use``::

    # yaml-language-server: $schema=./physlm-blueprint.schema.json

A node is checked by one ``if``/``then`` per component (``if use == "ffn.mlp" then`` its
parameters, nothing else): an editor then names the one wrong key, where a ``oneOf`` would only
say that no branch matched. Any value may also be a ``${...}`` expression, which the compiler
evaluates later. The schema checks the text; the compiler still checks the model.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from physlm_graph._schema import BLOCK_USE_KEYS, NODE_KEYS, BlueprintDoc

__all__ = ["blueprint_json_schema", "write_schema", "SCHEMA_ID"]

SCHEMA_ID = "https://physlm-graph.invalid/blueprint.schema.json"
EXPR = {"type": "string", "pattern": r"\$\{", "description": "a ${...} expression, evaluated by the compiler"}
NAME = {"type": "string", "description": "a node, a graph input or a block input (node.port picks an output)"}
IN = {
    "description": "the inputs: one source, a list of sources, or a map of ports to sources",
    "anyOf": [
        NAME,
        {"type": "array", "items": NAME},
        {"type": "object", "additionalProperties": NAME},
    ],
}
NODE_BASE: dict[str, Any] = {
    "use": {"type": "string", "description": "a registered component or a block of this blueprint"},
    "in": IN,
    "tie": {"type": "string", "description": "share this node's weight with another node's (e.g. the LM head with tok)"},
    "allow_leak": {"type": "boolean", "description": "accept a component that sees the future (non-causal)"},
    "about": {"type": "string", "description": "a note for readers"},
}
BLOCK_USE: dict[str, Any] = {
    "repeat": {"anyOf": [{"type": "integer", "minimum": 0}, EXPR], "description": "how many copies, chained"},
    "pattern": {"anyOf": [{"type": "array", "items": {"type": "string"}}, {"type": "string"}],
                "description": "block names used in turn (e.g. [mamba, mamba, attn])"},
    "select": {**EXPR, "description": "instance i uses pattern[select], an expression over the params and index "
                                     "(e.g. ${1 if index % 8 == 4 else 0}); without it pattern[i % len]"},
}
assert set(NODE_BASE) == set(NODE_KEYS) and set(BLOCK_USE) | {"use", "in", "about"} == set(BLOCK_USE_KEYS)


def _with_expr(prop: dict[str, Any]) -> dict[str, Any]:
    """Accept a ``${...}`` expression wherever a value goes; keep the docs on the outside."""
    outer = {k: prop[k] for k in ("title", "description", "default", "examples") if k in prop}
    inner = {k: v for k, v in prop.items() if k not in outer}
    if not inner:
        return prop  # Any: already accepts everything
    if set(inner) == {"anyOf"}:
        outer["anyOf"] = [*inner["anyOf"], EXPR]
    else:
        outer["anyOf"] = [inner, EXPR]
    return outer


def _rewrite_refs(node: Any, prefix: str) -> Any:
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if k == "$ref" and isinstance(v, str) and v.startswith("#/$defs/"):
                out[k] = f"#/definitions/{prefix}{v[len('#/$defs/'):]}"
            else:
                out[k] = _rewrite_refs(v, prefix)
        return out
    if isinstance(node, list):
        return [_rewrite_refs(v, prefix) for v in node]
    return node


def _model_schema(model: type[BaseModel], prefix: str, defs: dict[str, Any]) -> dict[str, Any]:
    """A pydantic model as an object schema whose leaves also take expressions; nested defs are
    hoisted into ``defs`` under ``prefix``."""
    raw = _rewrite_refs(model.model_json_schema(by_alias=True), prefix)
    for name, sub in raw.pop("$defs", {}).items():
        if sub.get("type") == "object" and "properties" in sub:
            sub = dict(sub, properties={k: _with_expr(v) for k, v in sub["properties"].items()})
        defs[prefix + name] = sub
    props = {k: _with_expr(v) for k, v in raw.get("properties", {}).items()}
    out: dict[str, Any] = {"type": "object", "properties": props, "additionalProperties": False}
    if raw.get("description"):
        out["description"] = raw["description"]
    if raw.get("required"):
        out["required"] = list(raw["required"])
    return out


def _component_rule(info: Any, defs: dict[str, Any]) -> dict[str, Any]:
    """``if use == name then`` the component's parameters (and the node keys), nothing else."""
    params = _model_schema(info.params, f"{info.name}.", defs)
    props = {**copy.deepcopy(NODE_BASE), **params["properties"]}
    summary = (info.doc.splitlines() or [""])[0]
    props["use"] = {"const": info.name, "description": summary}
    then: dict[str, Any] = {"properties": props, "additionalProperties": False}
    if params.get("required"):
        then["required"] = params["required"]
    return {"if": {"properties": {"use": {"const": info.name}}, "required": ["use"]}, "then": then}


def _node_schema(names: list[str]) -> dict[str, Any]:
    use = dict(NODE_BASE["use"])
    use["anyOf"] = [{"enum": names}, {"type": "string"}]  # the enum gives editors completions
    rules = [{"$ref": f"#/definitions/component:{n}"} for n in names]
    block_use = {  # a block: its own keys; the others override the block's params
        "if": {"properties": {"use": {"not": {"enum": names}}}, "required": ["use"]},
        "then": {"properties": {**BLOCK_USE}},
    }
    return {
        "type": "object",
        "description": "a node: `use` a component (its parameters as keys) or a block",
        "required": ["use"],
        "properties": {**NODE_BASE, "use": use, **BLOCK_USE},
        "allOf": [*rules, block_use],
    }


def blueprint_json_schema(registry: Any = None) -> dict[str, Any]:
    """The JSON Schema (draft-07) of a blueprint file, covering every registered component."""
    from physlm_graph._registry import REGISTRY

    reg = registry if registry is not None else REGISTRY
    infos = list(reg)
    names = [i.name for i in infos]
    defs: dict[str, Any] = {}
    for info in infos:
        defs[f"component:{info.name}"] = _component_rule(info, defs)
    defs["node"] = _node_schema(names)
    nodes = {"type": "object", "additionalProperties": {"$ref": "#/definitions/node"}}
    defs["block"] = {
        "type": "object",
        "additionalProperties": False,
        "required": ["nodes", "out"],
        "description": "a reusable sub-graph; `x` (or `inputs`) is what it takes",
        "properties": {
            "about": {"type": "string"},
            "params": {"type": "object", "description": "the block's own params, usable as ${name}"},
            "inputs": {"type": "array", "items": {"type": "string"}, "default": ["x"]},
            "nodes": nodes,
            "out": {"anyOf": [{"type": "string"}, {"type": "object", "additionalProperties": {"type": "string"}}],
                    "description": "the node that is the block's output, or a map of named outputs"},
        },
    }
    ext_use = {"type": "string", "anyOf": [{"enum": names}, {"type": "string"}]}
    # Every document field comes from BlueprintDoc (so a new field appears here by itself);
    # the graph parts, which BlueprintDoc leaves as free dicts, get the per-component rules.
    doc = _model_schema(BlueprintDoc, "doc.", defs)
    props: dict[str, Any] = {
        **doc["properties"],
        "physlm": {"const": 1, "description": "format version"},
        "extends": {"type": "string", "description": "a base blueprint, relative to this file"},
        "set": {"type": "object", "description": "dotted path -> value, e.g. {params.layers: 4}"},
        "replace": {"type": "object", "description": "dotted path -> a whole new value (the path must exist)"},
        "remove": {"type": "array", "items": {"type": "string"}, "description": "dotted paths to delete"},
        "params": {"type": "object", "description": "named values used as ${name} below"},
        "blocks": {"type": "object", "additionalProperties": {"$ref": "#/definitions/block"}},
        "nodes": nodes,
        "outputs": {"type": "object", "additionalProperties": {"type": "string"},
                    "description": "named outputs; `logits` is the language-model output"},
        "extensions": {"type": "object", "additionalProperties": {
            "type": "object", "required": ["use", "at"],
            "properties": {"use": ext_use, "at": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}},
        }},
    }
    return {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "$id": SCHEMA_ID,
        "title": "physlm-graph blueprint",
        "description": "A YAML blueprint of a language model (physlm-graph format 1).",
        "type": "object",
        "additionalProperties": False,
        "properties": props,
        # a derived blueprint (extends) may leave everything to its base
        "if": {"not": {"required": ["extends"]}},
        "then": {"required": ["name", "nodes", "outputs"]},
        "definitions": defs,
    }


def write_schema(path: str | Path | None) -> str:
    """Write the schema to ``path`` (stdout when None); returns the text."""
    text = json.dumps(blueprint_json_schema(), indent=2, ensure_ascii=False) + "\n"
    if path is not None:
        Path(path).write_text(text, encoding="utf-8")
    return text
