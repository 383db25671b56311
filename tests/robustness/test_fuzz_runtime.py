"""A fuzzer for what reaches the runtime: checkpoint folders, data files and CLI option values.

Each case is drawn from a seeded ``random.Random`` (the case number is the seed), so a failure
names the case that reproduces it. A case passes when the code under test either works or
raises a ``PhysLMError`` (the CLI: exits 0, 1 or 2 with no traceback and no "internal error").

- **checkpoints:** one JSON file of a real checkpoint (trainer state, config, optimizer,
  manifest, the tokenizer's files) mutated in shape and type (a key deleted or renamed, a value
  of another type, the top level replaced, a deep nest), the manifest rewritten to match so the
  damage gets past the checksums; then everything that reads a checkpoint: the resume check,
  loading, and what a resume restores (RNGs, batcher, optimizer, schedule).
- **data:** files of every kind a user may pass: bad encodings, binary, empty, device files,
  FIFOs, links to them, folders of them, a file above the size bound.
- **CLI:** one option of a working command line given a bad value (numbers out of range or of
  the wrong type, paths that are devices, folders or missing, hostile ``--set`` text).

300 cases by default; 2,000 under ``-m slow``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import shutil
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from physlm_graph import PhysLMError
from physlm_graph.cli import main
from physlm_graph.runtime import checkpoint as ckpt_mod
from physlm_graph.runtime import data as data_mod
from physlm_graph.runtime import evaluate as eval_mod

pytestmark = pytest.mark.usefixtures("one_thread")

_REAL_LOAD = ckpt_mod.load_checkpoint  # the checkpoint cases load damaged folders for real
WRONG = [None, True, False, 0, -1, 1.5, -1e300, 2**70, "", "x", "NaN", [], [1, "a"], {}, {"a": None}]


# ------------------------------------------------------------------ checkpoints


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(value, list) and value:
        for i in sorted({0, len(value) - 1}):
            out += _paths(value[i], prefix + (i,))
    return out


def _get(value: Any, path: tuple) -> Any:
    for p in path:
        value = value[p]
    return value


def _mutate_json(rng: random.Random, data: Any) -> Any:
    op = rng.choice(["top", "set", "set", "set", "delete", "rename", "deep", "shrink"])
    if op == "top" or not isinstance(data, (dict, list)):
        return rng.choice(WRONG + [[data], "[" * 10])
    path = rng.choice(_paths(data)[1:] or [()])
    if not path:
        return rng.choice(WRONG)
    parent, key = _get(data, path[:-1]), path[-1]
    if op == "set":
        parent[key] = rng.choice(WRONG)
    elif op == "deep":
        parent[key] = f"__DEEP_{rng.choice([70, 1000, 100_000])}__"  # json.dumps cannot write it: see _dump
    elif op == "shrink" and isinstance(parent[key], (list, str)):
        parent[key] = parent[key][: rng.randrange(len(parent[key]) + 1)]
    elif isinstance(parent, dict) and op in ("delete", "rename"):
        value = parent.pop(key)
        if op == "rename":
            parent[str(key) + "_"] = value
    else:
        parent[key] = rng.choice(WRONG)
    return data


def _dump(data: Any) -> str:
    text = json.dumps(data)
    for depth in (70, 1000, 100_000):
        text = text.replace(f'"__DEEP_{depth}__"', "[" * depth + "1" + "]" * depth)
    return text


def _restore_like_a_resume(folder: Path) -> None:
    """What ``Trainer.restore`` does with a checked checkpoint, without a trainer: the RNGs (on
    this process's generators, put back after), the batcher, the optimizer, the schedule."""
    from physlm_graph.runtime._schedule_checks import resume_horizon
    from physlm_graph.runtime.data import RandomWindows
    from physlm_graph.runtime.optim import make_optimizer, node_components
    from physlm_graph.runtime.train import rng_state, set_rng_state

    ck = _REAL_LOAD(folder)
    state = ck.trainer_state
    cpu = torch.device("cpu")
    saved = rng_state(cpu)
    try:
        set_rng_state(state["rng"], cpu)
    finally:
        set_rng_state(saved, cpu)
    b = state["batcher"]
    tokens = np.zeros(max(int(b["n_tokens"]), 1), dtype=np.uint16)
    if len(tokens) <= 10_000_000 and b["seq_len"] < len(tokens):
        windows = RandomWindows(tokens, batch_size=b["batch_size"], seq_len=b["seq_len"], seed=0)
        windows.load_state_dict(b)
    opt = make_optimizer(ck.model.module, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.99), owners=node_components(ck.model))
    ckpt_mod.restore_optimizer(opt, folder)
    resume_horizon(state, steps=state["step"] + 1, schedule="cosine")


