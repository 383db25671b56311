"""Checkpoints: one folder, safetensors and JSON only, written atomically.

    ckpt/
      model.safetensors        weights (tied tensors stored once: safetensors' save_model)
      blueprint.yaml           the merged blueprint: the model is rebuilt from it, never from flags
      config.json              model_type "physlm", Hugging Face-style fields, a "physlm" block
      tokenizer/               the tokenizer, written by its save()
      optimizer.safetensors    optimizer state tensors, flattened ("state.<name>.<key>")
      optimizer.json           param groups, parameter names, non-tensor state
      trainer_state.json       step, tokens seen, best val loss, RNG states, the batcher's state
      manifest.json            sha256 of every other file, written last

A sharded checkpoint (``train.checkpoint_format: sharded``, ``runtime/sharded_checkpoint.py``)
holds ``shards/`` and ``sharded.json`` in place of the two ``.safetensors`` files; ``load_checkpoint``
and ``load_weights`` read either kind.

``save_checkpoint`` builds the folder next to its target (``.last.tmp-<pid>``), fsyncs it,
moves the old folder aside (``.last.old``), renames the new one in, and deletes the old one,
so a crash at any moment leaves the old or the new checkpoint. ``find_checkpoint`` accepts a
leftover aside folder. ``load_checkpoint`` verifies the manifest and never unpickles.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file, save_model

from physlm_graph._errors import CheckpointError, Loc, PhysLMError

from ._ckpt_schema import RESUME_KEYS, read_json

__all__ = [
    "Checkpoint",
    "save_checkpoint",
    "load_checkpoint",
    "find_checkpoint",
    "checkpoint_candidates",
    "check_checkpoint",
    "restore_optimizer",
    "load_weights",
    "write_manifest",
    "model_context",
    "FORMAT",
]

FORMAT = 1
MODEL, BLUEPRINT, CONFIG, MANIFEST = "model.safetensors", "blueprint.yaml", "config.json", "manifest.json"
OPTIM, OPTIM_META, STATE, TOKENIZER = "optimizer.safetensors", "optimizer.json", "trainer_state.json", "tokenizer"
REQUIRED = (MODEL, BLUEPRINT, CONFIG)
SHARD_INDEX = "sharded.json"  # a sharded checkpoint's (runtime/sharded_checkpoint.py): it replaces MODEL


def required_files(folder: Path) -> tuple[str, ...]:
    """The files a checkpoint folder cannot lack: the weights (``model.safetensors``, or a sharded
    checkpoint's index), the blueprint and the config."""
    from .sharded_read import is_sharded

    return (SHARD_INDEX, BLUEPRINT, CONFIG) if is_sharded(folder) else REQUIRED


@dataclass
class Checkpoint:
    """A loaded checkpoint: the rebuilt model with its weights, and everything saved beside it."""

    path: Path
    model: Any  # CompiledModel, weights loaded, in eval mode
    config: dict[str, Any]
    tokenizer: Any | None
    trainer_state: dict[str, Any] | None

    @property
    def module(self) -> torch.nn.Module:
        return self.model.module


# ---------------------------------------------------------------- small helpers


def model_context(cm: Any) -> int | None:
    """The longest sequence the model takes: params ``context``/``max_seq_len``/``block_size``,
    else the smallest ``max_seq_len`` of a position node (learned positions, rope)."""
    params = (cm.blueprint.get("params") or {}) if isinstance(cm.blueprint, dict) else {}
    for key in ("context", "max_seq_len", "block_size"):
        if isinstance(params.get(key), int):
            return int(params[key])
    found = [getattr(p, "max_seq_len", None) for p in cm.checked.values()]
    found = [int(v) for v in found if isinstance(v, int)]
    return min(found) if found else None


def model_vocab(cm: Any) -> int | None:
    """The number of logits: the last dimension of the ``logits`` output."""
    ref = cm.resolved.outputs.get("logits")
    specs = cm.inferred.specs.get(ref.node) if ref is not None else None
    if not specs:
        return None
    idx = 0
    if ref.port is not None:
        from physlm_graph._registry import REGISTRY

        info = REGISTRY.get(cm.resolved.nodes[ref.node].use)
        idx = info.outputs.index(ref.port) if info is not None and ref.port in info.outputs else 0
    return int(specs[idx].shape[-1])  # one spec per output port


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a folder
    finally:
        os.close(fd)


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(folder: str | Path, known: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Write ``manifest.json``: the sha256 and size of every file in the folder (``known``: entries
    already computed, by relative path; a sharded save has each rank hash its own shards)."""
    folder = Path(folder)
    known = known or {}
    files = {}
    for p in _files(folder):
        rel = p.relative_to(folder).as_posix()
        files[rel] = known.get(rel) or {"sha256": _sha256(p), "bytes": p.stat().st_size}
    manifest = {"format": FORMAT, "files": files}
    _write_json(folder / MANIFEST, manifest)
    return manifest


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def _read_json(path: Path) -> Any:
    """A checkpoint JSON file, its shape checked (``_ckpt_schema``): a ``CheckpointError`` names the
    file and the key at fault."""
    return read_json(path)


# ---------------------------------------------------------------- optimizer state


def _full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (every rank must call this for the same tensors), a tensor itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _flatten_optimizer(opt: torch.optim.Optimizer, *, sharded: bool = False,
                       keep: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer state as tensors keyed by parameter name, plus JSON metadata (no pickle).

    FSDP2's sharded moments are gathered into full CPU tensors (a collective: every rank calls
    this; with ``keep`` False a rank joins the gathers but keeps no tensor), or with ``sharded``
    kept as they are, each rank's pieces (``sharded_checkpoint``)."""
    sd = opt.state_dict()
    names: list[str] = []
    for g in opt.param_groups:
        names.extend(g.get("names") or [f"param{len(names) + i}" for i in range(len(g["params"]))])
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for key, val in st.items():
            if isinstance(val, torch.Tensor):
                value = val.detach() if sharded else _full(val.detach())
                if keep:
                    tensors[f"state.{names[idx]}.{key}"] = value if sharded else value.cpu().contiguous()
            else:
                scalars.setdefault(names[idx], {})[key] = val
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    meta = {"format": FORMAT, "class": type(opt).__name__, "names": names, "param_groups": groups, "scalars": scalars}
    return tensors, meta


def restore_optimizer(opt: torch.optim.Optimizer, folder: str | Path, *,
                      tensors: dict[str, torch.Tensor] | None = None) -> None:
    """Load ``optimizer.safetensors`` (or ``tensors``, read elsewhere) + ``optimizer.json`` into
    ``opt``, matching parameters by name. A full moment of a parameter that FSDP2 shards is cut
    to the rank's piece."""
    folder = Path(folder)
    meta = _read_json(folder / OPTIM_META)
    if tensors is None:
        tensors = _load_tensors(folder / OPTIM)
    mine: list[str] = []
    params: list[torch.Tensor] = []
    for g in opt.param_groups:
        mine.extend(g.get("names") or [f"param{len(mine) + i}" for i in range(len(g["params"]))])
        params.extend(g["params"])
    if meta.get("names") != mine or len(meta.get("param_groups", [])) != len(opt.param_groups):
        missing = sorted(set(mine) - set(meta.get("names", [])))
        extra = sorted(set(meta.get("names", [])) - set(mine))
        raise CheckpointError(
            "the optimizer state was saved for other parameters"
            + (f"; missing: {', '.join(missing[:5])}" if missing else "")
            + (f"; unexpected: {', '.join(extra[:5])}" if extra else ""),
            loc=Loc(file=str(folder / OPTIM_META)),
            fix="resume with the same blueprint and --set overrides, or start a new run (--out)",
        )
    state: dict[int, dict[str, Any]] = {}
    for i, name in enumerate(mine):
        entry = dict(meta.get("scalars", {}).get(name, {}))
        prefix = f"state.{name}."
        entry.update({k[len(prefix):]: _place_like(v, params[i]) for k, v in tensors.items() if k.startswith(prefix)})
        if entry:
            state[i] = entry
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    try:
        opt.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError, TypeError, RuntimeError) as err:
        raise CheckpointError(f"the optimizer state does not fit the optimizer: {err}",
                              loc=Loc(file=str(folder / OPTIM_META)), fix="the file is damaged: use another checkpoint") from None


def _place_like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``value`` as ``param`` holds it: a full tensor of a DTensor parameter's shape becomes this
    rank's piece (every rank holds the full value, so nothing is sent)."""
    if not hasattr(param, "device_mesh") or hasattr(value, "device_mesh") or list(value.shape) != list(param.shape):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(param.device), param.device_mesh, param.placements, src_data_rank=None)


