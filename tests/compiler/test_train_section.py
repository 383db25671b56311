"""The ``train:`` section is checked by the compiler with strict types: what pydantic's lax
mode would coerce (``"10"``, ``10.0``, ``"yes"``) is refused with its location."""

from __future__ import annotations

from pathlib import Path

import pytest

from physlm_graph import PhysLMError, compile_blueprint

TINY = Path(__file__).resolve().parents[1] / "assets" / "blueprints" / "valid" / "tiny.yaml"


def _train(**train) -> object:
    return compile_blueprint(TINY, overrides={"train": train}, device="meta", build=False).train_config


@pytest.mark.parametrize("key, value, message", [
    ("steps", "10", "train.steps: expected a whole number, not text (got '10')"),
    ("steps", 10.0, "train.steps: Input should be a valid integer (got 10.0)"),
    ("steps", True, "train.steps: expected a whole number, not a boolean (YAML reads yes, no, on, off, true and false "
                     "as booleans) (got True)"),
    ("compile", "yes", "train.compile: expected false or a mode: default, reduce-overhead, max-autotune, "
                        "max-autotune-no-cudagraphs (true means default) (got 'yes')"),
    ("compile", 1, "train.compile: expected false or a mode: default, reduce-overhead, max-autotune, "
                   "max-autotune-no-cudagraphs (true means default) (got 1)"),
    ("lr", "0.001", "train.lr: expected a number, not text (got '0.001')"),
    ("tokenizer", 5, "train.tokenizer: Input should be a valid string (got 5)"),
    ("checkpoint_format", "shard", "train.checkpoint_format: Input should be 'full' or 'sharded' (got 'shard')"),
])
def test_wrong_types_are_refused(key, value, message):
    with pytest.raises(PhysLMError) as err:
        _train(**{key: value})
    assert message in str(err.value)
    assert str(err.value).startswith("validate error: ")


def test_numbers_as_yaml_writes_them_are_kept():
    cfg = _train(lr="3e-4", min_lr=1, betas=[0.9, "9.5e-1"], steps=10, compile=True)
    assert (cfg.lr, cfg.min_lr, cfg.betas, cfg.steps, cfg.compile) == (3e-4, 1.0, (0.9, 0.95), 10, "default")


def test_an_unknown_key_gets_did_you_mean():
    with pytest.raises(PhysLMError) as err:
        _train(warmpu=5)
    assert "train.warmpu: unknown key 'warmpu'\n  fix: did you mean warmup?" in str(err.value)


def test_set_reaches_the_train_section_typed():
    with_train = TINY.parents[4] / "examples" / "growth" / "tiny-growth.yaml"
    cm = compile_blueprint(with_train, overrides=["train.steps=7", "train.lr=3e-4"], device="meta", build=False)
    assert (cm.train_config.steps, cm.train_config.lr) == (7, 3e-4)
