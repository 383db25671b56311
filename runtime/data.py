"""Training text in, token windows out.

    text = load_text("data/input.txt")                   # a file, a folder, or hf:NAME[:CONFIG][@SPLIT]
    tokens = TokenCache(cache_dir).tokens(text, tok)     # encoded once, memory-mapped after that
    train, val = split(tokens, val_fraction=0.1)         # the last 10% is validation (nanoGPT)
    batches = RandomWindows(train, batch_size=12, seq_len=256, seed=1337)
    x, y = next(batches)                                 # (B, T) int64 each, y = x shifted by one

    batches = SequentialWindows(train, batch_size=12, seq_len=256)   # or in order (train.data_order)

``RandomWindows.state_dict()`` and ``SequentialWindows.state_dict()`` are plain ints and lists
(JSON-able), so a checkpoint resumes the exact batch sequence. ``strided_windows`` + ``window_batch`` cover a split for evaluation so
that every target token is scored exactly once (Hugging Face's strided perplexity).

Every problem with the user's data is a ``RuntimeDataError`` naming the file and the fix.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import socket
import stat
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from physlm_graph._errors import Loc, RuntimeDataError

from .shards import ShardText, ShardTokens, read_shards, shard_files
from .tokenizers import Tokenizer, text_fingerprint

__all__ = [
    "load_text",
    "TokenCache",
    "split",
    "RandomWindows",
    "SequentialWindows",
    "train_batches",
    "Batcher",
    "Window",
    "strided_windows",
    "window_batch",
]

TEXT_SUFFIXES = (".txt", ".md", ".raw")
MAX_TEXT_BYTES = 16 << 30  # all text is held in memory once; beyond this, tokenize into shards first
DATASET_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
CACHE_FORMAT = 1


# ---------------------------------------------------------------- reading text


def load_text(source: str | Path) -> str:
    """Read the training text from a file, a folder, or Hugging Face ``datasets``.

    - a text file (any suffix): read as UTF-8 (a BOM is dropped), checked for problems;
    - a folder: every ``*.txt``/``*.md``/``*.raw`` under it, sorted by relative path, each
      followed by a newline when it does not end with one;
    - ``*.json``/``*.jsonl``/``*.parquet``: through ``datasets``, column ``text``;
    - ``hf:NAME[:CONFIG][@SPLIT]``: a local file through ``datasets`` (``.csv`` too), or a hub
      dataset (split ``train`` unless named), which needs network access or the local HF cache;
    - token shards (``*.bin``, a glob or a folder of them): no text, the ids (``runtime/shards.py``).
    """
    spec = str(source)
    if spec.startswith("hf:"):
        return _load_hf(spec[3:], spec)
    shards = shard_files(spec)  # token shards (.bin, a glob, a folder of them): runtime/shards.py
    if shards is not None:
        return ShardText(read_shards(shards), spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        return _read_folder(path)
    if not path.exists():
        raise RuntimeDataError("no such file or folder", loc=Loc(file=spec),
                               fix="check the path; a Hugging Face dataset is written hf:NAME[:CONFIG]")
    _check_regular(path)
    if path.suffix.lower() in DATASET_BUILDERS and path.suffix.lower() != ".csv":
        return _load_local_dataset(path, spec)
    return _read_text_file(path)


def _check_regular(path: Path) -> int:
    """The size of ``path``, a regular file (following links); a device, FIFO or socket would be
    read forever or block, so it is refused, as is a file above ``MAX_TEXT_BYTES``."""
    loc = Loc(file=str(path))
    try:
        st = os.stat(path)
    except OSError as err:
        raise RuntimeDataError(f"cannot read it: {err.strerror or err}", loc=loc, fix="check the path and its permissions") from None
    if not stat.S_ISREG(st.st_mode):
        kind = ("a character device" if stat.S_ISCHR(st.st_mode) else "a block device" if stat.S_ISBLK(st.st_mode)
                else "a FIFO (named pipe)" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode)
                else "not a regular file")
        raise RuntimeDataError(f"the data is {kind}, not a regular file", loc=loc,
                               fix="save the text to a file and pass that file")
    if st.st_size > MAX_TEXT_BYTES:
        raise RuntimeDataError(f"the file holds {_size(st.st_size)}, above the {_size(MAX_TEXT_BYTES)} that are read "
                               "into memory", loc=loc, fix="split it into smaller files and train on part")
    return st.st_size


def _entry_kind(path: Path) -> str | None:
    """What a folder entry is when it is neither a regular file nor a folder (following links):
    ``a FIFO (named pipe)``, ``a broken link``...; None for a regular file, ``folder`` for one."""
    try:
        st = os.stat(path)
    except OSError as err:
        if os.path.islink(path):
            return "a symlink loop" if err.errno == errno.ELOOP else "a broken link"
        return f"unreadable: {err.strerror or err}"
    if stat.S_ISDIR(st.st_mode):
        return "folder"
    if stat.S_ISREG(st.st_mode):
        return None
    return ("a character device" if stat.S_ISCHR(st.st_mode) else "a block device" if stat.S_ISBLK(st.st_mode)
            else "a FIFO (named pipe)" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode)
            else "not a regular file")


def _read_folder(folder: Path) -> str:
    """The folder's text files (see ``load_text``). Entries that are not regular files (devices,
    FIFOs, sockets, broken links) are skipped with a warning naming them; a folder left without a
    text file is an error naming what was skipped."""
    files, skipped = [], []
    for p in folder.rglob("*"):
        rel = p.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts):
            continue
        kind = _entry_kind(p)
        if kind is None and p.suffix.lower() in TEXT_SUFFIXES:
            files.append(p)
        elif kind not in (None, "folder"):
            skipped.append(f"{rel.as_posix()} ({kind})")
    files.sort(key=lambda p: p.relative_to(folder).as_posix())
    skipped.sort()
    shown = ", ".join(skipped[:8]) + (f", ... ({len(skipped) - 8} more)" if len(skipped) > 8 else "")
    if not files:
        what = f"the folder holds no {'/'.join('*' + s for s in TEXT_SUFFIXES)} files"
        raise RuntimeDataError(what + (f" that are regular files; skipped: {shown}" if skipped else ""),
                               loc=Loc(file=str(folder)), fix="put the training text in .txt files, or pass one file")
    if skipped:
        print(f"warning: {folder}: skipped {len(skipped)} entr{'y' if len(skipped) == 1 else 'ies'} that "
              f"{'is' if len(skipped) == 1 else 'are'} not a regular file: {shown}", file=sys.stderr)
    total = sum(_check_regular(p) for p in files)
    if total > MAX_TEXT_BYTES:
        raise RuntimeDataError(f"the folder's text files hold {_size(total)}, above the {_size(MAX_TEXT_BYTES)} that "
                               "are read into memory", loc=Loc(file=str(folder)),
                               fix="train on a part of the folder")
    parts = [_read_text_file(p) for p in files]
    return "".join(t if t.endswith("\n") else t + "\n" for t in parts)


def _size(n: int) -> str:
    unit = next((u for u, k in (("GiB", 30), ("MiB", 20), ("KiB", 10)) if n >= 1 << k), None)
    return f"{n:,} bytes" if unit is None else f"{n / (1 << {'GiB': 30, 'MiB': 20, 'KiB': 10}[unit]):.1f} {unit}"


def _read_text_file(path: Path) -> str:
    loc = Loc(file=str(path))
    size = _check_regular(path)
    with open(path, "rb") as f:
        data = f.read(size + 1)  # bounded: a file that grows while it is read stops at its size
    if len(data) > size:
        raise RuntimeDataError("the file grew while it was read", loc=loc, fix="pass a file that is not being written")
    if not data.strip():
        what = "is empty (0 bytes)" if not data else "holds only whitespace"
        raise RuntimeDataError(f"the file {what}", loc=loc, fix="point at a file with training text")
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise RuntimeDataError("the file is UTF-16 (it starts with a UTF-16 byte-order mark); expected UTF-8",
                               loc=loc, fix=f"convert it: iconv -f UTF-16 -t UTF-8 {path} > {path.stem}.utf8{path.suffix}")
    nul = data.find(b"\x00")
    if nul >= 0:
        raise RuntimeDataError(f"the file looks binary (a NUL byte at offset {nul}); expected UTF-8 text",
                               loc=loc, fix="pass a text file (for a dataset file use .json, .jsonl or .parquet)")
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as err:
        guess = _legacy_encoding(data)
        sample = data[:65536].decode("utf-8", errors="replace")
        if guess is None and sample.count("\ufffd") > 0.3 * len(sample):
            raise RuntimeDataError("the file looks binary (most of it is not UTF-8); expected UTF-8 text",
                                   loc=loc, fix="pass a text file") from None
        guess = guess or "CP1252"
        off = err.start
        line = data.count(b"\n", 0, off) + 1
        col = off - (data.rfind(b"\n", 0, off) + 1) + 1
        raise RuntimeDataError(
            f"invalid UTF-8: byte 0x{data[off]:02x} at offset {off} (line {line}, byte {col} of the line) "
            f"cannot start or continue a character; it may be {guess}",
            loc=Loc(file=str(path), line=line, col=col),
            fix=f"re-save the file as UTF-8, e.g. iconv -f {guess} -t UTF-8 {path} > {path.stem}.utf8{path.suffix}",
        ) from None


def _legacy_encoding(data: bytes) -> str | None:
    """Korean CP949 (EUC-KR) when the bytes decode to Hangul that way; the fix then says so."""
    try:
        return "CP949" if re.search("[\uac00-\ud7a3]", data[:1 << 20].decode("cp949", errors="strict")) else None
    except UnicodeDecodeError:
        return None


# ---------------------------------------------------------------- Hugging Face datasets


def _load_hf(rest: str, spec: str) -> str:
    name, _, split_name = rest.partition("@")
    name, _, config = name.partition(":")
    local = Path(name).expanduser()
    if local.exists():
        if not local.is_dir():
            _check_regular(local)
        if local.is_file() and DATASET_BUILDERS.get(local.suffix.lower()) is None:
            _read_text_file(local)  # the clear errors (empty, binary, bad UTF-8) before datasets sees it
        return _load_local_dataset(local, spec)
    if not name or name.startswith((".", "/", "~")):
        raise RuntimeDataError("no such local file or folder for a dataset", loc=Loc(file=name or spec),
                               fix="check the path")
    return _load_hub(name, config or None, split_name or "train", spec)


def _load_local_dataset(path: Path, spec: str) -> str:
    import datasets

    builder = DATASET_BUILDERS.get(path.suffix.lower(), "text")
    kwargs = {"keep_linebreaks": True} if builder == "text" else {}
    files = [str(p) for p in sorted(path.rglob("*")) if p.is_file()] if path.is_dir() else [str(path)]
    try:
        ds = datasets.load_dataset(builder, data_files=files, split="train", **kwargs)
    except Exception as err:  # datasets raises many kinds; report its own words
        raise RuntimeDataError(f"Hugging Face datasets could not read it as {builder}: {_first_line(err)}",
                               loc=Loc(file=str(path)), fix="check the file's format") from None
    sep = "" if builder == "text" else "\n"
    return _column_text(ds, spec, sep)


def _hub_reachable(timeout: float = 3.0) -> bool:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    host = re.sub(r"^https?://", "", constants.ENDPOINT).split("/")[0]
    try:
        with socket.create_connection((host.split(":")[0], 443), timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _offline():
    """Hub access off for one call, so a cached dataset loads and a missing one fails at once."""
    import datasets
    from huggingface_hub import constants

    saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved


def _load_hub(name: str, config: str | None, split_name: str, spec: str) -> str:
    import datasets

    online = _hub_reachable()
    try:
        with contextlib.nullcontext() if online else _offline():
            ds = datasets.load_dataset(name, config, split=split_name)
    except ConnectionError:
        if online:
            raise RuntimeDataError(f"{spec}: the Hugging Face hub could not be reached",
                                   fix="retry, or download it elsewhere and pass a local file") from None
        raise RuntimeDataError(
            f"{spec}: {name!r} is a Hugging Face hub dataset and this machine is offline "
            "(and it is not in the local Hugging Face cache)",
            fix="download it on a machine with network access, or pass a local file",
        ) from None
    except Exception as err:
        raise RuntimeDataError(f"{spec}: Hugging Face datasets could not load it: {_first_line(err)}",
                               fix="check the dataset name, config and split (hf:NAME[:CONFIG][@SPLIT])") from None
    return _column_text(ds, spec, "\n")


def _column_text(ds, spec: str, sep: str) -> str:
    names = [n for n, f in ds.features.items() if getattr(f, "dtype", None) in ("string", "large_string")]
    column = "text" if "text" in ds.column_names else (names[0] if len(names) == 1 else None)
    if column is None:
        raise RuntimeDataError(f"{spec}: no 'text' column to train on (columns: {', '.join(ds.column_names)})",
                               fix="use a dataset with a 'text' column, or one string column")
    text = sep.join(t for t in ds[column] if t is not None)
    if not text.strip():
        raise RuntimeDataError(f"{spec}: the dataset has no text", fix="check the dataset and split")
    return text


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


# ---------------------------------------------------------------- token cache


class TokenCache:
    """Encode a text once; keep the ids as a memory-mapped file keyed by (text, tokenizer).

    ``cache_dir/tokens/<key>.bin`` holds the ids (uint16 when the vocabulary fits, else
    uint32); ``<key>.json`` beside it records n_tokens, dtype, vocab_size and both
    fingerprints. Both are written to a temp file and renamed, the sidecar last, so a
    cache entry is either complete or absent.
    """

    def __init__(self, cache_dir: str | Path) -> None:
        self.dir = Path(cache_dir) / "tokens"

    @staticmethod
    def key(text: str, tokenizer: Tokenizer, *, data_fingerprint: str | None = None) -> str:
        data = data_fingerprint or text_fingerprint(text)
        return text_fingerprint(f"{CACHE_FORMAT}|{data}|{tokenizer.fingerprint()}")[:24]

    def paths(self, text: str, tokenizer: Tokenizer, *, data_fingerprint: str | None = None) -> tuple[Path, Path]:
        key = self.key(text, tokenizer, data_fingerprint=data_fingerprint)
        return self.dir / f"{key}.bin", self.dir / f"{key}.json"

    def tokens(self, text: str, tokenizer: Tokenizer, *, progress: bool | None = None) -> np.ndarray:
        """The ids of ``text``: read-only memmap, encoded now if not cached yet."""
        if isinstance(text, ShardText):  # already token ids
            return text.tokens_for(tokenizer)
        data = text_fingerprint(text)
        binary, sidecar = self.paths(text, tokenizer, data_fingerprint=data)
        meta = self._valid_meta(binary, sidecar)
        if meta is None:
            meta = self._encode(text, data, tokenizer, binary, sidecar, progress)
        return np.memmap(binary, dtype=meta["dtype"], mode="r", shape=(meta["n_tokens"],))

    @staticmethod
    def _valid_meta(binary: Path, sidecar: Path) -> dict | None:
        try:
            meta = json.loads(sidecar.read_text(encoding="utf-8"))
            size = meta["n_tokens"] * np.dtype(meta["dtype"]).itemsize
            return meta if binary.stat().st_size == size and meta.get("format") == CACHE_FORMAT else None
        except (OSError, ValueError, KeyError, TypeError):
            return None  # absent or damaged: encode again

    def _encode(self, text: str, data: str, tok: Tokenizer, binary: Path, sidecar: Path,
                progress: bool | None) -> dict:
        dtype = np.dtype(np.uint16 if tok.vocab_size <= 2**16 else np.uint32)
        self.dir.mkdir(parents=True, exist_ok=True)
        chunks = _chunks(text, tok)
        show = progress if progress is not None else (len(text) > 4_000_000 and sys.stderr.isatty())
        n = 0
        fd, tmp = tempfile.mkstemp(prefix=binary.name + ".", suffix=".tmp", dir=self.dir)
        try:
            with os.fdopen(fd, "wb") as f, _progress(show, len(text), tok.name) as advance:
                for group in (chunks[i : i + 8] for i in range(0, len(chunks), 8)):
                    encoded = tok.encode_batch(group) if hasattr(tok, "encode_batch") else map(tok.encode, group)
                    for piece, ids in zip(group, encoded):
                        f.write(np.asarray(ids, dtype=dtype).tobytes())
                        n += len(ids)
                        advance(len(piece))
            if n == 0:
                raise RuntimeDataError(f"the text encodes to no tokens with tokenizer {tok.name!r}",
                                       fix="check the text and the tokenizer")
            os.replace(tmp, binary)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        meta = {"format": CACHE_FORMAT, "n_tokens": n, "dtype": dtype.name, "vocab_size": tok.vocab_size,
                "tokenizer": tok.fingerprint(), "tokenizer_name": tok.name, "data": data,
                "n_chars": len(text)}
        fd, tmp = tempfile.mkstemp(prefix=sidecar.name + ".", suffix=".tmp", dir=self.dir)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)
        os.replace(tmp, sidecar)
        return meta


# A chunk boundary goes between a non-space character and the whitespace that ends its line: the
# whole whitespace run then lies in the next chunk and no byte-level (GPT-2 regex) pre-token spans
# the cut, so chunked ids equal whole-text ids. Other tokenizers are probed at the first cut.
_SAFE_CUT = re.compile(r"(?<=\S)(?=[ \t\r]*\n)")
CHUNK_CHARS = 1 << 20


def _chunks(text: str, tok: Tokenizer) -> list[str]:
    cuts, start = [0], 0
    while start + CHUNK_CHARS < len(text):
        m = _SAFE_CUT.search(text, start + CHUNK_CHARS)
        if m is None:
            break
        cuts.append(start := m.start())
    cuts.append(len(text))
    if len(cuts) > 2:  # a tokenizer that marks the start of each call (a prefix space) is not additive
        a, b = text[max(0, cuts[1] - 2000) : cuts[1]], text[cuts[1] : cuts[1] + 2000]
        if tok.encode(a) + tok.encode(b) != tok.encode(a + b):
            return [text]
    return [text[i:j] for i, j in zip(cuts, cuts[1:])]


@contextlib.contextmanager
def _progress(show: bool, total: int, name: str):
    if not show:
        yield lambda k: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("encoding with {task.fields[tok]}"), BarColumn(), TimeRemainingColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("encode", total=total, tok=name)
        yield lambda k: bar.advance(task, k)


# ---------------------------------------------------------------- splits and batches


def split(tokens: np.ndarray, val_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Train and validation views: the last ``val_fraction`` of the tokens is validation."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_train = int(len(tokens) * (1.0 - val_fraction))
    if val_fraction > 0 and n_train == len(tokens):
        raise RuntimeDataError(f"{len(tokens)} tokens are too few for a validation split of {val_fraction}",
                               fix="use more text or val_fraction=0")
    return tokens[:n_train], tokens[n_train:]


class RandomWindows:
    """Random (x, y) windows of shape (B, T) from one split, reproducible across resume.

    Each batch draws B start positions uniformly from [0, n - T) with its own seeded
    ``torch.Generator`` (nanoGPT's ``get_batch``); ``y`` is ``x`` shifted by one token.
    Give each data-parallel rank its own seed.
    """

    def __init__(self, tokens: np.ndarray, *, batch_size: int, seq_len: int, seed: int,
                 device: str | torch.device = "cpu") -> None:
        if len(tokens) < seq_len + 1:
            raise RuntimeDataError(f"the split has {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}",
                                   fix="use more text, a smaller seq_len, or a smaller val_fraction")
        self.tokens, self.batch_size, self.seq_len, self.seed = tokens, batch_size, seq_len, seed
        self.device = torch.device(device)
        self.generator = torch.Generator().manual_seed(seed)
        self.step = 0

    def __iter__(self) -> RandomWindows:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        T = self.seq_len
        ix = torch.randint(len(self.tokens) - T, (self.batch_size,), generator=self.generator).tolist()
        rows = np.stack([np.asarray(self.tokens[i : i + T + 1], dtype=np.int64) for i in ix])  # (B, T+1)
        x, y = torch.from_numpy(rows[:, :-1].copy()), torch.from_numpy(rows[:, 1:].copy())  # (B, T) each
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
            y = y.pin_memory().to(self.device, non_blocking=True)
        self.step += 1
        return x, y

    def state_dict(self) -> dict:
        """Plain values only: the generator state as a list of byte values, and the counter."""
        return {"seed": self.seed, "step": self.step, "generator": self.generator.get_state().tolist(),
                "batch_size": self.batch_size, "seq_len": self.seq_len, "n_tokens": len(self.tokens)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("order", "random") != "random":
            raise RuntimeDataError(f"the checkpoint read its data in {state['order']} order; this run draws random "
                                   "windows", fix=f"resume with train.data_order: {state['order']}")
        mine = (self.batch_size, self.seq_len, len(self.tokens))
        saved = (state["batch_size"], state["seq_len"], state["n_tokens"])
        if saved != mine:
            raise RuntimeDataError(
                f"the batch state was saved for batch_size, seq_len, n_tokens = {saved}, this run has {mine}",
                fix="resume with the same data, tokenizer, batch_size and seq_len",
            )
        self.generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))
        self.seed, self.step = state["seed"], state["step"]


class SequentialWindows:
    """(x, y) batches read in order, as the speedrun program's loader reads its shards.

    Each micro-batch over all ``world`` ranks takes the next ``world * B * T`` tokens; rank ``r``
    reads its own ``B * T + 1`` of them from offset ``r * B * T`` (so the ranks' slices touch and
    no token is read twice), row b of ``x`` is tokens ``[b T, (b + 1) T)`` of that slice and ``y``
    is ``x`` shifted by one. ``spans`` are the token files of the split (``shard_spans``): a read
    never crosses from one file into the next: when the file cannot hold it (the program's test,
    ``pos + world B T + 1 >= len(file)``) the read moves to the start of the next file, and the
    file's tail is skipped, as the program does. After the last file reading starts again at the
    first one (``epoch`` counts the passes), where the program would run out of data.

    The state is the position in the data (file, offset, pass), the same on every rank; batch
    size, window and rank count may change on resume: reading goes on at the next unread token.
    """

    def __init__(self, tokens: np.ndarray | ShardTokens, *, batch_size: int, seq_len: int, rank: int = 0,
                 world: int = 1, spans: list[tuple[int, int]] | None = None,
                 device: str | torch.device = "cpu") -> None:
        self.tokens, self.batch_size, self.seq_len, self.rank, self.world = tokens, batch_size, seq_len, rank, world
        self.spans = spans if spans is not None else [(0, len(tokens))]
        self.device = torch.device(device)
        stride = world * batch_size * seq_len
        if not any(b - a > stride + 1 for a, b in self.spans):
            longest = max(b - a for a, b in self.spans)
            what = "the longest file of the split" if len(self.spans) > 1 else "the split"
            raise RuntimeDataError(
                f"reading in order, a micro-batch over {world} rank(s) takes {stride + 1} tokens "
                f"({world} x {batch_size} x {seq_len} + 1), but {what} has {longest}",
                fix="use more data, a smaller batch_size or seq_len, or train.data_order: random")
        self.span, self.pos, self.epoch, self.step = 0, 0, 0, 0

    @property
    def stride(self) -> int:
        """Tokens one micro-batch takes over all ranks."""
        return self.world * self.batch_size * self.seq_len

    def reads_per_pass(self) -> int:
        """Micro-batches in one pass over the data (files too short for one read give none)."""
        S = self.stride
        return sum(max(0, -(-(b - a - S - 1) // S)) for a, b in self.spans)

    def __iter__(self) -> SequentialWindows:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        B, T = self.batch_size, self.seq_len
        while self.pos + self.stride + 1 >= self.spans[self.span][1] - self.spans[self.span][0]:
            self.span, self.pos = self.span + 1, 0  # the next file, from its first token
            if self.span == len(self.spans):
                self.span, self.epoch = 0, self.epoch + 1
        start = self.spans[self.span][0] + self.pos + self.rank * B * T
        buf = np.asarray(self.tokens[start : start + B * T + 1], dtype=np.int64)  # (B T + 1,)
        x = torch.from_numpy(buf[:-1].reshape(B, T).copy())  # (B, T)
        y = torch.from_numpy(buf[1:].reshape(B, T).copy())  # (B, T): x shifted by one
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
            y = y.pin_memory().to(self.device, non_blocking=True)
        self.pos += self.stride
        self.step += 1
        return x, y

    def state_dict(self) -> dict:
        return {"order": "sequential", "span": self.span, "pos": self.pos, "epoch": self.epoch, "step": self.step,
                "batch_size": self.batch_size, "seq_len": self.seq_len, "world": self.world,
                "n_tokens": len(self.tokens), "spans": len(self.spans)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("order") != "sequential":
            raise RuntimeDataError("the checkpoint drew random windows; this run reads its data in order",
                                   fix="resume with train.data_order: random (the default)")
        mine, saved = (len(self.tokens), len(self.spans)), (state["n_tokens"], state["spans"])
        if saved != mine:
            raise RuntimeDataError(
                f"the read position was saved for n_tokens, files = {saved}, this run has {mine}",
                fix="resume with the same data and tokenizer")
        if not 0 <= state["span"] < len(self.spans):
            raise RuntimeDataError(f"the saved file index {state['span']} is outside 0..{len(self.spans) - 1}",
                                   fix="the checkpoint is damaged: use another one")
        self.span, self.pos, self.epoch, self.step = state["span"], state["pos"], state["epoch"], state["step"]


def passes_note(batches: SequentialWindows, reads: int) -> list[str]:
    """What a run of ``reads`` micro-batches in order says before step 0 when it passes over the
    data more than once; nothing otherwise."""
    per_pass = batches.reads_per_pass()
    if reads <= per_pass:
        return []
    return [f"train.data_order sequential: {reads:,} micro-batches of {batches.stride:,} tokens over all ranks, "
            f"{per_pass:,} in one pass over the training split: the run reads it {reads / per_pass:.2f} times, "
            "from the first file again after the last"]


def shard_spans(tokens: np.ndarray | ShardTokens) -> list[tuple[int, int]]:
    """The (start, stop) of each token file within ``tokens`` (a split of shards), in order; one
    span for tokens of one file or of encoded text."""
    return tokens.spans() if isinstance(tokens, ShardTokens) else [(0, len(tokens))]


def train_batches(tokens: np.ndarray | ShardTokens, *, order: str, batch_size: int, seq_len: int, seed: int,
                  rank: int = 0, world: int = 1,
                  device: str | torch.device = "cpu") -> RandomWindows | SequentialWindows:
    """The training batches of rank ``rank`` of ``world`` as ``train.data_order`` says: random
    windows (each rank its own seed, ``seed + rank``) or the data in order (each rank its slice)."""
    if order == "sequential":
        return SequentialWindows(tokens, batch_size=batch_size, seq_len=seq_len, rank=rank, world=world,
                                 spans=shard_spans(tokens), device=device)
    if order != "random":
        raise ValueError(f"unknown data order {order!r}")
    return RandomWindows(tokens, batch_size=batch_size, seq_len=seq_len, seed=seed + rank, device=device)


Batcher = RandomWindows


@dataclass(frozen=True)
class Window:
    """``x = tokens[start : start + length]``; only the last ``n_score`` targets are new."""

    start: int
    length: int
    n_score: int


def strided_windows(tokens: np.ndarray, seq_len: int, stride: int) -> list[Window]:
    """Windows over a whole split that score each target token exactly once.

    Windows start every ``stride`` tokens, so each target after the first window is
    predicted with at least ``seq_len - stride`` tokens of context; the last window is
    moved back to end at the last token, so all windows have one length and batch together.
    Targets are tokens 1..n-1; the ``n_score`` of all windows sum to n - 1.
    """
    if not 1 <= stride <= seq_len:
        raise ValueError(f"stride must be in [1, seq_len={seq_len}], got {stride}")
    n = len(tokens)
    if n < 2:
        raise RuntimeDataError(f"the split has {n} tokens; evaluation needs at least 2", fix="use more text")
    T = min(seq_len, n - 1)
    starts = list(range(0, n - 1 - T + 1, stride))
    if starts[-1] != n - 1 - T:
        starts.append(n - 1 - T)
    windows, scored_until = [], 0  # targets 1..scored_until are already scored
    for s in starts:
        windows.append(Window(start=s, length=T, n_score=s + T - scored_until))
        scored_until = s + T
    return windows


def window_batch(tokens: np.ndarray, windows: list[Window], *, ignore_index: int = -100,
                 device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Stack windows into (x, y) of shape (N, T); targets not to be scored are ``ignore_index``."""
    T = windows[0].length
    rows = np.stack([np.asarray(tokens[w.start : w.start + T + 1], dtype=np.int64) for w in windows])
    x, y = torch.from_numpy(rows[:, :-1]), torch.from_numpy(rows[:, 1:].copy())  # (N, T) each
    for i, w in enumerate(windows):
        y[i, : T - w.n_score] = ignore_index
    return x.to(device), y.to(device)