def _checkpoint_case(rng: random.Random, base: Path, tmp: Path) -> str:
    folder = tmp / "ck"
    shutil.copytree(base, folder)
    # the JSON files the runtime reads (tokenizer.json and tokenizer_config.json at the top are
    # copies for Hugging Face's loaders)
    target = folder / rng.choice(["trainer_state.json", "config.json", "optimizer.json", "manifest.json",
                                  "tokenizer/physlm_tokenizer.json", "tokenizer/tokenizer.json"])
    data = _mutate_json(rng, json.loads(target.read_text(encoding="utf-8")))
    target.write_text(_dump(data), encoding="utf-8")
    if target.name != "manifest.json":  # the damage gets past the checksums
        ckpt_mod.write_manifest(folder)
    what = f"{target.relative_to(folder)}"
    try:
        ckpt_mod.check_checkpoint(folder, resume=True)
    except PhysLMError:
        return what + ": refused by the check"
    try:
        _restore_like_a_resume(folder)
    except PhysLMError:
        return what + ": refused on load"
    return what + ": accepted"


# ------------------------------------------------------------------ data files


def _data_case(rng: random.Random, tmp: Path) -> str:
    kind = rng.choice(["bytes", "utf16", "utf16-nobom", "cp949", "latin1", "nul", "empty", "space", "ok", "bom",
                       "surrogate", "device", "fifo", "link-device", "dangling", "folder-devices", "folder-empty",
                       "big", "long-line", "missing", "hf-device"])
    p = tmp / f"data-{kind}.txt"
    text = "It was the best of times, it was the worst of times.\n"
    if kind == "bytes":
        p.write_bytes(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 4096))))
    elif kind == "utf16":
        p.write_bytes(text.encode("utf-16"))
    elif kind == "utf16-nobom":
        p.write_bytes(text.encode("utf-16-le"))
    elif kind == "cp949":
        p.write_bytes("한국어 문장입니다.\n".encode("cp949") * 10)
    elif kind == "latin1":
        p.write_bytes("café déjà vu\n".encode("latin-1") * 10)
    elif kind == "nul":
        p.write_bytes(text.encode() + b"\x00" + text.encode())
    elif kind == "empty":
        p.write_bytes(b"")
    elif kind == "space":
        p.write_bytes(b" \n\t\n" * rng.randrange(1, 50))
    elif kind == "ok":
        p.write_text(text * rng.randrange(1, 20), encoding="utf-8")
    elif kind == "bom":
        p.write_bytes(b"\xef\xbb\xbf" + text.encode())
    elif kind == "surrogate":
        p.write_bytes(text.encode() + b"\xed\xa0\x80" + text.encode())
    elif kind == "device":
        p = Path(rng.choice(["/dev/zero", "/dev/null", "/dev/urandom"]))
    elif kind == "fifo":
        os.mkfifo(p)
    elif kind == "link-device":
        p.symlink_to("/dev/zero")
    elif kind == "dangling":
        p.symlink_to(tmp / "nowhere")
    elif kind == "folder-devices":
        p = tmp / "corpus"
        p.mkdir()
        (p / "a.txt").symlink_to("/dev/zero")
        (p / "b.txt").write_text(text, encoding="utf-8")
        os.mkfifo(p / "c.txt")
    elif kind == "folder-empty":
        p = tmp / "nothing"
        p.mkdir()
    elif kind == "big":
        with open(p, "wb") as f:
            f.truncate(data_mod.MAX_TEXT_BYTES + 1)  # sparse: no disk used
    elif kind == "long-line":
        p.write_text("x" * 200_000, encoding="utf-8")
    elif kind == "missing":
        p = tmp / "missing.txt"
    elif kind == "hf-device":
        p = Path("hf:/dev/zero")
    try:
        data_mod.load_text(str(p))
    except PhysLMError:
        return kind + ": refused"
    return kind + ": read"


# ------------------------------------------------------------------ CLI option values

