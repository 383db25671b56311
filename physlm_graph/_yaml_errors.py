"""YAML syntax errors in words a blueprint author can act on: where, what, and the fix.

PyYAML says ``expected ',' or '}', but got '{'`` for ``{dim: ${d}}`` and ``expected <block
end>, but found '<block mapping start>'`` for a line indented one space too far. This module
looks at the problem and at the text around it and says which mistake it is.
"""

from __future__ import annotations

import re

import yaml

from physlm_graph._errors import Diagnostic, Loc

__all__ = ["syntax_error"]

_UNQUOTED_EXPR = re.compile(r"""(?<!["'\w])\$\{""")  # ${ not right after a quote


def _line(text: str, n: int) -> str:
    lines = text.splitlines()
    return lines[n] if 0 <= n < len(lines) else ""


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _previous_content_line(text: str, n: int) -> tuple[int, str] | None:
    for i in range(n - 1, -1, -1):
        line = _line(text, i)
        if line.strip() and not line.lstrip().startswith("#"):
            return i, line
    return None


def _unquoted_expression(text: str, exc: yaml.MarkedYAMLError) -> str | None:
    """The first unquoted ``${...}`` on the lines of the problem and its context, if any."""
    rows = {m.line for m in (exc.problem_mark, exc.context_mark) if m is not None}
    for row in sorted(rows):
        line = _line(text, row)
        m = _UNQUOTED_EXPR.search(line)
        if m:
            end = line.find("}", m.end())
            return line[m.start(): end + 1] if end >= 0 else line[m.start():]
    return None


def _fix(text: str, exc: yaml.MarkedYAMLError) -> tuple[str, str | None]:
    """(what happened, the fix) for a YAML error."""
    problem = exc.problem or exc.context or "the YAML cannot be read"
    mark = exc.problem_mark or exc.context_mark
    row = mark.line if mark is not None else 0
    expr = _unquoted_expression(text, exc)
    if expr is not None:
        return (f"YAML syntax error: {problem} (the unquoted {expr} is read as YAML, not as an expression)",
                f'quote it: "{expr}"; an expression inside {{...}} or [...] must always be quoted')
    if "\t" in problem or "'\\t'" in problem:
        return f"YAML syntax error: {problem}", "indent with spaces: YAML does not allow tabs"
    if "expected <block end>" in problem or ("mapping values are not allowed" in problem and row > 0):
        here = _line(text, row)
        prev = _previous_content_line(text, row)
        if prev is not None and _indent(here) != _indent(prev[1]) and here.strip():
            return (f"YAML syntax error: this line is indented by {_indent(here)} spaces, which matches no "
                    f"enclosing block ({problem})",
                    f"indent it like the lines of its block (line {prev[0] + 1} has {_indent(prev[1])} spaces), "
                    "or quote a value that contains ': '")
        if "mapping values are not allowed" in problem:
            return (f"YAML syntax error: {problem}",
                    "quote a value that contains ': ' (key: \"a: b\"), or put the nested key on its own line")
    if "mapping values are not allowed" in problem:
        return (f"YAML syntax error: {problem}",
                "quote a value that contains ': ' (key: \"a: b\"), or put the nested key on its own line")
    if "could not find expected ':'" in problem:
        return (f"YAML syntax error: {problem}",
                "write `key: value` with a space after the colon, or quote a text that runs over several lines")
    if exc.context and "quoted scalar" in exc.context and exc.context_mark is not None:
        return (f"YAML syntax error: {problem} (a quote opened at line {exc.context_mark.line + 1} "
                f"is never closed)", "close the quote")
    if exc.context and exc.context.startswith("while parsing a flow") and exc.context_mark is not None:
        kind = "mapping {...}" if "mapping" in exc.context else "list [...]"
        opened = f"{exc.context_mark.line + 1}:{exc.context_mark.column + 1}"
        return (f"YAML syntax error: {problem} (in the flow {kind} opened at {opened})",
                "separate its items with commas, close it, and quote any item that holds { } [ ] , or a colon")
    if "found character" in problem and "that cannot start any token" in problem:
        return (f"YAML syntax error: {problem}",
                "quote the value: a plain YAML value cannot start with @ or `, nor hold a tab")
    return f"YAML syntax error: {problem}", "check the YAML around this place (indentation, quotes, brackets)"


def syntax_error(text: str, file: str, exc: yaml.MarkedYAMLError) -> Diagnostic:
    """One located diagnostic with a fix for a YAML syntax error in ``text``."""
    mark = exc.problem_mark or exc.context_mark
    message, fix = _fix(text, exc)
    loc = Loc(file, mark.line + 1, mark.column + 1) if mark is not None else Loc(file)
    return Diagnostic(message, loc=loc, fix=fix)