# ---------------------------------------------------------------- saving


def _config(cm: Any, tokenizer: Any | None) -> dict[str, Any]:
    params = cm.blueprint.get("params") or {}
    cfg: dict[str, Any] = {
        "model_type": "physlm",
        "architectures": ["PhysLMForCausalLM"],
        "vocab_size": model_vocab(cm),
    }
    ctx = model_context(cm)
    if ctx is not None:
        cfg["max_position_embeddings"] = ctx
    for hf, ours in (("hidden_size", "dim"), ("num_hidden_layers", "layers"), ("num_attention_heads", "heads")):
        if isinstance(params.get(ours), int):
            cfg[hf] = params[ours]
    dtypes = {p.dtype for p in cm.module.parameters()}
    cfg["torch_dtype"] = str(dtypes.pop()).replace("torch.", "") if len(dtypes) == 1 else "float32"
    cfg["physlm"] = {
        "format": FORMAT,
        "blueprint": cm.name,
        "hash": cm.hash,
        "num_params": cm.num_params,
        "flops_per_token": cm.flops_per_token,
        "blueprint_file": BLUEPRINT,
        "blueprint_text": cm.blueprint_text,  # so AutoConfig alone knows the model
        "tokenizer": None if tokenizer is None else {"name": tokenizer.name, "fingerprint": tokenizer.fingerprint(),
                                                     "vocab_size": tokenizer.vocab_size},
    }
    return cfg


