"""Finding files shipped inside other installed packages (datasets, network weights)."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def package_dirs(module: str) -> list[Path]:
    """The folders of an installed top-level package, found WITHOUT importing it (some of
    the packages we read data from import matplotlib or OpenCV); [] when it is not installed."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return []
    if spec is None or not spec.submodule_search_locations:
        return []
    return [Path(location) for location in spec.submodule_search_locations]
