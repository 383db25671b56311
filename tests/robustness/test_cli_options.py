"""Every documented option of every subcommand, walked from the argparse parsers themselves, with
out-of-range and wrong-type values: exit 2 and a message naming the option, never exit 3.

A new option that takes a value must use a validator of ``physlm_graph/_cliargs.py`` or
``choices``, or be listed in ``FREE_TEXT`` (paths, names, prompts) with the reason; the fuzzer
(``test_fuzz_runtime.py``) feeds bad values to those.
"""

from __future__ import annotations

import argparse

import pytest
import torch

from physlm_graph import _cliargs
from physlm_graph.cli import make_parser, main

# options whose value is free text, checked where it is used (a file, a folder, an expression)
FREE_TEXT = {
    "--set", "--data", "--tokenizer", "--out", "--prompt", "--draft-exit", "--text",
    ("schema", "--output"),  # any file name: the schema is JSON text
    ("viz", "--output"),  # .html or .svg, checked by the command with its own message
    ("viz-coords", "--output"),  # the page is written whatever the suffix
    ("import", "--name"),  # the imported blueprint's name: any text
    ("train", "--init-from"),  # a checkpoint folder, checked by runtime/init_from.py (the fuzzer feeds bad ones)
    ("ablate", "--address"),  # a Ray cluster's address (host:port, auto, ray://...), checked by Ray when it connects
}

BAD = {
    "positive_int": ["0", "-5", "1.5", "abc", "", "1e3", "99999999999999999999"],
    "nonnegative_int": ["-1", "2.5", "seven"],
    "seed": ["-1", "9223372036854775808", "99999999999999999999", "1.0"],
    "positive_float": ["0", "-0.1", "nan", "inf", "abc"],
    "nonnegative_float": ["-1", "nan", "-inf", "x"],
    "finite_float": ["nan", "inf", "abc"],
    "unit_interval": ["0", "1.5", "-0.2", "nan"],
    "device": ["tpu", "cuda:x", "gpu", "cpu:0", "", "meta"] + ([] if torch.cuda.is_available() else ["cuda", "cuda:0"]),
    "output_file": ["c.txt", "noext", "curves.PNG.bak"],
}


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = make_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _minimal_argv(name: str, sp: argparse.ArgumentParser, skip: argparse.Action) -> list[str]:
    """The subcommand with placeholder values for its positionals and required options."""
    argv = [name]
    for a in sp._actions:
        if a is skip or isinstance(a, argparse._HelpAction):
            continue
        if not a.option_strings:
            argv += ["x"] * (1 if a.nargs in (None, "?") else 2 if a.nargs == "+" else 1)
        elif a.required:
            suffixes = getattr(a.type, "suffixes", None)
            argv += [a.option_strings[-1], f"out{suffixes[0]}" if suffixes else "x"]
    for group in sp._mutually_exclusive_groups:
        if group.required and skip not in group._group_actions:
            first = group._group_actions[0]
            argv += [first.option_strings[-1]] + ([] if first.nargs == 0 else ["x"])
    return argv


def _options():
    for name, sp in _subcommands().items():
        for a in sp._actions:
            if a.option_strings and not isinstance(a, argparse._HelpAction):
                yield name, sp, a


def _kind(a: argparse.Action) -> str | None:
    return getattr(a.type, "__name__", None) if a.type is not None else None


def test_every_value_option_is_validated_or_declared_free_text():
    unchecked = []
    for name, _, a in _options():
        if a.nargs == 0 or a.choices is not None:
            continue
        key = a.option_strings[-1]
        if a.type in _cliargs.VALIDATORS or _kind(a) == "output_file":
            continue
        if key in FREE_TEXT or (name, key) in FREE_TEXT:
            continue
        unchecked.append(f"{name} {key} (type={_kind(a)})")
    assert not unchecked, "options without a validator: " + ", ".join(unchecked)


def _cases():
    for name, sp, a in _options():
        key = a.option_strings[-1]
        if a.nargs == 0:
            yield pytest.param(name, key, f"{key}=1", id=f"{name}-{key}-flag-with-value")
        elif a.choices is not None:
            yield pytest.param(name, key, "bogus", id=f"{name}-{key}-bogus")
        elif _kind(a) in BAD:
            for v in BAD[_kind(a)]:
                yield pytest.param(name, key, v, id=f"{name}-{key}-{v or 'empty'}")


@pytest.mark.parametrize("command,option,value", list(_cases()))
def test_bad_option_value_exits_2_naming_the_option(command, option, value, capsys):
    sp = _subcommands()[command]
    action = next(a for a in sp._actions if option in a.option_strings)
    argv = _minimal_argv(command, sp, action)
    argv += [value] if value.startswith(option + "=") else [option, value]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert "internal error" not in err and "Traceback" not in err
    named = [s for s in action.option_strings if s in err]
    assert named, f"{option} not named in: {err}"
    assert f"physlm-graph {command}: error: argument " in err, err


def test_messages_say_what_was_expected(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "ck", "--data", "t.txt", "--stride", "-5"])
    assert capsys.readouterr().err.splitlines()[-1] == (
        "physlm-graph eval: error: argument --stride: must be a positive integer, got '-5'")
    with pytest.raises(SystemExit):
        main(["eval", "ck", "--data", "t.txt", "--device", "tpu"])
    assert capsys.readouterr().err.splitlines()[-1] == (
        "physlm-graph eval: error: argument --device: unknown device 'tpu': use auto, cpu, cuda, cuda:N or mps")
    with pytest.raises(SystemExit):
        main(["plot", "run", "-o", "c.txt"])
    assert capsys.readouterr().err.splitlines()[-1] == (
        "physlm-graph plot: error: argument -o/--output: 'c.txt': the file name must end in .png, .svg, .pdf "
        "(the format is chosen by the suffix), got '.txt'")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("command", ["train", "generate", "eval"])
def test_cuda_without_cuda_is_an_option_error(command, capsys):
    argv = {"train": ["train", "bp.yaml"], "generate": ["generate", "ck", "--prompt", "x"],
            "eval": ["eval", "ck", "--data", "t.txt"]}[command]
    with pytest.raises(SystemExit) as exc:
        main(argv + ["--device", "cuda"])
    assert exc.value.code == 2
    assert f"physlm-graph {command}: error: argument --device: 'cuda': CUDA is not available on this machine (torch " \
        in capsys.readouterr().err


def test_validators_accept_good_values():
    assert _cliargs.positive_int("3") == 3 and _cliargs.nonnegative_int("0") == 0
    assert _cliargs.positive_float("1e-3") == 1e-3 and _cliargs.nonnegative_float("0") == 0.0
    assert _cliargs.unit_interval("1") == 1.0 and _cliargs.finite_float("-0.5") == -0.5
    assert _cliargs.device("auto") == "auto" and _cliargs.device("cpu") == "cpu"
    assert _cliargs.output_file(".png")("a/b.PNG") == "a/b.PNG"
