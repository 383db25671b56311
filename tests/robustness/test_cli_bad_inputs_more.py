"""Bad inputs to the newer entry points, from the command line: each is refused with exit 2 and a
message naming the file and the reason, and whatever was at an output path is left as it was.

The checkpoint is the shared ``tiny_run`` (conftest.py); the Hugging Face folder is a one-layer
GPT-2 written by transformers.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from physlm_graph.cli import main


def _run(argv: list[str], capsys) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err and "internal error" not in err, err
    return code, err


def _snapshot(path: Path) -> dict[str, bytes] | bytes:
    if path.is_file():
        return path.read_bytes()
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def hf_gpt2(tmp_path_factory) -> Path:
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("hf") / "gpt2"
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16,
                                     bos_token_id=0, eos_token_id=0)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


def _output(kind: str, tmp_path: Path, ckpt: Path, hf: Path) -> Path:
    """The output path a case names, made as the case needs it."""
    if kind == "file":
        (tmp_path / "notes.txt").write_text("my notes\n")
        return tmp_path / "notes.txt"
    if kind == "other-folder":
        (tmp_path / "mine").mkdir()
        (tmp_path / "mine" / "keep.txt").write_text("keep me\n")
        return tmp_path / "mine"
    return {"the-checkpoint": ckpt, "inside-the-checkpoint": ckpt / "hf", "the-hf-folder": hf}[kind]


EXPORT_CASES = [
    ("file", "the output exists and is a file, not a folder"),
    ("other-folder", "the output folder holds other files and is not a Hugging Face folder"),
    ("the-checkpoint", "the output is inside the checkpoint being exported"),
    ("inside-the-checkpoint", "the output is inside the checkpoint being exported"),
]


@pytest.mark.parametrize("kind,message", EXPORT_CASES, ids=[c[0] for c in EXPORT_CASES])
def test_export_refuses_an_output_it_would_clobber(kind, message, tiny_run, hf_gpt2, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_run / "last", ckpt)
    out = _output(kind, tmp_path, ckpt, hf_gpt2)
    before, ckpt_before = (_snapshot(out) if out.exists() else None), _snapshot(ckpt)
    code, err = _run(["export", ckpt, "--out", out], capsys)
    assert code == 2
    assert f"hugging face error: {out}: {message}" in err, err
    assert (_snapshot(out) if out.exists() else None) == before
    assert _snapshot(ckpt) == ckpt_before


def test_export_over_an_earlier_export_replaces_it_whole(tiny_run, tmp_path, capsys):
    out = tmp_path / "hf"
    assert _run(["export", tiny_run / "last", "--out", out], capsys)[0] == 0
    (out / "stale.bin").write_bytes(b"from an older export")
    assert _run(["export", tiny_run / "last", "--out", out], capsys)[0] == 0
    assert not (out / "stale.bin").exists() and (out / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # no temporary folder left beside it


IMPORT_CASES = [
    ("file", "the output exists and is not a checkpoint folder"),
    ("other-folder", "the output exists and is not a checkpoint folder"),
    ("the-hf-folder", "the output is the Hugging Face folder being imported"),
]


@pytest.mark.parametrize("kind,message", IMPORT_CASES, ids=[c[0] for c in IMPORT_CASES])
def test_import_refuses_an_output_it_would_clobber(kind, message, tiny_run, hf_gpt2, tmp_path, capsys):
    out = _output(kind, tmp_path, tiny_run / "last", hf_gpt2)
    before, hf_before = _snapshot(out), _snapshot(hf_gpt2)
    code, err = _run(["import", hf_gpt2, "--out", out], capsys)
    assert code == 2
    assert f"hugging face error: {out}: {message}" in err, err
    assert _snapshot(out) == before and _snapshot(hf_gpt2) == hf_before


TINY = Path(__file__).resolve().parents[1] / "assets" / "blueprints" / "valid" / "tiny.yaml"

BETAS = [
    ("train.betas=[0.9,1.5]", "train.betas.1: Input should be less than 1 (got 1.5)"),
    ("train.betas=[-0.1,0.9]", "train.betas.0: Input should be greater than or equal to 0 (got -0.1)"),
    ("train.optimizers=[{name: all, params: ['*'], optimizer: adamw, lr: 0.1, betas: [0.9, 1.0]}]",
     "train.optimizers.0.betas.1: Input should be less than 1 (got 1.0)"),
]


@pytest.mark.parametrize("override,message", BETAS, ids=["beta2-above-1", "beta1-negative", "group-beta2-is-1"])
def test_adam_betas_outside_0_1_are_a_validate_error(override, message, capsys):
    # torch.optim.AdamW refused these only once training started, as an internal error
    code, err = _run(["validate", TINY, "--set", override], capsys)
    assert code == 2
    assert f"validate error: {TINY}:1:1: {message}" in err, err


def test_train_out_that_is_a_file_is_refused_and_kept(tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("It was the best of times, it was the worst of times.\n" * 20)
    code, err = _run(["train", TINY, "--data", text, "--out", text, "--steps", "1", "--device", "cpu",
                      "--no-progress"], capsys)
    assert code == 2
    assert f"train error: {text}: the output exists and is a file, not a run folder" in err, err
    assert text.read_text().startswith("It was the best of times")


@pytest.fixture(scope="module")
def sharded_run(tiny_run, tmp_path_factory) -> Path:
    """tiny.yaml trained one step with train.checkpoint_format=sharded."""
    import torch

    from physlm_graph.runtime.train import train

    root = tmp_path_factory.mktemp("sharded")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(TINY, data=str(tiny_run / "text.txt"), out_dir=root / "run", device="cpu", steps=1, batch_size=2,
              eval_every=1, eval_iters=1, warmup=0, log_every=1, progress=False, fit_vocab=True,
              overrides=["train.checkpoint_format=sharded"])
    finally:
        torch.set_num_threads(threads)
    return root / "run"


@pytest.mark.parametrize("where", ["itself", "inside"])
def test_consolidate_refuses_an_output_in_the_checkpoint(where, sharded_run, capsys):
    ckpt = sharded_run / "last"
    out = ckpt if where == "itself" else ckpt / "full"
    before = _snapshot(ckpt)
    code, err = _run(["consolidate", ckpt, out], capsys)
    assert code == 2
    assert f"checkpoint error: {out}: the output is the checkpoint itself or a folder inside it" in err, err
    assert _snapshot(ckpt) == before


SEEDS = [("99999999999999999999", "Input should be less than 9223372036854775808"),
         ("-1", "Input should be greater than or equal to 0")]


@pytest.mark.parametrize("value,message", SEEDS, ids=["above-2**63", "negative"])
def test_train_seed_has_the_command_lines_range(value, message, capsys):
    # torch.manual_seed overflowed on the big one at the start of training (an internal error)
    code, err = _run(["validate", TINY, "--set", f"train.seed={value}"], capsys)
    assert code == 2
    assert f"validate error: {TINY}:1:1: train.seed: {message} (got {value})" in err, err


@pytest.mark.parametrize("value,message", SEEDS, ids=["above-2**63", "negative"])
def test_study_seeds_have_the_command_lines_range(value, message, tmp_path, capsys):
    study = tmp_path / "study.yaml"
    study.write_text(f"study: s\nbase: {TINY}\nvariants:\n  - name: a\nseeds: [{value}]\n")
    code, err = _run(["ablate", study, "--out", tmp_path / "out", "--no-progress"], capsys)
    assert code == 2
    assert f"study error: {study}:5:9: seeds.0: {message}" in err, err
    assert not (tmp_path / "out").exists()


def test_a_variants_bad_replace_path_is_located_in_the_study_file(tmp_path, capsys):
    study = tmp_path / "study.yaml"
    study.write_text(f"study: s\nbase: {TINY}\nvariants:\n  - name: a\n"
                     "    replace:\n      blocks.block.nodes.nothere: {use: norm.rms, in: x}\n")
    code, err = _run(["ablate", study, "--out", tmp_path / "out", "--no-progress"], capsys)
    assert code == 2
    assert err.splitlines()[0] == (f"study error: {study}: variant 'a': cannot replace blocks.block.nodes.nothere: "
                                   "blocks.block.nodes has no key 'nothere'"), err
