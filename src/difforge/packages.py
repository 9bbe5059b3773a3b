"""Where files live: inside other installed packages (datasets, network weights), and the
cache directory for what difforge derives from them (FID statistics, compiled CPU kernels)."""

from __future__ import annotations

import importlib.util
import os
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


def default_cache_dir() -> Path:
    """``$DIFFORGE_CACHE`` if set, else ``~/.cache/difforge``."""
    env = os.environ.get("DIFFORGE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "difforge"
