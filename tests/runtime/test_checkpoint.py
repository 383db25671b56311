"""Checkpoints: round trip, no pickle, every damage named, and atomic writes under SIGKILL."""

from __future__ import annotations

import multiprocessing
import os
import random
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch

from physlm_graph import CheckpointError, compile_blueprint
from physlm_graph.runtime.checkpoint import (
    find_checkpoint,
    load_checkpoint,
    load_weights,
    restore_optimizer,
    save_checkpoint,
    write_manifest,
)
from physlm_graph.runtime.optim import make_optimizer, node_components
from physlm_graph.runtime.tokenizers import CharTokenizer

ROOT = Path(__file__).resolve().parents[2]
TINY = {"params.layers": 1, "params.dim": 32, "params.heads": 2, "params.context": 32, "train.seq_len": 32}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained():
    """A tiny baby-gpt after two AdamW steps, with its optimizer and a chars tokenizer."""
    cm = compile_blueprint(ROOT / "blueprints" / "baby-gpt.yaml", overrides=TINY)
    opt = make_optimizer(cm.module, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.99), owners=node_components(cm))
    x = torch.randint(0, 65, (2, 16))
    for _ in range(2):
        cm.module(x)["logits"].square().mean().backward()
        opt.step()
        opt.zero_grad()
    tok = CharTokenizer([chr(i) for i in range(32, 97)])
    return cm, opt, tok


def _save(path: Path, trained, **kw) -> Path:
    cm, opt, tok = trained
    return save_checkpoint(path, cm=cm, tokenizer=tok, optimizer=opt, trainer_state={"step": 2}, **kw)


def test_round_trip_rebuilds_model_from_its_blueprint(tmp_path, trained):
    cm, opt, tok = trained
    folder = _save(tmp_path / "ck", trained)
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert {"model.safetensors", "blueprint.yaml", "config.json", "manifest.json", "optimizer.safetensors",
            "optimizer.json", "trainer_state.json"} <= set(names)
    assert not [n for n in names if n.endswith((".pt", ".pth", ".bin", ".pkl"))]  # no pickle anywhere
    ck = load_checkpoint(folder)
    for k, v in cm.module.state_dict().items():
        assert torch.equal(ck.module.state_dict()[k], v), k
    assert ck.module.head.weight is ck.module.tok.weight  # the tie survives
    assert ck.model.hash == cm.hash
    assert ck.config["model_type"] == "physlm" and ck.config["architectures"] == ["PhysLMForCausalLM"]
    assert ck.config["vocab_size"] == 65 and ck.config["max_position_embeddings"] == 32
    assert ck.config["physlm"]["hash"] == cm.hash and ck.config["physlm"]["num_params"] == cm.num_params
    assert ck.tokenizer.fingerprint() == tok.fingerprint()
    assert ck.trainer_state == {"step": 2}


def test_optimizer_state_round_trips_by_name(tmp_path, trained):
    cm, opt, _ = trained
    folder = _save(tmp_path / "ck", trained)
    fresh = make_optimizer(cm.module, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.99), owners=node_components(cm))
    restore_optimizer(fresh, folder)
    a, b = opt.state_dict(), fresh.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for i, st in a["state"].items():
        for key, val in st.items():
            assert torch.equal(b["state"][i][key], val), (i, key)


