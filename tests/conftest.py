"""Fixtures shared by the test folders."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_thread():
    """Run the test with one torch CPU thread (small models: threads only add noise and overhead),
    restoring the count afterwards. Files that need it declare
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def rerun_under_triton_interpreter():
    """``run(path)``: run the test file at ``path`` again in a fresh pytest process with
    ``TRITON_INTERPRET=1`` and assert that it passes. For the Triton kernel test files when triton
    was already imported in this process with compiled (not interpreted) kernels."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def run(path: str) -> None:
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.abspath(path)],
                           env=env, cwd=root, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]

    return run
