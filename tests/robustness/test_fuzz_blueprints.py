"""Fuzzing: every broken blueprint compiles or fails with a located ``PhysLMError``, never a crash.

The cases come from ``_mutate.cases()``: valid seeds with keys deleted, duplicated, renamed
and retyped, references pointed at the wrong nodes, huge numbers, deep nests, hostile
expressions, random bytes and truncation. Any exception that is not a ``PhysLMError``, or a
diagnostic without a location, fails the test (hypothesis then shrinks the case). A sample of
cases also goes through ``physlm-graph validate`` in-process: exit 0 or 2, never a traceback.
Small models that compile are sometimes built for real and run on a batch.

The default run checks 300 cases (derandomized: the same cases every run); the slow run 5000.
"""

from __future__ import annotations

import contextlib
import io
import itertools
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _mutate import cases, write_seeds
from physlm_graph import PhysLMError, compile_blueprint
from physlm_graph.cli import main

TINY_PATH = Path(__file__).resolve().parents[1] / "assets" / "blueprints" / "valid" / "tiny.yaml"
PWNED = Path("/tmp/physlm-fuzz-pwned")  # a `!!python/object/apply:os.system` case would create it


def _settings(n: int) -> settings:
    return settings(max_examples=n, deadline=None, derandomize=True, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture])


def _outcome(source: object) -> tuple[str, object]:
    """'ok' (and the model) or the error class's name; anything else propagates and fails."""
    try:
        cm = compile_blueprint(source, device="meta", build=False)
    except PhysLMError as err:
        assert err.diagnostics, f"{type(err).__name__} without diagnostics"
        for d in err.diagnostics:
            assert d.loc is not None, f"a diagnostic without a location: {d.render()}"
        assert "Traceback" not in str(err)
        return type(err).__name__, None
    return "ok", cm


def _run_cli(path: Path) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["validate", str(path)])
    return code, out.getvalue() + err.getvalue()


def _build_and_run(case: Path, cm: object) -> None:
    """Build a small model on the CPU and run it once: a model that checks must also work."""
    built = compile_blueprint(case, device="cpu")
    seq = min(8, cm.inferred.sample["seq"])  # type: ignore[attr-defined]
    with torch.no_grad():
        out = built.module(torch.zeros(1, seq, dtype=torch.long))
    assert torch.isfinite(out["logits"]).all()


class _Fuzzer:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        write_seeds(folder)
        self.counts: Counter[str] = Counter()
        self.cli_runs = 0
        self.builds = 0
        self.ticker = itertools.count()

    def check(self, case: tuple) -> None:
        seed, data, raw = case
        i = next(self.ticker)
        path = self.folder / "case.yaml"
        path.write_bytes(raw)
        as_dict = data is not None and "extends" not in data and i % 5 == 4
        outcome, cm = _outcome(data if as_dict else path)
        self.counts[outcome] += 1
        if i % 10 == 0:
            code, text = _run_cli(path)
            self.cli_runs += 1
            assert code in (0, 2), f"exit code {code}:\n{text}"
            assert "Traceback" not in text and "internal error" not in text, text
            if not as_dict:
                assert (code == 0) == (outcome == "ok"), text
        if cm is not None and not as_dict and self.builds * 8 < self.counts["ok"] + 8:
            if cm.num_params < 2_000_000 and cm.inferred.sample["seq"] <= 1024:  # type: ignore[attr-defined]
                self.builds += 1
                _build_and_run(path, cm)


def _fuzz(tmp_path_factory: pytest.TempPathFactory, n: int) -> _Fuzzer:
    fz = _Fuzzer(tmp_path_factory.mktemp("fuzz"))
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        given(cases())(_settings(n)(lambda case: fz.check(case)))()
    finally:
        torch.set_num_threads(n_threads)
    total = sum(fz.counts.values())
    print(f"\nfuzzed {total} blueprints: {dict(fz.counts)}; {fz.cli_runs} through the CLI, {fz.builds} built")
    assert not PWNED.exists(), "a YAML tag ran a shell command"
    assert total >= n
    assert fz.counts["ok"] > 0, "no mutated case compiled: the mutations are too blunt to test success"
    assert len(fz.counts) >= 4, f"the cases reach too few stages: {dict(fz.counts)}"
    assert fz.cli_runs >= n // 10
    return fz


def test_fuzz_300_blueprints(tmp_path_factory):
    _fuzz(tmp_path_factory, 300)


@pytest.mark.slow
def test_fuzz_5000_blueprints(tmp_path_factory):
    _fuzz(tmp_path_factory, 5000)


_OVERRIDE_PATHS = ["params.layers", "layers", "dim", "params", "nodes.tok.in", "nodes.tok.in.0", "nodes.head.tie",
                   "blocks.block.nodes.attn.num_heads", "blocks.block.out", "nodes.trunk.repeat", "outputs.logits",
                   "nodes..x", "", ".", "nodes.nope.x", "train.steps", "name", "physlm", "extends", "growth.0",
                   "nodes.x0.in.-1", "nodes.x0.in.7", "blocks.block.nodes.0"]


