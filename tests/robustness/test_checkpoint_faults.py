"""Checkpoints under attack and accident: pickles are never loaded, damage is named, a full disk
keeps the previous checkpoint.

Every failure is a ``CheckpointError`` whose message names the file at fault.
"""

from __future__ import annotations

import errno
import json
import pickle
from pathlib import Path

import pytest
import torch

from physlm_graph import CheckpointError, compile_blueprint
from physlm_graph.runtime import checkpoint as ckpt_mod
from physlm_graph.runtime.checkpoint import load_checkpoint, restore_optimizer, save_checkpoint, write_manifest
from physlm_graph.runtime.optim import make_optimizer, node_components

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "tests" / "assets" / "blueprints" / "valid" / "tiny.yaml"


class _Payload:
    """Unpickling this creates ``marker``: proof that a loader ran pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cm = compile_blueprint(TINY, device="cpu")
    opt = make_optimizer(cm.module, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.99), owners=node_components(cm))
    cm.module(torch.randint(0, 50, (2, 8)))["logits"].square().mean().backward()
    opt.step()
    opt.zero_grad()
    return cm, opt


def _save(path: Path, model, step: int = 1) -> Path:
    cm, opt = model
    return save_checkpoint(path, cm=cm, optimizer=opt, trainer_state={"step": step})


def _names(err: pytest.ExceptionInfo, path: Path) -> None:
    assert isinstance(err.value, CheckpointError)
    assert str(path) in str(err.value), f"{path} not named in: {err.value}"
    assert "Traceback" not in str(err.value)


# ------------------------------------------------------------------ pickles


@pytest.mark.parametrize("fmt", ["pickle", "torch.save"])
@pytest.mark.parametrize("manifest", ["stale", "rewritten"])
def test_pickle_posing_as_weights_is_refused_not_run(tmp_path, model, fmt, manifest):
    folder = _save(tmp_path / "ck", model)
    marker = tmp_path / "pwned"
    target = folder / "model.safetensors"
    if fmt == "pickle":
        target.write_bytes(pickle.dumps(_Payload(marker)))
    else:
        torch.save({"w": _Payload(marker)}, target)
    if manifest == "rewritten":  # an attacker who also fixes the checksums
        write_manifest(folder)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(folder)
    _names(err, target)
    msg = "checksum mismatch" if manifest == "stale" else "not a readable safetensors file"
    assert msg in str(err.value) or "truncated or grown" in str(err.value)
    assert not marker.exists()
    with pytest.raises(CheckpointError) as err:  # and with the manifest check off
        load_checkpoint(folder, verify=False)
    _names(err, target)
    assert "not a readable safetensors file" in str(err.value)
    assert not marker.exists()


def test_pickle_posing_as_optimizer_state_is_refused_not_run(tmp_path, model):
    cm, opt = model
    folder = _save(tmp_path / "ck", model)
    marker = tmp_path / "pwned"
    (folder / "optimizer.safetensors").write_bytes(pickle.dumps(_Payload(marker)))
    write_manifest(folder)
    with pytest.raises(CheckpointError) as err:
        restore_optimizer(opt, folder)
    _names(err, folder / "optimizer.safetensors")
    assert "not a readable safetensors file" in str(err.value)
    assert not marker.exists()


def test_pickle_posing_as_json_is_refused_not_run(tmp_path, model):
    cm, opt = model
    folder = _save(tmp_path / "ck", model)
    marker = tmp_path / "pwned"
    (folder / "optimizer.json").write_bytes(pickle.dumps(_Payload(marker)))
    write_manifest(folder)
    with pytest.raises(CheckpointError) as err:
        restore_optimizer(opt, folder)
    _names(err, folder / "optimizer.json")
    assert "not valid JSON" in str(err.value)
    assert not marker.exists()


# ------------------------------------------------------------------ damage


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 3])


def _flip(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x40
    p.write_bytes(bytes(data))


def _garbage(p: Path) -> None:
    p.write_bytes(b"\x00\xff" * 64)


@pytest.mark.parametrize("damage", [_truncate, _flip, _garbage], ids=["truncated", "flipped", "garbage"])
@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "blueprint.yaml", "optimizer.safetensors",
                                  "trainer_state.json"])
def test_damage_to_any_file_is_named(tmp_path, model, damage, name):
    folder = _save(tmp_path / "ck", model)
    damage(folder / name)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(folder)
    _names(err, folder / name)
    assert "checksum mismatch" in str(err.value) or "truncated or grown" in str(err.value)


@pytest.mark.parametrize("damage", [_truncate, _garbage], ids=["truncated", "garbage"])
def test_damaged_weights_with_a_consistent_manifest_are_named(tmp_path, model, damage):
    folder = _save(tmp_path / "ck", model)
    damage(folder / "model.safetensors")
    write_manifest(folder)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(folder)
    _names(err, folder / "model.safetensors")
    assert "not a readable safetensors file (truncated or corrupt)" in str(err.value)


def test_damaged_manifest_is_named(tmp_path, model):
    folder = _save(tmp_path / "ck", model)
    _truncate(folder / "manifest.json")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(folder)
    _names(err, folder / "manifest.json")
    assert "not valid JSON" in str(err.value)


def test_blueprint_that_no_longer_matches_the_weights_is_named(tmp_path, model):
    folder = _save(tmp_path / "ck", model)
    bp = folder / "blueprint.yaml"
    bp.write_text(bp.read_text().replace("dim: 32", "dim: 48"), encoding="utf-8")
    with pytest.raises(CheckpointError) as err:  # the manifest notices first
        load_checkpoint(folder)
    _names(err, bp)
    write_manifest(folder)
    with pytest.raises(CheckpointError) as err:  # a consistent folder whose blueprint builds another model
        load_checkpoint(folder)
    _names(err, folder / "model.safetensors")
    assert "the weights do not match the model its blueprint builds" in str(err.value)
    assert "shape mismatch" in str(err.value)


def test_blueprint_that_no_longer_compiles_is_named(tmp_path, model):
    folder = _save(tmp_path / "ck", model)
    bp = folder / "blueprint.yaml"
    bp.write_text(bp.read_text().replace("norm.layer", "norm.gone"), encoding="utf-8")
    write_manifest(folder)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(folder)
    _names(err, bp)
    assert "the stored blueprint no longer compiles" in str(err.value)


# ------------------------------------------------------------------ a full disk


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _half_then_enospc(module, filename, *args, **kwargs):
    Path(filename).write_bytes(b"\x00" * 100)  # the disk filled up halfway through the file
    _enospc()


@pytest.mark.parametrize("writer, fake", [
    ("save_model", _half_then_enospc),
    ("save_file", _enospc),
    ("_write_json", _enospc),
    ("write_manifest", _enospc),
])
def test_full_disk_keeps_the_previous_checkpoint(tmp_path, model, monkeypatch, writer, fake):
    target = _save(tmp_path / "last", model, step=1)
    before = {p.name: p.read_bytes() for p in target.iterdir() if p.is_file()}
    monkeypatch.setattr(ckpt_mod, writer, fake)
    with pytest.raises(CheckpointError) as err:
        _save(target, model, step=2)
    assert str(err.value) == (f"checkpoint error: {target}: could not write the checkpoint: No space left on device\n"
                              "  fix: check free disk space and permissions; the previous checkpoint is kept")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"], "temporary folders were left behind"
    assert {p.name: p.read_bytes() for p in target.iterdir() if p.is_file()} == before
    ck = load_checkpoint(target)
    assert ck.trainer_state == {"step": 1}


def test_full_disk_during_training_is_a_clear_error(tmp_path, monkeypatch):
    from physlm_graph.runtime.train import train

    data = tmp_path / "text.txt"
    data.write_text("the quick brown fox jumps over the lazy dog.\n" * 40, encoding="utf-8")
    calls = {"n": 0}
    real = ckpt_mod.save_model

    def fill_up_on_second_save(module, filename, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] >= 2:
            _half_then_enospc(module, filename)
        return real(module, filename, *args, **kwargs)

    monkeypatch.setattr(ckpt_mod, "save_model", fill_up_on_second_save)
    out = tmp_path / "run"
    with pytest.raises(CheckpointError, match="No space left on device") as err:
        train(TINY, data=str(data), out_dir=out, device="cpu", steps=4, save_every=2, eval_every=100, eval_iters=1,
              batch_size=2, warmup=0, progress=False, fit_vocab=True)
    _names(err, out / "best")  # step 4 saves best first (the run ends there), then last
    monkeypatch.undo()
    ck = load_checkpoint(out / "last")
    assert ck.trainer_state["step"] == 2
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
