"""The shape of every JSON file of a checkpoint, checked when it is read.

A file that parses as JSON can still hold a list where the trainer state belongs, a string for
a step, or an RNG state that no generator accepts. ``read_json(path)`` parses the file (bounded
in size and nesting) and validates it against the model for its name; every problem is a
``CheckpointError`` naming the file and the key:

    trainer_state.json: key `rng.torch_cpu`: not a state the torch CPU generator accepts

RNG and batcher states are checked by loading them into fresh generators, so a state that
passes here also restores. Unknown extra keys are kept (growth runs and the Hugging Face
integration add their own); the keys the runtime reads are typed strictly.
"""

from __future__ import annotations

import json
import os
import random
import stat
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from physlm_graph._errors import CheckpointError, Loc

__all__ = ["read_json", "validate_json", "MAX_JSON_BYTES", "MAX_JSON_DEPTH", "SCHEMAS", "RESUME_KEYS", "ShardIndex"]

MAX_JSON_BYTES = 256 << 20  # config.json carries the blueprint text; optimizer.json one name per tensor
MAX_JSON_DEPTH = 64

_strict = ConfigDict(strict=True, frozen=True)
_open = ConfigDict(strict=True, frozen=True, extra="allow")


class _FileEntry(BaseModel):
    model_config = ConfigDict(strict=True, frozen=True, extra="forbid")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)


class Manifest(BaseModel):
    model_config = ConfigDict(strict=True, frozen=True, extra="forbid")
    format: int
    files: dict[str, _FileEntry]


class _TokenizerInfo(BaseModel):
    model_config = _open
    name: str
    fingerprint: str
    vocab_size: int = Field(ge=1)


class _PhysLMConfig(BaseModel):  # the Hugging Face integration writes fewer keys than the trainer
    model_config = _open
    format: int | None = None
    blueprint: str | None = None
    hash: str
    num_params: int | None = Field(None, ge=0)
    blueprint_file: str = "blueprint.yaml"
    blueprint_text: str | None = None
    tokenizer: _TokenizerInfo | None = None


class Config(BaseModel):
    model_config = _open
    model_type: str
    vocab_size: int | None = Field(None, ge=1)
    physlm: _PhysLMConfig


def _torch_state(value: list[int]) -> list[int]:
    import torch

    if any(not 0 <= v <= 255 for v in value):
        raise ValueError("not a list of byte values (0 to 255)")
    try:
        torch.Generator().set_state(torch.tensor(value, dtype=torch.uint8))
    except (RuntimeError, TypeError, ValueError):
        raise ValueError("not a state the torch CPU generator accepts") from None
    return value


class _NumpyRng(BaseModel):
    model_config = _strict
    kind: str
    keys: list[int]
    pos: int
    has_gauss: int
    gauss: float

    def check(self) -> None:
        import numpy as np

        try:
            keys = np.array(self.keys, dtype=np.uint32)
            np.random.RandomState().set_state((self.kind, keys, self.pos, self.has_gauss, self.gauss))
        except (ValueError, TypeError, OverflowError, IndexError) as err:  # IndexError: keys shorter than 624
            raise ValueError(f"not a state numpy's generator accepts ({err})") from None


class _PythonRng(BaseModel):
    model_config = _strict
    version: int
    state: list[int]
    gauss: float | None

    def check(self) -> None:
        try:
            random.Random().setstate((self.version, tuple(self.state), self.gauss))
        except (ValueError, TypeError, OverflowError) as err:
            raise ValueError(f"not a state Python's generator accepts ({err})") from None


class _Rng(BaseModel):
    model_config = _strict
    torch_cpu: list[int]
    numpy: _NumpyRng | None = None
    python: _PythonRng | None = None
    torch_cuda: list[list[int]] | None = None

    @field_validator("torch_cpu")
    @classmethod
    def _cpu(cls, v: list[int]) -> list[int]:
        return _torch_state(v)

    @field_validator("torch_cuda")
    @classmethod
    def _cuda(cls, v: list[list[int]] | None) -> list[list[int]] | None:
        if v is not None and any(not 0 <= b <= 255 for s in v for b in s):
            raise ValueError("not lists of byte values (0 to 255)")
        return v

    @field_validator("numpy", "python")
    @classmethod
    def _others(cls, v: Any) -> Any:
        if v is not None:
            v.check()
        return v


class _Batcher(BaseModel):
    model_config = _strict
    seed: int
    step: int = Field(ge=0)
    generator: list[int]
    batch_size: int = Field(ge=1)
    seq_len: int = Field(ge=1)
    n_tokens: int = Field(ge=1)

    @field_validator("generator")
    @classmethod
    def _gen(cls, v: list[int]) -> list[int]:
        return _torch_state(v)


class _SequentialBatcher(BaseModel):
    """``data.SequentialWindows.state_dict()``: the read position in the training split."""

    model_config = _strict
    order: Literal["sequential"]
    span: int = Field(ge=0)
    pos: int = Field(ge=0)
    epoch: int = Field(ge=0)
    step: int = Field(ge=0)
    batch_size: int = Field(ge=1)
    seq_len: int = Field(ge=1)
    world: int = Field(ge=1)
    n_tokens: int = Field(ge=1)
    spans: int = Field(ge=1)


