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

import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from physlm_graph._errors import CheckpointError, Loc

from . import checkpoint as ck
from ._ckpt_schema import read_json
from .sharded_read import (_DAMAGED, FORMAT, INDEX, SHARDS, _dtype_name, _model_tensors, _optimizer_targets, _read,
                           check_shards, is_sharded, read_index, read_sharded)

__all__ = ["SHARDS", "INDEX", "is_sharded", "save_sharded", "load_sharded", "consolidate", "check_shards"]



# ---------------------------------------------------------------- what is saved




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






# ---------------------------------------------------------------- loading




def load_sharded(folder: str | Path, model: torch.nn.Module, optimizer: Any | None = None, *,
                 cm_hash: str | None = None, verify: bool = True) -> None:
    """Load a sharded checkpoint into ``model`` (and ``optimizer``): plain modules get the full
    tensors, FSDP2 modules the pieces their rank owns. Every rank of the process group calls it."""
    folder = Path(folder)
    if verify:
        ck._verify(folder)
    tensors = read_sharded(folder, model, optimizer, cm_hash=cm_hash)
    if optimizer is not None:
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
    if out.resolve().is_relative_to(folder.resolve()):  # inside it, the next save of the run would delete it
        raise CheckpointError("the output is the checkpoint itself or a folder inside it", loc=Loc(file=str(out)),
                              fix="pass a folder outside the checkpoint")
    ck.refuse_foreign_output(out)
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
