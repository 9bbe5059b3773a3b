"""difforge: train image diffusion models on your own pictures and sample from them."""

from __future__ import annotations

from typing import Any

from difforge.errors import DifforgeError

__version__ = "0.1.0"

__all__ = ["DifforgeError", "Pipeline", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "Pipeline":  # imported on first use: `import difforge` stays light
        from difforge.pipeline import Pipeline

        return Pipeline
    raise AttributeError(f"module 'difforge' has no attribute {name!r}")
