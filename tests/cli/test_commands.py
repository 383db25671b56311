"""The CLI package: one subcommand convention, and the torchrun line built from parsed arguments."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import pytest

from physlm_graph.cli import MODULES, main, make_parser, to_argv

ROOT = Path(__file__).resolve().parents[2]
BLUEPRINT = ROOT / "blueprints" / "baby-gpt.yaml"


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_every_subcommand_follows_the_convention():
    """Each subcommand is declared by one module of physlm_graph.cli and runs its cmd_NAME there."""
    subs = _subparsers(make_parser())
    assert {"build", "validate", "train", "generate", "eval", "ablate", "diff", "viz", "plot", "viz-coords",
            "schema", "components"} <= set(subs)
    owners = {}
    for name in MODULES:
        mod = importlib.import_module(f"physlm_graph.cli.{name}")
        sub = argparse.ArgumentParser().add_subparsers()
        mod.add_commands(sub)
        for command in sub.choices:
            owners.setdefault(command, []).append(name)
    assert {c: len(m) for c, m in owners.items() if len(m) != 1} == {}  # declared exactly once
    assert set(owners) == set(subs)
    for command, p in subs.items():
        fn = p.get_default("fn")
        assert fn is not None, command
        assert fn.__name__ == "cmd_" + command.replace("-", "_"), command
        assert fn.__module__ == f"physlm_graph.cli.{owners[command][0]}", command


def _torchrun_line(monkeypatch, argv: list[str]) -> list[str]:
    import subprocess

    calls: list[list[str]] = []
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(subprocess, "call", lambda cmd, *a, **k: calls.append(list(cmd)) or 0)
    assert main(argv) == 0
    (cmd,) = calls
    return cmd


def test_gpus_equals_and_space_build_the_same_worker_command(monkeypatch):
    common = ["train", str(BLUEPRINT), "--data", "input.txt", "--steps", "5", "--set", "layers=2", "--set",
              "train.lr=1e-3", "--lr", "0.5", "--tokenizer=-odd", "--device", "cpu", "--no-progress"]
    a = _torchrun_line(monkeypatch, common + ["--gpus=2"])
    b = _torchrun_line(monkeypatch, ["train", "--gpus", "2", *common[1:]])
    assert a == b
    assert a[:5] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    i = a.index("physlm_graph")
    assert a[i - 1] == "-m"
    worker = a[i + 1:]
    assert not any(w.startswith("--gpus") for w in worker)
    # the worker line parses back to the same arguments, less --gpus
    want = vars(make_parser().parse_args(common))
    got = vars(make_parser().parse_args(worker))
    assert got == want
    assert got["overrides"] == ["layers=2", "train.lr=1e-3"] and got["lr"] == 0.5
    assert got["tokenizer"] == "-odd"  # a value that looks like an option survives the worker line


def test_to_argv_keeps_top_level_flags_and_store_true():
    p = make_parser()
    args = p.parse_args(["--debug", "train", "bp.yaml", "--no-progress", "--resume", "--gpus", "4", "--seed", "3"])
    line = to_argv(p, args, drop={"gpus"})
    assert line[:3] == ["--debug", "train", "bp.yaml"]
    assert sorted(line[3:]) == ["--no-progress", "--resume", "--seed=3"]
    assert vars(p.parse_args(line)) == {**vars(args), "gpus": None}


def test_python_dash_m_runs_the_cli():
    import subprocess

    out = subprocess.run([sys.executable, "-m", "physlm_graph", "validate", str(BLUEPRINT)], capture_output=True,
                         text=True, cwd=ROOT, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout
