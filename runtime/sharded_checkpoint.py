"""Sharded checkpoints: every rank writes its own shards, and any number of processes reads them.

    ckpt/
      shards/shard-0000R-model-00001-of-00001.safetensors   one file per writing rank
      sharded.json             every tensor's full shape and dtype, the graph hash, the world size
      optimizer.json           param groups, parameter names, non-tensor state (as in a full checkpoint)
      blueprint.yaml, config.json, tokenizer/, trainer_state.json   as in a full checkpoint
      manifest.json            sha256 of every file, shards included, written last

``train.checkpoint_format: sharded`` saves this way. The shards are written by
``torch.distributed.checkpoint`` (DCP) in its safetensors layout: a rank's file holds its local
piece of each tensor under the tensor's name (``model.<param>``, ``optim.<param>.<key>``), and the
piece's offset in the full tensor sits in the file's safetensors header. Nothing is gathered:
under FSDP2 each rank writes the rows of the weights and optimizer moments it owns; a replicated
tensor (DDP, one process, the optimizer's step counts) is written once. Loading asks DCP for the
pieces the loading rank needs, whatever the world size was when they were written, so a run
saved on 2 processes resumes on 1 or 4; one process reading everything is how ``generate``,
``eval`` and ``export`` read a sharded folder, and ``consolidate`` writes it out as a full
checkpoint. No file is unpickled: the shards are safetensors, the rest JSON.

Before DCP reads anything, the shards are checked against ``sharded.json`` (each tensor covered
exactly once, inside its shape) and ``sharded.json`` against the model the blueprint builds, so
a missing shard, a file from another run or another blueprint is a ``CheckpointError`` naming the
file and the tensor, never a half-loaded model. All ranks must share one filesystem.
"""

from __future__ import annotations

import json
import math
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from physlm_graph._errors import CheckpointError, Loc

from . import checkpoint as ck
from ._ckpt_schema import ShardIndex, read_json

__all__ = ["SHARDS", "INDEX", "is_sharded", "save_sharded", "load_sharded", "consolidate", "check_shards"]

SHARDS, INDEX = "shards", "sharded.json"
FORMAT = 1
_DAMAGED = "the checkpoint is damaged: use another one (last or best)"


def is_sharded(folder: str | Path) -> bool:
    """Whether ``folder`` is a sharded checkpoint (its index or its shard folder is there)."""
    folder = Path(folder)
    return (folder / INDEX).is_file() or (folder / SHARDS).is_dir()