def _fill(folder: Path, cm: Any, module: torch.nn.Module | None, tokenizer: Any | None, optimizer: Any | None,
          trainer_state: dict[str, Any] | None, extra_tensors: dict[str, torch.Tensor] | None,
          shard_entries: dict[str, dict[str, Any]] | None = None) -> None:
    """Write the checkpoint's files into ``folder``. ``module`` None: the weights are already there
    as shards (``sharded_checkpoint``, with their manifest entries in ``shard_entries``);
    ``optimizer`` is an optimizer or its flattened ``(tensors, meta)``."""
    folder.mkdir(parents=True, exist_ok=module is None)
    if module is not None:
        save_model(module, str(folder / MODEL), metadata={"format": "pt", "physlm_hash": cm.hash})
    (folder / BLUEPRINT).write_text(cm.blueprint_text, encoding="utf-8")
    _write_json(folder / CONFIG, _config(cm, tokenizer))
    if tokenizer is not None:
        tokenizer.save(folder / TOKENIZER)
        # Hugging Face's AutoTokenizer looks at the top of the folder
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if (folder / TOKENIZER / name).is_file():
                shutil.copyfile(folder / TOKENIZER / name, folder / name)
    if optimizer is not None:
        tensors, meta = optimizer if isinstance(optimizer, tuple) else _flatten_optimizer(optimizer)
        if tensors:
            save_file(tensors, str(folder / OPTIM))
        _write_json(folder / OPTIM_META, meta)
    if trainer_state is not None:
        _write_json(folder / STATE, trainer_state)
    if extra_tensors:  # for tests and callers that store more (e.g. a padding tensor)
        save_file({k: v.contiguous() for k, v in extra_tensors.items()}, str(folder / "extra.safetensors"))
    write_manifest(folder, shard_entries)
    for p in [*_files(folder), folder / MANIFEST]:
        _fsync_file(p)
    for d in sorted({p.parent for p in folder.rglob("*")}, key=lambda p: -len(p.parts)):
        _fsync_dir(d)


