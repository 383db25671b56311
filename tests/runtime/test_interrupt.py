"""Ctrl-C: a run interrupted by SIGINT saves a state that resumes bit-identically.

A child process trains a tiny model (dropout on, two micro-batches a step) and sends itself
SIGINT right after drawing a given micro-batch, so the signal lands inside a step. The run
finishes that step, saves ``last`` and stops; resuming it ends with the same weights, trainer
state (tokens, RNGs, batcher, losses) and metrics as a run that was never interrupted.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from physlm_graph.runtime.train import train

ROOT = Path(__file__).resolve().parents[2]
BLUEPRINT = ROOT / "blueprints" / "baby-gpt.yaml"
TINY = {"params.layers": 1, "params.dim": 16, "params.heads": 2, "params.context": 16, "train.seq_len": 16,
        "params.dropout": 0.1}
RUN = dict(steps=10, batch_size=2, accumulate=2, eval_every=4, eval_iters=1, save_every=6, log_every=1, warmup=2,
           progress=False, device="cpu")

CHILD = """
import os, signal, sys
import torch
torch.set_num_threads(1)
from physlm_graph.runtime import train as train_mod

at = int(sys.argv[3])
setup = train_mod.Trainer.setup

def hooked_setup(self):
    setup(self)
    base = type(self.batches)

    class Hooked(base):
        def __next__(s):
            out = base.__next__(s)
            if s.step == at:  # the at-th micro-batch of the run has just been drawn: inside a step
                os.kill(os.getpid(), signal.SIGINT)
            return out

    self.batches.__class__ = Hooked

train_mod.Trainer.setup = hooked_setup
try:
    train_mod.train(sys.argv[1], out_dir=sys.argv[2], overrides=%(tiny)r, data=sys.argv[4], **%(run)r)
except KeyboardInterrupt:
    sys.exit(130)
sys.exit(0)
"""


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n"
                    "ROMEO:\nBut, soft! what light through yonder window breaks?\n" * 60, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def straight(tmp_path_factory, text_file) -> Path:
    out = tmp_path_factory.mktemp("straight") / "run"
    train(BLUEPRINT, out_dir=out, overrides=TINY, data=str(text_file), **RUN)
    return out


def _metrics(out: Path) -> list[dict]:
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]


def _state(out: Path) -> dict:
    state = json.loads((out / "last" / "trainer_state.json").read_text())
    state.pop("elapsed_s")
    # numpy's and Python's generators are seeded by each process and unused by training: only torch's is the run's
    state["rng"] = state["rng"]["torch_cpu"]
    return state


def _interrupt_and_resume(tmp_path: Path, text_file: Path, straight: Path, at: int) -> None:
    out = tmp_path / f"at{at}"
    script = CHILD % {"tiny": TINY, "run": RUN}
    proc = subprocess.run([sys.executable, "-c", script, str(BLUEPRINT), str(out), str(at), str(text_file)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 130, proc.stdout[-2000:] + proc.stderr[-3000:]
    step = (at + 1) // 2  # the step that drew micro-batch `at`: finished, then saved
    stopped = _state(out)
    assert stopped["step"] == step and stopped["tokens_seen"] == step * 2 * 2 * 16, stopped["tokens_seen"]
    assert f"interrupted after step {step}" in proc.stdout
    train(BLUEPRINT, out_dir=out, overrides=TINY, data=str(text_file), resume=True, **RUN)
    a = load_file(str(straight / "last" / "model.safetensors"))
    b = load_file(str(out / "last" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"interrupt at micro-batch {at}: weights"
    assert _state(out) == _state(straight)
    assert _metrics(out) == _metrics(straight)


def test_sigint_inside_a_step_resumes_bit_identically(tmp_path, text_file, straight):
    _interrupt_and_resume(tmp_path, text_file, straight, at=7)  # the first micro-batch of step 4 (an eval step)


@pytest.mark.slow
def test_sigint_at_five_random_steps_resumes_bit_identically(tmp_path, text_file, straight):
    for at in random.Random(23).sample(range(1, 2 * RUN["steps"]), 5):
        _interrupt_and_resume(tmp_path, text_file, straight, at)
