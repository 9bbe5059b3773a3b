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


def _value_type(default: Any, annotation: object) -> type:
    """The argparse type of a field: its default's (int, float, str), else read from the
    annotation (``float | None`` -> float)."""
    kind = {"int": int, "float": float, "str": str}.get(type(default).__name__ if default is not None else "")
    if kind is not None:
        return kind
    text = str(annotation)
    return int if "int" in text else float if "float" in text else str


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
        kind = _value_type(default, f.type)
        shown = "" if "default" in helps[f.name] else f" (default: {'off' if default is None else default})"
        parser.add_argument(
            flag, dest=dest, type=kind, default=default, metavar=f.name.upper(), help=helps[f.name] + shown
        )


def add_alternative_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    classes: Mapping[str, type],
    helps: Mapping[str, str],
    dest_prefix: str,
    flag_names: Mapping[str, str] | None = None,
) -> None:
    """One flag per field named in ``helps`` of any of ``classes`` (name -> dataclass: the
    process kinds), so a field several of them share is one flag with one meaning. The
    parsed default is None, which means "the chosen class's own default"; the help text
    shows each class's default ("default: 1000 for gaussian, 50 for cold")."""
    owners: dict[str, list[tuple[str, type]]] = {}
    for name, cls in classes.items():
        for f in fields(cls):  # type: ignore[arg-type]
            if f.name in helps:
                owners.setdefault(f.name, []).append((name, cls))
    for field_name, owned in owners.items():
        flag = (flag_names or {}).get(field_name, "--" + field_name.replace("_", "-"))
        defaults = [(name, field_default(cls, field_name)) for name, cls in owned]
        shown = ", ".join(
            f"{'off' if value is None else ('on' if value is True else value)}"
            + (f" for {name}" if len(classes) > 1 else "")
            for name, value in defaults
        )
        text = f"{helps[field_name]} (default: {shown})"
        dest = dest_prefix + field_name
        first = defaults[0][1]
        if isinstance(first, bool):
            parser.add_argument(
                flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=text
            )
            continue
        annotation = next(f.type for f in fields(owned[0][1]) if f.name == field_name)  # type: ignore[arg-type]
        kind = _value_type(first, annotation)
        parser.add_argument(flag, dest=dest, type=kind, default=None, metavar=field_name.upper(), help=text)


def dataclass_values(args: argparse.Namespace, dest_prefix: str) -> dict[str, Any]:
    """The flags `add_dataclass_flags` stored under ``dest_prefix``, by field name."""
    return {k[len(dest_prefix) :]: v for k, v in vars(args).items() if k.startswith(dest_prefix)}


def _list_parser(item: type, separator: str, what: str) -> Any:
    def parse(text: str) -> tuple[Any, ...]:
        if text.strip().lower() == "none":
            return ()
        parts = [p.strip() for p in text.split(separator)]
        if not text.strip() or any(not p for p in parts):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        try:
            return tuple(item(p) for p in parts)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None

    return parse


def add_override_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    helps: Mapping[str, str],
    dest_prefix: str,
    flag_names: Mapping[str, str] | None = None,
    base: str = "the preset's",
) -> None:
    """Flags for fields of ``cls`` named in ``helps`` whose parsed default is None, meaning
    "not given: keep the base's value" (``base`` names it in the help: a preset's, for the
    U-Net's fields). A tuple of ints
    is written ``1,2,2,4``; a tuple of strings ``res/res,attn`` (one item per ``/``); either
    ``none`` for an empty one; a bool ``--x/--no-x``."""
    for f in fields(cls):  # type: ignore[arg-type]
        if f.name not in helps:
            continue
        flag = (flag_names or {}).get(f.name, "--" + f.name.replace("_", "-"))
        dest, text, annotation = dest_prefix + f.name, str(f.type), field_default(cls, f.name)
        if isinstance(annotation, bool):
            parser.add_argument(
                flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=helps[f.name]
            )
            continue
        kind: Any
        if text.startswith("tuple[int"):
            kind = _list_parser(int, ",", "whole numbers separated by commas, e.g. 1,2,2")
        elif text.startswith("tuple[str"):
            kind = _list_parser(str, "/", "one recipe per level separated by /, e.g. res/res,attn")
        else:
            kind = _value_type(annotation, f.type)
        parser.add_argument(
            flag, dest=dest, type=kind, default=None, metavar=f.name.upper(), help=helps[f.name]
        )
