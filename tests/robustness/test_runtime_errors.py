"""Ordinary mistakes at run time get a located error and exit 2: checkpoint files of the wrong
shape, data that is a device or a FIFO, NaN weights, resume lengths, --gpus without GPUs."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from physlm_graph import CheckpointError, PhysLMError, RuntimeDataError, TrainingError
from physlm_graph.cli import main
from physlm_graph.runtime import data as data_mod
from physlm_graph.runtime._schedule_checks import resume_horizon, warmup_note
from physlm_graph.runtime.checkpoint import check_checkpoint, find_checkpoint, load_checkpoint, write_manifest
from physlm_graph.runtime.data import load_text
from physlm_graph.runtime.distributed import check_launch
from physlm_graph.runtime.train import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def _copy(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run, dst, ignore=shutil.ignore_patterns("cache"))
    return dst


def _rewrite(folder: Path, name: str, value) -> Path:
    """Replace a JSON file and fix the manifest, so only the shape check can catch it."""
    path = folder / name
    path.write_text(value if isinstance(value, str) else json.dumps(value), encoding="utf-8")
    if name != "manifest.json":
        write_manifest(folder)
    return path


# ------------------------------------------------------------------ checkpoint files of the wrong shape


def _state(folder: Path) -> dict:
    return json.loads((folder / "trainer_state.json").read_text())


def _cases(folder: Path):
    state = _state(folder)
    garbage_rng = {**state, "rng": {**state["rng"], "torch_cpu": [7] * len(state["rng"]["torch_cpu"])}}
    batcher = {**state, "batcher": {**state["batcher"], "generator": "abc"}}
    step = {**state, "step": "12"}
    manifest = json.loads((folder / "manifest.json").read_text())
    entries = {**manifest, "files": {k: "sha" for k in manifest["files"]}}
    return {
        "state-is-list": ("trainer_state.json", [1, 2, 3], "expected a JSON object at the top level, got list"),
        "garbage-rng": ("trainer_state.json", garbage_rng,
                        "key `rng.torch_cpu`: not a state the torch CPU generator accepts, got [7, 7, 7, "),
        "garbage-batcher": ("trainer_state.json", batcher, "key `batcher.generator`: Input should be a valid list, "
                            "got 'abc'"),
        "step-is-string": ("trainer_state.json", step, "key `step`: Input should be a valid integer, got '12'"),
        "manifest-entries": ("manifest.json", entries, "key `files.blueprint.yaml`: Input should be a valid dictionary "
                             "or instance of _FileEntry, got 'sha' (and "),
        "deep-config": ("config.json", "[" * 100_000 + "]" * 100_000, "JSON nested more than 64 levels deep"),
        "config-physlm-list": ("config.json", {"model_type": "physlm", "physlm": []},
                               "key `physlm`: Input should be a valid dictionary or instance of _PhysLMConfig, got []"),
    }


@pytest.mark.parametrize("case", ["state-is-list", "garbage-rng", "garbage-batcher", "step-is-string",
                                  "manifest-entries", "deep-config", "config-physlm-list"])
def test_wrong_shape_names_file_and_key(tiny_run, tmp_path, case):
    run = _copy(tiny_run, tmp_path)
    last = run / "last"
    name, value, message = _cases(last)[case]
    path = _rewrite(last, name, value)
    with pytest.raises(CheckpointError) as err:
        check_checkpoint(last, resume=True)
    assert str(err.value).startswith(f"checkpoint error: {path}: {message}"), str(err.value)
    if name != "trainer_state.json" or case == "state-is-list":  # loading for generate reads these too
        with pytest.raises(CheckpointError):
            load_checkpoint(last)


def test_cli_generate_falls_back_to_best_and_says_why(tiny_run, tmp_path, capsys):
    run = _copy(tiny_run, tmp_path)
    path = _rewrite(run / "last", "config.json", [1])
    code = main(["generate", str(run), "--prompt", "It", "--max-new-tokens", "3", "--temperature", "0", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert err == (f"warning: the checkpoint {run / 'last'} is damaged, using {run / 'best'} instead:\n"
                   f"  checkpoint error: {path}: expected a JSON object at the top level, got list\n")
    assert json.loads(out)["checkpoint"] == str(run / "best")


def test_resume_falls_back_when_the_state_is_garbage(tiny_run, tmp_path, capsys):
    run = _copy(tiny_run, tmp_path)
    state = _state(run / "last")
    _rewrite(run / "last", "trainer_state.json", {**state, "rng": {"torch_cpu": [1, 2]}})
    assert find_checkpoint(run, resume=True) == run / "best"
    assert "key `rng.torch_cpu`: not a state the torch CPU generator accepts" in capsys.readouterr().err
    shutil.rmtree(run / "best")
    with pytest.raises(CheckpointError, match="key `rng.torch_cpu`"):
        find_checkpoint(run, resume=True)


def test_resume_without_data_uses_the_saved_text(tiny_run, tmp_path, capsys):
    """tiny.yaml has no train.data: --resume finds the text in the trainer state."""
    run = _copy(tiny_run, tmp_path)
    code = main(["train", str(Path(__file__).parents[1] / "assets" / "blueprints" / "valid" / "tiny.yaml"),
                 "--out", str(run), "--resume", "--steps", "4", "--device", "cpu", "--no-progress",
                 "--batch-size", "2", "--set", "train.fit_vocab=true"])
    assert code == 0, capsys.readouterr().err
    assert _state(run / "last")["step"] == 4


# ------------------------------------------------------------------ resume lengths and the schedule


def test_resume_steps_below_the_run_step_is_refused():
    with pytest.raises(TrainingError) as err:
        resume_horizon({"step": 300, "config": {"steps": 500}}, steps=200, schedule="cosine")
    assert str(err.value) == ("train error: --steps 200 is below the step this run has reached (300) "
                              "(expected --steps 300 or more)\n"
                              "  fix: pass --steps 400 (or any number above 300) to train further, or drop --resume "
                              "to start a new run in another --out")


def test_more_steps_keep_the_saved_schedule_horizon():
    horizon, note = resume_horizon({"step": 100, "config": {"steps": 200}}, steps=400, schedule="cosine")
    assert horizon == 200
    assert note == ("train.steps is 400 but the resumed run was planned for 200: the cosine schedule keeps its "
                    "horizon of 200 steps (the learning rate does not jump), so steps 200 to 400 run at train.min_lr")
    assert resume_horizon({"step": 100, "config": {"steps": 200}}, steps=200, schedule="cosine") == (200, None)
    assert resume_horizon({"step": 100, "config": {"steps": 200}}, steps=400, schedule="constant") == (400, None)


def test_resumed_learning_rate_does_not_jump(tiny_run, tmp_path):
    run = _copy(tiny_run, tmp_path)
    t = Trainer(Path(__file__).parents[1] / "assets" / "blueprints" / "valid" / "tiny.yaml", out_dir=run,
                resume=True, device="cpu", steps=30, progress=False, batch_size=2, eval_every=3, eval_iters=1,
                warmup=0, fit_vocab=True)
    t.setup()
    assert t.step == 3 and t.schedule_steps == 3
    floor = t.cfg.lr / 10
    assert t.lr_at(3) == pytest.approx(floor) and t.lr_at(20) == pytest.approx(floor)
    assert any("keeps its horizon of 3 steps" in n for n in t.notes)


def test_warmup_longer_than_the_run_is_a_note():
    assert warmup_note(warmup=10, steps=100, lr=1e-3) is None
    assert warmup_note(warmup=100, steps=20, lr=1e-3) == (
        "train.warmup 100 is not shorter than the run (20 steps): the learning rate only rises, to 0.000198 at the "
        "last step instead of train.lr 0.001; lower train.warmup (e.g. --set train.warmup=2) for a full schedule")


# ------------------------------------------------------------------ data that never ends


@pytest.mark.parametrize("dev", ["/dev/zero", "/dev/urandom", "/dev/null"])
def test_device_files_are_refused_at_once(dev, tmp_path):
    if not os.path.exists(dev):
        pytest.skip(f"no {dev}")
    with pytest.raises(RuntimeDataError, match=f"{dev}: the data is a character device, not a regular file"):
        load_text(dev)
    with pytest.raises(RuntimeDataError, match="character device"):
        load_text(f"hf:{dev}")
    link = tmp_path / "link.txt"
    link.symlink_to(dev)
    with pytest.raises(RuntimeDataError, match="character device"):
        load_text(link)


def test_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.txt"
    os.mkfifo(fifo)
    with pytest.raises(RuntimeDataError, match="a FIFO \\(named pipe\\), not a regular file"):
        load_text(fifo)


def test_size_bound(tmp_path, monkeypatch):
    big = tmp_path / "big.txt"
    big.write_text("word " * 1000, encoding="utf-8")
    monkeypatch.setattr(data_mod, "MAX_TEXT_BYTES", 4096)
    with pytest.raises(RuntimeDataError, match="the file holds 4.9 KiB, above the 4.0 KiB that are read into memory"):
        load_text(big)
    folder = tmp_path / "parts"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.txt").write_text("word " * 400, encoding="utf-8")
    with pytest.raises(RuntimeDataError, match="the folder's text files hold 5.9 KiB, above the 4.0 KiB"):
        load_text(folder)


def test_eval_of_a_device_exits_2(tiny_run, capsys):
    assert main(["eval", str(tiny_run), "--data", "/dev/zero"]) == 2
    assert capsys.readouterr().err == ("data error: /dev/zero: the data is a character device, not a regular file\n"
                                       "  fix: save the text to a file and pass that file\n")


def test_eval_stride_longer_than_the_window_exits_2(tiny_run, capsys):
    assert main(["eval", str(tiny_run), "--data", str(tiny_run / "text.txt"), "--stride", "17"]) == 2
    assert capsys.readouterr().err == ("data error: --stride 17: expected between 1 and the window length 16\n"
                                       "  fix: pass --stride 16, or leave it out for the default\n")


# ------------------------------------------------------------------ NaN weights, --gpus


def test_generate_with_nan_weights_exits_2(tiny_run, tmp_path, capsys):
    run = _copy(tiny_run, tmp_path)
    weights = run / "best" / "model.safetensors"
    tensors = {k: torch.full_like(v, float("nan")) for k, v in load_file(str(weights)).items()}
    save_file(tensors, str(weights), metadata={"format": "pt"})
    write_manifest(run / "best")
    code = main(["generate", str(run / "best"), "--prompt", "It", "--max-new-tokens", "5"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("generate error: the model's logits are not finite (NaN or inf), so no token can be "
                          "chosen: weight "), err
    assert "holds" in err and "NaN/inf values of" in err


def _poison(run: Path, change) -> Path:
    """``run/best`` with ``change(name, tensor)`` applied to every stored tensor, the manifest rewritten."""
    weights = run / "best" / "model.safetensors"
    tensors = {k: change(k, v) for k, v in load_file(str(weights)).items()}
    save_file(tensors, str(weights), metadata={"format": "pt"})
    write_manifest(run / "best")
    return run / "best"


def test_eval_with_nan_weights_exits_2_naming_the_weight(tiny_run, tmp_path, capsys):
    best = _poison(_copy(tiny_run, tmp_path),
                   lambda k, v: torch.full_like(v, float("nan")) if k == "trunk.1.mlp.fc.weight" else v)
    code = main(["eval", str(best), "--data", str(tiny_run / "text.txt")])
    err = capsys.readouterr().err
    assert code == 2
    assert err == ("eval error: the model's weights are not finite (NaN or inf): weight trunk.1.mlp.fc.weight holds "
                   "4,096 NaN/inf values of 4,096, so the loss cannot be measured\n  fix: use another checkpoint "
                   "(a run folder's best/), or retrain it with a lower learning rate\n")


def test_eval_whose_logits_overflow_exits_2(tiny_run, tmp_path, capsys):
    """Finite weights (the tied embedding and the final norm scaled by 1e37) whose logits overflow."""
    best = _poison(_copy(tiny_run, tmp_path), lambda k, v: v * 1e37 if k in ("head.weight", "norm.weight") else v)
    code = main(["eval", str(best), "--data", str(tiny_run / "text.txt")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("eval error: the loss on the windows from token 0 is nan (the logits are not finite), so "
                          "the loss cannot be measured\n"), err


def test_gpus_without_gpus_is_refused_unless_cpu_processes_are_asked_for():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(PhysLMError) as err:
        check_launch(2, "auto")
    assert str(err.value) == ("physlm-graph error: --gpus 2: this machine has no CUDA GPU\n"
                              "  fix: drop --gpus, or add --device cpu to run that many CPU processes over gloo "
                              "(for testing)")
    with pytest.raises(PhysLMError, match="no CUDA GPU"):
        check_launch(2, "cuda")
    check_launch(2, "cpu")  # the documented opt-in


def test_a_damaged_tokenizer_description_falls_back_too(tiny_run, tmp_path, capsys):
    run = _copy(tiny_run, tmp_path)
    path = _rewrite(run / "last", "tokenizer/physlm_tokenizer.json", {"kind": ["bytes"]})
    assert find_checkpoint(run, resume=True) == run / "best"
    assert capsys.readouterr().err == (
        f"warning: the checkpoint {run / 'last'} is damaged, using {run / 'best'} instead:\n"
        f"  checkpoint error: {path}: unreadable tokenizer description: key `kind`: Input should be a valid string\n")


def test_text_that_was_not_utf8_is_a_data_error():
    from physlm_graph.runtime.tokenizers import ByteTokenizer

    with pytest.raises(RuntimeDataError, match="the text holds '\\\\udcff' at position 2, which is not a Unicode"):
        ByteTokenizer().encode("ab\udcff")
