"""Training under faults: bad data files, NaN and infinite losses, damaged resume state, SIGKILL.

- A missing, empty, binary or wrongly encoded data file: ``physlm-graph train --data BAD``
  exits 2 with a message naming the file (no traceback).
- A non-finite loss stops the run naming the step (``nan_policy: stop``) or skips the batch
  (``nan_policy: skip``); the last good checkpoint is kept either way.
- SIGKILL at random moments (slow): resuming always works, loses at most the steps since the
  last checkpoint, and ends bit-identical to a run that was never interrupted.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from physlm_graph import TrainingError
from physlm_graph.cli import main
from physlm_graph.runtime.checkpoint import load_checkpoint
from physlm_graph.runtime.train import Trainer, train

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "tests" / "assets" / "blueprints" / "valid" / "tiny.yaml"
FAST = dict(device="cpu", batch_size=2, eval_every=1000, eval_iters=1, warmup=0, log_every=1, progress=False,
            fit_vocab=True)  # tiny.yaml's vocab 50 -> the bytes tokenizer's 256


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def text(tmp_path) -> Path:
    path = tmp_path / "text.txt"
    path.write_text("It was the best of times, it was the worst of times.\n" * 40, encoding="utf-8")
    return path


# ------------------------------------------------------------------ bad data through the CLI


def _bad_data(tmp_path: Path, kind: str) -> tuple[Path, str]:
    p = tmp_path / f"{kind}.txt"
    if kind == "missing":
        return p, "no such file or folder"
    if kind == "empty":
        p.write_bytes(b"")
        return p, "the file is empty (0 bytes)"
    if kind == "whitespace":
        p.write_bytes(b"  \n\n\t \n")
        return p, "the file holds only whitespace"
    if kind == "nul":
        p.write_bytes(b"abc\x00def" * 10)
        return p, "the file looks binary (a NUL byte at offset 3); expected UTF-8 text"
    if kind == "random":
        p.write_bytes(bytes(random.Random(0).randrange(128, 256) for _ in range(4096)))
        return p, "the file looks binary (most of it is not UTF-8); expected UTF-8 text"
    if kind == "utf16":
        p.write_bytes("hello world\n".encode("utf-16"))
        return p, "the file is UTF-16 (it starts with a UTF-16 byte-order mark); expected UTF-8"
    if kind == "latin1":
        p.write_bytes("caf\u00e9 au lait\n".encode("latin-1") * 5)
        return p, "invalid UTF-8: byte 0xe9 at offset 3 (line 1, byte 4 of the line)"
    if kind == "empty_folder":
        p = tmp_path / "folder"
        p.mkdir()
        (p / "image.png").write_bytes(b"\x89PNG")
        return p, "the folder holds no *.txt/*.md/*.raw files"
    if kind == "bad_jsonl":
        p = tmp_path / "data.jsonl"
        p.write_bytes(b"{not json\n")
        return p, "Hugging Face datasets could not read it as json"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["missing", "empty", "whitespace", "nul", "random", "utf16", "latin1",
                                  "empty_folder", "bad_jsonl"])
def test_bad_data_file_exits_2_naming_the_file(tmp_path, capsys, kind):
    path, message = _bad_data(tmp_path, kind)
    code = main(["train", str(TINY), "--data", str(path), "--out", str(tmp_path / "run"), "--steps", "1",
                 "--no-progress", "--device", "cpu"])
    out = capsys.readouterr()
    assert code == 2, out.err
    assert "Traceback" not in out.err + out.out and "internal error" not in out.err
    # the error is the last thing printed (datasets may log its own lines before it)
    error = out.err[out.err.index("data error: "):]
    assert error.startswith(f"data error: {path}"), out.err
    assert message in error
    assert "fix: " in out.err
    assert not (tmp_path / "run" / "last").exists()


def test_too_little_data_names_the_file(tmp_path, capsys):
    path = tmp_path / "short.txt"
    path.write_text("ab", encoding="utf-8")
    code = main(["train", str(TINY), "--data", str(path), "--out", str(tmp_path / "run"), "--steps", "1",
                 "--no-progress", "--device", "cpu", "--set", "train.fit_vocab=true"])
    err = capsys.readouterr().err
    assert code == 2
    assert str(path) in err, err


# ------------------------------------------------------------------ non-finite losses


@pytest.fixture(params=["synchronous", "deferred"])
def step_mode(request, monkeypatch):
    """Both ways a step meets a non-finite loss: checked on the host every step (CPU's AdamW), or
    skipped on the device by the fused AdamW and reported at the next log/save step (the CUDA
    path, run here on CPU with the fused AdamW)."""
    if request.param == "deferred":
        _use_fused_adamw(monkeypatch)
    return request.param


def _use_fused_adamw(monkeypatch) -> None:
    from physlm_graph.runtime import optim as optim_mod
    from physlm_graph.runtime import train as train_mod

    def fused(*args, **kw):
        opt = optim_mod.make_optimizer(*args, **kw)
        groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in opt.param_groups]
        return torch.optim.AdamW(groups, lr=opt.defaults["lr"], betas=opt.defaults["betas"], fused=True)

    monkeypatch.setattr(train_mod, "make_optimizer", fused)


class _Poisoned(Trainer):
    """Multiplies the loss of the steps in ``bad`` (0-based) by ``factor`` (nan or inf)."""

    bad: set[int] = set()
    factor = float("nan")

    def compute_loss(self, out, y):
        total, parts = super().compute_loss(out, y)
        if self.step in self.bad:
            total = total * self.factor
        return total, parts


def _poisoned(tmp_path: Path, text: Path, bad: set[int], factor: float, **kw) -> _Poisoned:
    cls = type("P", (_Poisoned,), {"bad": bad, "factor": factor})
    return cls(TINY, data=str(text), out_dir=tmp_path / "run", **{"steps": 6, "save_every": 2, **FAST, **kw})


def _finite_weights(folder: Path) -> bool:
    return all(torch.isfinite(t).all() for t in load_file(str(folder / "model.safetensors")).values())


@pytest.mark.parametrize("factor, shown", [(float("nan"), "nan"), (float("inf"), "inf")])
def test_nonfinite_loss_stops_naming_the_step(tmp_path, text, factor, shown, step_mode):
    with pytest.raises(TrainingError) as err:
        t = _poisoned(tmp_path, text, {3}, factor, nan_policy="stop")
        t.fit()
    assert t.deferred() == (step_mode == "deferred")
    last = tmp_path / "run" / "last"
    assert str(err.value) == (
        f"train error: the loss is {shown} at step 4; the last good checkpoint is kept in {last}\n"
        "  fix: lower lr, raise warmup, or set train.nan_policy: skip to skip such batches")
    ck = load_checkpoint(last)
    assert ck.trainer_state["step"] == 2
    assert _finite_weights(last)


def test_nonfinite_loss_is_skipped_with_nan_policy_skip(tmp_path, text, step_mode):
    result = _poisoned(tmp_path, text, {3}, float("nan"), nan_policy="skip").fit()
    assert result["steps"] == 6 and result["skipped"] == 1
    assert math.isfinite(result["final_loss"])
    last = tmp_path / "run" / "last"
    state = json.loads((last / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["skipped"] == 1
    assert _finite_weights(last)
    losses = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("skipped", False) for r in losses] == [False, False, False, True, False, False]


def test_too_many_skips_stop_and_keep_the_last_good_checkpoint(tmp_path, text, step_mode):
    with pytest.raises(TrainingError) as err:
        _poisoned(tmp_path, text, {2, 3, 4, 5}, float("nan"), nan_policy="skip", max_skips=1).fit()
    last = tmp_path / "run" / "last"
    assert str(err.value).startswith(
        f"train error: the loss is nan at step 4: 2 batches skipped, more than max_skips 1; "
        f"the last good checkpoint is kept in {last}")
    assert load_checkpoint(last).trainer_state["step"] == 2
    assert _finite_weights(last)


def test_deferred_steps_report_at_the_next_log_step(tmp_path, text, step_mode):
    """With log_every 4, a deferred run learns of the bad step 3 at step 4, and still names step 3;
    the synchronous run stops at step 3 itself. Either way the checkpoint of step 2 is kept."""
    with pytest.raises(TrainingError, match="the loss is nan at step 3; the last good checkpoint"):
        _poisoned(tmp_path, text, {2}, float("nan"), nan_policy="stop", log_every=4).fit()
    assert load_checkpoint(tmp_path / "run" / "last").trainer_state["step"] == 2


def test_a_skipped_deferred_step_leaves_the_weights_as_a_synchronous_skip(tmp_path, text, monkeypatch):
    """The fused AdamW's found_inf skip (weights, moments and step count untouched) against the
    host-side skip with the same fused AdamW: the same weights, bit for bit."""
    _use_fused_adamw(monkeypatch)
    weights = {}
    for mode in ("synchronous", "deferred"):
        t = _poisoned(tmp_path / mode, text, {1, 3}, float("nan"), nan_policy="skip", log_every=3, save_every=3)
        if mode == "synchronous":
            t.deferred = lambda: False
        result = t.fit()
        assert result["skipped"] == 2
        weights[mode] = {k: v.detach().clone() for k, v in t.model.state_dict().items()}
    for k, v in weights["synchronous"].items():
        assert torch.equal(weights["deferred"][k], v), k


class _Interrupted(_Poisoned):
    """Raises KeyboardInterrupt in the step after ``stop_at`` (0-based), as Ctrl-C would."""

    stop_at = 4

    def train_step(self, step):
        if step == self.stop_at + 1:
            raise KeyboardInterrupt
        return super().train_step(step)


@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_an_interrupt_reports_the_unreported_steps_before_saving(tmp_path, text, step_mode, policy):
    """Ctrl-C between log steps: a deferred run first acts on the non-finite steps it has not
    reported (skip: counted in the saved state; stop: the error, and the checkpoint of step 4 stays).
    Step 5 is bad, Ctrl-C comes before step 6, and nothing is reported between steps 4 and 8."""
    cls = type("I", (_Interrupted,), {"bad": {4}, "factor": float("nan")})
    t = cls(TINY, data=str(text), out_dir=tmp_path / "run", **{**FAST, "steps": 8, "save_every": 4, "log_every": 8,
                                                                "nan_policy": policy})
    if policy == "skip":
        with pytest.raises(KeyboardInterrupt):
            t.fit()
        state = json.loads((tmp_path / "run" / "last" / "trainer_state.json").read_text())
        assert state["step"] == 5 and state["skipped"] == 1
    else:
        with pytest.raises(TrainingError, match="the loss is nan at step 5"):
            t.fit()
        assert load_checkpoint(tmp_path / "run" / "last").trainer_state["step"] == 4


# ------------------------------------------------------------------ damaged resume state


def _damage(last: Path, kind: str) -> tuple[Path, str]:
    if kind == "state":
        p = last / "trainer_state.json"
        p.write_text("{not json", encoding="utf-8")
        return p, "file is truncated or grown"
    p = last / "model.safetensors"
    p.write_bytes(p.read_bytes()[:100])
    return p, "file is truncated or grown"


@pytest.mark.parametrize("kind", ["state", "weights"])
def test_resume_from_damaged_last_falls_back_to_best(tmp_path, text, capsys, kind):
    args = ["train", str(TINY), "--data", str(text), "--out", str(tmp_path / "run"), "--no-progress",
            "--device", "cpu", "--batch-size", "2", "--set", "train.fit_vocab=true"]
    assert main(args + ["--steps", "2"]) == 0
    last, best = tmp_path / "run" / "last", tmp_path / "run" / "best"
    bad, why = _damage(last, kind)
    code = main(args + ["--steps", "4", "--resume"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert err.startswith(f"warning: the checkpoint {last} is damaged, using {best} instead:\n"
                          f"  checkpoint error: {bad}: {why}"), err
    assert json.loads((last / "trainer_state.json").read_text())["step"] == 4


@pytest.mark.parametrize("kind", ["state", "weights"])
def test_resume_from_damaged_last_without_best_is_a_clear_error(tmp_path, text, capsys, kind):
    args = ["train", str(TINY), "--data", str(text), "--out", str(tmp_path / "run"), "--no-progress",
            "--device", "cpu", "--batch-size", "2", "--set", "train.fit_vocab=true"]
    assert main(args + ["--steps", "2"]) == 0
    import shutil

    shutil.rmtree(tmp_path / "run" / "best")
    bad, why = _damage(tmp_path / "run" / "last", kind)
    code = main(args + ["--steps", "4", "--resume"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith(f"checkpoint error: {bad}: {why}"), err


# ------------------------------------------------------------------ SIGKILL (slow)

KILL_STEPS = 40


def _child(out: str, data: str, resume: bool) -> None:
    torch.set_num_threads(1)
    train(TINY, data=data, out_dir=out, steps=KILL_STEPS, save_every=1, resume=resume, **FAST)


def _checkpoint_step(out: Path) -> int | None:
    try:
        return load_checkpoint(out).trainer_state["step"]
    except Exception:
        return None


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume(tmp_path, text):
    """25 runs killed at random moments (save_every 1, so many kills land inside a checkpoint
    write); each resumes, loses at most the step in flight, and ends bit-identical to a run
    that was never killed."""
    straight = tmp_path / "straight"
    train(TINY, data=str(text), out_dir=straight, steps=KILL_STEPS, save_every=1, **FAST)
    want = load_file(str(straight / "last" / "model.safetensors"))
    ctx = multiprocessing.get_context("fork")
    rnd = random.Random(20240601)
    trials = 25
    lost = []
    killed = 0
    for trial in range(trials):
        out = tmp_path / f"run{trial}"
        proc = ctx.Process(target=_child, args=(str(out), str(text), False))
        proc.start()
        deadline = time.monotonic() + 120
        while not (out / "last").exists() and proc.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rnd.uniform(0.0, 0.6))
        if proc.is_alive():
            os.kill(proc.pid, signal.SIGKILL)
            killed += 1
        proc.join()
        logged = [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines() if l.endswith("}")]
        step = _checkpoint_step(out)  # the crash-tolerant lookup: last/, or the folder a save left aside
        assert step is not None, f"trial {trial}: no loadable checkpoint after the kill"
        assert step >= max(logged, default=0) - 1, f"trial {trial}: lost more than the step in flight"
        lost.append(max(logged, default=0) - step)
        train(TINY, data=str(text), out_dir=out, steps=KILL_STEPS, save_every=1, resume=True, **FAST)
        got = load_file(str(out / "last" / "model.safetensors"))
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want), f"trial {trial}: resume diverged"
        assert not [p for p in out.iterdir() if p.name.startswith(".")], f"trial {trial}: leftovers"
    print(f"\n{trials} trials, {killed} killed mid-run; steps lost per trial: {lost}")
    assert killed >= 20, "most runs ended before the kill: raise KILL_STEPS"


def test_clipping_inside_the_fused_adamw_matches_clip_grad_norm(tmp_path, text, monkeypatch):
    """The fused AdamW's grad_scale carries the clipping (no in-place pass over the gradients):
    the same weights as clip_grad_norm_ followed by the step, to fp32 rounding, with a clip small
    enough that every step clips; and grad_scale does not outlive its step."""
    _use_fused_adamw(monkeypatch)
    weights, norms = {}, {}
    for mode in ("clip_grad_norm_", "grad_scale"):
        t = Trainer(TINY, data=str(text), out_dir=tmp_path / mode, **{"steps": 6, **FAST, "grad_clip": 0.05,
                                                                      "log_every": 1})
        if mode == "clip_grad_norm_":
            t.clip_gradients = lambda t=t: torch.nn.utils.clip_grad_norm_(t.model.parameters(), t.cfg.grad_clip)
        t.fit()
        assert getattr(t.optimizer, "grad_scale", None) is None
        weights[mode] = {k: v.detach().clone() for k, v in t.model.state_dict().items()}
        norms[mode] = [json.loads(line).get("grad_norm") for line in
                       (tmp_path / mode / "metrics.jsonl").read_text().splitlines()]
    assert all(n is not None and n > 0.05 for n in norms["grad_scale"][:2]), norms  # it did clip
    assert norms["grad_scale"] == pytest.approx(norms["clip_grad_norm_"], rel=1e-5)
    for k, v in weights["clip_grad_norm_"].items():
        torch.testing.assert_close(weights["grad_scale"][k], v, rtol=1e-5, atol=1e-6, msg=k)
