"""Command-line flags generated from config dataclasses, so each default lives in its
dataclass and nowhere else, and a flag name means the same in every command."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import MISSING, fields
from typing import Any


def field_default(cls: type, name: str) -> Any:
    """The default of dataclass field ``name`` of ``cls``."""
    for f in fields(cls):  # type: ignore[arg-type]
        if f.name == name:
            return f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
    raise KeyError(name)


def add_dataclass_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    helps: Mapping[str, str],
    dest_prefix: str,
    flag_names: Mapping[str, str] | None = None,
) -> None:
    """One ``--field-name`` flag per field of ``cls`` named in ``helps`` (in field order),
    stored as ``dest_prefix + field``; booleans get ``--x/--no-x``. The default shown is the
    field's unless the help text names one; ``None`` shows as "off"."""
    for f in fields(cls):  # type: ignore[arg-type]
        if f.name not in helps:
            continue
        flag = (flag_names or {}).get(f.name, "--" + f.name.replace("_", "-"))
        default = field_default(cls, f.name)
        dest = dest_prefix + f.name
        if isinstance(default, bool):
            parser.add_argument(
                flag,
                dest=dest,
                action=argparse.BooleanOptionalAction,
                default=default,
                help=f"{helps[f.name]} (default: {'on' if default else 'off'})",
            )
            continue
        kind = {"int": int, "float": float, "str": str}.get(
            type(default).__name__ if default is not None else ""
        )
        if kind is None:
            text = str(f.type)
            kind = int if "int" in text else float if "float" in text else str
        shown = "" if "default" in helps[f.name] else f" (default: {'off' if default is None else default})"
        parser.add_argument(
            flag, dest=dest, type=kind, default=default, metavar=f.name.upper(), help=helps[f.name] + shown
        )


def dataclass_values(args: argparse.Namespace, dest_prefix: str) -> dict[str, Any]:
    """The flags `add_dataclass_flags` stored under ``dest_prefix``, by field name."""
    return {k[len(dest_prefix) :]: v for k, v in vars(args).items() if k.startswith(dest_prefix)}
