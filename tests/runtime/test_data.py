"""Data: reading text (and its errors), the token cache, splits, random and strided windows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from physlm_graph import RuntimeDataError
from physlm_graph.runtime import data as D
from physlm_graph.runtime.data import (
    Batcher,
    RandomWindows,
    TokenCache,
    load_text,
    split,
    strided_windows,
    window_batch,
)
from physlm_graph.runtime.tokenizers import ByteTokenizer, CharTokenizer, make_tokenizer

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="needs the shared test corpora")


def data_error(fn, *args) -> str:
    with pytest.raises(RuntimeDataError) as err:
        fn(*args)
    return str(err.value)


class Counting:
    """A tokenizer wrapper that counts encode calls."""

    def __init__(self, inner, vocab_size=None):
        self.inner, self.calls, self.name = inner, 0, inner.name
        self.vocab_size = vocab_size or inner.vocab_size
        self.eos_id = inner.eos_id

    def encode(self, text):
        self.calls += 1
        return self.inner.encode(text)

    def decode(self, ids):
        return self.inner.decode(ids)

    def fingerprint(self):
        return self.inner.fingerprint() + f"/{self.vocab_size}"


# ---------------------------------------------------------------- load_text


def test_a_text_file_reads_as_is(tmp_path):
    (tmp_path / "a.txt").write_bytes("\ufeffhello\r\n한국어\n".encode())
    assert load_text(tmp_path / "a.txt") == "hello\r\n한국어\n"  # BOM dropped, nothing else changed


def test_a_folder_concatenates_text_files_in_order(tmp_path):
    (tmp_path / "b.txt").write_text("two")
    (tmp_path / "a.md").write_text("one\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.raw").write_text("three")
    (tmp_path / "skip.bin").write_bytes(b"\x00\x01")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "x.txt").write_text("no")
    assert load_text(tmp_path) == "one\ntwo\nthree\n"


def test_missing_file():
    assert data_error(load_text, "/no/such/file.txt") == (
        "data error: /no/such/file.txt: no such file or folder\n"
        "  fix: check the path; a Hugging Face dataset is written hf:NAME[:CONFIG]"
    )


def test_empty_file(tmp_path):
    (tmp_path / "e.txt").write_bytes(b"")
    (tmp_path / "w.txt").write_bytes(b" \n\n")
    assert data_error(load_text, tmp_path / "e.txt") == (
        f"data error: {tmp_path}/e.txt: the file is empty (0 bytes)\n  fix: point at a file with training text"
    )
    assert "w.txt: the file holds only whitespace" in data_error(load_text, tmp_path / "w.txt")


def test_empty_folder(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"1")
    assert data_error(load_text, tmp_path) == (
        f"data error: {tmp_path}: the folder holds no *.txt/*.md/*.raw files\n"
        "  fix: put the training text in .txt files, or pass one file"
    )


def test_a_folder_names_what_it_skips_that_is_no_regular_file(tmp_path, capsys):
    import os
    import socket

    (tmp_path / "a.txt").write_text("one")
    os.mkfifo(tmp_path / "pipe.txt")  # reading it would block
    (tmp_path / "null.txt").symlink_to("/dev/null")  # a character device
    (tmp_path / "gone.txt").symlink_to(tmp_path / "missing.txt")
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(tmp_path / "s"))
        assert load_text(tmp_path) == "one\n"
    finally:
        sock.close()
    assert capsys.readouterr().err == (
        f"warning: {tmp_path}: skipped 4 entries that are not a regular file: gone.txt (a broken link), null.txt "
        "(a character device), pipe.txt (a FIFO (named pipe)), s (a socket)\n")


def test_a_folder_of_only_unusable_entries_is_an_error_naming_them(tmp_path):
    import os

    os.mkfifo(tmp_path / "pipe.txt")
    (tmp_path / "gone.md").symlink_to("nowhere.md")
    assert data_error(load_text, tmp_path) == (
        f"data error: {tmp_path}: the folder holds no *.txt/*.md/*.raw files that are regular files; skipped: "
        "gone.md (a broken link), pipe.txt (a FIFO (named pipe))\n"
        "  fix: put the training text in .txt files, or pass one file"
    )


def test_binary_file(tmp_path):
    (tmp_path / "model.txt").write_bytes(b"PK\x03\x04" + bytes(range(256)))
    assert data_error(load_text, tmp_path / "model.txt") == (
        f"data error: {tmp_path}/model.txt: the file looks binary (a NUL byte at offset 4); expected UTF-8 text\n"
        "  fix: pass a text file (for a dataset file use .json, .jsonl or .parquet)"
    )
    (tmp_path / "noise.txt").write_bytes(bytes(range(128, 256)) * 10)
    assert "noise.txt: the file looks binary (most of it is not UTF-8)" in data_error(load_text, tmp_path / "noise.txt")


def test_utf16_file(tmp_path):
    (tmp_path / "u.txt").write_text("hello", encoding="utf-16")
    assert "u.txt: the file is UTF-16 (it starts with a UTF-16 byte-order mark); expected UTF-8\n" \
        "  fix: convert it: iconv -f UTF-16 -t UTF-8" in data_error(load_text, tmp_path / "u.txt")


def test_invalid_utf8_names_offset_and_line(tmp_path):
    (tmp_path / "latin.txt").write_bytes("line one\ncaf\xe9 au lait\n".encode("latin-1"))
    path = tmp_path / "latin.txt"
    assert data_error(load_text, path) == (
        f"data error: {path}:2:4: invalid UTF-8: byte 0xe9 at offset 12 (line 2, byte 4 of the line) "
        "cannot start or continue a character; it may be CP1252\n"
        f"  fix: re-save the file as UTF-8, e.g. iconv -f CP1252 -t UTF-8 {path} > latin.utf8.txt"
    )


def test_invalid_utf8_guesses_korean(tmp_path):
    (tmp_path / "ko.txt").write_bytes("안녕하세요 여러분\n".encode("cp949"))
    assert "; it may be CP949" in data_error(load_text, tmp_path / "ko.txt")


def test_hf_local_text_file_equals_plain_read(tmp_path):
    (tmp_path / "a.txt").write_text("one\n\ntwo\nthree")
    assert load_text(f"hf:{tmp_path / 'a.txt'}") == "one\n\ntwo\nthree"


def test_hf_local_file_still_gets_clear_errors(tmp_path):
    (tmp_path / "e.txt").write_bytes(b"")
    assert "e.txt: the file is empty (0 bytes)" in data_error(load_text, f"hf:{tmp_path / 'e.txt'}")


def test_jsonl_goes_through_datasets(tmp_path):
    rows = [{"text": "first doc", "id": 1}, {"text": "second doc", "id": 2}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert load_text(tmp_path / "d.jsonl") == "first doc\nsecond doc"


def test_offline_hub_name(monkeypatch):
    monkeypatch.setattr(D, "_hub_reachable", lambda timeout=3.0: False)
    assert data_error(load_text, "hf:someone/no-such-corpus-xyz:cfg") == (
        "data error: hf:someone/no-such-corpus-xyz:cfg: 'someone/no-such-corpus-xyz' is a Hugging Face hub "
        "dataset and this machine is offline (and it is not in the local Hugging Face cache)\n"
        "  fix: download it on a machine with network access, or pass a local file"
    )


# ---------------------------------------------------------------- token cache


def test_cache_encodes_once_and_reuses(tmp_path):
    tok = Counting(ByteTokenizer())
    text = "hello 안녕\n" * 100
    a = TokenCache(tmp_path).tokens(text, tok)
    calls, (binary, sidecar) = tok.calls, TokenCache(tmp_path).paths(text, tok)
    mtime = binary.stat().st_mtime_ns
    b = TokenCache(tmp_path).tokens(text, tok)
    assert tok.calls == calls and binary.stat().st_mtime_ns == mtime
    assert isinstance(b, np.memmap) and b.dtype == np.uint16 and not b.flags.writeable
    assert b.tolist() == list(text.encode()) == a.tolist()
    meta = json.loads(sidecar.read_text())
    assert (meta["n_tokens"], meta["dtype"], meta["vocab_size"]) == (len(text.encode()), "uint16", 256)
    assert meta["tokenizer"] == tok.fingerprint()
    assert [p.name for p in binary.parent.iterdir() if p.suffix == ".tmp"] == []


def test_cache_key_follows_data_and_tokenizer(tmp_path):
    text = "abcabc\n"
    keys = {
        TokenCache.key(text, ByteTokenizer()),
        TokenCache.key(text + "d", ByteTokenizer()),
        TokenCache.key(text, CharTokenizer.from_text(text)),
        TokenCache.key(text, CharTokenizer.from_text(text + "z")),
    }
    assert len(keys) == 4
    assert TokenCache.key(text, ByteTokenizer()) == TokenCache.key(str(text), ByteTokenizer())


def test_large_vocab_uses_uint32(tmp_path):
    tok = Counting(ByteTokenizer(), vocab_size=70_000)
    assert TokenCache(tmp_path).tokens("abc", tok).dtype == np.uint32


def test_damaged_cache_is_rebuilt(tmp_path):
    tok = Counting(ByteTokenizer())
    TokenCache(tmp_path).tokens("hello", tok)
    binary, _ = TokenCache(tmp_path).paths("hello", tok)
    binary.write_bytes(b"\x00")  # truncated
    assert TokenCache(tmp_path).tokens("hello", tok).tolist() == list(b"hello")
    assert tok.calls == 2


@needs_data
def test_chunked_encoding_equals_whole_text(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "CHUNK_CHARS", 5_000)
    tok = make_tokenizer(str(DATA / "tokenizers" / "gpt2"), cache_dir=tmp_path)
    text = (DATA / "wikitext-2" / "wikitext-2-raw" / "wiki.valid.raw").read_text()[:100_000]
    assert len(D._chunks(text, tok)) > 10
    assert TokenCache(tmp_path).tokens(text, tok).tolist() == tok.encode(text)


def test_a_tokenizer_that_is_not_additive_is_encoded_whole(monkeypatch):
    monkeypatch.setattr(D, "CHUNK_CHARS", 10)

    class Prefix(Counting):
        def encode(self, text):  # marks the start of every call, as a prefix-space tokenizer does
            return [0] + self.inner.encode(text)

    assert D._chunks("line one\nline two\nline three\n" * 5, Prefix(ByteTokenizer())) == [
        "line one\nline two\nline three\n" * 5]
    assert len(D._chunks("line one\nline two\nline three\n" * 5, ByteTokenizer())) > 1


# ---------------------------------------------------------------- split and batches


def test_split_takes_the_last_fraction_as_validation():
    tokens = np.arange(1000, dtype=np.uint16)
    train, val = split(tokens, 0.1)
    assert (len(train), len(val)) == (900, 100) and val[0] == 900
    assert np.shares_memory(train, tokens) and np.shares_memory(val, tokens)
    assert len(split(tokens, 0.0)[1]) == 0
    assert "too few for a validation split" in data_error(split, np.arange(5), 1e-17)


def test_windows_are_shifted_pairs():
    tokens = np.arange(500, dtype=np.uint16)
    x, y = next(RandomWindows(tokens, batch_size=4, seq_len=16, seed=0))
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(y, x + 1)
    assert Batcher is RandomWindows


def test_batcher_state_round_trip_gives_the_same_batches():
    tokens = np.random.default_rng(0).integers(0, 256, 10_000).astype(np.uint16)
    a = RandomWindows(tokens, batch_size=3, seq_len=32, seed=1337)
    for _ in range(5):
        next(a)
    state = json.loads(json.dumps(a.state_dict()))  # plain values only
    expected = [next(a) for _ in range(3)]
    b = RandomWindows(tokens, batch_size=3, seq_len=32, seed=999)
    b.load_state_dict(state)
    assert b.step == 5
    for (xa, ya), (xb, yb) in zip(expected, (next(b) for _ in range(3))):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_batcher_state_from_other_data_is_refused():
    a = RandomWindows(np.arange(100), batch_size=2, seq_len=8, seed=0)
    b = RandomWindows(np.arange(200), batch_size=2, seq_len=8, seed=0)
    assert data_error(b.load_state_dict, a.state_dict()) == (
        "data error: the batch state was saved for batch_size, seq_len, n_tokens = (2, 8, 100), "
        "this run has (2, 8, 200)\n  fix: resume with the same data, tokenizer, batch_size and seq_len"
    )


def test_too_short_split():
    assert "the split has 8 tokens, fewer than seq_len + 1 = 9" in data_error(
        lambda: RandomWindows(np.arange(8), batch_size=1, seq_len=8, seed=0))


@pytest.mark.parametrize("n, seq_len, stride", [(1000, 64, 64), (1000, 64, 16), (1001, 64, 48), (50, 64, 32),
                                                (65, 64, 1), (2, 8, 8), (130, 64, 63)])
def test_strided_windows_score_every_target_once(n, seq_len, stride):
    tokens = np.arange(n, dtype=np.int64)
    windows = strided_windows(tokens, seq_len, stride)
    assert sum(w.n_score for w in windows) == n - 1
    x, y = window_batch(tokens, windows)
    assert x.shape == (len(windows), min(seq_len, n - 1))
    scored = y[y != -100].tolist()
    assert sorted(scored) == list(range(1, n))  # each target position exactly once
    assert torch.equal(x[y != -100] + 1, y[y != -100])
    for w in windows[1:]:  # later windows keep at least seq_len - stride tokens of context
        assert w.length - w.n_score >= min(seq_len, n - 1) - stride


def test_strided_windows_check_their_arguments():
    with pytest.raises(ValueError, match="stride must be in"):
        strided_windows(np.arange(10), 4, 5)
    assert "evaluation needs at least 2" in data_error(strided_windows, np.arange(1), 4, 4)