@_settings(150)
@given(st.lists(st.tuples(st.sampled_from(_OVERRIDE_PATHS) | st.text(max_size=8),
                          st.sampled_from(["", "1", "-1", "4097", "x", "[1, 2]", "{a: 1}", "${dim * 2}", "null",
                                           "!!python/name:os.system", "${__import__('os')}", "1e999", "'", "tok"])
                          | st.text(max_size=8), st.booleans()), min_size=1, max_size=3))
def test_fuzz_set_overrides(items):
    """``--set`` takes any text: the result is a model or a located error."""
    overrides = [f"{p}={v}" if eq else p for p, v, eq in items]
    _outcome_with(overrides)


def _outcome_with(overrides: list[str]) -> None:
    try:
        compile_blueprint(TINY_PATH, overrides=overrides, device="meta", build=False)
    except PhysLMError as err:
        assert all(d.loc is not None for d in err.diagnostics), str(err)


# ------------------------------------------------------------------ crashes the fuzzer found, kept as cases

_TINY_TEXT = TINY_PATH.read_text(encoding="utf-8")


@pytest.mark.parametrize("text, message", [
    (_TINY_TEXT.replace('trunk: {use: block, repeat: "${layers}", in: x0}',
                        "trunk: {use: block, pattern: [{a: 1}], repeat: 2, in: x0}"),
     "resolve error: <string>:18:33: unknown block {'a': 1}\n  fix: blocks defined: block"),
    (_TINY_TEXT.replace("dim: 32", "dim: 2147483648"),
     "3 validate errors:\n"  # refused before torch computes (and overflows) a storage size
     "  1. <string>:15:65: tok: embed_dim: far larger than any model's size (at most 2,147,483,647; no weights were "
     "allocated) (got 2147483648)\n"
     "  2. <string>:16:79: pos: embed_dim: far larger than any model's size (at most 2,147,483,647; no weights were "
     "allocated) (got 2147483648)\n"
     "  3. <string>:11:37: trunk.0.mlp (and 1 more: trunk.1.mlp): hidden_dim: far larger than any model's size "
     "(at most 2,147,483,647; no weights were allocated) (got 8589934592)"),
    (_TINY_TEXT + "inputs: {tokens: [batch, mlp]}\n",
     "validate error: <string>:22:26: graph input 'tokens': axis 'mlp' is neither batch, seq nor a size\n"
     "  fix: e.g. tokens: [batch, seq]"),
    ("physlm: 1\nname: !!float add\n",
     "load error: <string>:2:7: cannot read this value: could not convert string to float: 'add'"),
    (_TINY_TEXT.replace("    out: r2", "    out: {}"),
     "resolve error: <string>:13:5: block 'block': `out` is empty\n"
     "  fix: a block takes at least one input and gives at least one output"),
    (_TINY_TEXT.replace("  block:\n", "  block:\n    inputs: []\n"),
     "resolve error: <string>:6:5: block 'block': `inputs` is empty\n"
     "  fix: a block takes at least one input and gives at least one output"),
], ids=["pattern-of-dicts", "width-2**31", "input-axis-name", "tag-cannot-hold-value", "block-out-empty",
        "block-inputs-empty"])
def test_fuzzer_findings(text, message):
    with pytest.raises(PhysLMError) as err:
        compile_blueprint(text, device="meta", build=False)
    assert str(err.value) == message


def test_fuzzer_finding_set_on_a_non_mapping_params():
    with pytest.raises(PhysLMError) as err:
        compile_blueprint(TINY_PATH, overrides=["params=1"], device="meta", build=False)
    assert str(err.value) == f"validate error: {TINY_PATH}:3:1: `params` must be a mapping of names to values"
    with pytest.raises(PhysLMError) as err:  # a key the document has no place for is the override's error
        compile_blueprint(TINY_PATH, overrides=["params=1", "0="], device="meta", build=False)
    assert str(err.value) == "resolve error: <command line>: --set 0=: the top level has no key '0'"


def test_fuzzer_finding_extends_name_too_long():
    with pytest.raises(PhysLMError) as err:
        compile_blueprint('extends: "' + "a" * 300 + '.yaml"\nname: x\n', device="meta", build=False)
    assert str(err.value) == ("resolve error: <string>:1:1: the base blueprint cannot be opened: File name too long "
                              f"(got {'a' * 80!r}...)")


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="needs /dev/zero")
def test_a_device_is_refused_before_reading():
    with pytest.raises(PhysLMError) as err:
        compile_blueprint("/dev/zero", device="meta", build=False)
    assert str(err.value) == "load error: /dev/zero: /dev/zero is a device, not a blueprint file"
    with pytest.raises(PhysLMError) as err:
        compile_blueprint("extends: /dev/zero\nname: x\n", device="meta", build=False)
    assert str(err.value) == ("resolve error: <string>:1:1: the base blueprint '/dev/zero' is a device, not a blueprint "
                              "file\n  fix: `extends` names one blueprint file, relative to the blueprint that extends")


def test_a_huge_file_is_read_only_up_to_the_size_limit(tmp_path):
    path = tmp_path / "huge.yaml"
    with open(path, "wb") as f:
        f.truncate(3_000_000_000)  # sparse: no disk is used, and reading it all would take 3 GB
    with pytest.raises(PhysLMError) as err:
        compile_blueprint(path, device="meta", build=False)
    assert str(err.value).startswith(f"load error: {path}:1:2000001: the blueprint is larger than 2 MB")
