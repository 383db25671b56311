"""Value checks for command-line options: argparse ``type=`` functions.

Every option that takes a number, a device or an output file uses one of these, so a bad value
is refused while the arguments are parsed: argparse prints ``argument --stride: must be a
positive integer, got '-5'`` with the command's usage and exits with 2, before anything runs.

    p.add_argument("--stride", type=positive_int)
    p.add_argument("--device", type=device, default="auto")
    p.add_argument("-o", "--output", type=output_file(".png", ".svg", ".pdf"))
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable
from pathlib import Path

__all__ = ["positive_int", "nonnegative_int", "seed", "positive_float", "nonnegative_float", "finite_float",
           "unit_interval", "device", "output_file", "VALIDATORS"]


def _int(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None


def _float(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An integer in [1, 2**63) (a count of steps, tokens, windows)."""
    value = _int(text, "a positive integer")
    if value >= 1 << 63:
        raise argparse.ArgumentTypeError(f"must be a positive integer below 2**63, got {text!r}")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def nonnegative_int(text: str) -> int:
    """An integer >= 0 (a seed, an index)."""
    value = _int(text, "an integer >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return value


def seed(text: str) -> int:
    """A random seed: an integer in [0, 2**63) (what torch's generators take)."""
    value = _int(text, "an integer seed in [0, 2**63)")
    if not 0 <= value < 1 << 63:
        raise argparse.ArgumentTypeError(f"must be an integer seed in [0, 2**63), got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (a learning rate, a penalty)."""
    value = _float(text, "a number > 0")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return value


def nonnegative_float(text: str) -> float:
    """A finite number >= 0 (a temperature: 0 is greedy)."""
    value = _float(text, "a number >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text!r}")
    return value


def finite_float(text: str) -> float:
    """Any finite number."""
    return _float(text, "a finite number")


def unit_interval(text: str) -> float:
    """A number in (0, 1] (a nucleus mass)."""
    value = _float(text, "a number in (0, 1]")
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {text!r}")
    return value


_DEVICE = re.compile(r"(auto|cpu|mps|cuda)(:(\d+))?")


def device(text: str) -> str:
    """``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``, and present on this machine."""
    m = _DEVICE.fullmatch(text)
    if m is None or (m.group(2) and m.group(1) != "cuda"):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}: use auto, cpu, cuda, cuda:N or mps")
    kind = m.group(1)
    if kind in ("auto", "cpu"):
        return text
    import torch

    if kind == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available on this machine (torch "
                                             f"{torch.__version__}); use --device cpu or auto")
        count = torch.cuda.device_count()
        if m.group(3) is not None and int(m.group(3)) >= count:
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {count} CUDA device(s), cuda:0 to "
                                             f"cuda:{count - 1}")
    if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise argparse.ArgumentTypeError(f"{text!r}: MPS is not available on this machine; use --device cpu or auto")
    return text


def output_file(*suffixes: str) -> Callable[[str], str]:
    """A file name ending in one of ``suffixes`` (the format is chosen by the suffix)."""
    def check(text: str) -> str:
        suffix = Path(text).suffix.lower()
        if suffix not in suffixes:
            raise argparse.ArgumentTypeError(f"{text!r}: the file name must end in {', '.join(suffixes)} "
                                             f"(the format is chosen by the suffix), got {suffix or 'no suffix'!r}")
        if Path(text).is_dir():
            raise argparse.ArgumentTypeError(f"{text!r} is a folder; name a file")
        return text

    check.__name__ = "output_file"
    check.suffixes = suffixes  # type: ignore[attr-defined]
    return check


#: the validators above by name, for tests that walk every parser
VALIDATORS = (positive_int, nonnegative_int, seed, positive_float, nonnegative_float, finite_float, unit_interval, device)
