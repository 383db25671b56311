"""Token shards in the speedrun's format (runtime/shards.py): reading one, a glob and a folder as one
sequence, the checks (each error word for word), and the hook that makes them ``--data``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from physlm_graph import RuntimeDataError
from physlm_graph.runtime.data import RandomWindows, TokenCache, load_text, split
from physlm_graph.runtime.shards import ShardText, ShardTokens, read_shard, read_shards, shard_files, write_shard
from physlm_graph.runtime.tokenizers import ByteTokenizer


class Vocab:
    """A stand-in tokenizer: only its vocabulary size and name matter for shards."""

    def __init__(self, n: int) -> None:
        self.vocab_size, self.name = n, f"v{n}"


def ids(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 50257, n).astype(np.uint16)


def error(fn, *args) -> str:
    with pytest.raises(RuntimeDataError) as err:
        fn(*args)
    return str(err.value)


def test_one_shard_reads_back_exactly(tmp_path):
    want = ids(1000, 0)
    path = write_shard(tmp_path / "a.bin", want)
    assert path.stat().st_size == 1024 + 2 * 1000
    header = np.fromfile(path, dtype="<i4", count=256)
    assert list(header[:3]) == [20240520, 1, 1000] and not header[3:].any()
    got = read_shard(path)
    assert got.dtype == np.uint16 and np.array_equal(got, want)
    text = load_text(path)  # the hook the trainer goes through: no text, the ids
    assert isinstance(text, ShardText) and text == ""
    assert np.array_equal(TokenCache(tmp_path / "cache").tokens(text, Vocab(50304)), want)
    assert not (tmp_path / "cache").exists()  # nothing encoded, nothing cached


def test_a_glob_and_a_folder_read_as_one_sequence(tmp_path):
    parts = [ids(300, 1), ids(5, 2), ids(700, 3)]
    for i, p in enumerate(parts):
        write_shard(tmp_path / f"fineweb_train_{i:06d}.bin", p)
    whole = np.concatenate(parts)
    for spec in (str(tmp_path / "fineweb_train_*.bin"), str(tmp_path)):
        files = shard_files(spec)
        assert [f.name for f in files] == [f"fineweb_train_{i:06d}.bin" for i in range(3)]
        tokens = TokenCache(tmp_path / "c").tokens(load_text(spec), Vocab(50257))
        assert isinstance(tokens, ShardTokens) and len(tokens) == 1005
        assert np.array_equal(np.asarray(tokens), whole)
        assert tokens[302] == whole[302] and tokens[-1] == whole[-1]
        view = tokens[290:310]  # across both boundaries (300 and 305)
        assert np.array_equal(np.asarray(view, dtype=np.int64), whole[290:310].astype(np.int64))
        assert np.array_equal(view[5:].astype("int64"), whole[295:310])
        train, val = split(tokens, 0.1)
        assert len(train) == 904 and np.array_equal(np.asarray(val), whole[904:])
        x, y = next(RandomWindows(train, batch_size=8, seq_len=64, seed=0))
        ref_x, ref_y = next(RandomWindows(whole[:904], batch_size=8, seq_len=64, seed=0))
        assert (x == ref_x).all() and (y == ref_y).all()


def test_what_is_not_a_shard_source(tmp_path):
    (tmp_path / "t.txt").write_text("hello\n")
    assert shard_files(tmp_path / "t.txt") is None
    write_shard(tmp_path / "stray.bin", ids(10, 0))
    assert shard_files(tmp_path) is None  # a text folder with a stray .bin stays a text folder
    assert load_text(tmp_path) == "hello\n"
    assert shard_files("hf:wikitext") is None
    renamed = tmp_path / "shard.dat"
    renamed.write_bytes((tmp_path / "stray.bin").read_bytes())
    assert shard_files(renamed) == [renamed]  # any file that starts with the magic number


def test_shard_errors_name_the_file(tmp_path):
    good = write_shard(tmp_path / "good.bin", ids(100, 0)).read_bytes()
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"\x00" * 4 + good[4:])
    assert error(load_text, bad) == (
        f"data error: {bad}: not a token shard: its first int32 is not the shard magic number "
        "(expected 20240520, got 0)\n"
        "  fix: pass .bin shards in the speedrun's format (modded-nanogpt, llm.c), or a text file not named *.bin")
    bad.write_bytes(good[:4] + np.int32(2).tobytes() + good[8:])
    assert error(load_text, bad) == (f"data error: {bad}: unsupported shard version (expected 1, got 2)\n"
                                     "  fix: write the shard in version 1 (uint16 tokens)")
    bad.write_bytes(good[:-10])
    assert error(load_text, bad) == (
        f"data error: {bad}: truncated shard: the header promises 100 tokens (200 bytes) but 190 bytes follow "
        "the header\n  fix: write the shard again, or download it again")
    bad.write_bytes(good + b"\x01\x00")
    assert error(load_text, bad) == (
        f"data error: {bad}: token count mismatch: the header promises 100 tokens (200 bytes) but 202 bytes "
        "follow the header\n  fix: write the shard again, or download it again")
    bad.write_bytes(good[:1000])
    assert error(load_text, bad) == (
        f"data error: {bad}: truncated shard: the file has 1000 bytes, fewer than the 1024-byte header\n"
        "  fix: write the shard again, or download it again")
    bad.write_bytes(write_shard(tmp_path / "empty.bin", []).read_bytes())
    assert error(load_text, bad) == (f"data error: {bad}: the shard holds no tokens (its header's count is 0)\n"
                                     "  fix: write the shard again, or download it again")


def test_source_errors(tmp_path):
    pattern = str(tmp_path / "fineweb_train_*.bin")
    assert error(load_text, pattern) == (
        f"data error: {pattern}: the pattern matches no files\n"
        "  fix: check the folder and the pattern (e.g. data/fineweb10B/fineweb_train_*.bin)")
    write_shard(tmp_path / "fineweb_train_000001.bin", ids(10, 0))
    write_shard(tmp_path / "fineweb_val_000000.bin", ids(10, 1))
    assert error(load_text, tmp_path) == (
        f"data error: {tmp_path}: the folder holds validation shards (fineweb_val_000000.bin, 1 in all) beside "
        f"training ones\n  fix: name the training shards with a glob, e.g. {tmp_path / '*train*.bin'}")
    text = load_text(pattern)
    assert error(TokenCache(tmp_path).tokens, text, ByteTokenizer()) == (
        f"data error: {pattern}: the shards hold token ids up to {int(ids(10, 0).max())}, but tokenizer 'bytes' has "
        "256 ids\n  fix: train with the tokenizer that made the shards (the FineWeb shards are GPT-2's: "
        "--tokenizer PATH/TO/gpt2)")


GPT2 = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "tokenizers" / "gpt2"


@pytest.mark.skipif(not GPT2.is_dir(), reason="needs the shared GPT-2 tokenizer")
@pytest.mark.usefixtures("one_thread")
def test_the_trainer_trains_on_a_glob_of_shards(tmp_path):
    from physlm_graph.runtime.train import train

    for i in range(2):
        write_shard(tmp_path / f"fineweb_train_{i:06d}.bin", ids(3000, i))
    root = Path(__file__).resolve().parents[2]
    out = train(root / "blueprints" / "baby-gpt.yaml", data=str(tmp_path / "fineweb_train_*.bin"), tokenizer=str(GPT2),
                overrides={"params.layers": 1, "params.dim": 16, "params.heads": 2, "params.context": 16,
                           "train.seq_len": 16}, out_dir=tmp_path / "run", device="cpu", steps=2, batch_size=2,
                eval_every=2, eval_iters=1, warmup=0, progress=False)
    assert out["steps"] == 2 and np.isfinite(out["best_val_loss"])
    assert out["best_val_loss"] > 9.0  # about ln(50257) = 10.8 after two steps: GPT-2 ids, not bytes