# ---------------------------------------------------------------- what is saved


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


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather(obj: Any) -> list[Any]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def save_sharded(path: str | Path, *, cm: Any, model: torch.nn.Module, optimizer: Any | None, tokenizer: Any | None,
                 trainer_state: dict[str, Any] | None) -> Path:
    """Write a sharded checkpoint at ``path``; every rank of the process group calls it.

    The ranks write into one temporary folder beside ``path``; rank 0 adds the metadata files and
    the manifest (each rank hashes its own shards), then swaps the folder in as ``save_checkpoint``
    does, so a crash leaves the old or the new checkpoint. ``trainer_state`` is rank 0's."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import CheckpointException, HuggingFaceStorageWriter

    target = Path(path)
    tmp = target.parent / f".{target.name}.tmp-sharded"
    rank, world = _rank_world()
    if rank == 0:
        target.parent.mkdir(parents=True, exist_ok=True)
        ck._recover(target)
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / SHARDS).mkdir(parents=True)
    _barrier()
    state, _ = _model_tensors(model)
    tensors = {f"model.{k}": v.detach() for k, v in state.items()}
    meta = None
    if optimizer is not None:
        opt_tensors, meta = ck._flatten_optimizer(optimizer, sharded=True)
        tensors.update({f"optim.{k.removeprefix('state.')}": v for k, v in opt_tensors.items()})
    try:
        with warnings.catch_warnings():  # one process without a group: DCP warns that it writes alone
            warnings.simplefilter("ignore", UserWarning)
            dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(str(tmp / SHARDS), save_distributed=True))
        mine = sorted((tmp / SHARDS).glob(f"shard-{rank + 1:05d}-*"))
        for p in mine:
            ck._fsync_file(p)
        entries = {p.relative_to(tmp).as_posix(): {"sha256": ck._sha256(p), "bytes": p.stat().st_size} for p in mine}
        error = None
    except (OSError, CheckpointException) as err:  # DCP reports any rank's failure on every rank
        entries, error = {}, getattr(err, "strerror", None) or (str(err).strip().splitlines() or [type(err).__name__])[0]
    gathered = _gather((entries, error))
    failed = [e for _, e in gathered if e is not None]
    if rank == 0:
        try:
            if failed:
                raise OSError(failed[0])
            index = {"format": FORMAT, "hash": cm.hash, "world_size": world,
                     "tensors": {k: {"shape": list(v.shape), "dtype": _dtype_name(v)} for k, v in tensors.items()}}
            ck._write_json(tmp / INDEX, index)
            ck._fill(tmp, cm, None, tokenizer, None if meta is None else ({}, meta), trainer_state, None,
                     shard_entries={k: v for e, _ in gathered for k, v in e.items()})
            ck._swap_in(tmp, target)
        except OSError as err:
            shutil.rmtree(tmp, ignore_errors=True)
            failed = [err.strerror or str(err)]
    failed = _gather(failed)[0]
    if failed:
        raise CheckpointError(f"could not write the checkpoint: {failed[0]}", loc=Loc(file=str(target)),
                              fix="check free disk space and permissions; the previous checkpoint is kept")
    return target


# ---------------------------------------------------------------- checking


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


# ---------------------------------------------------------------- loading


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


def load_sharded(folder: str | Path, model: torch.nn.Module, optimizer: Any | None = None, *,
                 cm_hash: str | None = None, verify: bool = True) -> None:
    """Load a sharded checkpoint into ``model`` (and ``optimizer``): plain modules get the full
    tensors, FSDP2 modules the pieces their rank owns. Every rank of the process group calls it."""
    folder = Path(folder)
    if verify:
        ck._verify(folder)
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
    if optimizer is not None:
        tensors = {f"state.{k.removeprefix('optim.')}": v for k, v in targets.items() if k.startswith("optim.")}
        ck.restore_optimizer(optimizer, folder, tensors=tensors)


def consolidate(path: str | Path, out: str | Path, *, optimizer: bool = True) -> Path:
    """Write the sharded checkpoint at ``path`` (or a run folder's last/best) as a full checkpoint
    folder at ``out``: one ``model.safetensors``, the optimizer state by name (unless
    ``optimizer=False``), and the same blueprint, config, tokenizer and trainer state."""
    folder = ck.find_checkpoint(path)
    if not is_sharded(folder):
        raise CheckpointError("not a sharded checkpoint (no sharded.json or shards/ folder)", loc=Loc(file=str(folder)),
                              fix="a full checkpoint needs no consolidating: use it as it is")
    out = Path(out)
    if out.resolve() == folder.resolve():
        raise CheckpointError("the output is the checkpoint itself", loc=Loc(file=str(out)), fix="pass another folder")
    if out.exists() and not (out / ck.MANIFEST).is_file():  # a checkpoint there is replaced; anything else is kept
        raise CheckpointError("the output exists and is not a checkpoint folder", loc=Loc(file=str(out)),
                              fix="pass a new folder (an existing checkpoint folder there would be replaced)")
    loaded = ck.load_checkpoint(folder, tokenizer=True)
    opt_state = None
    if optimizer and (folder / ck.OPTIM_META).is_file():
        index = read_index(folder)
        meta = read_json(folder / ck.OPTIM_META)
        targets = _optimizer_targets(_NamedParams(loaded.module, meta, folder), index, folder)
        _read(targets, folder)
        opt_state = ({f"state.{k.removeprefix('optim.')}": v.contiguous() for k, v in targets.items()}, meta)
    ck.save_checkpoint(out, cm=loaded.model, tokenizer=loaded.tokenizer, optimizer=opt_state,
                       trainer_state=loaded.trainer_state)
    return out


class _NamedParams:
    """The parameter groups an optimizer.json describes, over a module's parameters (for
    ``_optimizer_targets`` without building the optimizer)."""

    def __init__(self, module: torch.nn.Module, meta: dict[str, Any], folder: Path) -> None:
        params = dict(module.named_parameters(remove_duplicate=False))
        unknown = [n for n in meta["names"] if n not in params]
        if unknown:
            raise CheckpointError(f"the optimizer state names parameters the model does not have: {', '.join(unknown[:5])}",
                                  loc=Loc(file=str(folder / ck.OPTIM_META)), fix=_DAMAGED)
        self.param_groups = [{"names": meta["names"], "params": [params[n] for n in meta["names"]]}]
