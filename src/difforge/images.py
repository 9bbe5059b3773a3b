"""Turning model tensors into pictures: uint8 arrays, grids, PNG and GIF files."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) floats in [-1, 1] -> (N, H, W, C) uint8, rounding ((x + 1) * 127.5)."""
    scaled = ((images.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5).round()
    return scaled.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def make_grid(images: np.ndarray, columns: int | None = None, padding: int = 2) -> np.ndarray:
    """(N, H, W, C) uint8 -> one (rows * (H + p) + p, cols * (W + p) + p, C) uint8 image,
    row-major, on a white background. ``columns`` defaults to ceil(sqrt(N))."""
    count, height, width, channels = images.shape
    columns = columns or max(1, math.ceil(math.sqrt(count)))
    rows = math.ceil(count / columns)
    grid = np.full(
        (rows * (height + padding) + padding, columns * (width + padding) + padding, channels),
        255,
        dtype=np.uint8,
    )
    for index in range(count):
        row, column = divmod(index, columns)
        top, left = padding + row * (height + padding), padding + column * (width + padding)
        grid[top : top + height, left : left + width] = images[index]
    return grid


def _pil(array: np.ndarray) -> Image.Image:
    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)


def _atomic_path(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def save_png(path: str | os.PathLike[str], image: np.ndarray) -> Path:
    """Write an (H, W, C) uint8 image as PNG (via a temporary file and a rename)."""
    path = Path(path)
    temporary = _atomic_path(path)
    _pil(image).save(temporary, format="PNG")
    os.replace(temporary, path)
    return path


def save_gif(path: str | os.PathLike[str], frames: Sequence[np.ndarray], fps: float = 10.0) -> Path:
    """Write (H, W, C) uint8 frames as a looping GIF at ``fps`` frames per second; the last
    frame is held for a second."""
    path = Path(path)
    temporary = _atomic_path(path)
    pictures = [_pil(frame).convert("RGB") for frame in frames]
    duration = max(20, round(1000.0 / fps))
    durations = [duration] * (len(pictures) - 1) + [1000]
    pictures[0].save(
        temporary, format="GIF", save_all=True, append_images=pictures[1:], duration=durations, loop=0
    )
    os.replace(temporary, path)
    return path
