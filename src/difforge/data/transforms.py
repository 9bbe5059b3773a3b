"""Geometric preprocessing: resize the shorter side, crop to a square, flip, scale to [-1, 1].

The resize is done once (when an image is decoded) with Pillow's antialiased bicubic filter;
the crop position and the flip are drawn per sample from torch's global RNG, so a DataLoader
(which seeds torch in every worker from the main seed) makes them reproducible.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

RESAMPLE = Image.Resampling.BICUBIC
"""Resampling filter for every resize (antialiased when shrinking)."""


def resize_shorter_side(img: Image.Image, size: int) -> Image.Image:
    """Resize so that the shorter side is ``size`` pixels, keeping the aspect ratio.

    The longer side becomes ``round(long * size / short)`` (at least ``size``). Returns the
    image itself when it already has that size.
    """
    width, height = img.size
    short = min(width, height)
    if short == size:
        return img
    scale = size / short
    if width <= height:
        new = (size, max(size, round(height * scale)))
    else:
        new = (max(size, round(width * scale)), size)
    return img.resize(new, RESAMPLE)


def center_crop(arr: np.ndarray, size: int) -> np.ndarray:
    """Central ``size`` x ``size`` window of an (H, W, C) array with H, W >= ``size``."""
    height, width = arr.shape[:2]
    top = (height - size) // 2
    left = (width - size) // 2
    return arr[top : top + size, left : left + size]


def random_crop_offsets(height: int, width: int, size: int) -> tuple[int, int]:
    """Uniform (top, left) of a ``size`` window in an (height, width) image, from torch's RNG."""
    top = int(torch.randint(0, height - size + 1, ()).item()) if height > size else 0
    left = int(torch.randint(0, width - size + 1, ()).item()) if width > size else 0
    return top, left


def to_model_range(arr: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, C) array, 0..255 -> contiguous float32 (C, H, W) tensor, 0 -> -1, 255 -> 1."""
    tensor = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)
    tensor = tensor.to(torch.float32, memory_format=torch.contiguous_format)
    return tensor.mul_(2.0 / 255.0).sub_(1.0)