def refuse_foreign_output(out: Path, error: type[PhysLMError] = CheckpointError) -> None:
    """Refuse an ``out`` that exists and is not a checkpoint folder: a checkpoint there is replaced
    whole by the next write, anything else is kept (``consolidate``, ``import``)."""
    if out.exists() and not (out / MANIFEST).is_file():
        raise error("the output exists and is not a checkpoint folder", loc=Loc(file=str(out)),
                    fix="pass a new folder (an existing checkpoint folder there would be replaced)")


def _recover(target: Path) -> None:
    """Tidy after a crashed save: bring an aside folder back if the target is gone, drop temps."""
    aside = target.parent / f".{target.name}.old"
    if not target.exists() and aside.is_dir():
        os.replace(aside, target)
    elif aside.exists():
        shutil.rmtree(aside, ignore_errors=True)
    for tmp in target.parent.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def _swap_in(tmp: Path, target: Path) -> None:
    """Move the finished folder ``tmp`` to ``target``: the old one aside, the new one in, the old one gone."""
    aside = target.parent / f".{target.name}.old"
    if target.exists():
        os.replace(target, aside)
    os.replace(tmp, target)
    _fsync_dir(target.parent)
    shutil.rmtree(aside, ignore_errors=True)


def save_checkpoint(
    path: str | Path,
    *,
    cm: Any,
    module: torch.nn.Module | None = None,
    tokenizer: Any | None = None,
    optimizer: torch.optim.Optimizer | tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None,
    trainer_state: dict[str, Any] | None = None,
    extra_tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a checkpoint folder at ``path`` atomically; returns ``path``.

    ``module`` defaults to ``cm.module`` (pass the uncompiled module, not a ``torch.compile``
    wrapper); ``optimizer`` may be given already flattened (``_flatten_optimizer``, gathered from
    FSDP2's shards). One writer per folder at a time.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    _recover(target)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    aside = target.parent / f".{target.name}.old"
    try:
        _fill(tmp, cm, module if module is not None else cm.module, tokenizer, optimizer, trainer_state, extra_tensors)
        _swap_in(tmp, target)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if not target.exists() and aside.is_dir():
            os.replace(aside, target)
        raise CheckpointError(f"could not write the checkpoint: {err.strerror or err}", loc=Loc(file=str(target)),
                              fix="check free disk space and permissions; the previous checkpoint is kept") from None
    return target


# ---------------------------------------------------------------- loading


def checkpoint_candidates(path: str | Path) -> list[Path]:
    """The checkpoint folders ``path`` names, in the order to try them: the folder itself, or a run
    folder's ``last`` then ``best`` (each accepting a folder left aside by a save that crashed
    before its rename)."""
    path = Path(path)
    if (path / MANIFEST).is_file() or (path / MODEL).is_file() or (path / SHARD_INDEX).is_file():
        return [path]
    aside = path.parent / f".{path.name}.old"
    if not path.exists() and aside.is_dir():
        return [aside]
    found = []
    for name in ("last", "best"):
        if (path / name).is_dir():
            found.append(path / name)
        elif (path / f".{name}.old").is_dir():
            found.append(path / f".{name}.old")
    if found:
        return found
    what = "does not exist" if not path.exists() else "holds no checkpoint (no manifest.json, last/ or best/)"
    raise CheckpointError(f"no checkpoint here: the folder {what}", loc=Loc(file=str(path)),
                          fix="pass a checkpoint folder, or a run folder written by `physlm-graph train --out`")


def _warn_fallback(bad: Path, err: CheckpointError, other: Path) -> None:
    first = str(err).splitlines()[0]
    print(f"warning: the checkpoint {bad} is damaged, using {other} instead:\n  {first}", file=sys.stderr)


def find_checkpoint(path: str | Path, *, resume: bool = False) -> Path:
    """A checkpoint folder from a checkpoint or a run folder (``last``, then ``best``).

    With ``resume``, each candidate is checked first (``check_checkpoint``): a damaged ``last``
    falls back to ``best`` with a warning on stderr naming what was wrong."""
    candidates = checkpoint_candidates(path)
    if not resume:
        return candidates[0]
    for i, folder in enumerate(candidates):
        try:
            check_checkpoint(folder, resume=True)
            return folder
        except CheckpointError as err:
            if i + 1 == len(candidates):
                raise
            _warn_fallback(folder, err, candidates[i + 1])
    raise AssertionError("unreachable")


def check_checkpoint(folder: str | Path, *, resume: bool = False) -> None:
    """Verify the manifest and the shape of every JSON file of a checkpoint folder; with
    ``resume``, also that its trainer state holds what a resumed run needs."""
    folder = Path(folder)
    _verify(folder)
    for p in sorted(folder.glob("*.json")):
        if p.is_file():
            _read_json(p)
    from .sharded_read import check_shards, is_sharded

    if is_sharded(folder):  # every element of every tensor stored once (the shards' headers only)
        check_shards(folder)
    if (folder / TOKENIZER).is_dir():
        _load_tokenizer(folder / TOKENIZER)
    if resume:
        if not (folder / STATE).is_file():
            raise CheckpointError("no trainer state: this checkpoint cannot be resumed", loc=Loc(file=str(folder / STATE)),
                                  fix="start a new run from it instead")
        state = _read_json(folder / STATE)
        missing = [k for k in RESUME_KEYS if state.get(k) is None]
        if missing:
            raise CheckpointError(f"the trainer state lacks {', '.join(f'`{k}`' for k in missing)}, so the run cannot "
                                  "be resumed from it", loc=Loc(file=str(folder / STATE)),
                                  fix="start a new run from it instead")


def _load_tokenizer(folder: Path) -> Any:
    from .tokenizers import load_tokenizer

    try:
        return load_tokenizer(folder)
    except PhysLMError as err:  # a damaged tokenizer/ is a damaged checkpoint (run folders fall back)
        raise CheckpointError(err.diagnostics) from None


def _verify(folder: Path) -> None:
    manifest = _read_json(folder / MANIFEST)  # its shape checked: "files" maps names to {sha256, bytes}
    files = manifest["files"]
    for name in required_files(folder):
        if name not in files:
            raise CheckpointError("required file not listed in the manifest", loc=Loc(file=str(folder / name)),
                                  fix="the checkpoint is incomplete: use another one")
    for rel, entry in files.items():
        p = folder / rel
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise CheckpointError(f"the manifest lists a file outside the checkpoint folder: {rel!r}",
                                  loc=Loc(file=str(folder / MANIFEST)), fix="the checkpoint is damaged: use another one")
        if not p.is_file():
            raise CheckpointError("file missing from the checkpoint", loc=Loc(file=str(p)),
                                  fix="the checkpoint is incomplete: use another one (last or best)")
        if p.stat().st_size != entry["bytes"]:
            raise CheckpointError(f"file is truncated or grown: {p.stat().st_size} bytes, the manifest says "
                                  f"{entry['bytes']}", loc=Loc(file=str(p)), fix="the file is damaged: use another checkpoint")
        if _sha256(p) != entry["sha256"]:
            raise CheckpointError("checksum mismatch: the file changed since the checkpoint was written",
                                  loc=Loc(file=str(p)), fix="the file is damaged or was edited: use another checkpoint")


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError("file missing from the checkpoint", loc=Loc(file=str(path)),
                              fix="the checkpoint is incomplete: use another one")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"not a readable safetensors file (truncated or corrupt): {err}", loc=Loc(file=str(path)),
                              fix="the file is damaged: use another checkpoint") from None


def _check_weights(module: torch.nn.Module, path: Path) -> None:
    """Name every key the stored weights and the rebuilt model disagree on."""
    try:
        with safe_open(str(path), framework="pt") as f:
            stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"not a readable safetensors file (truncated or corrupt): {err}", loc=Loc(file=str(path)),
                              fix="the file is damaged: use another checkpoint") from None
    want = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    # A tied tensor is stored under one of its names; the others are not missing.
    shared: dict[int, list[str]] = {}
    for k, v in module.state_dict().items():
        local = getattr(v, "_local_tensor", v)  # a DTensor's own piece: the wrapper has no storage
        shared.setdefault(local.data_ptr() if local.numel() else id(v), []).append(k)
    missing = [k for k in want if k not in stored and not any(a in stored for a in _aliases(k, shared))]
    unexpected = [k for k in stored if k not in want]
    mismatched = [f"{k} (stored {list(stored[k])}, model {list(want[k])})" for k in stored if k in want and stored[k] != want[k]]
    problems = []
    if missing:
        problems.append("missing " + ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else ""))
    if unexpected:
        problems.append("unexpected " + ", ".join(unexpected[:8]) + (" ..." if len(unexpected) > 8 else ""))
    if mismatched:
        problems.append("shape mismatch " + ", ".join(mismatched[:8]))
    if problems:
        raise CheckpointError(
            "the weights do not match the model its blueprint builds: " + "; ".join(problems),
            loc=Loc(file=str(path)),
            fix="blueprint.yaml or a component changed since the checkpoint was written; "
            "use the version of physlm-graph that wrote it",
        )


