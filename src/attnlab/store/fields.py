"""Whether a value read from JSON (or given by a caller) fits a dataclass field's declared type.

One rule for every settings file attnlab reads (training settings, model sizes, trainer state):
``bool`` is not an ``int`` here (``True`` is no layer count), an ``int`` is a ``float``, ``X | None``
admits None, and a generic such as ``dict[str, Any]`` is checked by its container type.
"""

from __future__ import annotations

import types
import typing
from typing import Any

__all__ = ["fits"]


def fits(kind: Any, value: Any) -> bool:
    """True when ``value`` fits the type ``kind`` (a resolved annotation, e.g. from get_type_hints)."""
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        return any(value is None if arg is type(None) else fits(arg, value) for arg in typing.get_args(kind))
    return isinstance(value, typing.get_origin(kind) or kind)
