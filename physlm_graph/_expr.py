"""The ``${...}`` evaluator: arithmetic on params and nothing else (never ``eval``).

Grammar: numbers, booleans, names of params, ``+ - * / // % **``, unary ``-``/``+``,
parentheses, comparisons, ``x in list_param`` (and ``not in``), ``a if cond else b``, and the
functions ``min max abs int round float ceil floor``. ``/`` of two integers that divide exactly is an integer (``${dim / heads}``
is 64, not 64.0). Anything else (attributes, subscripts, lambdas, strings, calls to other
names) is refused with the position of the offending part.
"""

from __future__ import annotations

import ast
import math
import operator
import re
from collections.abc import Mapping
from typing import Any

__all__ = ["ExprError", "evaluate", "substitute", "references", "MAX_EXPR_LEN", "EXPR_RE"]

MAX_EXPR_LEN = 200
MAX_ABS = 1e15  # results beyond this are refused: a blueprint has no use for them
EXPR_RE = re.compile(r"\$\{([^{}]*)\}")


class ExprError(ValueError):
    """A bad expression; the message says what and where in the expression."""


def _div(a: Any, b: Any) -> Any:
    if b == 0:
        raise ExprError("division by zero")
    if isinstance(a, int) and isinstance(b, int) and not isinstance(a, bool) and a % b == 0:
        return a // b
    return a / b


def _floordiv(a: Any, b: Any) -> Any:
    if b == 0:
        raise ExprError("division by zero")
    return a // b


def _mod(a: Any, b: Any) -> Any:
    if b == 0:
        raise ExprError("modulo by zero")
    return a % b


def _pow(a: Any, b: Any) -> Any:
    if a == 0 and b < 0:
        raise ExprError("0 cannot be raised to a negative power")
    if abs(b) > 64 or (abs(a) > 1 and abs(b) * math.log2(abs(a) + 1) > 60):
        raise ExprError(f"{a} ** {b} is too large")
    return a**b


_BINOPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: _div,
    ast.FloorDiv: _floordiv,
    ast.Mod: _mod,
    ast.Pow: _pow,
}
_CMPOPS = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
}
_FUNCS = {
    "min": min,
    "max": max,
    "abs": abs,
    "int": int,
    "round": round,
    "float": float,
    "ceil": math.ceil,
    "floor": math.floor,
}


def _check(value: Any) -> Any:
    if isinstance(value, complex):  # (-8) ** 0.5
        raise ExprError("the result is not a real number")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, float) and not math.isfinite(value):
            raise ExprError("the result is not a finite number")
        if abs(value) > MAX_ABS:
            raise ExprError(f"the result {value:.3g} is too large")
    return value


def _eval(node: ast.AST, names: Mapping[str, Any]) -> Any:
    if isinstance(node, ast.Expression):
        return _eval(node.body, names)
    if isinstance(node, ast.Constant):
        if isinstance(node.value, (int, float, bool)):
            return _check(node.value)  # 1e999 is inf
        raise ExprError(f"only numbers are allowed, not {node.value!r}")
    if isinstance(node, ast.Name):
        if node.id in ("true", "True"):
            return True
        if node.id in ("false", "False"):
            return False
        if node.id not in names:
            import difflib

            near = difflib.get_close_matches(node.id, list(names), n=3)
            hint = f"; did you mean {', '.join(near)}?" if near else ""
            raise ExprError(f"unknown name {node.id!r}{hint}")
        return names[node.id]
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        left, right = _eval(node.left, names), _eval(node.right, names)
        if not all(isinstance(v, (int, float)) for v in (left, right)):
            raise ExprError("arithmetic needs numbers")
        try:
            return _check(_BINOPS[type(node.op)](left, right))
        except (ArithmeticError, TypeError, ValueError) as exc:  # 0 ** -1
            if isinstance(exc, ExprError):
                raise
            raise ExprError(f"{exc}") from None
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd, ast.Not)):
        v = _eval(node.operand, names)
        if isinstance(node.op, ast.Not):
            return not v
        if not isinstance(v, (int, float)):
            raise ExprError("arithmetic needs numbers")
        return -v if isinstance(node.op, ast.USub) else +v
    if isinstance(node, ast.Compare) and len(node.ops) == 1 and isinstance(node.ops[0], (ast.In, ast.NotIn)):
        item, within = _eval(node.left, names), _eval(node.comparators[0], names)
        if not isinstance(within, (list, tuple)) or isinstance(item, (list, tuple)):
            raise ExprError("`in` tests a number against a list param (index in attn_layers)")
        return (item in within) == isinstance(node.ops[0], ast.In)
    if isinstance(node, ast.Compare) and all(type(o) in _CMPOPS for o in node.ops):
        left = _eval(node.left, names)
        for op, comp in zip(node.ops, node.comparators):
            right = _eval(comp, names)
            try:
                holds = _CMPOPS[type(op)](left, right)
            except TypeError:
                raise ExprError(f"cannot compare {type(left).__name__} with {type(right).__name__}") from None
            if not holds:
                return False
            left = right
        return True
    if isinstance(node, ast.BoolOp):
        vals = [_eval(v, names) for v in node.values]
        return all(vals) if isinstance(node.op, ast.And) else any(vals)
    if isinstance(node, ast.IfExp):
        return _eval(node.body, names) if _eval(node.test, names) else _eval(node.orelse, names)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCS:
        if node.keywords:
            raise ExprError("functions take positional arguments only")
        args = [_eval(a, names) for a in node.args]
        try:
            return _check(_FUNCS[node.func.id](*args))
        except (TypeError, ValueError, OverflowError) as exc:
            raise ExprError(f"{node.func.id}(...) failed: {exc}") from None
    what = type(node).__name__
    if isinstance(node, ast.Call):
        what = "a call to " + (node.func.id if isinstance(node.func, ast.Name) else "an expression")
    elif isinstance(node, ast.Attribute):
        what = f"attribute access .{node.attr}"
    raise ExprError(f"{what} is not allowed (only arithmetic on params)")


def evaluate(expr: str, names: Mapping[str, Any]) -> Any:
    """Evaluate one expression (the text inside ``${}``)."""
    text = expr.strip()
    if not text:
        raise ExprError("empty expression")
    if len(text) > MAX_EXPR_LEN:
        raise ExprError(f"expression longer than {MAX_EXPR_LEN} characters")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as exc:
        raise ExprError(f"not a valid expression: {exc.msg}") from None
    if sum(1 for _ in ast.walk(tree)) > 100:
        raise ExprError("expression has too many parts")
    try:
        return _eval(tree, names)
    except RecursionError:
        raise ExprError("expression nests too deeply") from None


def references(value: str) -> set[str]:
    """Names used by the ``${}`` expressions in a string (for ordering params)."""
    out: set[str] = set()
    for m in EXPR_RE.finditer(value):
        try:
            tree = ast.parse(m.group(1).strip(), mode="eval")
        except SyntaxError:
            continue
        out |= {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    return out


def substitute(value: Any, names: Mapping[str, Any]) -> Any:
    """Replace ``${...}`` in a string. A string that is exactly one ``${...}`` keeps the
    expression's type (``"${4 * dim}"`` -> 1536); otherwise results are formatted into text."""
    if not isinstance(value, str) or "${" not in value:
        return value
    whole = EXPR_RE.fullmatch(value.strip())
    if whole:
        return evaluate(whole.group(1), names)
    if value.count("${") != len(EXPR_RE.findall(value)):
        raise ExprError("unbalanced ${ ... }")
    return EXPR_RE.sub(lambda m: str(evaluate(m.group(1), names)), value)
