"""Strict scalar types for blueprint values: no bool <-> number, no text -> bool or number.

pydantic's lax mode reads ``num_heads: yes`` (YAML's boolean true) as the integer 1 and
``bias: "no"`` as False. A blueprint value has one type: a number field takes numbers (an
integral float such as ``${dim * 1.5}`` = 96.0 still makes a whole number), a boolean field
takes ``true``/``false``, and neither takes text. ``StrictScalars`` is the base of the
component parameter models and of the document's models.
"""

from __future__ import annotations

import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ValidationInfo, field_validator

__all__ = ["StrictScalars", "scalar_type_error"]

_BOOL_WORDS = "YAML reads yes, no, on, off, true and false as booleans"


def _kinds(tp: Any) -> set[str]:
    """The scalar kinds a type admits: bool, int, float, str, none, or other (anything else)."""
    origin = get_origin(tp)
    if tp is Any:
        return {"other"}
    if origin is Annotated:
        return _kinds(get_args(tp)[0])
    if origin is Union or origin is types.UnionType:
        return set().union(*(_kinds(a) for a in get_args(tp)))
    if origin is Literal:
        return {("bool" if isinstance(a, bool) else "none" if a is None else type(a).__name__) for a in get_args(tp)}
    if tp is type(None):
        return {"none"}
    for t in (bool, int, float, str):
        if tp is t:
            return {t.__name__}
    return {"other"}


def _number_word(kinds: set[str]) -> str:
    return "a number" if "float" in kinds else "a whole number"


def _element_types(tp: Any, n: int) -> list[Any] | None:
    """The element types of a tuple or list annotation for a sequence of ``n`` items."""
    origin = get_origin(tp)
    if origin is Annotated:
        return _element_types(get_args(tp)[0], n)
    if origin is Union or origin is types.UnionType:
        seqs = [a for a in get_args(tp) if get_origin(a) in (tuple, list)]
        return _element_types(seqs[0], n) if len(seqs) == 1 else None
    args = get_args(tp)
    if origin is list and len(args) == 1:
        return [args[0]] * n
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return [args[0]] * n
    if origin is tuple and len(args) == n:
        return list(args)
    return None


def scalar_type_error(tp: Any, value: Any) -> str | None:
    """Why ``value`` does not have the type ``tp`` strictly, or None when it may go on to pydantic."""
    if isinstance(value, (list, tuple)):
        elems = _element_types(tp, len(value))
        for i, (t, v) in enumerate(zip(elems or [], value)):
            why = scalar_type_error(t, v)
            if why is not None:
                return f"item {i}: {why}"
        return None
    kinds = _kinds(tp)
    if "other" in kinds:
        return None
    numbers = kinds & {"int", "float"}
    if isinstance(value, bool):
        if "bool" not in kinds and numbers:
            return f"expected {_number_word(numbers)}, not a boolean ({_BOOL_WORDS})"
        return None
    if isinstance(value, (int, float)):
        if not numbers and "bool" in kinds:
            return "expected true or false, not a number"
        return None
    if isinstance(value, str) and "str" not in kinds and (numbers or "bool" in kinds):
        want = _number_word(numbers) if numbers else "true or false"
        if numbers and "bool" in kinds:
            want += " or true/false"
        return f"expected {want}, not text"
    return None


class StrictScalars(BaseModel):
    """A model whose number and boolean fields take their type strictly (see the module doc)."""

    @field_validator("*", mode="before")
    @classmethod
    def _strict_scalars(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        if field is not None:
            why = scalar_type_error(field.annotation, value)
            if why is not None:
                raise ValueError(why)
        return value
