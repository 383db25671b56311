"""Reading a sharded checkpoint (``train.checkpoint_format: sharded``): whether a folder is one,
the check that its shard files cover every tensor of its index exactly once, and reading the
pieces a model (and its optimizer) needs through DCP. Writing, resuming and ``consolidate`` are in
``sharded_checkpoint``; this module is what ``checkpoint`` reads sharded folders with, so it
imports nothing from either."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from physlm_graph._errors import CheckpointError, Loc

from ._ckpt_schema import ShardIndex, read_json

__all__ = ["SHARDS", "INDEX", "is_sharded", "check_shards", "read_index", "read_sharded"]

SHARDS, INDEX = "shards", "sharded.json"
FORMAT = 1
_DAMAGED = "the checkpoint is damaged: use another one (last or best)"


def is_sharded(folder: str | Path) -> bool:
    """Whether ``folder`` is a sharded checkpoint (its index or its shard folder is there)."""
    folder = Path(folder)
    return (folder / INDEX).is_file() or (folder / SHARDS).is_dir()


def _model_tensors(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The model's state (DTensors under FSDP2) without tied aliases, and alias -> stored name."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        kept = first.setdefault(id(p), name)
        if kept != name:
            aliases[name] = kept
    state = {k: v for k, v in model.state_dict().items() if k not in aliases}
    return state, aliases


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def read_index(folder: Path) -> ShardIndex:
    return ShardIndex.model_validate(read_json(folder / INDEX, ShardIndex))


def _shard_files(folder: Path) -> list[Path]:
    return sorted(p for p in (folder / SHARDS).glob("*.safetensors") if p.is_file())


def check_shards(folder: str | Path) -> ShardIndex:
    """The index, after checking that the shard files cover each of its tensors exactly once:
    every piece inside its tensor, of its dtype, no piece twice, no element left out."""
    folder = Path(folder)
    index = read_index(folder)
    files = _shard_files(folder)
    if not files:
        raise CheckpointError("no shard files: the shards/ folder is missing or empty", loc=Loc(file=str(folder / SHARDS)),
                              fix=_DAMAGED)
    covered: dict[str, int] = {}
    seen: set[tuple[str, tuple[int, ...]]] = set()
    for path in files:
        loc = Loc(file=str(path))
        try:
            with safe_open(str(path), framework="pt") as f:
                info = json.loads((f.metadata() or {}).get("DCP_SHARDING_INFO", "{}"))
                pieces = {k: (f.get_slice(k).get_shape(), f.get_slice(k).get_dtype()) for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"not a readable safetensors file (truncated or corrupt): {err}", loc=loc,
                                  fix=_DAMAGED) from None
        if not isinstance(info, dict) or not all(isinstance(v, dict) for v in info.values()):
            raise CheckpointError("the header's DCP_SHARDING_INFO is not a map of tensor names to offsets", loc=loc,
                                  fix=_DAMAGED)
        for key, (shape, _dt) in pieces.items():
            if 0 in shape:
                continue  # a rank that owns no rows of this tensor
            want = index.tensors.get(key)
            if want is None:
                raise CheckpointError(f"the shard holds `{key}`, which {INDEX} does not list", loc=loc,
                                      fix="the shard belongs to another checkpoint: use another one")
            offsets = (info.get(key) or {}).get("saved_offsets")
            if not isinstance(offsets, list) or not all(type(o) is int for o in offsets) \
                    or len(offsets) != len(want.shape) or len(shape) != len(want.shape):
                raise CheckpointError(f"`{key}`: the piece's offsets are missing or do not fit its shape", loc=loc,
                                      fix=_DAMAGED)
            if any(o < 0 or o + s > full for o, s, full in zip(offsets, shape, want.shape)):
                raise CheckpointError(f"`{key}`: a piece at {offsets} of shape {list(shape)} lies outside the tensor's "
                                      f"shape {want.shape}", loc=loc, fix="the shard belongs to another checkpoint")
            if (key, tuple(offsets)) in seen:
                if not shape or math.prod(shape) == math.prod(want.shape):
                    continue  # a replicated tensor written by more than one rank: the same piece again
                raise CheckpointError(f"`{key}`: the piece at {offsets} is stored twice", loc=loc, fix=_DAMAGED)
            seen.add((key, tuple(offsets)))
            covered[key] = covered.get(key, 0) + math.prod(shape)
    for key, want in index.tensors.items():
        have, need = covered.get(key, 0), math.prod(want.shape)
        if have != need:
            raise CheckpointError(f"the shards hold {have:,} of the {need:,} elements of `{key}`: a shard file is "
                                  "missing or belongs to another checkpoint", loc=Loc(file=str(folder / INDEX)),
                                  fix=_DAMAGED)
    return index


def _check_against(index: ShardIndex, folder: Path, state: dict[str, torch.Tensor], cm_hash: str | None) -> None:
    """The index's model tensors against the model that will receive them: names and shapes."""
    loc = Loc(file=str(folder / INDEX))
    if cm_hash is not None and index.hash != cm_hash:
        raise CheckpointError(f"the shards were written for graph {index.hash}; the blueprint builds {cm_hash}", loc=loc,
                              fix="the folder mixes two checkpoints: use another one")
    stored = {k.removeprefix("model."): v.shape for k, v in index.tensors.items() if k.startswith("model.")}
    want = {k: list(v.shape) for k, v in state.items()}
    problems = []
    missing = [k for k in want if k not in stored]
    unexpected = [k for k in stored if k not in want]
    mismatched = [f"{k} (stored {stored[k]}, model {want[k]})" for k in want if k in stored and stored[k] != want[k]]
    for what, names in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
        if names:
            problems.append(f"{what} " + ", ".join(names[:8]) + (" ..." if len(names) > 8 else ""))
    if problems:
        raise CheckpointError("the shards do not match the model its blueprint builds: " + "; ".join(problems), loc=loc,
                              fix="blueprint.yaml or a component changed since the checkpoint was written; use the "
                              "version of physlm-graph that wrote it")


