"""Errors: one class per compiler stage under one base, each carrying where and why.

Every message a user sees has the form

    blueprint.yaml:12:7: nodes.trunk.3.attn: num_heads: expected a divisor of the width 384, got 5
      fix: use 1, 2, 3, 4, 6, 8, 12, ...

Errors are collected per stage and raised together (``PhysLMErrorGroup``), so one run of
``physlm-graph validate`` lists everything that is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = [
    "Loc",
    "Diagnostic",
    "PhysLMError",
    "LoadError",
    "ResolveError",
    "ValidateError",
    "ShapeError",
    "BuildError",
    "PassError",
    "RuntimeDataError",
    "CheckpointError",
    "TrainingError",
    "ComponentError",
]


@dataclass(frozen=True)
class Loc:
    """A position in a blueprint file (1-based line and column)."""

    file: str = "<blueprint>"
    line: int = 0
    col: int = 0

    def __str__(self) -> str:
        if self.line <= 0:
            return self.file
        return f"{self.file}:{self.line}:{self.col}"


@dataclass(frozen=True)
class Diagnostic:
    """One problem: where it is, which node, what was expected and what was found."""

    message: str
    loc: Loc | None = None
    node: str | None = None
    expected: str | None = None
    got: str | None = None
    fix: str | None = None

    def render(self) -> str:
        head = []
        if self.loc is not None:
            head.append(str(self.loc))
        if self.node:
            head.append(self.node)
        text = ": ".join(head + [self.message])
        if self.expected is not None and self.got is not None:
            text += f" (expected {self.expected}, got {self.got})"
        elif self.expected is not None:
            text += f" (expected {self.expected})"
        elif self.got is not None:
            text += f" (got {self.got})"
        if self.fix:
            text += f"\n  fix: {self.fix}"
        return text


def _collapse(diags: list[Diagnostic]) -> list[Diagnostic]:
    """Merge problems that differ only in the node (one block line repeated N times)."""
    groups: dict[tuple, list[Diagnostic]] = {}
    for d in diags:
        key = (str(d.loc), d.message.replace(d.node or "\0", "<node>"), d.expected, d.got, d.fix)
        groups.setdefault(key, []).append(d)
    out = []
    for same in groups.values():
        first = same[0]
        nodes = [d.node for d in same if d.node]
        if len(nodes) > 1:
            first = Diagnostic(first.message, loc=first.loc, node=f"{nodes[0]} (and {len(nodes) - 1} more: "
                               f"{', '.join(nodes[1:3])}{', ...' if len(nodes) > 3 else ''})",
                               expected=first.expected, got=first.got, fix=first.fix)
        out.append(first)
    return out


class PhysLMError(Exception):
    """Base of every error physlm-graph raises on purpose.

    ``diagnostics`` holds one or more problems; ``str(err)`` renders all of them.
    """

    stage = "physlm-graph"

    def __init__(self, message: str | list[Diagnostic] | Diagnostic, **kw: object) -> None:
        if isinstance(message, Diagnostic):
            diags = [message]
        elif isinstance(message, list):
            diags = list(message)
        else:
            diags = [Diagnostic(message, **kw)]  # type: ignore[arg-type]
        self.diagnostics: list[Diagnostic] = _collapse(diags)
        super().__init__(self.render())

    def render(self) -> str:
        lines = [d.render() for d in self.diagnostics]
        if len(lines) == 1:
            return f"{self.stage} error: {lines[0]}"
        body = "\n".join(f"  {i + 1}. " + ln.replace("\n", "\n     ") for i, ln in enumerate(lines))
        return f"{len(lines)} {self.stage} errors:\n{body}"


class LoadError(PhysLMError):
    """The file could not be read or is not a safe YAML mapping."""

    stage = "load"


class ResolveError(PhysLMError):
    """``extends``, ``set``, ``${...}``, blocks, patterns, stages or extensions could not be resolved."""

    stage = "resolve"


class ValidateError(PhysLMError):
    """The document or a component's parameters or the graph's wiring are wrong."""

    stage = "validate"


class ShapeError(PhysLMError):
    """Shape inference on the meta device failed; the message names the nodes involved."""

    stage = "shape"


class BuildError(PhysLMError):
    """The fx graph or the modules could not be built."""

    stage = "build"


class PassError(PhysLMError):
    """A graph pass failed."""

    stage = "pass"


class RuntimeDataError(PhysLMError):
    """A data file or tokenizer is missing, empty, binary or wrongly encoded."""

    stage = "data"


class CheckpointError(PhysLMError):
    """A checkpoint is missing, truncated, corrupted or does not match its blueprint."""

    stage = "checkpoint"


class TrainingError(PhysLMError):
    """Training had to stop (a NaN loss, a full disk, ...); the last good checkpoint is kept."""

    stage = "train"


@dataclass
class ComponentError(Exception):
    """Raised by a component builder about one of its parameters or inputs.

    The compiler turns it into a located ``ValidateError`` or ``ShapeError``: ``param`` names
    the parameter key whose position is reported (None reports the node itself).
    """

    message: str
    param: str | None = None
    expected: str | None = None
    got: str | None = None
    fix: str | None = None
    extra: dict = field(default_factory=dict)

    def __str__(self) -> str:
        return self.message
