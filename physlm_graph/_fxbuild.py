"""Stage 5, build fx: construct the ``fx.Graph`` directly from the checked graph (no tracing).

``placeholder`` per graph input, ``call_module`` per component (its submodule path is the
blueprint path, ``trunk.3.attn``), ``call_function`` for plain ops and port selection, and an
``output`` holding a dict: the blueprint's named outputs plus ``aux``, the unweighted auxiliary
loss terms by name. The generated code starts with a banner naming the blueprint.
"""

from __future__ import annotations

import copy
import operator
from typing import Any

import torch
from torch import fx, nn

from physlm_graph._errors import BuildError
from physlm_graph._infer import build_modules
from physlm_graph._init import apply_init
from physlm_graph._ir import Inferred, Ref
from physlm_graph._registry import REGISTRY
from physlm_graph._resolve import exit_heads
from physlm_graph._validate import Checked, topo_order

__all__ = ["build_graph_module", "mean_of", "sum_of", "set_submodule"]


def mean_of(*xs: torch.Tensor) -> torch.Tensor:
    """Mean of scalar loss terms gathered across repeats."""
    return torch.stack([x.float().reshape(()) for x in xs]).mean()


def sum_of(*xs: torch.Tensor) -> torch.Tensor:
    """Sum of scalar loss terms gathered across repeats."""
    return torch.stack([x.float().reshape(()) for x in xs]).sum()


class _BannerCodeGen(fx.graph.CodeGen):
    def __init__(self, banner: str) -> None:
        super().__init__()
        self.banner = banner

    def gen_fn_def(self, free_vars: list[str], maybe_return_annotation: str) -> str:
        return self.banner + super().gen_fn_def(free_vars, maybe_return_annotation)


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    """Place ``module`` at a dotted path, creating plain container modules on the way."""
    parts = path.split(".")
    cur = root
    for p in parts[:-1]:
        nxt = cur._modules.get(p)
        if nxt is None:
            nxt = nn.Module()
            cur.add_module(p, nxt)
        cur = nxt
    if parts[-1] in cur._modules:
        raise BuildError(f"two nodes want the submodule path {path!r}")
    cur.add_module(parts[-1], module)


def _safe_name(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text)


def build_graph_module(inf: Inferred, checked: Checked, *, device: str | torch.device = "cpu", seed: int = 0,
                       banner: str = "") -> fx.GraphModule:
    res = inf.resolved
    order = topo_order(res)
    torch.manual_seed(seed)
    modules = build_modules(res, checked, inf.specs, device, order)
    if str(device) != "meta":
        apply_init(res, modules, res.spec.init.scheme, res.spec.init.std)
    root = nn.Module()
    for path in order:
        if path in modules:
            set_submodule(root, path, modules[path])
    for path in order:  # ties share the target's parameter object
        node = res.nodes[path]
        if node.tie is not None and path in modules:
            info = REGISTRY.get(node.use)
            tinfo = REGISTRY.get(res.nodes[node.tie].use)
            setattr(modules[path], info.tie_param, getattr(modules[node.tie], tinfo.tie_param))  # type: ignore[union-attr,arg-type]
    graph = fx.Graph()
    graph.set_codegen(_BannerCodeGen(banner))
    env: dict[str, fx.Node] = {}
    ports: dict[tuple[str, str | None], fx.Node] = {}
    for name in res.inputs:
        env[name] = graph.placeholder(name)

    def value(ref: Ref) -> fx.Node:
        key = (ref.node, ref.port)
        if key in ports:
            return ports[key]
        base = env[ref.node]
        if ref.node in res.inputs:
            return base
        info = REGISTRY.get(res.nodes[ref.node].use)
        assert info is not None
        if len(info.outputs) == 1:
            ports[key] = base
            return base
        idx = 0 if ref.port is None else info.outputs.index(ref.port)
        n = graph.create_node("call_function", operator.getitem, (base, idx),
                              name=_safe_name(f"{ref.node}_{info.outputs[idx]}"))
        ports[key] = n
        return n

    for path in order:
        node = res.nodes[path]
        info = REGISTRY.get(node.use)
        assert info is not None
        args: list[Any]
        if info.variadic:
            args = [value(r) for _, r in node.inputs]
        else:
            by_port: dict[str, Ref] = {}
            for i, (p, r) in enumerate(node.inputs):
                by_port[p if p is not None else info.inputs[i]] = r
            args = [value(by_port[p]) if p in by_port else None for p in info.inputs]
            while args and args[-1] is None:
                args.pop()
        if info.function is not None:
            kwargs = checked[path].model_dump()
            env[path] = graph.create_node("call_function", info.function, tuple(args), kwargs, name=_safe_name(path))
        else:
            env[path] = graph.create_node("call_module", path, tuple(args), {}, name=_safe_name(path))
    result: dict[str, Any] = {k: value(r) for k, r in res.outputs.items()}
    aux: dict[str, Any] = {}
    for loss in res.losses:
        fn = mean_of if loss.reduce == "mean" else sum_of
        aux[loss.name] = graph.create_node("call_function", fn, tuple(value(r) for r in loss.refs),
                                           name=_safe_name(f"aux_{loss.name}"))
    result["aux"] = aux
    if res.exit_points:
        result["exit_hidden"], result["exit_logits"] = _exit_outputs(graph, root, modules, res, value, order)
    graph.output(result)
    try:
        graph.lint()
    except Exception as exc:  # an internal invariant: the checked graph must lint
        raise BuildError(f"the generated fx graph is malformed: {exc}") from exc
    return fx.GraphModule(root, graph, class_name=_safe_name(res.name) or "Blueprint")


def _exit_outputs(graph: fx.Graph, root: nn.Module, modules: dict[str, nn.Module], res: Any, value: Any,
                  order: list[str]) -> tuple[dict[str, fx.Node], dict[str, fx.Node]]:
    """Each exit point's hidden state and its logits, shallowest exit first (graph order). Shared
    (``head: tie`` or a node) exits call the final norm and head modules again; ``own`` exits get
    copies of them at ``exits.<i>.norm`` and ``exits.<i>.head`` (initialised as the final ones are,
    then trained on their own)."""
    plan, problems = exit_heads(res.spec, res.nodes, res.outputs)
    assert plan is not None and not problems, problems  # resolve reported these
    rank = {path: i for i, path in enumerate(order)}
    refs = {}
    for p in res.exit_points:
        outs = res.instance_outputs.get(p)
        refs[p] = next(iter(outs.values())) if outs else Ref(p)
    hidden: dict[str, fx.Node] = {}
    logits: dict[str, fx.Node] = {}
    for i, p in enumerate(sorted(res.exit_points, key=lambda q: rank.get(refs[q].node, -1))):
        h = hidden[p] = value(refs[p])
        norm, head = plan.norm, plan.head
        if plan.own:
            if norm is not None:
                set_submodule(root, f"exits.{i}.norm", copy.deepcopy(modules[norm]))
                norm = f"exits.{i}.norm"
            set_submodule(root, f"exits.{i}.head", copy.deepcopy(modules[head]))
            head = f"exits.{i}.head"
        if norm is not None:
            h = graph.create_node("call_module", norm, (h,), {}, name=_safe_name(f"exit_{p}_norm"))
        logits[p] = graph.create_node("call_module", head, (h,), {}, name=_safe_name(f"exit_{p}_logits"))
    return hidden, logits
