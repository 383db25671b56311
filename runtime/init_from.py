"""``train --init-from DIR``: a new run that starts from another checkpoint's weights, by name.

    physlm-graph import hf/llama --out imported/llama
    physlm-graph train hybrid.yaml --init-from imported/llama --steps 50 --out runs/hybrid

The run's model is built and seeded by its own blueprint first. Then every tensor of its state
(parameters and persistent buffers) whose name is in the checkpoint takes the checkpoint's value;
a name found with another shape stops the run (one located error per tensor, both shapes named),
since a silent fresh start there would hide a changed width. Names the checkpoint does not have
start as the blueprint's init made them. This happens once, before step 0; the optimizer starts
fresh. A ``train.init_rules`` rule whose every parameter is carried would draw nothing the run
keeps: it is refused at the rule's line (a rule with some carried parameters gets a note). A node
is *carried* when all its tensors came from the checkpoint, *fresh* when none did.

The report (carried and fresh nodes, the checkpoint's unused tensors) is printed before the run
and written to ``OUT/init_from.json``: the run's record of where its weights came from. Without
``--tokenizer`` the run uses the checkpoint's tokenizer, whose ids the carried embedding rows
belong to. ``--init-from`` with ``--resume`` is refused: a resumed run already has its weights.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from physlm_graph._errors import CheckpointError, Diagnostic, Loc, TrainingError

from .checkpoint import MANIFEST, MODEL, TOKENIZER, check_checkpoint, checkpoint_candidates

__all__ = ["InitFrom", "InitReport", "carry_weights"]

RECORD = "init_from.json"


@dataclass
class InitReport:
    """What ``--init-from`` carried: node paths of the model, tensor names of the checkpoint."""

    checkpoint: str
    tensors_carried: int = 0
    carried: list[str] = field(default_factory=list)  # nodes whose every tensor came from the checkpoint
    partial: dict[str, list[str]] = field(default_factory=dict)  # node -> its tensors that start fresh
    fresh: list[str] = field(default_factory=list)  # nodes with tensors, none from the checkpoint
    unused: list[str] = field(default_factory=list)  # checkpoint tensors no tensor of the model took

    def lines(self) -> list[str]:
        """The report as notes for the run's summary."""
        out = [f"--init-from {self.checkpoint}: {self.tensors_carried} tensors carried into {len(self.carried)} "
               f"nodes; {len(self.fresh)} nodes start fresh" + (f": {_some(self.fresh)}" if self.fresh else "")]
        for node, names in self.partial.items():
            out.append(f"--init-from: node {node} is carried except {', '.join(names)} (fresh)")
        if self.unused:
            out.append(f"--init-from: {len(self.unused)} checkpoint tensors unused: {_some(self.unused)}")
        return out


def _some(names: list[str], n: int = 8) -> str:
    return ", ".join(names[:n]) + (f", ... ({len(names) - n} more)" if len(names) > n else "")


