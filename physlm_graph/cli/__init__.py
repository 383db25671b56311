"""The ``physlm-graph`` command line: one package, one convention for its subcommands.

Each module of this package holds a few subcommands, each one a function pair:

- ``add_commands(sub)`` declares the module's subcommands and their arguments
  (``sub.add_parser(NAME, ...)`` with ``set_defaults(fn=cmd_NAME)``);
- ``cmd_NAME(args) -> int`` turns the parsed arguments into one call of the library
  (``compile_blueprint``, ``runtime.train.train``, ``runtime.study.run_study``, ...), prints
  what it returns and gives the exit code.

``MODULES`` lists the modules in the order their subcommands are shown. Every command reports
user mistakes as ``physlm-graph`` errors (file:line:col, node, expected vs got, fix) on stderr
with exit code 2, never a traceback; ``--json`` gives machine output. This package and the
Hugging Face integration are the only places in ``physlm_graph/`` that import the runtime
(tests/test_layering.py).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["main", "make_parser", "console", "to_argv", "MODULES"]

MODULES = ("blueprint", "viz", "runs", "study", "hf")  # modules of this package, each with add_commands(sub)


def console(stderr: bool = False) -> Any:
    """A rich console that keeps long table rows on one line when the output is not a terminal."""
    import shutil

    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() else max(shutil.get_terminal_size((160, 40)).columns, 160)
    return Console(stderr=stderr, highlight=False, soft_wrap=False, width=width)


_console = console  # the older private name


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="physlm-graph", description="Compile, train and study LM blueprints.")
    p.add_argument("--debug", action="store_true", help="show Python tracebacks for internal errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in MODULES:
        importlib.import_module(f"{__name__}.{name}").add_commands(sub)
    return p


def to_argv(parser: argparse.ArgumentParser, args: argparse.Namespace, *, drop: frozenset[str] | set[str] = frozenset()
            ) -> list[str]:
    """The command line that parses back to ``args`` (less the destinations in ``drop``).

    Built from the parser's declared actions and the parsed values, never from the text the user
    typed, so ``--gpus=2``, ``--gpus 2`` and abbreviations all give the same line. An option at
    its default is left out; one with a value is written ``--name=VALUE`` (a value that starts with
    ``-`` stays a value)."""
    out: list[str] = []
    for action in parser._actions:
        dest = action.dest
        if isinstance(action, argparse._SubParsersAction):
            name = getattr(args, dest)
            out += [name, *to_argv(action.choices[name], args, drop=drop)]
            continue
        if dest in drop or isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            continue
        value = getattr(args, dest, action.default)
        if not action.option_strings:  # a positional
            out += [str(v) for v in value] if isinstance(value, list) else [str(value)]
            continue
        if value == action.default or value is None:
            continue
        opt = action.option_strings[-1]
        if isinstance(action, argparse._StoreConstAction):  # store_true / store_false / store_const
            if value == action.const:
                out.append(opt)
        elif isinstance(action, argparse._AppendAction):
            out += [f"{opt}={v}" for v in value]
        else:
            out.append(f"{opt}={value}")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    from physlm_graph._errors import PhysLMError

    parser = make_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except PhysLMError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head`: not an error
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # an internal bug: say so plainly, keep the traceback behind --debug
        if args.debug:
            raise
        print(f"physlm-graph internal error: {type(exc).__name__}: {exc}\n"
              "  this is a bug in physlm-graph; rerun with --debug for the traceback and report it",
              file=sys.stderr)
        return 3
