"""A tiny trained run (both checkpoints and its text), shared by the runtime robustness tests."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "tests" / "assets" / "blueprints" / "valid" / "tiny.yaml"


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """``run/`` with ``last/`` and ``best/`` after 3 steps of tiny.yaml on a small text (``run/text.txt``)."""
    import torch

    from physlm_graph.runtime.train import train

    root = tmp_path_factory.mktemp("tiny-run")
    text = root / "text.txt"
    text.write_text("It was the best of times, it was the worst of times.\n" * 60, encoding="utf-8")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(TINY, data=str(text), out_dir=root / "run", device="cpu", steps=3, batch_size=2, eval_every=3,
              eval_iters=1, warmup=0, log_every=1, progress=False, fit_vocab=True)  # vocab 50 -> the bytes' 256
    finally:
        torch.set_num_threads(threads)
    (root / "run" / "text.txt").write_bytes(text.read_bytes())
    return root / "run"