BAD_NUMBERS = ["0", "-1", "-5", "1.5", "abc", "", "nan", "inf", "-inf", "1e999", "99999999999999999999", "0x10", " 3"]
BAD_PATHS = ["/dev/zero", "/dev/null", "", ".", "/nonexistent/x", "hf:", "hf:/dev/zero", "~nobody/x"]
BAD_SET = ["a", "=", "params.vocab=-1", "params.dim=${", "params.dim=${1/0}", "nodes.x.use=nope", "params=1",
           "params.layers=1e9", "a.b.c.d.e.f=1", "params.dim=[[[[[[1]]]]]]"]


def _cli_argv(rng: random.Random, run: Path, text: Path, tmp: Path) -> list[str]:
    tiny = str(Path(__file__).parents[1] / "assets" / "blueprints" / "valid" / "tiny.yaml")
    command = rng.choice(["generate", "generate", "eval", "eval", "build", "validate", "plot", "train", "diff",
                          "components"])
    if command == "generate":
        argv = ["generate", str(run), "--prompt", "It was", "--max-new-tokens", "2", "--json"]
        opts = {"--max-new-tokens": BAD_NUMBERS, "--temperature": BAD_NUMBERS, "--top-k": BAD_NUMBERS,
                "--top-p": BAD_NUMBERS + ["1.0001"], "--repetition-penalty": BAD_NUMBERS, "--seed": BAD_NUMBERS,
                "--device": ["tpu", "cuda:9", "meta", ""], "--exit-threshold": BAD_NUMBERS + ["0.5"],
                "--speculate": BAD_NUMBERS + ["2"], "--exit-rule": ["top1", "bogus"], "--exit-kv": ["lazy", "x"],
                "--draft-exit": ["7", "nope"],
                "--prompt": ["", "\x00", "\udcff", "é" * 3000, "<|endoftext|>"], "checkpoint": BAD_PATHS}
    elif command == "eval":
        argv = ["eval", str(run), "--data", str(text), "--seq-len", "8", "--batch-size", "64", "--json"]
        opts = {"--seq-len": BAD_NUMBERS + ["17", "100000"], "--stride": BAD_NUMBERS + ["9", "1"],
                "--batch-size": BAD_NUMBERS, "--device": ["tpu", "cuda", ""], "--data": BAD_PATHS + [str(run)],
                "--exit-threshold": BAD_NUMBERS, "--exit-rule": ["entropy", "x"], "checkpoint": BAD_PATHS}
    elif command in ("build", "validate"):
        argv = [command, tiny]
        opts = {"--set": BAD_SET, "--stage": BAD_NUMBERS + ["3"], "blueprint": BAD_PATHS}
        if command == "validate":
            opts.pop("--stage")
    elif command == "plot":
        argv = ["plot", str(run), "-o", str(tmp / "c.png")]
        opts = {"-o": ["c.txt", str(tmp), "", "x.pdf.txt"], "runs": BAD_PATHS}
    elif command == "train":
        argv = ["train", tiny, "--data", str(text), "--out", str(tmp / "new"), "--steps", "1", "--no-progress",
                "--device", "cpu", "--batch-size", "1", "--set", "train.fit_vocab=true"]
        opts = {"--steps": BAD_NUMBERS, "--batch-size": BAD_NUMBERS, "--lr": BAD_NUMBERS, "--seed": BAD_NUMBERS,
                "--gpus": BAD_NUMBERS, "--device": ["tpu", "cuda", ""], "--data": BAD_PATHS,
                "--tokenizer": ["bpe:0", "bpe:-3", "bpe:x", "nope", "/dev/zero", ""], "--set": BAD_SET,
                "--strategy": ["zero"], "--compile-mode": ["fast"], "--init-from": BAD_PATHS + [str(run)]}
    elif command == "diff":
        argv = ["diff", tiny, tiny]
        opts = {"--set": BAD_SET, "a": BAD_PATHS}
    else:
        argv = ["components"]
        opts = {"name": ["", "nope", "attention", "a" * 500]}
    option = rng.choice(sorted(opts))
    value = rng.choice(opts[option])
    if option in ("checkpoint", "blueprint", "runs", "a", "name"):
        i = 1
        if command == "components":
            argv.append(value)
        else:
            argv[i] = value
    elif option in argv:
        argv[argv.index(option) + 1] = value
    else:
        argv += [option, value]
    return argv