def _optimizer_targets(optimizer: Any, index: ShardIndex, folder: Path) -> dict[str, torch.Tensor]:
    """Empty tensors for the saved optimizer state, each placed like its parameter (a DTensor under FSDP2)."""
    params: dict[str, torch.Tensor] = {}
    for g in optimizer.param_groups:
        names = g.get("names") or [f"param{len(params) + i}" for i in range(len(g["params"]))]
        params.update(zip(names, g["params"]))
    targets = {}
    for key, info in index.tensors.items():
        if not key.startswith("optim."):
            continue
        name, _, _slot = key.removeprefix("optim.").rpartition(".")
        p = params.get(name)
        if p is None:
            raise CheckpointError(f"the optimizer state names `{name}`, which this run's optimizer does not have",
                                  loc=Loc(file=str(folder / INDEX)),
                                  fix="resume with the same blueprint and --set overrides, or start a new run (--out)")
        dtype = getattr(torch, info.dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise CheckpointError(f"`{key}`: unknown dtype {info.dtype!r}", loc=Loc(file=str(folder / INDEX)), fix=_DAMAGED)
        if info.shape == list(p.shape):
            targets[key] = torch.zeros_like(p, dtype=dtype)  # a DTensor keeps the parameter's placement
        else:  # a step count: one value, replicated; on the CPU, where the optimizer's own load puts it
            targets[key] = torch.zeros(info.shape, dtype=dtype)
    return targets


def _read(targets: dict[str, torch.Tensor], folder: Path) -> None:
    """Fill ``targets`` (by stored name) from the shards through DCP, each with the piece it covers."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import CheckpointException, HuggingFaceStorageReader

    try:
        with warnings.catch_warnings():  # one process without a group: DCP warns that it reads alone
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(targets, storage_reader=HuggingFaceStorageReader(str(folder / SHARDS)))
    except (SafetensorError, OSError, RuntimeError, ValueError, AssertionError, CheckpointException) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"the shards could not be read: {first}", loc=Loc(file=str(folder / SHARDS)),
                              fix=_DAMAGED) from None


def read_sharded(folder: Path, model: torch.nn.Module, optimizer: Any | None = None, *,
                 cm_hash: str | None = None) -> dict[str, torch.Tensor]:
    """Check the shards, then load the model's tensors into ``model`` (plain modules the full
    tensors, FSDP2 modules their rank's pieces); returns the optimizer's tensors by
    ``state.NAME.SLOT`` (empty without ``optimizer``) for ``checkpoint.restore_optimizer``."""
    index = check_shards(folder)
    state, aliases = _model_tensors(model)
    _check_against(index, folder, state, cm_hash)
    targets = {f"model.{k}": v for k, v in state.items()}
    if optimizer is not None:
        targets.update(_optimizer_targets(optimizer, index, folder))
    _read(targets, folder)
    weights = {k.removeprefix("model."): v for k, v in targets.items() if k.startswith("model.")}
    weights.update({a: weights[k] for a, k in aliases.items()})
    model.load_state_dict(weights, strict=True)
    return {f"state.{k.removeprefix('optim.')}": v for k, v in targets.items() if k.startswith("optim.")}
