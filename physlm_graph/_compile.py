"""The pipeline: one straight list of named stages, each a pure step between typed IRs.

    load -> merge (extends, --set) -> resolve -> validate -> infer_shapes -> build_fx -> passes

With a ``growth:`` list, the checks after shape inference also compile every growth stage on
meta and compare consecutive stages (``_growth_spec``), once per merged document.
``compile_blueprint(..., dump_ir="resolve")`` prints the IR after any stage.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import yaml
from torch import fx

from physlm_graph._errors import PhysLMError
from physlm_graph._growth_spec import GrowthPhase, check_growth
from physlm_graph._infer import infer_shapes
from physlm_graph._ir import Inferred, NodeReport, Resolved
from physlm_graph._load import Document, load_document
from physlm_graph._merge import apply_overrides, merge_extends
from physlm_graph._passes import check_checkpointing
from physlm_graph._resolve import resolve
from physlm_graph._validate import Checked, check_file_kind, validate

__all__ = ["compile_blueprint", "CompiledModel", "STAGES", "canonical_graph", "blueprint_yaml"]

STAGES = ("load", "merge", "resolve", "validate", "infer_shapes", "build_fx", "passes")


def blueprint_yaml(data: dict[str, Any]) -> str:
    """The merged blueprint as YAML: self-contained (no ``extends``), what checkpoints store."""
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=100)


def canonical_graph(res: Resolved) -> dict[str, Any]:
    """The expanded graph as plain data: what the model *is*, independent of how it was written."""
    nodes = {}
    for path, n in res.nodes.items():
        entry: dict[str, Any] = {"use": n.use}
        if n.inputs:
            entry["in"] = [str(r) if p is None else {p: str(r)} for p, r in n.inputs]
        entry.update({k: n.params[k] for k in sorted(n.params)})
        if n.tie:
            entry["tie"] = n.tie
        if n.allow_leak:
            entry["allow_leak"] = True
        nodes[path] = entry
    return {
        "inputs": {k: list(v) for k, v in res.inputs.items()},
        "nodes": nodes,
        "outputs": {k: str(v) for k, v in res.outputs.items()},
        "losses": {l.name: {"from": [str(r) for r in l.refs], "weight": l.weight, "reduce": l.reduce} for l in res.losses},
        "exits": res.exit_points,
    }


@dataclass
class CompiledModel:
    """A compiled blueprint: the module, the resolved blueprint with its hash, and the report."""

    module: fx.GraphModule | None
    blueprint: dict[str, Any]  # the merged document: re-compiles to the same model
    graph: dict[str, Any]  # the canonical expanded graph
    hash: str
    inferred: Inferred
    checked: Checked
    passes: list[tuple[str, bool]] = field(default_factory=list)
    growth_stages: list[GrowthPhase] = field(default_factory=list)  # checked; [] without growth

    @property
    def resolved(self) -> Resolved:
        return self.inferred.resolved

    @property
    def name(self) -> str:
        return self.resolved.name

    @property
    def report(self) -> list[NodeReport]:
        return self.inferred.reports

    @property
    def num_params(self) -> int:
        return self.inferred.total_params

    @property
    def flops_per_token(self) -> float:
        return self.inferred.flops_per_token

    @property
    def loss_weights(self) -> dict[str, float]:
        return {l.name: l.weight for l in self.resolved.losses}

    @property
    def train_config(self) -> Any:
        return self.resolved.spec.train

    @property
    def blueprint_text(self) -> str:
        return blueprint_yaml(self.blueprint)

    def decode_kind(self, path: str) -> str:
        """How node ``path`` generates: ``stateless``, ``cached``, ``recurrent`` or ``none``."""
        from physlm_graph._registry import REGISTRY

        info = REGISTRY.get(self.resolved.nodes[path].use)
        return info.decode_kind(self.checked[path]) if info is not None else "none"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "hash": self.hash,
            "params": self.num_params,
            "flops_per_token": self.flops_per_token,
            "sample": self.inferred.sample,
            "stage": self.resolved.stage,
            "nodes": [
                {"node": r.path, "component": r.use, "outputs": dict(r.out_shapes), "params": r.params,
                 "flops_per_token": r.flops_per_token, "tied_to": r.tied_to, "decode": self.decode_kind(r.path)}
                for r in self.report
            ],
        }


def _hash(graph: dict[str, Any]) -> str:
    text = json.dumps(graph, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _dump(stage: str, ir: Any, want: str | None, sink: Callable[[str], None]) -> None:
    if want != stage:
        return
    if isinstance(ir, Document):
        sink(blueprint_yaml(ir.data))
    elif isinstance(ir, Resolved):
        sink(yaml.safe_dump(canonical_graph(ir), sort_keys=False))
    elif isinstance(ir, Inferred):
        sink("\n".join(f"{r.path}: {r.use} -> {r.out_shapes} params={r.params}" for r in ir.reports))
    elif isinstance(ir, fx.GraphModule):
        sink(ir.code)
    else:
        sink(repr(ir))


def compile_blueprint(
    source: str | os.PathLike[str] | dict[str, Any],
    *,
    overrides: dict[str, Any] | list[str] | None = None,
    stage: int | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    build: bool = True,
    passes: list[str] | None = None,
    dump_ir: str | None = None,
    dump: Callable[[str], None] = print,
) -> CompiledModel:
    """Compile a blueprint (a path, YAML text or a dict) into a ``CompiledModel``.

    A Hugging Face ``save_pretrained`` folder (``config.json`` + ``*.safetensors``) of a supported
    family compiles as its family blueprint with the config's params (what ``physlm-graph
    import`` writes); its weights, when the folder has them, are loaded into the built module.

    ``overrides`` are ``--set``-style changes (``{"params.layers": 2}`` or ``["layers=2"]``);
    ``stage`` builds one growth stage; ``device="meta"`` checks and reports without allocating
    weights; ``build=False`` stops after shape inference (``module`` is None).
    """
    if dump_ir is not None and dump_ir not in STAGES:
        raise PhysLMError(f"unknown stage {dump_ir!r} for dump_ir", expected=", ".join(STAGES))
    doc = load_document(source)
    hf_folder = doc.hf_folder
    check_file_kind(doc)
    _dump("load", doc, dump_ir, dump)
    doc = apply_overrides(merge_extends(doc), overrides)
    _dump("merge", doc, dump_ir, dump)
    res = resolve(doc, stage=stage)
    _dump("resolve", res, dump_ir, dump)
    checked = validate(res)
    _dump("validate", res, dump_ir, dump)
    inf = infer_shapes(res, checked)
    _dump("infer_shapes", inf, dump_ir, dump)
    phases = check_growth(doc, list(res.spec.growth))
    check_checkpointing(res, doc)
    graph = canonical_graph(res)
    module = None
    applied: list[tuple[str, bool]] = []
    if build:
        from physlm_graph._fxbuild import build_graph_module
        from physlm_graph._fits import check_fits
        from physlm_graph._passes import run_passes

        check_fits(inf, device)  # a located error, not the allocator's (or the OOM killer)

        banner = (
            f"# generated by physlm-graph from blueprint {res.name!r} ({os.path.basename(doc.file)}), "
            f"graph {_hash(graph)}\n# do not edit: change the blueprint and recompile\n"
        )
        module = build_graph_module(inf, checked, device=device, seed=seed, banner=banner)
        _dump("build_fx", module, dump_ir, dump)
        module, applied = run_passes(module, passes or [], res)
        _dump("passes", module, dump_ir, dump)
    cm = CompiledModel(module=module, blueprint=doc.data, graph=graph, hash=_hash(graph), inferred=inf,
                       checked=checked, passes=applied, growth_stages=phases)
    if hf_folder is not None and module is not None and str(device) != "meta" and _has_hf_weights(hf_folder):
        from physlm_graph._hf_import import load_hf_weights

        load_hf_weights(cm, hf_folder)  # the folder's weights replace the seeded init
    return cm


def _has_hf_weights(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, f)) for f in ("model.safetensors", "model.safetensors.index.json"))