def _cli_case(rng: random.Random, run: Path, text: Path, tmp: Path) -> str:
    argv = _cli_argv(rng, run, text, tmp)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse
            code = exc.code
    text_err = err.getvalue()
    if code not in (0, 1, 2) or "internal error" in text_err or "Traceback" in text_err:
        raise AssertionError(f"exit {code} for {argv}:\n{text_err[-2000:]}")
    return f"{argv[0]}: exit {code}"


# ------------------------------------------------------------------ the runs


@pytest.fixture(scope="module")
def cached_checkpoint(tiny_run):
    """The intact checkpoint loads once for the CLI cases (loading damaged ones is the
    checkpoint cases' work); any other path loads for real."""
    real = ckpt_mod.load_checkpoint
    intact = {str(tiny_run): real(tiny_run)}

    def load(path, **kw):
        key = str(path)
        return intact[key] if key in intact else real(path, **kw)

    return load


def _run_cases(cases: range, tiny_run: Path, tmp_path: Path, monkeypatch, cached_checkpoint) -> None:
    import physlm_graph._compile as compile_mod

    real_compile, compiled = compile_mod.compile_blueprint, {}

    def compile_once(path, **kw):  # a checkpoint's blueprint.yaml is never mutated here: compile it once per stage
        if not isinstance(path, str) or not path.endswith("/blueprint.yaml") or not Path(path).is_file():
            return real_compile(path, **kw)
        key = (Path(path).read_text(encoding="utf-8"), repr(sorted(kw.items())))
        if key not in compiled:
            compiled[key] = real_compile(path, **kw)
        return compiled[key]

    monkeypatch.setattr(compile_mod, "compile_blueprint", compile_once)
    monkeypatch.setattr(ckpt_mod, "load_checkpoint", cached_checkpoint)
    monkeypatch.setattr(eval_mod, "load_checkpoint", cached_checkpoint)
    monkeypatch.setattr(data_mod, "MAX_TEXT_BYTES", 1 << 20)  # the "big" case writes a sparse file above it
    monkeypatch.chdir(tmp_path)
    base = tiny_run / "last"
    text = tiny_run / "text.txt"
    failures, seen, seconds = [], {}, {"checkpoint": 0.0, "data": 0.0, "cli": 0.0}
    for case in cases:
        rng = random.Random(case)
        tmp = tmp_path / f"case{case}"
        tmp.mkdir()
        family = ("checkpoint", "data", "cli")[case % 3]
        t0 = time.perf_counter()
        try:
            if family == "checkpoint":
                what = _checkpoint_case(rng, base, tmp)
            elif family == "data":
                what = _data_case(rng, tmp)
            else:
                what = _cli_case(rng, tiny_run, text, tmp)
            seen[what] = seen.get(what, 0) + 1
        except Exception:  # anything but a PhysLMError (or a clean CLI exit) is a finding
            failures.append(f"case {case} ({family}): {traceback.format_exc(limit=4)}")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            seconds[family] += time.perf_counter() - t0
            if os.environ.get("FUZZ_VERBOSE"):
                print(f"case {case} {family} {time.perf_counter() - t0:.2f}s {what if 'what' in dir() else ''}")
    n = len(cases)
    assert not failures, f"{len(failures)} of {n} cases failed:\n" + "\n".join(failures[:8])
    assert len(seen) > 20, seen  # the cases reach many kinds of input and outcomes
    print(f"{n} cases ({', '.join(f'{k} {v:.0f} s' for k, v in seconds.items())}), outcomes: "
          + ", ".join(f"{k} x{v}" for k, v in sorted(seen.items())))


def test_fuzz_runtime_300(tiny_run, tmp_path, monkeypatch, cached_checkpoint):
    _run_cases(range(300), tiny_run, tmp_path, monkeypatch, cached_checkpoint)


@pytest.mark.slow
@pytest.mark.parametrize("chunk", range(8))
def test_fuzz_runtime_2000(tiny_run, tmp_path, monkeypatch, cached_checkpoint, chunk):
    """Cases 1,000 to 2,999 (the default test runs 0 to 299), in 8 chunks of 250."""
    start = 1000 + 250 * chunk
    _run_cases(range(start, start + 250), tiny_run, tmp_path, monkeypatch, cached_checkpoint)
