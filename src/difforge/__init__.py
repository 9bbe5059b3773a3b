"""difforge: train image diffusion models on your own pictures and sample from them."""

from difforge.errors import DifforgeError

__version__ = "0.1.0"

__all__ = ["DifforgeError", "__version__"]