class InitFrom:
    """A checkpoint to start a new run from; checked when made (before any data is read)."""

    def __init__(self, source: str | os.PathLike[str], *, resume: bool = False) -> None:
        if resume:
            raise TrainingError("--init-from starts a new run from a checkpoint's weights; --resume continues a run "
                                "with its own: they cannot be combined",
                                fix="drop --resume (new run), or drop --init-from (continue the run in --out)")
        path = Path(source)
        hf_weights = (path / MODEL).is_file() or (path / "model.safetensors.index.json").is_file()
        if (path / "config.json").is_file() and not (path / MANIFEST).is_file() and hf_weights:
            raise CheckpointError("--init-from: this is a Hugging Face model folder, not a physlm checkpoint",
                                  loc=Loc(file=str(path)),
                                  fix=f"import it first: physlm-graph import {path} --out DIR, then --init-from DIR")
        self.folder = checkpoint_candidates(path)[0]  # a run folder: its last, else best
        check_checkpoint(self.folder)  # the manifest's checksums: a damaged file is named here
        from .sharded_checkpoint import is_sharded

        if is_sharded(self.folder):
            raise CheckpointError("--init-from reads a full checkpoint's model.safetensors; this one is sharded",
                                  loc=Loc(file=str(self.folder)),
                                  fix=f"write it as a full one first: physlm-graph consolidate {self.folder} DIR, "
                                  "then --init-from DIR")

    @property
    def tokenizer(self) -> str | None:
        """The checkpoint's tokenizer folder, if it has one."""
        folder = self.folder / TOKENIZER
        return str(folder) if folder.is_dir() else None

    def stored(self) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
        """The checkpoint's tensor shapes by stored name, and each tied alias's stored name
        (``save_model`` keeps one name per shared tensor and records the others in its metadata)."""
        path = self.folder / MODEL
        try:
            with safe_open(str(path), framework="pt") as f:
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
                meta = f.metadata() or {}
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"not a readable safetensors file: {err}", loc=Loc(file=str(path)),
                                  fix="the file is damaged: use another checkpoint") from None
        aliases = {k: v for k, v in meta.items() if v in shapes and k not in shapes}
        return shapes, aliases

    def apply(self, cm: Any) -> InitReport:
        """Copy every tensor of ``cm.module``'s state whose name the checkpoint has; see the
        module docstring. Raises before copying anything when a name has another shape or no
        name matches at all."""
        shapes, aliases = self.stored()
        module = cm.module
        state = module.state_dict(keep_vars=True)
        groups: dict[int, list[str]] = {}  # tied tensors: one group, several names
        for name, t in state.items():
            groups.setdefault(id(t), []).append(name)
        plan: list[tuple[list[str], str]] = []  # (our names, stored name)
        problems: list[Diagnostic] = []
        where = Loc(file=str(self.folder / MODEL))
        for names in groups.values():
            want = tuple(state[names[0]].shape)
            hits = [(n, aliases.get(n, n)) for n in names if n in shapes or n in aliases]
            bad = [(n, s) for n, s in hits if shapes[s] != want]
            for n, s in bad:
                problems.append(Diagnostic(f"tensor {n} is in the checkpoint with another shape",
                                           loc=where, node=_owner(n, cm), expected=f"{list(want)} (this model)",
                                           got=f"{list(shapes[s])} (the checkpoint)",
                                           fix="rename the node so it starts fresh, or give it the checkpoint's shape"))
            if hits and not bad:
                plan.append((names, hits[0][1]))
        if problems:
            raise CheckpointError(problems)
        if not plan:
            raise CheckpointError("--init-from: no tensor of the checkpoint fits this model by name, so nothing "
                                  "would be carried", loc=Loc(file=str(self.folder)),
                                  fix="start from a checkpoint whose blueprint this one extends (node paths are "
                                  "the tensor names), or drop --init-from")
        with safe_open(str(self.folder / MODEL), framework="pt") as f, torch.no_grad():
            for names, stored in plan:
                target = state[names[0]]
                target.copy_(f.get_tensor(stored).to(device=target.device, dtype=target.dtype))
        self.carried_names = {n for names, _ in plan for n in names}
        return self.report(cm, state, plan, shapes)

    def report(self, cm: Any, state: dict[str, Any], plan: list[tuple[list[str], str]],
               shapes: dict[str, tuple[int, ...]]) -> InitReport:
        taken = {n for names, _ in plan for n in names}
        used = {s for _, s in plan}
        by_node: dict[str, list[str]] = {}
        for name in state:
            by_node.setdefault(_owner(name, cm), []).append(name)
        r = InitReport(checkpoint=str(self.folder), tensors_carried=len(plan),
                       unused=sorted(s for s in shapes if s not in used))
        for node, names in by_node.items():
            left = [n[len(node) + 1:] for n in names if n not in taken]
            if not left:
                r.carried.append(node)
            elif len(left) == len(names):
                r.fresh.append(node)
            else:
                r.partial[node] = left
        return r


def _owner(name: str, cm: Any) -> str:
    """The node a state-dict name belongs to: the longest node path that prefixes it."""
    parts = name.split(".")
    nodes = cm.graph["nodes"]
    for i in range(len(parts) - 1, 0, -1):
        if ".".join(parts[:i]) in nodes:
            return ".".join(parts[:i])
    return parts[0]


def carry_weights(t: Any, cm: Any) -> Any:
    """Trainer ``t``'s ``--init-from`` applied to ``cm`` (its freshly built model), reported in
    the run's notes and ``OUT/init_from.json``; ``cm`` unchanged without ``--init-from``."""
    init = getattr(t, "init_from", None)
    if init is None:
        return cm
    report = init.apply(cm)
    t.notes.extend(report.lines())
    t.notes.extend(t.plan.check_init_rules_carried(cm.module, init.carried_names))  # train.init_rules carried over
    if t.dist.main:
        t.out_dir.mkdir(parents=True, exist_ok=True)
        (t.out_dir / RECORD).write_text(json.dumps(asdict(report), indent=1) + "\n", encoding="utf-8")
    return cm
