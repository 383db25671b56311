"""The LM head and the loss as one fused operation (``components/head/_linear_ce.py``).

``split_lm_head(module)`` returns a copy of a compiled blueprint's GraphModule that outputs
``hidden`` (the head's input) instead of ``logits``, and the head, when the blueprint's logits
come straight out of one ``head.lm`` node: no bias, no other user of the logits (a softcap or a
temperature after the head would change the loss). Otherwise it returns the reason it cannot.
The copy shares every parameter with the original, so evaluation and generation keep using the
original module while the training step calls the copy and ``linear_cross_entropy``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn


def split_lm_head(module: nn.Module) -> tuple[fx.GraphModule, nn.Module] | str:
    """(GraphModule outputting ``hidden`` in place of ``logits``, the head module), or why not."""
    from physlm_graph.components.head.lm import LMHead

    if not isinstance(module, fx.GraphModule):
        return "the model is not a compiled blueprint's GraphModule"
    graph = module.graph
    out = next(n for n in graph.nodes if n.op == "output")
    result = out.args[0]
    if not isinstance(result, dict) or not isinstance(result.get("logits"), fx.Node):
        return "the blueprint has no `logits` output"
    head_node = result["logits"]
    if head_node.op != "call_module":
        return "the `logits` output is not a head module's output"
    head = module.get_submodule(head_node.target)
    if not isinstance(head, LMHead):
        return f"the `logits` output comes from {type(head).__name__}, not head.lm"
    if head.bias is not None:
        return "head.lm has a bias (the fused loss has none)"
    if len(head_node.users) != 1:
        return "the logits feed other nodes besides the output"
    new_graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    res = dict(new_graph.graph_copy(graph, env))  # the output's value, mapped (no output node yet)
    res.pop("logits")
    res["hidden"] = env[head_node].args[0]
    new_graph.output(res)
    new_graph.erase_node(env[head_node])
    new_graph.lint()
    return fx.GraphModule(module, new_graph), head


class FusedLossModule(nn.Module):
    """The training module of a split model: ``forward(x, y)`` -> (mean CE, the other outputs).

    The loss is inside the forward so that a DDP wrapper sees the head's weight used there (an
    untied head's gradient is all-reduced like any other). Parameters are the body's and the
    head's, the very tensors of the original module."""

    def __init__(self, body: fx.GraphModule, head: nn.Module) -> None:
        super().__init__()
        self.body = body
        self.head = head

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        return fused_lm_loss((self.body, self.head), x, y)


def fused_lm_loss(split: tuple[fx.GraphModule, nn.Module], x: torch.Tensor, y: torch.Tensor,
                  ignore_index: int = -100) -> tuple[torch.Tensor, dict[str, Any]]:
    """(mean CE through the fused head, the rest of the model's outputs) for tokens x, targets y."""
    from physlm_graph.components.head._linear_ce import linear_cross_entropy

    body, head = split
    out = body(x)
    ce = linear_cross_entropy(out["hidden"], head.weight, y, ignore_index=ignore_index, limit=head.logit_limit)
    return ce, out
