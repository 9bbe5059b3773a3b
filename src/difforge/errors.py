"""The one exception type for user mistakes.

Anything a user can get wrong (a flag, a folder, a damaged file) raises `DifforgeError`
(a `ValueError`) with a one-line message naming the thing and what to do. The CLI prints
it without a traceback and exits with status 2.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import fields
from typing import Any, TypeVar

T = TypeVar("T")


class DifforgeError(ValueError):
    """A clear, user-facing error: bad argument, missing file, damaged checkpoint."""


def dataclass_from_mapping(cls: type[T], data: Mapping[str, Any], what: str) -> T:
    """``cls(**data)`` for a dataclass, with a DifforgeError naming unknown or mistyped fields
    (a config written by another version, or edited by hand)."""
    if not isinstance(data, Mapping):
        raise DifforgeError(f"{what} must be a JSON object, got {type(data).__name__}")
    known = {f.name for f in fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = sorted(set(data) - known)
    if unknown:
        raise DifforgeError(
            f"unknown {what} {', '.join(unknown)}; known: {', '.join(sorted(known))} "
            "(written by another difforge version?)"
        )
    try:
        return cls(**dict(data))
    except TypeError as error:
        raise DifforgeError(f"{what}: {error}") from None


def kind_config_from_mapping(cls: type[T], data: Mapping[str, Any], what: str) -> T:
    """`dataclass_from_mapping` of a config saved as ``{"kind": KIND, **fields}`` (a process
    kind's settings): the kind, when present, must be ``cls.kind``."""
    settings = dict(data) if isinstance(data, Mapping) else data
    expected = getattr(cls, "kind", None)
    if isinstance(settings, dict) and settings.pop("kind", expected) != expected:
        raise DifforgeError(f"{what} of kind {data['kind']!r} are not {expected!r} settings")
    return dataclass_from_mapping(cls, settings, what)  # type: ignore[arg-type]


def check_number(
    flag: str,
    value: object,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    integer: bool = False,
) -> None:
    """Raise a one-line DifforgeError unless ``value`` is a finite number (an integer when
    ``integer``) with ``low <= value`` (``low < value`` when ``low_open``) and ``value <= high``.

    ``flag`` names the setting in the message (e.g. ``--lr``). NaN and infinities are refused
    everywhere: every float setting must be finite."""
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if integer and not (isinstance(value, int) and not isinstance(value, bool)):
        raise DifforgeError(f"{flag} must be an integer, got {value!r}")
    if not is_number or not math.isfinite(value):  # type: ignore[arg-type]
        raise DifforgeError(f"{flag} must be a finite number, got {value!r}")
    number = float(value)  # type: ignore[arg-type]
    below = low is not None and (number <= low if low_open else number < low)
    if below or (high is not None and number > high):
        lower = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
        upper = "" if high is None else f"<= {high:g}"
        bounds = " and ".join(b for b in (lower, upper) if b)
        raise DifforgeError(f"{flag} must be {bounds}, got {value!r}")
