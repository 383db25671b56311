"""Several processes through torchrun (gloo on CPU here; NCCL on GPUs): data-parallel training
writes one checkpoint that loads in a single process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from physlm_graph.runtime.checkpoint import load_checkpoint

ROOT = Path(__file__).parents[2]
DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


@pytest.mark.skipif(not DATA.exists(), reason="needs ../shared/data")
def test_two_process_ddp_on_cpu_writes_one_loadable_checkpoint(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(DATA.read_text()[:20000])
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "physlm_graph", "train", str(ROOT / "blueprints/baby-gpt-cpu.yaml"),
           "--data", str(text), "--steps", "6", "--out", str(out), "--device", "cpu", "--no-progress", "--gpus", "2",
           "--set", "layers=1", "--set", "dim=32", "--set", "heads=2", "--set", "train.eval_every=3",
           "--set", "train.eval_iters=2", "--batch-size", "4"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 processes (ddp)" in proc.stdout
    assert proc.stdout.count("done:") == 1  # only rank 0 reports
    ck = load_checkpoint(out / "last")
    assert ck.trainer_state["step"] == 6
    assert ck.trainer_state["tokens_seen"] == 6 * 4 * 64 * 2  # both ranks' windows count
    logits = ck.model.module(torch.randint(0, ck.tokenizer.vocab_size, (1, 8)))["logits"]
    assert torch.isfinite(logits).all()
