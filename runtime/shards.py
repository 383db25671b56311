"""Pre-tokenized training data in the speedrun's shard format (modded-nanogpt, llm.c).

A shard is a 1024-byte header of 256 little-endian int32, then the token ids as uint16::

    header[0] = 20240520    the magic number
    header[1] = 1           the format version
    header[2] = N           the number of tokens that follow (2 N bytes)

The FineWeb shards the speedrun trains on (``fineweb_train_000001.bin``, ...) are GPT-2 ids of
100M tokens each. ``--data`` takes one shard, a glob (``data/fineweb10B/fineweb_train_*.bin``)
or a folder of ``.bin`` shards; the shards are read in name order as one token sequence,
memory-mapped (nothing is copied until a window is read).

    files = shard_files("data/fineweb10B/fineweb_train_*.bin")   # None: not a shard source
    tokens = read_shards(files)                                 # len(), slicing, np.asarray(...)

Every problem with a shard is a ``RuntimeDataError`` naming the file.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

import numpy as np

from physlm_graph._errors import Loc, RuntimeDataError

__all__ = ["MAGIC", "VERSION", "HEADER_BYTES", "shard_files", "read_shard", "read_shards", "write_shard",
           "ShardTokens", "ShardText"]

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = 4 * HEADER_INTS
_TEXT_SUFFIXES = (".txt", ".md", ".raw")
_REWRITE = "write the shard again, or download it again"


def _starts_with_magic(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return len(head) == 4 and int(np.frombuffer(head, dtype="<i4")[0]) == MAGIC


def shard_files(spec: str | os.PathLike[str]) -> list[Path] | None:
    """The shard files ``spec`` names, in name order; None when it is not a shard source.

    - a file named ``*.bin``, or any file that starts with the magic number: that file;
    - a folder holding ``*.bin`` files, one at least a shard, and no text (``*.txt``, ``*.md``,
      ``*.raw``): its ``*.bin`` files (not its sub-folders), each checked; refused when validation shards (``*val*``) sit beside
      training ones, which a glob separates;
    - a glob pattern that names no existing path (``dir/fineweb_train_*.bin``): the files it
      matches, an error when there are none.
    """
    text = str(spec)
    if text.startswith("hf:"):
        return None
    path = Path(text).expanduser()
    if path.is_file():
        return [path] if path.suffix.lower() == ".bin" or _starts_with_magic(path) else None
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() == ".bin")
        has_text = any(p.suffix.lower() in _TEXT_SUFFIXES for p in path.rglob("*") if p.is_file())
        if has_text or not any(_starts_with_magic(p) for p in files):
            return None
        val = [p for p in files if "val" in p.name.lower()]
        if val and len(val) < len(files):
            raise RuntimeDataError(
                f"the folder holds validation shards ({val[0].name}, {len(val)} in all) beside training ones",
                loc=Loc(file=text),
                fix=f"name the training shards with a glob, e.g. {path / '*train*.bin'}")
        return files
    if glob.has_magic(text):
        matches = sorted(Path(p) for p in glob.glob(os.path.expanduser(text)))
        files = [p for p in matches if p.is_file()]
        if not files:
            raise RuntimeDataError("the pattern matches no files", loc=Loc(file=text),
                                   fix="check the folder and the pattern (e.g. data/fineweb10B/fineweb_train_*.bin)")
        return files
    return None


def read_shard(path: str | os.PathLike[str]) -> np.memmap:
    """One shard's tokens, checked against its header: a read-only uint16 memmap (N,)."""
    path = Path(path)
    loc = Loc(file=str(path))
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise RuntimeDataError(f"truncated shard: the file has {size} bytes, fewer than the {HEADER_BYTES}-byte header",
                               loc=loc, fix=_REWRITE)
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)  # (256,)
    magic, version, n = (int(v) for v in header[:3])
    if magic != MAGIC:
        raise RuntimeDataError(
            "not a token shard: its first int32 is not the shard magic number",
            loc=loc, expected=str(MAGIC), got=str(magic),
            fix="pass .bin shards in the speedrun's format (modded-nanogpt, llm.c), or a text file not named *.bin")
    if version != VERSION:
        raise RuntimeDataError("unsupported shard version", loc=loc, expected=str(VERSION), got=str(version),
                               fix="write the shard in version 1 (uint16 tokens)")
    if n <= 0:
        raise RuntimeDataError(f"the shard holds no tokens (its header's count is {n})", loc=loc, fix=_REWRITE)
    payload = size - HEADER_BYTES
    if payload != 2 * n:
        what = "truncated shard" if payload < 2 * n else "token count mismatch"
        raise RuntimeDataError(
            f"{what}: the header promises {n} tokens ({2 * n} bytes) but {payload} bytes follow the header",
            loc=loc, fix=_REWRITE)
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(n,))


