"""The one exception type for user mistakes.

Anything a user can get wrong (a flag, a folder, a damaged file) raises `DifforgeError`
(a `ValueError`) with a one-line message naming the thing and what to do. The CLI prints
it without a traceback and exits with status 2.
"""

from __future__ import annotations

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
