"""Stage 6, passes: optional rewrites of the GraphModule, each reporting whether it changed it.

- ``checkpoint``: activation checkpointing of every component inside a block instance.
- ``bf16`` / ``fp32``: cast parameters and floating buffers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import fx
from torch.utils.checkpoint import checkpoint

from physlm_graph._errors import PassError
from physlm_graph._ir import Resolved

__all__ = ["run_passes", "PASSES", "checkpointed_call"]


def checkpointed_call(module: torch.nn.Module, *args: object) -> object:
    """Run ``module`` under activation checkpointing (recomputed in backward)."""
    if torch.is_grad_enabled() and module.training:
        return checkpoint(module, *args, use_reentrant=False)
    return module(*args)


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