class ShardTokens:
    """Several shards as one token sequence without copying them: ``len``, ``[i]``, slices (views,
    step 1), ``np.asarray(view, dtype)`` and ``astype`` (which read the slice's tokens)."""

    def __init__(self, shards: list[np.ndarray], start: int = 0, stop: int | None = None) -> None:
        self._shards = shards
        self._ends = np.cumsum([len(s) for s in shards])  # (n_shards,)
        self.start = start
        self.stop = int(self._ends[-1]) if stop is None else stop
        self.dtype = np.dtype("<u2")

    def __len__(self) -> int:
        return self.stop - self.start

    def spans(self) -> list[tuple[int, int]]:
        """Where each shard's tokens lie in this view: (start, stop) pairs in order, empty ones left out."""
        out = []
        for end, shard in zip(self._ends, self._shards):
            lo, hi = max(self.start, int(end) - len(shard)), min(self.stop, int(end))
            if lo < hi:
                out.append((lo - self.start, hi - self.start))
        return out

    def __getitem__(self, key: int | slice) -> ShardTokens | int:
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                raise ValueError("ShardTokens: slices with a step are not supported")
            return ShardTokens(self._shards, self.start + start, self.start + max(start, stop))
        i = key + len(self) if key < 0 else key
        if not 0 <= i < len(self):
            raise IndexError(f"token {key} is outside 0..{len(self) - 1}")
        j = int(np.searchsorted(self._ends, self.start + i, side="right"))
        return int(self._shards[j][self.start + i - (self._ends[j] - len(self._shards[j]))])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        pieces = []
        for shard, end in zip(self._shards, self._ends):
            begin = int(end) - len(shard)
            lo, hi = max(self.start, begin), min(self.stop, int(end))
            if lo < hi:
                pieces.append(shard[lo - begin : hi - begin])
        out = np.concatenate(pieces) if pieces else np.empty(0, dtype=self.dtype)
        return out.astype(dtype) if dtype is not None else out

    def astype(self, dtype) -> np.ndarray:
        return np.asarray(self, dtype=dtype)


def read_shards(files: list[Path]) -> np.ndarray | ShardTokens:
    """All shards' tokens in order: one shard's memmap, or a ``ShardTokens`` over several."""
    shards = [read_shard(p) for p in files]
    return shards[0] if len(shards) == 1 else ShardTokens(shards)


class ShardText(str):
    """What ``load_text`` gives for a shard source: no text (the string is empty) and the token ids in
    ``tokens``, which ``TokenCache.tokens`` returns instead of encoding (``tokens_for``)."""

    tokens: np.ndarray | ShardTokens
    source: str

    def __new__(cls, tokens: np.ndarray | ShardTokens, source: str) -> ShardText:
        obj = super().__new__(cls, "")
        obj.tokens, obj.source = tokens, source
        return obj

    def tokens_for(self, tokenizer) -> np.ndarray | ShardTokens:
        """The ids, after checking that ``tokenizer`` (the model's vocabulary) covers every one of them."""
        shards = self.tokens._shards if isinstance(self.tokens, ShardTokens) else [self.tokens]
        top = max(int(s.max()) for s in shards)
        if top >= tokenizer.vocab_size:
            raise RuntimeDataError(
                f"the shards hold token ids up to {top}, but tokenizer {tokenizer.name!r} has {tokenizer.vocab_size} ids",
                loc=Loc(file=self.source),
                fix="train with the tokenizer that made the shards (the FineWeb shards are GPT-2's: "
                    "--tokenizer PATH/TO/gpt2)")
        return self.tokens


def write_shard(path: str | os.PathLike[str], tokens) -> Path:
    """Write ``tokens`` (ids below 65536) as one shard: header (magic, version 1, count), then uint16."""
    ids = np.asarray(tokens)
    if ids.size and (ids.min() < 0 or ids.max() >= 1 << 16):
        raise ValueError("write_shard: token ids must lie in 0..65535 (uint16)")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (MAGIC, VERSION, ids.size)
    path = Path(path)
    with path.open("wb") as f:
        f.write(header.tobytes())
        f.write(ids.astype("<u2").tobytes())
    return path
