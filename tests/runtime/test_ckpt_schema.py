"""Checkpoint JSON shapes found by the runtime fuzzer (tests/robustness/test_fuzz_runtime.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from physlm_graph import CheckpointError
from physlm_graph.runtime._ckpt_schema import validate_json


def _numpy_state() -> dict:
    s = np.random.RandomState(0).get_state()
    return {"kind": s[0], "keys": s[1].tolist(), "pos": int(s[2]), "has_gauss": int(s[3]), "gauss": float(s[4])}


def test_a_shortened_numpy_state_is_refused_not_an_index_error():
    """Fuzz case 2283: numpy raises IndexError (not ValueError) for keys shorter than 624."""
    rng = {"torch_cpu": __import__("torch").get_rng_state().tolist(), "numpy": _numpy_state()}
    rng["numpy"]["keys"] = rng["numpy"]["keys"][:114]
    with pytest.raises(CheckpointError) as err:
        validate_json(Path("ck/trainer_state.json"), {"rng": rng})
    assert "rng.numpy" in str(err.value) and "not a state numpy's generator accepts" in str(err.value)
    rng["numpy"] = _numpy_state()  # the intact state passes
    validate_json(Path("ck/trainer_state.json"), {"rng": rng})
