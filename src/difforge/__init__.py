"""difforge: train image diffusion models on your own pictures and sample from them.

``import difforge`` stays light (no torch): the parts are imported from their modules, e.g.
``from difforge.pipeline import Pipeline``. The layers and where each part lives are in
``docs/architecture.md``.
"""

from __future__ import annotations

from difforge.errors import DifforgeError

__version__ = "0.1.0"

__all__ = ["DifforgeError", "__version__"]
