"""The typed intermediate representations passed between compiler stages."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from physlm_graph._load import Document
from physlm_graph._schema import BlueprintDoc

__all__ = ["Ref", "NodeSpec", "LossSpec", "Resolved", "NodeReport", "Inferred"]


@dataclass(frozen=True)
class Ref:
    """An edge's source: a node (or graph input) path and an output port (None: the first)."""

    node: str
    port: str | None = None

    def __str__(self) -> str:
        return self.node if self.port is None else f"{self.node}.{self.port}"


@dataclass
class NodeSpec:
    """One component instance in the expanded graph."""

    path: str  # "trunk.3.attn": also its submodule name
    use: str
    inputs: list[tuple[str | None, Ref]]  # (port name, or None for positional) -> source
    params: dict[str, Any]
    src: tuple[str | int, ...]  # document path of its definition, for error positions
    tie: str | None = None
    allow_leak: bool = False
    instance: str | None = None  # the block instance it belongs to ("trunk.3")


@dataclass
class LossSpec:
    name: str
    refs: list[Ref]
    weight: float
    reduce: str
    src: tuple[str | int, ...]


@dataclass
class Resolved:
    """Stage 2's result: params evaluated, blocks expanded, extensions inserted."""

    doc: Document  # the merged document (extends and overrides applied), positions kept
    spec: BlueprintDoc  # the checked document
    params: dict[str, Any]
    nodes: dict[str, NodeSpec]
    inputs: dict[str, tuple[str, ...]]
    outputs: dict[str, Ref]
    losses: list[LossSpec]
    instances: dict[str, list[str]]  # repeated block node -> its instance paths, in order
    instance_outputs: dict[str, dict[str, Ref]]  # instance path -> named outputs
    stage: int | None = None
    exit_points: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.spec.name


@dataclass
class NodeReport:
    path: str
    use: str
    out_shapes: list[tuple[str, str]]  # (port, pretty shape)
    params: int
    flops_per_token: float
    tied_to: str | None = None


@dataclass
class Inferred:
    """Stage 4's result: shapes, parameter counts and FLOPs per node (no weights allocated)."""

    resolved: Resolved
    specs: dict[str, list[Any]]  # node path (or input) -> TensorSpec per output port
    reports: list[NodeReport]
    total_params: int
    flops_per_token: float
    sample: dict[str, int]
    dtypes: dict[str, torch.dtype] = field(default_factory=dict)
    # every node tensor (parameters and persistent buffers) by its state-dict name -> shape
    tensor_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
