"""Tokenizers for the runtime: bytes, chars, a trained byte-level BPE, or a tokenizer folder.

    tok = make_tokenizer("bytes", cache_dir=cache)                     # UTF-8 bytes, vocab 256
    tok = make_tokenizer("chars", train_text=text, cache_dir=cache)    # nanoGPT shakespeare_char
    tok = make_tokenizer("bpe:8192", train_text=text, cache_dir=cache) # trained once, then cached
    tok = make_tokenizer("path/to/gpt2", cache_dir=cache)              # vocab.json + merges.txt
                                                                       # or tokenizer.json

Every tokenizer can ``save(folder)`` itself, and ``load_tokenizer(folder)`` gives it back
without the training text: a checkpoint stores its tokenizer that way. A saved folder holds

- ``physlm_tokenizer.json``: our description (kind, name, fingerprint; the characters for
  ``chars``), read first by ``load_tokenizer``;
- ``tokenizer.json`` + ``tokenizer_config.json``: the same tokenizer as a Hugging Face
  ``tokenizers`` file, which ``transformers.PreTrainedTokenizerFast`` (and ``AutoTokenizer``)
  load. ``bytes`` becomes a byte-level BPE with the 256 GPT-2 byte symbols as vocabulary,
  id = byte value, and no merges; ``chars`` becomes a WordLevel model over single characters
  (each character split off by a regex) with a ``Fuse`` decoder. Both encode exactly as ours;
  the WordLevel model refuses unknown characters just as ``chars`` does.

``fingerprint()`` is ``kind:sha256-prefix`` of the vocabulary (and merges) only, so it does
not change with the library version that wrote a file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Protocol, runtime_checkable

from physlm_graph._errors import Loc, RuntimeDataError

__all__ = [
    "Tokenizer",
    "ByteTokenizer",
    "CharTokenizer",
    "HFTokenizer",
    "make_tokenizer",
    "load_tokenizer",
    "text_fingerprint",
    "add_boundary_token",
]

DESCRIPTION = "physlm_tokenizer.json"
EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|eos|>")
KINDS = "bytes, chars, bpe:N (e.g. bpe:8192), or a folder with tokenizer.json or vocab.json + merges.txt"


@runtime_checkable
class Tokenizer(Protocol):
    """What the runtime needs from a tokenizer."""

    name: str

    @property
    def vocab_size(self) -> int: ...

    @property
    def eos_id(self) -> int | None: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def fingerprint(self) -> str: ...

    def save(self, folder: str | Path) -> Path: ...

    def to_hf(self, folder: str | Path) -> Path: ...


def _sha(data: str | bytes) -> str:
    return hashlib.sha256(data.encode("utf-8") if isinstance(data, str) else data).hexdigest()


def text_fingerprint(text: str) -> str:
    """A stable hash of a training text (sha256 of its UTF-8 bytes)."""
    return _sha(text)


def _byte_symbols() -> list[str]:
    """GPT-2's printable stand-in for each byte value 0..255 (the ByteLevel alphabet)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols, extra = {}, 0
    for b in range(256):
        if b in keep:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def _write_description(folder: Path, desc: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / DESCRIPTION).write_text(json.dumps(desc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_hf(folder: Path, hf, eos: str | None) -> Path:  # hf: tokenizers.Tokenizer
    folder.mkdir(parents=True, exist_ok=True)
    hf.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    if eos is not None:
        config["eos_token"] = eos
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return folder / "tokenizer.json"


BOUNDARY = "<|endoftext|>"


def add_boundary_token(folder: str | Path, token_id: int) -> int:
    """Give the Hugging Face tokenizer in ``folder`` (written by ``to_hf``) a special token
    ``<|endoftext|>`` at id ``token_id``, the next free id, and make it the BOS, EOS and PAD token.

    ``bytes`` and ``chars`` have no such token: every id is a byte or a character. Tools built on
    transformers need one (lm-evaluation-harness prefixes a document with BOS, stops generating at
    EOS and pads batches with PAD), so a Hugging Face export adds it past the vocabulary, and the
    exported model gives that id a row whose logit is -inf (``head.lm``'s ``logit_limit``): it can be
    read, never produced. The literal text ``<|endoftext|>`` then encodes as that one id, as in GPT-2.
    Returns the id."""
    from tokenizers import AddedToken

    folder = Path(folder)
    hf = _read_hf_json(folder / "tokenizer.json")
    have = hf.token_to_id(BOUNDARY)
    if have is None:
        size = hf.get_vocab_size(with_added_tokens=True)
        if size != token_id:
            raise RuntimeDataError(f"the boundary token would get id {size}, not the {token_id} the model reserved",
                                   loc=Loc(file=str(folder / "tokenizer.json")),
                                   fix="export from the checkpoint's own tokenizer folder")
        hf.add_special_tokens([AddedToken(BOUNDARY, special=True, normalized=False)])
        hf.save(str(folder / "tokenizer.json"))
        desc_path = folder / DESCRIPTION
        if desc_path.is_file():  # a trained or imported tokenizer's fingerprint covers its added tokens
            desc = json.loads(desc_path.read_text(encoding="utf-8"))
            if desc.get("kind") not in ("bytes", "chars"):
                desc["fingerprint"] = HFTokenizer(hf, name=desc.get("name", ""), kind=desc["kind"]).fingerprint()
                _write_description(folder, desc)
    elif have != token_id:
        raise RuntimeDataError(f"{BOUNDARY} already has id {have}, not {token_id}", loc=Loc(file=str(folder)))
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {"tokenizer_class": "PreTrainedTokenizerFast"}
    config.update(bos_token=BOUNDARY, eos_token=BOUNDARY, pad_token=BOUNDARY)
    path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return token_id


class ByteTokenizer:
    """UTF-8 bytes: id = byte value, vocabulary 256, no end-of-text token. Any text encodes."""

    name = "bytes"
    vocab_size = 256
    eos_id = None

    def encode(self, text: str) -> list[int]:
        try:
            return list(text.encode("utf-8"))
        except UnicodeEncodeError as err:  # a lone surrogate: bytes that were not UTF-8 (e.g. in argv)
            raise RuntimeDataError(f"the text holds {text[err.start]!r} at position {err.start}, which is not a "
                                   "Unicode character (the input was not UTF-8)",
                                   fix="pass UTF-8 text") from None

    def decode(self, ids: list[int]) -> str:
        # A sampled model can emit a cut multi-byte sequence; show it as U+FFFD, never raise.
        return bytes(ids).decode("utf-8", errors="replace")

    def fingerprint(self) -> str:
        return "bytes:utf8-256"

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        _write_description(folder, {"format": 1, "kind": "bytes", "name": self.name, "fingerprint": self.fingerprint()})
        self.to_hf(folder)
        return folder

    def to_hf(self, folder: str | Path) -> Path:
        from tokenizers import Tokenizer as HF, decoders, models, pre_tokenizers

        vocab = {sym: b for b, sym in enumerate(_byte_symbols())}
        hf = HF(models.BPE(vocab=vocab, merges=[]))
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        hf.decoder = decoders.ByteLevel()
        return _write_hf(Path(folder), hf, eos=None)


class CharTokenizer:
    """One id per character of the training text, in sorted order (nanoGPT's shakespeare_char)."""

    def __init__(self, chars: list[str]) -> None:
        self.chars = list(chars)
        self.name = "chars"
        self.eos_id = None
        self._stoi = {c: i for i, c in enumerate(self.chars)}
        assert len(self._stoi) == len(self.chars), "characters must be distinct"

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        stoi = self._stoi
        try:
            return [stoi[c] for c in text]
        except KeyError:
            bad = next(c for c in text if c not in stoi)
            pos = text.index(bad)
            raise RuntimeDataError(
                f"character {bad!r} (U+{ord(bad):04X}) at position {pos} is not in the 'chars' "
                f"vocabulary of {len(self.chars)} characters",
                fix="encode text that uses the training text's characters, or use the 'bytes' "
                "tokenizer, which encodes any text",
            ) from None

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def fingerprint(self) -> str:
        return "chars:" + _sha("\n".join(f"{ord(c):x}" for c in self.chars))[:16]

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        desc = {"format": 1, "kind": "chars", "name": self.name, "fingerprint": self.fingerprint(), "chars": self.chars}
        _write_description(folder, desc)
        self.to_hf(folder)
        return folder

    def to_hf(self, folder: str | Path) -> Path:
        from tokenizers import Regex, Tokenizer as HF, decoders, models, pre_tokenizers

        hf = HF(models.WordLevel(dict(self._stoi), unk_token=None))
        hf.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one piece per char
        hf.decoder = decoders.Fuse()
        return _write_hf(Path(folder), hf, eos=None)


class HFTokenizer:
    """A Hugging Face ``tokenizers.Tokenizer``: a trained ``bpe:N`` or a tokenizer folder."""

    def __init__(self, hf, *, name: str, kind: str) -> None:  # hf: tokenizers.Tokenizer
        self.hf = hf
        self.name = name
        self.kind = kind
        self.eos_id = next((i for i in map(hf.token_to_id, EOS_NAMES) if i is not None), None)
        self._fingerprint: str | None = None  # hashing a 50k vocabulary takes ~0.3 s: once

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = self._hash_model()
        return self._fingerprint

    def _hash_model(self) -> str:
        model = json.loads(self.hf.to_str())["model"]
        merges = model.get("merges") or []
        # tokenizers < 0.20 wrote merges as "a b" strings, later as ["a", "b"]: hash one form.
        merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
        vocab = sorted(self.hf.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
        content = json.dumps({"type": model.get("type"), "vocab": vocab, "merges": merges}, ensure_ascii=False)
        return f"{self.kind}:{_sha(content)[:16]}"

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        desc = {"format": 1, "kind": self.kind, "name": self.name, "fingerprint": self.fingerprint()}
        _write_description(folder, desc)
        self.to_hf(folder)
        return folder

    def to_hf(self, folder: str | Path) -> Path:
        eos = self.hf.id_to_token(self.eos_id) if self.eos_id is not None else None
        return _write_hf(Path(folder), self.hf, eos=eos)


def _train_bpe(text: str, vocab_size: int):  # -> tokenizers.Tokenizer
    from tokenizers import Tokenizer as HF, decoders, models, pre_tokenizers, trainers

    hf = HF(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte, so any text encodes
        show_progress=False,
    )
    lines = text.splitlines(keepends=True)
    chunks = ("".join(lines[i : i + 1000]) for i in range(0, len(lines), 1000))
    hf.train_from_iterator(chunks, trainer=trainer, length=len(lines) // 1000 + 1)
    return hf


def _bpe(spec: str, train_text: str | None, cache_dir: Path) -> HFTokenizer:
    try:
        vocab_size = int(spec.split(":", 1)[1])
    except ValueError:
        vocab_size = -1
    if vocab_size < 257:
        raise RuntimeDataError(
            f"tokenizer {spec!r}: expected bpe:N with N >= 257 (256 bytes + <|endoftext|>)",
            fix="use e.g. bpe:8192",
        )
    if train_text is None:
        raise RuntimeDataError(f"tokenizer {spec!r} is trained on the training text, and none was given",
                               fix="pass train_text=, or load a saved tokenizer folder")
    folder = Path(cache_dir) / "tokenizers" / f"bpe{vocab_size}-{text_fingerprint(train_text)[:16]}"
    if not (folder / DESCRIPTION).is_file():
        hf = HFTokenizer(_train_bpe(train_text, vocab_size), name=spec, kind="bpe")
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
        hf.save(tmp)
        try:
            os.replace(tmp, folder)  # atomic; another process may have won the race
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return load_tokenizer(folder)


def make_tokenizer(spec: str, *, train_text: str | None = None, cache_dir: str | Path) -> Tokenizer:
    """Build the tokenizer that ``spec`` names: ``bytes``, ``chars``, ``bpe:N`` or a folder path.

    ``chars`` and ``bpe:N`` learn from ``train_text``; a ``bpe:N`` is trained once per
    (text, N) and kept under ``cache_dir/tokenizers/``.
    """
    spec = str(spec).strip()
    if spec == "bytes":
        return ByteTokenizer()
    if spec == "chars":
        if train_text is None:
            raise RuntimeDataError("tokenizer 'chars' takes its vocabulary from the training text, and none was given",
                                   fix="pass train_text=, or load a saved tokenizer folder")
        return CharTokenizer.from_text(train_text)
    if spec.startswith("bpe:"):
        return _bpe(spec, train_text, Path(cache_dir))
    if Path(spec).expanduser().is_dir():
        return load_tokenizer(Path(spec).expanduser())
    if Path(spec).expanduser().is_file():
        raise RuntimeDataError(f"tokenizer {spec!r} is a file; a tokenizer is named by its folder",
                               loc=Loc(file=spec), fix=f"pass the folder {str(Path(spec).parent)!r}")
    raise RuntimeDataError(
        f"tokenizer {spec!r} is not a tokenizer kind and no such folder exists",
        fix=f"use {KINDS}; a Hugging Face hub tokenizer must first be downloaded (save_pretrained) "
        "on a machine with network access",
    )


def load_tokenizer(folder: str | Path) -> Tokenizer:
    """Load a tokenizer folder: one written by ``save``, a ``tokenizer.json``, or GPT-2 files."""
    folder = Path(folder)
    if (folder / DESCRIPTION).is_file():
        return _load_described(folder)
    if (folder / "tokenizer.json").is_file():
        return HFTokenizer(_read_hf_json(folder / "tokenizer.json"), name=folder.name, kind="hf")
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return HFTokenizer(_read_gpt2_files(folder), name=folder.name, kind="bpe")
    found = sorted(p.name for p in folder.iterdir())[:8] if folder.is_dir() else []
    what = "does not exist" if not folder.exists() else f"holds {found or 'nothing'}"
    raise RuntimeDataError(
        f"not a tokenizer folder: expected {DESCRIPTION}, tokenizer.json, or vocab.json + merges.txt; it {what}",
        loc=Loc(file=str(folder)),
        fix="point at a folder written by Tokenizer.save, a Hugging Face tokenizer folder, "
        "or GPT-2 style vocab.json + merges.txt",
    )


def _description(path: Path) -> dict:
    """The tokenizer description, its shape checked: kind, name, fingerprint and (chars) the
    distinct characters."""
    from pydantic import BaseModel, ConfigDict, ValidationError

    class Description(BaseModel):
        model_config = ConfigDict(strict=True, extra="allow")
        kind: str
        name: str | None = None
        fingerprint: str | None = None
        chars: list[str] | None = None

    def bad(why: str) -> RuntimeDataError:
        return RuntimeDataError(f"unreadable tokenizer description: {why}", loc=Loc(file=str(path)),
                                fix="save the tokenizer again, or use another checkpoint")

    try:
        if path.stat().st_size > 64 << 20:
            raise bad("larger than 64 MiB")
        desc = json.loads(path.read_text(encoding="utf-8"))
    except RecursionError:
        raise bad("JSON nested too deeply") from None
    except (ValueError, OSError) as err:
        raise bad(str(err)) from None
    if not isinstance(desc, dict):
        raise bad(f"expected a JSON object, got {type(desc).__name__}")
    try:
        Description.model_validate(desc)
    except ValidationError as err:
        e = err.errors()[0]
        raise bad(f"key `{'.'.join(map(str, e['loc']))}`: {e['msg']}") from None
    if desc["kind"] == "chars" and (desc.get("chars") is None or len(set(desc["chars"])) != len(desc["chars"])
                                    or any(len(c) != 1 for c in desc["chars"])):
        raise bad("key `chars`: expected a list of distinct single characters")
    return desc


def _load_described(folder: Path) -> Tokenizer:
    path = folder / DESCRIPTION
    desc = _description(path)
    kind = desc["kind"]
    if kind == "bytes":
        tok: Tokenizer = ByteTokenizer()
    elif kind == "chars":
        tok = CharTokenizer(desc["chars"])
    elif kind in ("bpe", "hf"):
        tok = HFTokenizer(_read_hf_json(folder / "tokenizer.json"), name=desc.get("name", folder.name), kind=kind)
    else:
        raise RuntimeDataError(f"unknown tokenizer kind {kind!r}", loc=Loc(file=str(path)),
                               fix="expected bytes, chars, bpe or hf")
    if desc.get("fingerprint") not in (None, tok.fingerprint()):
        raise RuntimeDataError(
            f"the tokenizer files do not match their description (fingerprint {tok.fingerprint()}, "
            f"expected {desc['fingerprint']})",
            loc=Loc(file=str(folder)),
            fix="the folder was edited or damaged; restore it from the checkpoint it came from",
        )
    return tok


def _read_hf_json(path: Path):  # -> tokenizers.Tokenizer
    from tokenizers import Tokenizer as HF

    try:
        return HF.from_file(str(path))
    except Exception as err:  # the Rust side raises plain Exception
        raise RuntimeDataError(f"not a readable Hugging Face tokenizer.json: {err}", loc=Loc(file=str(path)),
                               fix="write it with tokenizers' Tokenizer.save or save_pretrained") from None


def _read_gpt2_files(folder: Path):  # -> tokenizers.Tokenizer
    from tokenizers import Tokenizer as HF, decoders, models, pre_tokenizers, processors

    try:
        hf = HF(models.BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt")))
    except Exception as err:
        raise RuntimeDataError(f"vocab.json + merges.txt do not form a BPE tokenizer: {err}",
                               loc=Loc(file=str(folder)), fix="check both files are GPT-2 style") from None
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.post_processor = processors.ByteLevel(trim_offsets=False)
    specials = [t for t in EOS_NAMES if hf.token_to_id(t) is not None]
    if specials:
        hf.add_special_tokens(specials)  # so "<|endoftext|>" in text is one token, as in GPT-2
    return hf
