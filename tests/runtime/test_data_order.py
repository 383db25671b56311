"""``train.data_order: sequential``: the training split read in order across its token files,
as the speedrun program's loader reads its shards; each rank its slice; an exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from physlm_graph import RuntimeDataError, TrainingError
from physlm_graph.runtime.data import SequentialWindows, shard_spans, train_batches
from physlm_graph.runtime.shards import read_shards, write_shard
from physlm_graph.runtime.train import Trainer, train

ROOT = Path(__file__).resolve().parents[2]
BABY = ROOT / "blueprints" / "baby-gpt.yaml"
TINY = {"params.layers": 1, "params.dim": 32, "params.heads": 2, "params.context": 16, "train.seq_len": 16,
        "params.dropout": 0.0}
FAST = dict(batch_size=2, eval_every=50, eval_iters=1, log_every=1, warmup=2, progress=False, device="cpu")

pytestmark = pytest.mark.usefixtures("one_thread")


def program_loader(files: list[np.ndarray], *, B: int, T: int, rank: int, world: int, passes: int):
    """The speedrun program's loader, written out as it reads: each file from its first token, the
    next file when ``pos + world B T + 1 >= len(file)``; here over ``passes`` passes of the files."""
    for _ in range(passes):
        for tokens in files:
            pos = 0
            while pos + world * B * T + 1 < len(tokens):
                buf = tokens[pos + rank * B * T:][: B * T + 1]
                yield buf[:-1].reshape(B, T), buf[1:].reshape(B, T)
                pos += world * B * T


@pytest.fixture
def shards(tmp_path) -> list[Path]:
    """Three files of distinct ids (each id says its file and place), of unequal lengths."""
    return [write_shard(tmp_path / f"part_{k}.bin", 10_000 * k + np.arange(n)) for k, n in enumerate((101, 47, 80))]


@pytest.mark.parametrize("world", [1, 2])
def test_sequential_reads_the_files_in_order_as_the_program_does(shards, world):
    """Every rank's batches equal the program's loader's, file after file, tails skipped, a read
    never crossing into the next file, and round again after the last (the 47-token file is too
    short for a read over two ranks and gives none)."""
    tokens = read_shards(shards)
    files = [np.asarray(read_shards([p])) for p in shards]
    B, T = 2, 5
    for rank in range(world):
        ours = train_batches(tokens, order="sequential", batch_size=B, seq_len=T, seed=0, rank=rank, world=world)
        want = list(program_loader(files, B=B, T=T, rank=rank, world=world, passes=2))
        got = [next(ours) for _ in want]
        for (x, y), (wx, wy) in zip(got, want):
            assert x.tolist() == wx.tolist() and y.tolist() == wy.tolist()
        assert ours.epoch == 1 and ours.reads_per_pass() * 2 == len(want)
    # the ranks' slices touch: rank 1 starts where rank 0's rows end
    r0, r1 = (train_batches(tokens, order="sequential", batch_size=B, seq_len=T, seed=0, rank=r, world=2)
              for r in (0, 1))
    (x0, _), (x1, _) = next(r0), next(r1)
    assert x0.flatten().tolist() + x1.flatten().tolist() == list(range(2 * B * T))


def test_the_spans_follow_the_files_within_a_split(shards):
    tokens = read_shards(shards)  # 101 + 47 + 80 tokens
    assert shard_spans(tokens) == [(0, 101), (101, 148), (148, 228)]
    assert shard_spans(tokens[50:200]) == [(0, 51), (51, 98), (98, 150)]
    assert shard_spans(np.arange(30)) == [(0, 30)]


def test_too_little_data_for_one_read_is_refused():
    with pytest.raises(RuntimeDataError, match=r"a micro-batch over 2 rank\(s\) takes 41 tokens \(2 x 2 x 10 \+ 1\), "
                                               "but the split has 41"):
        SequentialWindows(np.arange(41), batch_size=2, seq_len=10, world=2)


def _text(tmp_path: Path) -> Path:
    path = tmp_path / "text.txt"
    rng = np.random.default_rng(0)
    path.write_text("".join(rng.choice(list("abcdefgh \n"), 6000)), encoding="utf-8")
    return path


def test_the_trainer_reads_the_split_in_order(tmp_path):
    t = Trainer(BABY, data=str(_text(tmp_path)), overrides=TINY, out_dir=tmp_path / "r", steps=3,
                data_order="sequential", **FAST)
    t.setup()
    split = np.asarray(t.train_tokens, dtype=np.int64)
    for i in range(3):
        x, y = next(t.batches)
        flat = split[i * 32: i * 32 + 33]
        assert x.flatten().tolist() == flat[:-1].tolist() and y.flatten().tolist() == flat[1:].tolist()


def test_a_resumed_sequential_run_continues_at_the_next_token(tmp_path):
    """Stopped after 3 of 6 steps and resumed: the checkpoint holds the read position (3 steps x 2
    micro-batches x 2 x 16 tokens), and the weights end as the uninterrupted run's."""
    data = _text(tmp_path)
    kw = dict(data=str(data), overrides=TINY, steps=6, accumulate=2, data_order="sequential", **FAST)
    train(BABY, out_dir=tmp_path / "a", **kw)
    train(BABY, out_dir=tmp_path / "b", stop_after=3, **kw)
    saved = json.loads((tmp_path / "b" / "last" / "trainer_state.json").read_text())["batcher"]
    assert saved == {"order": "sequential", "span": 0, "pos": 3 * 2 * 2 * 16, "epoch": 0, "step": 6,
                     "batch_size": 2, "seq_len": 16, "world": 1, "n_tokens": saved["n_tokens"], "spans": 1}
    train(BABY, out_dir=tmp_path / "b", resume=True, **kw)
    a = load_file(str(tmp_path / "a" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "last" / "model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    sa = json.loads((tmp_path / "a" / "last" / "trainer_state.json").read_text())["batcher"]
    sb = json.loads((tmp_path / "b" / "last" / "trainer_state.json").read_text())["batcher"]
    assert sa == sb and sa["pos"] == 6 * 2 * 2 * 16


def test_resuming_with_the_other_order_is_refused(tmp_path):
    data = _text(tmp_path)
    kw = dict(data=str(data), overrides=TINY, steps=4, **FAST)
    train(BABY, out_dir=tmp_path / "r", stop_after=2, **kw)
    with pytest.raises(RuntimeDataError, match="the checkpoint drew random windows; this run reads its data in order"):
        train(BABY, out_dir=tmp_path / "r", resume=True, data_order="sequential", **kw)


def test_a_run_longer_than_the_data_says_how_many_passes(tmp_path, capsys):
    train(BABY, data=str(_text(tmp_path)), overrides=TINY, out_dir=tmp_path / "r", steps=200,
          data_order="sequential", **{**FAST, "eval_every": 200, "log_every": 100})
    out = " ".join(capsys.readouterr().out.split())
    assert "train.data_order sequential: 200 micro-batches of 32 tokens over all ranks, 168 in one pass over the " \
           "training split: the run reads it 1.19 times, from the first file again after the last" in out, out


def test_data_order_is_checked_like_the_other_options():
    from physlm_graph.runtime.plan import make_plan

    with pytest.raises(TrainingError, match="invalid training option: data_order: Input should be 'random' or "
                                            "'sequential'"):
        make_plan(BABY, data_order="in-order")


def test_a_damaged_read_position_is_a_located_checkpoint_error(tmp_path):
    from physlm_graph import CheckpointError
    from physlm_graph.runtime._ckpt_schema import validate_json

    good = {"order": "sequential", "span": 0, "pos": 64, "epoch": 0, "step": 2, "batch_size": 2, "seq_len": 16,
            "world": 1, "n_tokens": 5400, "spans": 1}
    path = tmp_path / "trainer_state.json"
    assert validate_json(path, {"batcher": good})
    with pytest.raises(CheckpointError) as err:
        validate_json(path, {"batcher": {**good, "pos": -1}})
    assert str(err.value).startswith(f"checkpoint error: {path}: key `batcher`: pos: Input should be greater "
                                     "than or equal to 0"), str(err.value)


def test_the_read_position_carries_over_to_another_batch_size_or_rank_count():
    first = SequentialWindows(np.arange(1000), batch_size=2, seq_len=5)
    next(first), next(first)  # tokens 0..19 read
    later = SequentialWindows(np.arange(1000), batch_size=4, seq_len=5, rank=1, world=2)
    later.load_state_dict(first.state_dict())
    x, _ = next(later)
    assert x.flatten().tolist() == list(range(40, 60))  # rank 1's slice of the micro-batch that starts at 20
    with pytest.raises(RuntimeDataError, match=r"saved for n_tokens, files = \(1000, 1\), this run has \(999, 1\)"):
        SequentialWindows(np.arange(999), batch_size=2, seq_len=5).load_state_dict(first.state_dict())


@pytest.mark.parametrize("rank, world", [(0, 1), (1, 2), (3, 4)])
def test_every_rank_resumes_an_in_order_position_whatever_the_world_size(rank, world):
    """A checkpoint of data read in order holds one position for all ranks (and, written by
    several processes, each rank's copy): every rank of the resumed run, a rank the checkpoint did
    not have included, goes on from that position, not from the start of the data."""
    from types import SimpleNamespace

    from physlm_graph.runtime.cadence import _restore_batcher

    position = {"order": "sequential", "span": 1, "pos": 4096, "epoch": 0, "step": 7, "batch_size": 2,
                "seq_len": 8, "world": 2, "n_tokens": 100_000, "spans": 3}
    loaded = []
    t = SimpleNamespace(dist=SimpleNamespace(enabled=world > 1, main=rank == 0, rank=rank, world=world),
                        batches=SimpleNamespace(load_state_dict=loaded.append), notes=[])
    _restore_batcher(t, {"batcher": position, "batchers": [position, position]})
    assert loaded == [position] and not t.notes
