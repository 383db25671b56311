"""Stage 6, passes: optional rewrites of the GraphModule, each reporting whether it changed it.

- ``checkpoint``: activation checkpointing of every component inside a block instance.
- ``bf16`` / ``fp32``: cast parameters and floating buffers.

``checkpoint_blocks`` is the activation checkpointing ``train.checkpointing`` asks for: whole
block instances (all, or every k-th), each extracted into a graph of its own that runs under
``torch.utils.checkpoint`` (only the block's inputs are kept for backward; its inside is
recomputed), or selected components by path pattern.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import fx
from torch.utils.checkpoint import checkpoint

from physlm_graph._errors import PassError
from physlm_graph._ir import Resolved

__all__ = ["run_passes", "PASSES", "checkpointed_call", "checkpoint_blocks", "check_checkpointing", "called_modules", "CheckpointedBlock"]


def checkpointed_call(module: torch.nn.Module, *args: object, **kwargs: object) -> object:
    """Run ``module`` under activation checkpointing (recomputed in backward)."""
    if torch.is_grad_enabled() and module.training:
        return checkpoint(module, *args, use_reentrant=False, **kwargs)
    return module(*args, **kwargs)


def _checkpoint(gm: fx.GraphModule, res: Resolved) -> bool:
    changed = False
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and res.nodes.get(node.target) is not None and res.nodes[node.target].instance:
            with gm.graph.inserting_before(node):
                mod = gm.graph.get_attr(node.target)
                new = gm.graph.call_function(checkpointed_call, (mod, *node.args))
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            changed = True
    return changed


class CheckpointedBlock:
    """One block instance's nodes as a graph of their own, called under activation checkpointing.

    Deliberately not an ``nn.Module``: its graph calls the parent's own component modules (the
    same objects), so the parameters keep their names and the state dict is unchanged."""

    def __init__(self, instance: str, graph: fx.GraphModule) -> None:
        self.instance, self.graph = instance, graph

    def __call__(self, *args: object) -> object:
        if torch.is_grad_enabled():
            return checkpoint(self.graph, *args, use_reentrant=False)
        return self.graph(*args)


def called_modules(gm: fx.GraphModule) -> list[str]:
    """The module paths ``gm`` calls, inside checkpointed blocks too, in call order."""
    out: list[str] = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            out.append(str(node.target))
        elif node.op == "get_attr" and isinstance(getattr(gm, str(node.target), None), CheckpointedBlock):
            block = getattr(gm, str(node.target))
            out += [str(n.target) for n in block.graph.graph.nodes if n.op == "call_module"]
    return out


def _instance_nodes(gm: fx.GraphModule, res: Resolved, instance: str) -> list[fx.Node]:
    names = {p.replace(".", "_") for p, n in res.nodes.items() if n.instance == instance}
    return [n for n in gm.graph.nodes if n.op in ("call_module", "call_function", "call_method") and n.name in names]


def _extract(gm: fx.GraphModule, instance: str, nodes: list[fx.Node]) -> None:
    """Replace ``nodes`` (one block instance) by one checkpointed call of a graph made of them."""
    inside = set(nodes)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    inputs: list[fx.Node] = []
    for n in nodes:
        for a in n.all_input_nodes:
            if a not in inside and a not in inputs:
                inputs.append(a)
    outputs = [n for n in nodes if any(u not in inside for u in n.users)]
    last = max(order[n] for n in nodes)
    late_inputs = [a.name for a in inputs if order[a] > min(order[n] for n in nodes)]
    early_users = [u.name for n in outputs for u in n.users if u not in inside and order[u] < last]
    if late_inputs and early_users:
        raise PassError(f"block instance {instance!r} is interleaved with other nodes ({late_inputs[0]!r} feeds it "
                        f"and {early_users[0]!r} reads it mid-way), so it cannot be checkpointed as one piece",
                        fix="checkpoint its components instead: train.checkpointing: {nodes: [...]}")
    sub = fx.Graph()
    env: dict[fx.Node, fx.Node] = {a: sub.placeholder(a.name) for a in inputs}
    for n in nodes:
        env[n] = sub.node_copy(n, lambda x: env[x])
    sub.output(tuple(env[o] for o in outputs))
    block = CheckpointedBlock(instance, fx.GraphModule(gm, sub, class_name="CheckpointedBlock"))
    attr = "_checkpointed_" + instance.replace(".", "_")
    setattr(gm, attr, block)
    # after the block's last node (every input is defined by then), or before its first when an
    # outside node reads a block value mid-way (then no input comes late)
    anchor = max(nodes, key=lambda n: order[n]).next if not early_users else min(nodes, key=lambda n: order[n])
    with gm.graph.inserting_before(anchor), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the attribute is a plain object on purpose, not a module
        holder = gm.graph.get_attr(attr)
        call = gm.graph.call_function(_call_block, (holder, *inputs))
        for i, o in enumerate(outputs):
            item = gm.graph.call_function(_item, (call, i))
            o.replace_all_uses_with(item, delete_user_cb=lambda u: u not in inside)
    for n in reversed(nodes):
        gm.graph.erase_node(n)


def _call_block(block: CheckpointedBlock, *args: object) -> object:
    return block(*args)


def _item(values: tuple, i: int) -> object:
    return values[i]


def check_checkpointing(res: Resolved, doc: Any = None) -> None:
    """Refuse a ``train.checkpointing`` that cannot be honoured, at compile time (before step 0);
    ``doc`` (the merged document) gives the errors their file and line."""
    spec = res.spec.train.checkpointing
    if spec == "none":
        return
    where = "train.checkpointing"
    loc = doc.loc(("train", "checkpointing")) if doc is not None else None
    if res.exit_points or res.spec.growth:
        what = "early exits" if res.exit_points else "growth"
        raise PassError(loc=loc, message=f"{where}: activation checkpointing is not supported together with {what} yet",
                        fix=f"drop {where}, or train this blueprint without it")
    instances = [p for paths in res.instances.values() for p in paths]
    if (spec == "blocks" or "every" in spec) and not instances:
        raise PassError(loc=loc, message=f"{where} asks for blocks, but the blueprint repeats no block",
                        fix="checkpoint components by path: train.checkpointing: {nodes: [...]}")
    if isinstance(spec, dict) and "every" in spec and spec["every"] > len(instances):
        raise PassError(loc=loc, message=f"{where}.every is {spec['every']}, but the blueprint has only {len(instances)} block "
                        "instances: nothing would be checkpointed")
    if isinstance(spec, dict) and "nodes" in spec:
        for pat in spec["nodes"]:
            if not any(fnmatch.fnmatchcase(p, pat) for p in res.nodes):
                raise PassError(loc=loc, message=f"{where}.nodes: {pat!r} matches no node", fix="patterns match node paths such as "
                                "trunk.*.attn")


def checkpoint_blocks(gm: fx.GraphModule, res: Resolved, spec: Any) -> list[str]:
    """Apply ``train.checkpointing`` (``"none"``, ``"blocks"``, ``{"every": k}`` or
    ``{"nodes": [patterns]}``) to ``gm`` in place; return what was checkpointed (instance or node
    paths). A pattern that matches no component is an error naming it."""
    if spec in (None, "none"):
        return []
    instances = [p for paths in res.instances.values() for p in paths]
    if spec == "blocks" or isinstance(spec, dict) and "every" in spec:
        every = 1 if spec == "blocks" else int(spec["every"])
        if not instances:
            raise PassError("train.checkpointing asks for blocks, but the blueprint repeats no block",
                            fix="checkpoint components by path: train.checkpointing: {nodes: [...]}")
        chosen = instances[every - 1::every]
        for inst in chosen:
            nodes = _instance_nodes(gm, res, inst)
            if nodes:
                _extract(gm, inst, nodes)
    else:
        patterns = list(spec["nodes"])
        modules = [n for n in gm.graph.nodes if n.op == "call_module"]
        chosen = []
        for pat in patterns:
            hits = [n for n in modules if fnmatch.fnmatchcase(str(n.target), pat)]
            if not hits:
                raise PassError(f"train.checkpointing.nodes: {pat!r} matches no component",
                                fix="patterns match node paths such as trunk.*.attn")
            chosen += [str(n.target) for n in hits if str(n.target) not in chosen]
        for node in modules:
            if str(node.target) in chosen:
                with gm.graph.inserting_before(node):
                    mod = gm.graph.get_attr(node.target)
                    new = gm.graph.call_function(checkpointed_call, (mod, *node.args), dict(node.kwargs))
                node.replace_all_uses_with(new)
                gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return chosen


def _cast(dtype: torch.dtype) -> Callable[[fx.GraphModule, Resolved], bool]:
    def run(gm: fx.GraphModule, res: Resolved) -> bool:
        before = {p.dtype for p in gm.parameters()}
        gm.to(dtype)
        return before != {dtype}

    return run


PASSES: dict[str, Callable[[fx.GraphModule, Resolved], bool]] = {
    "checkpoint": _checkpoint,
    "bf16": _cast(torch.bfloat16),
    "fp32": _cast(torch.float32),
}


def run_passes(gm: fx.GraphModule, names: list[str], res: Resolved) -> tuple[fx.GraphModule, list[tuple[str, bool]]]:
    applied = []
    for name in names:
        fn = PASSES.get(name)
        if fn is None:
            raise PassError(f"unknown pass {name!r}", expected=", ".join(PASSES))
        changed = fn(gm, res)
        if changed:
            gm.graph.lint()
            gm.recompile()
        applied.append((name, changed))
    return gm, applied
