"""Typed options: the one validator for every pass's frozen options dataclass.

Each pass declares its options as a frozen dataclass whose type hints say what a value
may be (``Literal`` members, ``bool`` / ``int`` / ``float``, optional values, typed tuples).
:func:`check_fields` checks an instance against those hints — from Python and from a
recipe alike — so a pass writes by hand only the checks a type cannot say (ranges and
combinations of fields). A string where a list is expected is an error, not a list of
characters; NaN is not a number; lists become tuples, so options stay hashable.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import types
import typing
from typing import Any

import numpy as np


def check_value(annotation: Any, value: Any) -> Any:
    """``value`` checked against a type hint (lists made tuples); ValueError says what is wanted."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return check_value(arg, value)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError(" or ".join(errors) if errors else f"{value!r} is not allowed")
    if origin is typing.Literal:
        if value not in args or isinstance(value, bool) != any(isinstance(a, bool) and a == value for a in args):
            raise ValueError(f"{value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin in (tuple, list) or annotation in (tuple, list):
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            hint = f" (write [{value!r}] for one item)" if isinstance(value, str) else ""
            raise ValueError(f"expects a list{hint}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(check_value(args[0], item) for item in value)
        if args and len(args) != len(value):
            raise ValueError(f"expects a list of {len(args)} items, got {len(value)}")
        return tuple(check_value(arg, item) for arg, item in zip(args, value)) if args else tuple(value)
    if annotation is bool:
        if not isinstance(value, (bool, np.bool_)):
            raise ValueError("expects true or false")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValueError("expects an integer")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
            raise ValueError("expects a number")
        return value
    if annotation is str and not isinstance(value, str):
        raise ValueError("expects a string")
    return value


def check_fields(options: Any) -> None:
    """Check every field of a (frozen) options dataclass against its type hint, in place."""
    hints = typing.get_type_hints(type(options))
    for field in dataclasses.fields(options):
        value = getattr(options, field.name)
        try:
            checked = check_value(hints.get(field.name, field.type), value)
        except ValueError as exc:
            raise ValueError(f"{field.name}={value!r}: {exc}") from None
        if checked is not value:
            object.__setattr__(options, field.name, checked)