def _aliases(key: str, shared: dict[int, list[str]]) -> list[str]:
    return next((names for names in shared.values() if key in names), [])


def stored_dtype(path: Path) -> torch.dtype | None:
    """bfloat16 or float16 when every floating tensor of ``model.safetensors`` is stored so (an
    import that kept its checkpoint's dtype), else None (float32: what a compiled blueprint has)."""
    names = {"BF16": torch.bfloat16, "F16": torch.float16}
    try:
        with safe_open(str(path), framework="pt") as f:
            kinds = {f.get_slice(k).get_dtype() for k in f.keys()}
    except (SafetensorError, OSError, ValueError):
        return None  # reported by load_weights, which reads the file next
    floats = kinds & {"F64", "F32", "BF16", "F16"}
    return names.get(floats.pop()) if len(floats) == 1 else None


def load_weights(module: torch.nn.Module, path: str | Path, *, verify: bool = True, cm_hash: str | None = None) -> Path:
    """Load a checkpoint's weights into an existing module (resume); returns the checkpoint folder.

    A sharded checkpoint is read through DCP (``sharded_read.read_sharded``; under a process
    group every rank calls this); a module that FSDP2 shards takes its rank's piece of each full
    tensor. ``cm_hash``: the graph the module is, checked against a sharded checkpoint's index."""
    folder = find_checkpoint(path)
    from .sharded_read import is_sharded, read_sharded

    if is_sharded(folder):
        if verify:
            _verify(folder)
        read_sharded(folder, module, cm_hash=cm_hash)
        return folder
    if verify:
        _verify(folder)
    _check_weights(module, folder / MODEL)
    if any(hasattr(p, "device_mesh") for p in module.parameters()):
        _load_into_sharded(module, folder / MODEL)
        return folder
    try:
        from safetensors.torch import load_model

        load_model(module, str(folder / MODEL), strict=True, device=str(next(module.parameters()).device))
    except (SafetensorError, OSError, RuntimeError) as err:
        raise CheckpointError(f"the weights could not be loaded: {err}", loc=Loc(file=str(folder / MODEL)),
                              fix="the file is damaged: use another checkpoint") from None
    return folder


