"""Weight initialisation schemes a blueprint can ask for with ``init:``.

``default`` keeps each component's own initialisation. ``gpt2`` is GPT-2's and nanoGPT's:
every Linear and Embedding weight N(0, std), biases zero, and the output projection of every
residual branch N(0, std / sqrt(2 L)) with L the number of block instances (Radford et al.
2019, "we scale the weights of residual layers at initialization by 1/sqrt(N)").

A component whose initialisation is deliberate (a scorer bias that selects every token, a
weight mask) defines ``after_init_scheme()``; it runs after any scheme, on every module that
has it, so the scheme cannot erase what the component relies on.

A residual branch is an input of an ``add`` node inside a block instance whose producer is a
component of that instance (not the skip path); its output projection is the last Linear of
that component, in module order, whose output width equals the residual width.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from physlm_graph._ir import Resolved
from physlm_graph._registry import REGISTRY

__all__ = ["apply_init", "residual_output_projections"]


def residual_output_projections(res: Resolved, modules: dict[str, nn.Module]) -> dict[str, nn.Linear]:
    """Node path -> the Linear that writes its residual branch, for every branch in every instance."""
    found: dict[str, nn.Linear] = {}
    for path, node in res.nodes.items():
        info = REGISTRY.get(node.use)
        if info is None or node.use != "add" or node.instance is None:
            continue
        for _, ref in node.inputs:
            src = res.nodes.get(ref.node)
            if src is None or src.instance != node.instance or ref.node not in modules:
                continue
            mod = modules[ref.node]
            linears = [m for m in mod.modules() if isinstance(m, nn.Linear)]
            if linears:
                width = linears[-1].out_features
                cands = [m for m in linears if m.out_features == width]
                found[ref.node] = cands[-1]
    return found


@torch.no_grad()
def apply_init(res: Resolved, modules: dict[str, nn.Module], scheme: str, std: float) -> None:
    if scheme == "default":
        return
    for mod in modules.values():
        for m in mod.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
    layers = sum(len(v) for v in res.instances.values()) or 1
    for lin in residual_output_projections(res, modules).values():
        nn.init.normal_(lin.weight, mean=0.0, std=std / math.sqrt(2 * layers))
    for mod in modules.values():
        for m in mod.modules():
            keep = getattr(m, "after_init_scheme", None)
            if callable(keep):
                keep()