class TrainerState(BaseModel):
    """What a checkpoint's ``trainer_state.json`` may hold; each key present is typed strictly.
    ``RESUME_KEYS`` must be present to resume from it (``generate`` and ``eval`` need none)."""

    model_config = _open
    format: int | None = None
    step: int | None = Field(None, ge=0)
    tokens_seen: int | None = Field(None, ge=0)
    best_val_loss: float | None = None
    last_val_loss: float | None = None
    skipped: int = Field(0, ge=0)
    elapsed_s: float = Field(0.0, ge=0)
    blueprint_hash: str | None = None
    config: dict[str, Any] | None = None
    data: str | None = None
    rng: _Rng | None = None
    batcher: _Batcher | None = None  # or a _SequentialBatcher: see _batcher
    batchers: list[Any] | None = None  # every rank's, in rank order (several processes); each as batcher
    stage: int | None = Field(None, ge=0)
    growth_stage: int | None = Field(None, ge=0)

    @field_validator("batcher", mode="wrap")
    @classmethod
    def _batcher(cls, v: Any, handler: Any) -> Any:
        """Random windows' state (``_Batcher``), or the read position of ``data_order: sequential``."""
        if not (isinstance(v, dict) and v.get("order") == "sequential"):
            return handler(v)
        return _one_batcher(v)

    @field_validator("batchers")
    @classmethod
    def _batchers(cls, v: list[Any] | None) -> list[Any] | None:
        return None if v is None else [_one_batcher(b) for b in v]


def _one_batcher(v: Any) -> Any:
    """One rank's batcher state: ``_SequentialBatcher`` when it says ``order: sequential``, else ``_Batcher``."""
    kind = _SequentialBatcher if isinstance(v, dict) and v.get("order") == "sequential" else _Batcher
    try:
        return kind.model_validate(v)
    except ValidationError as err:
        first = err.errors()[0]
        raise ValueError(f"{_key(first['loc'])}: {first['msg']}") from None


RESUME_KEYS = ("step", "tokens_seen", "blueprint_hash", "config", "rng", "batcher")


class _ParamGroup(BaseModel):
    model_config = _open
    lr: float
    names: list[str] | None = None


class OptimizerMeta(BaseModel):
    model_config = _open
    format: int
    names: list[str]
    param_groups: list[_ParamGroup]
    scalars: dict[str, dict[str, Any]] = {}


class _TensorInfo(BaseModel):
    model_config = ConfigDict(strict=True, frozen=True, extra="forbid")
    shape: list[Annotated[int, Field(ge=0)]]
    dtype: Literal["float32", "float16", "bfloat16", "float64", "int64", "int32"]


class ShardIndex(BaseModel):
    """``sharded.json`` of a sharded checkpoint (``runtime/sharded_checkpoint.py``): the graph hash,
    the world size that wrote it, and every stored tensor's full shape and dtype."""

    model_config = ConfigDict(strict=True, frozen=True, extra="forbid")
    format: int
    hash: str
    world_size: int = Field(ge=1)
    tensors: dict[str, _TensorInfo]


#: checkpoint file name -> its model (``trainer_state.json`` of any checkpoint, at any depth)
SCHEMAS: dict[str, type[BaseModel]] = {"manifest.json": Manifest, "config.json": Config,
                                        "trainer_state.json": TrainerState, "optimizer.json": OptimizerMeta,
                                        "sharded.json": ShardIndex}


def _depth(value: Any, limit: int) -> int:
    """Nesting depth of parsed JSON, iteratively (a deep nest must not recurse)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if d > limit:
            return d
        deepest = max(deepest, d)
        if isinstance(v, dict):
            stack.extend((x, d + 1) for x in v.values())
        elif isinstance(v, list):
            stack.extend((x, d + 1) for x in v)
    return deepest


def _key(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc) or "(the top level)"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def validate_json(path: Path, data: Any, schema: type[BaseModel] | None = None) -> Any:
    """``data`` checked against ``schema`` (by default the model for ``path.name``); returns it."""
    schema = schema or SCHEMAS.get(path.name)
    if schema is None:
        return data
    if not isinstance(data, dict):
        raise CheckpointError(f"expected a JSON object at the top level, got {type(data).__name__}",
                              loc=Loc(file=str(path)), fix="the file is damaged: use another checkpoint")
    try:
        schema.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
        got = "" if first["type"] == "missing" else f", got {_short(first.get('input'))}"
        msg = first["msg"].removeprefix("Value error, ")
        raise CheckpointError(f"key `{_key(first['loc'])}`: {msg}{got}{more}", loc=Loc(file=str(path)),
                              fix="the file is damaged: use another checkpoint") from None
    return data


def read_json(path: Path, schema: type[BaseModel] | None = None) -> Any:
    """Parse a checkpoint JSON file, bounded in size and depth, and validate its shape."""
    loc = Loc(file=str(path))
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block, a device never end
            raise CheckpointError("not a regular file", loc=loc, fix="the checkpoint is damaged: use another one")
        with open(path, "rb") as f:
            raw = f.read(MAX_JSON_BYTES + 1)
    except FileNotFoundError:
        raise CheckpointError("file missing from the checkpoint", loc=loc,
                              fix="the checkpoint is incomplete: use another one (last or best)") from None
    except OSError as err:
        raise CheckpointError(f"cannot read the file: {err.strerror or err}", loc=loc,
                              fix="check the file's permissions") from None
    if len(raw) > MAX_JSON_BYTES:
        raise CheckpointError(f"the file is larger than {MAX_JSON_BYTES >> 20} MiB; no checkpoint writes one that large",
                              loc=loc, fix="the file is damaged: use another checkpoint")
    try:
        data = json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise CheckpointError(f"JSON nested more than {MAX_JSON_DEPTH} levels deep", loc=loc,
                              fix="the file is damaged: use another checkpoint") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"not valid JSON: {err}", loc=loc, fix="the file is damaged: use another checkpoint") from None
    if _depth(data, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise CheckpointError(f"JSON nested more than {MAX_JSON_DEPTH} levels deep", loc=loc,
                              fix="the file is damaged: use another checkpoint")
    return validate_json(path, data, schema)