def _load_into_sharded(module: torch.nn.Module, path: Path) -> None:
    """Full weights from ``path`` into an FSDP2 module: each rank reads the file and keeps its piece."""
    stored = _load_tensors(path)
    shared: dict[int, list[str]] = {}
    state = module.state_dict()
    for name, p in module.named_parameters(remove_duplicate=False):
        shared.setdefault(id(p), []).append(name)
    weights = {}
    for key, target in state.items():
        found = next((a for a in [key, *next((n for n in shared.values() if key in n), [])] if a in stored), None)
        if found is None:  # _check_weights has named every missing tensor already
            raise CheckpointError(f"the weights lack {key}", loc=Loc(file=str(path)), fix="use another checkpoint")
        weights[key] = _place_like(stored[found].to(target.dtype), target)
    module.load_state_dict(weights, strict=True)


def load_checkpoint(path: str | Path, *, device: str | torch.device = "cpu", verify: bool = True,
                    tokenizer: bool = True) -> Checkpoint:
    """Load a checkpoint (or a run folder's last/best): rebuild the model from its blueprint and
    load its weights. Every problem is a ``CheckpointError`` naming the file; in a run folder a
    damaged ``last`` falls back to ``best`` with a warning on stderr."""
    candidates = checkpoint_candidates(path)
    for i, folder in enumerate(candidates):
        try:
            return _load_folder(folder, device=device, verify=verify, tokenizer=tokenizer)
        except CheckpointError as err:
            if i + 1 == len(candidates):
                raise
            _warn_fallback(folder, err, candidates[i + 1])
    raise AssertionError("unreachable")