def test_weight_decay_skips_norms_and_embeddings(trained):
    _, opt, _ = trained
    decayed = {n for g in opt.param_groups if g["weight_decay"] > 0 for n in g["names"]}
    assert decayed == {"trunk.0.attn.qkv.weight", "trunk.0.attn.proj.weight", "trunk.0.mlp.fc.weight",
                       "trunk.0.mlp.proj.weight"}


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint here: the folder does not exist") as err:
        load_checkpoint(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(err.value)


def test_missing_file_is_named(tmp_path, trained):
    folder = _save(tmp_path / "ck", trained)
    (folder / "optimizer.json").unlink()
    with pytest.raises(CheckpointError, match="file missing from the checkpoint") as err:
        load_checkpoint(folder)
    assert "optimizer.json" in str(err.value)


def test_truncated_weights_are_named(tmp_path, trained):
    folder = _save(tmp_path / "ck", trained)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated") as err:
        load_checkpoint(folder)
    assert "model.safetensors" in str(err.value)
    with pytest.raises(CheckpointError, match="not a readable safetensors file") as err:  # without the manifest check
        load_checkpoint(folder, verify=False)
    assert "model.safetensors" in str(err.value)


def test_checksum_mismatch_is_named(tmp_path, trained):
    folder = _save(tmp_path / "ck", trained)
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-1] ^= 0x01  # one flipped bit in the last weight, same size
    (folder / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(folder)
    assert str(err.value).startswith(f"checkpoint error: {folder / 'model.safetensors'}: checksum mismatch: "
                                     "the file changed since the checkpoint was written")


def test_blueprint_that_no_longer_matches_the_weights(tmp_path, trained):
    folder = _save(tmp_path / "ck", trained)
    bp = folder / "blueprint.yaml"
    bp.write_text(bp.read_text().replace("  dim: 32", "  dim: 48"))
    write_manifest(folder)  # a consistent folder whose blueprint builds another model
    with pytest.raises(CheckpointError, match="do not match the model its blueprint builds") as err:
        load_checkpoint(folder)
    msg = str(err.value)
    assert "model.safetensors" in msg and "shape mismatch head.weight (stored [65, 32], model [65, 48])" in msg
    bp.write_text(bp.read_text().replace("  dim: 48", "  dim: 32").replace("  layers: 1", "  layers: 2"))
    write_manifest(folder)
    with pytest.raises(CheckpointError, match="missing trunk.1.") as err:
        load_checkpoint(folder)


def test_find_checkpoint_prefers_last_then_best_then_aside(tmp_path, trained):
    run = tmp_path / "run"
    _save(run / "best", trained)
    assert find_checkpoint(run) == run / "best"
    _save(run / "last", trained)
    assert find_checkpoint(run) == run / "last"
    os.replace(run / "last", run / ".last.old")  # a save that died between its two renames
    shutil.rmtree(run / "best")
    assert find_checkpoint(run) == run / ".last.old"
    assert load_checkpoint(run).trainer_state == {"step": 2}
    _save(run / "last", trained)  # the next save tidies up
    assert not (run / ".last.old").exists() and (run / "last").is_dir()


def _writer(path: str, trained) -> None:  # runs in a forked child until it is killed
    torch.set_num_threads(1)
    pad = torch.zeros(12 * 2**20 // 4)  # 12 MB: each save takes a while
    step = 0
    while True:
        step += 1
        cm, opt, tok = trained
        save_checkpoint(path, cm=cm, tokenizer=tok, optimizer=opt, trainer_state={"step": step},
                        extra_tensors={"pad": pad + step})


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_sigkill_while_saving_leaves_a_loadable_checkpoint(tmp_path, trained):
    target = tmp_path / "run" / "last"
    rng = random.Random(0)
    ctx = multiprocessing.get_context("fork")
    steps = []
    for trial in range(5):
        proc = ctx.Process(target=_writer, args=(str(target), trained), daemon=True)
        proc.start()
        deadline = time.monotonic() + 30
        while not (target.is_dir() or (target.parent / ".last.old").is_dir()):
            assert time.monotonic() < deadline and proc.is_alive(), "the writer never saved"
            time.sleep(0.01)
        time.sleep(rng.uniform(0.05, 0.4))
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        ck = load_checkpoint(target.parent)  # whatever folder exists: last, or a leftover aside
        steps.append(ck.trainer_state["step"])
        cm, _, _ = trained
        fresh = make_optimizer(ck.module, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.99), owners=node_components(ck.model))
        restore_optimizer(fresh, ck.path)  # and it resumes
        load_weights(cm.module, ck.path)
    assert all(s >= 1 for s in steps)
