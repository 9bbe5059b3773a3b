"""Turning model tensors into pictures: uint8 arrays, grids, image and GIF files, and the
checks that an output path can be written before any work starts."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from difforge.errors import DifforgeError


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


IMAGE_FORMATS = {
    ".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP",
    ".tif": "TIFF", ".tiff": "TIFF",
}  # fmt: skip
"""File extension -> the format an image is written in (the extension names the format)."""


def check_output_file(path: str | os.PathLike[str], flag: str, formats: Mapping[str, str]) -> Path:
    """Raise a one-line DifforgeError unless ``path`` can be written as one of ``formats``
    (by extension): not an existing folder, a known extension, and a folder for it that
    exists and is writable or can be created. Nothing is written. Returns the path."""
    path = Path(path)
    if path.is_dir():
        raise DifforgeError(f"{flag} {path}: is a folder; give a file name ending in {_extensions(formats)}")
    if path.suffix.lower() not in formats:
        raise DifforgeError(f"{flag} {path}: unknown image type {path.suffix!r}; use {_extensions(formats)}")
    check_output_folder(path.parent, flag)
    return path


def check_output_folder(folder: str | os.PathLike[str], flag: str) -> Path:
    """Raise a one-line DifforgeError unless ``folder`` is, or can be made, a writable folder."""
    folder = Path(folder)
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise DifforgeError(f"{flag} {folder}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise DifforgeError(f"{flag} {folder}: {existing} is not writable")
    return folder


def _extensions(formats: Mapping[str, str]) -> str:
    return ", ".join(formats)


def _write_atomic(path: Path, write: Callable[[Path], None]) -> Path:
    """``write(temporary)`` next to ``path``, then rename; the temporary never outlives a failure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def save_image(path: str | os.PathLike[str], image: np.ndarray) -> Path:
    """Write an (H, W, C) uint8 image in the format its extension names (`IMAGE_FORMATS`),
    via a temporary file and a rename."""
    path = Path(path)
    image_format = IMAGE_FORMATS.get(path.suffix.lower())
    if image_format is None:
        raise DifforgeError(f"{path}: unknown image type {path.suffix!r}; use {_extensions(IMAGE_FORMATS)}")
    picture = _pil(image)
    if image_format == "JPEG" and picture.mode not in ("L", "RGB"):
        picture = picture.convert("RGB")
    return _write_atomic(path, lambda temporary: picture.save(temporary, format=image_format))


def save_png(path: str | os.PathLike[str], image: np.ndarray) -> Path:
    """Write an (H, W, C) uint8 image as PNG (via a temporary file and a rename)."""
    path = Path(path)
    return _write_atomic(path, lambda temporary: _pil(image).save(temporary, format="PNG"))


def save_gif(path: str | os.PathLike[str], frames: Sequence[np.ndarray], fps: float = 10.0) -> Path:
    """Write (H, W, C) uint8 frames as a looping GIF at ``fps`` frames per second; the last
    frame is held for a second."""
    pictures = [_pil(frame).convert("RGB") for frame in frames]
    duration = max(20, round(1000.0 / fps))
    durations = [duration] * (len(pictures) - 1) + [1000]

    def write(temporary: Path) -> None:
        pictures[0].save(
            temporary, format="GIF", save_all=True, append_images=pictures[1:], duration=durations, loop=0
        )

    return _write_atomic(Path(path), write)