def _load_folder(folder: Path, *, device: str | torch.device, verify: bool, tokenizer: bool) -> Checkpoint:
    from physlm_graph._compile import compile_blueprint

    if verify:
        _verify(folder)
    for name in required_files(folder):
        if not (folder / name).is_file():
            raise CheckpointError("file missing from the checkpoint", loc=Loc(file=str(folder / name)),
                                  fix="the checkpoint is incomplete: use another one")
    config = _read_json(folder / CONFIG)
    stage = None
    if (folder / STATE).is_file():  # a growth run: rebuild the stage the weights belong to
        stage = _read_json(folder / STATE).get("stage")
    try:
        cm = compile_blueprint(str(folder / BLUEPRINT), device="cpu", stage=stage)
    except PhysLMError as err:
        raise CheckpointError(f"the stored blueprint no longer compiles:\n{err}", loc=Loc(file=str(folder / BLUEPRINT)),
                              fix="use the version of physlm-graph that wrote the checkpoint") from None
    half = stored_dtype(folder / MODEL)
    if half is not None:  # an import that kept a checkpoint's bfloat16 (or float16): loaded as stored
        cm.module.to(half)
    load_weights(cm.module, folder, verify=False, cm_hash=cm.hash)
    cm.module.to(device).eval()
    tok = None
    if tokenizer and (folder / TOKENIZER).is_dir():
        tok = _load_tokenizer(folder / TOKENIZER)
        vocab = model_vocab(cm)
        if vocab is not None and tok.vocab_size > vocab:
            raise CheckpointError(f"the tokenizer has {tok.vocab_size:,} tokens but the model's logits cover {vocab:,}",
                                  loc=Loc(file=str(folder / TOKENIZER)), fix="the folder was edited: use another checkpoint")
    state = _read_json(folder / STATE) if (folder / STATE).is_file() else None
    return Checkpoint(path=folder, model=cm, config=config, tokenizer=tok, trainer_state=state)
