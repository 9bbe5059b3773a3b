"""Finding and decoding image files.

`list_image_files` walks a folder for images; `decode_image` turns one file of any common
format and mode into a plain uint8 array, so the rest of the data layer only ever sees
``(H, W, 3)`` RGB or ``(H, W, 1)`` grey pixels in 0..255.

Mode conversions done by `open_image` / `decode_image`:

- grey (``1``, ``L``), palette (``P``, with or without transparency), ``RGB``, ``CMYK``,
  ``YCbCr``, ``LAB``, ``HSV`` are converted with Pillow's own conversions;
- anything with transparency (``RGBA``, ``LA``, ``PA``, premultiplied ``RGBa``/``La``, a
  palette or a grey/RGB PNG with a ``tRNS`` colour) is alpha-composited over white;
- 16-bit grey (``I;16``, ``I;16B``, ``I;16L``, ``I;16N``, and ``I`` from a PNG, as older
  Pillow reads 16-bit PNGs) is scaled to 8-bit by ``v / 257`` (65535 -> 255), rounded; other
  32-bit ``I``/``I;*`` and float ``F`` images are scaled by their value range (``F`` in
  [0, 1] -> x 255; integer data that fits 0..255 kept; fits 0..65535 -> / 257; otherwise
  min-max stretched); 16-bit RGB/RGBA PNGs are reduced to 8 bits by Pillow itself;
- the EXIF orientation tag is applied (photos come out upright);
- RGB -> grey uses Pillow's ITU-R 601-2 luma (``L = 0.299 R + 0.587 G + 0.114 B``).

Every failure (empty file, not an image, truncated data, unsupported mode, decompression
bomb) becomes an `UnreadableImageError` naming the file and the reason. Truncated files are
detected because Pillow's ``LOAD_TRUNCATED_IMAGES`` is left at its default (False).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from difforge.errors import DifforgeError

IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".png",
    ".jpg",
    ".jpeg",
    ".jpe",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
    ".webp",
)
"""Lower-case file-name suffixes treated as images (matched case-insensitively)."""

ImageMode = Literal["RGB", "L"]

WHITE = 255
"""Background value that transparent pixels are composited over (white)."""

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})


class UnreadableImageError(DifforgeError):
    """An image file that cannot be decoded (empty, damaged, truncated, not an image).

    Attributes ``path`` (the file) and ``reason`` (one short line) are kept for reports.
    """

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"cannot read image {self.path!r}: {reason}")

    def __reduce__(self) -> tuple[type[UnreadableImageError], tuple[str, str]]:
        return (type(self), (self.path, self.reason))


def list_image_files(root: str | os.PathLike[str]) -> list[Path]:
    """All image files under ``root``, recursively, in a deterministic order.

    Files are matched by suffix (`IMAGE_EXTENSIONS`, case-insensitive); hidden files and
    folders (names starting with ``.``) are ignored; symlinked folders are followed once.
    The result is sorted by the path relative to ``root`` (POSIX form), so it does not depend
    on the file system's listing order.

    Raises `DifforgeError` naming the path when ``root`` does not exist, is not a folder, or
    holds no image file.
    """
    root = Path(root)
    if not root.exists():
        raise DifforgeError(f"data folder {str(root)!r} does not exist")
    if not root.is_dir():
        raise DifforgeError(f"data path {str(root)!r} is not a folder")
    found: list[tuple[str, Path]] = []
    seen_dirs: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen_dirs:  # a symlink loop or a folder linked twice
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name.startswith(".") or os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            path = Path(dirpath, name)
            found.append((path.relative_to(root).as_posix(), path))
    if not found:
        exts = ", ".join(IMAGE_EXTENSIONS)
        raise DifforgeError(f"no image files ({exts}) found in {str(root)!r}")
    found.sort(key=lambda item: item[0])
    return [path for _, path in found]


def _scale_wide_grey(img: Image.Image, sixteen_bit: bool) -> Image.Image:
    """16-bit / 32-bit / float grey image -> 8-bit ``L`` image (see the module docstring)."""
    values = np.asarray(img)
    if sixteen_bit:
        out = values.astype(np.float32) / 257.0
    elif img.mode == "F" and values.size and values.min() >= 0.0 and values.max() <= 1.0:
        out = values.astype(np.float32) * 255.0
    else:
        values = values.astype(np.float64)
        lo = float(values.min()) if values.size else 0.0
        hi = float(values.max()) if values.size else 0.0
        if lo >= 0.0 and hi <= 255.0:
            out = values
        elif lo >= 0.0 and hi <= 65535.0:
            out = values / 257.0
        else:
            out = (values - lo) * (255.0 / max(hi - lo, 1e-12))
    out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return Image.fromarray(out)


def _normalise_mode(img: Image.Image, file_format: str | None) -> Image.Image:
    """Convert any Pillow mode to one of ``L``, ``LA``, ``RGB``, ``RGBA``.

    ``file_format`` (Pillow's ``format`` of the file): PNG integer grey is always 16-bit.
    """
    mode = img.mode
    if mode in ("I", "F") or mode.startswith("I;"):
        sixteen_bit = mode in _SIXTEEN_BIT_MODES or (mode == "I" and file_format == "PNG")
        return _scale_wide_grey(img, sixteen_bit)
    has_key_colour = "transparency" in img.info
    if mode == "1":
        return img.convert("L")
    if mode in ("L", "RGB"):
        return img.convert("RGBA") if has_key_colour else img
    if mode == "P":
        return img.convert("RGBA" if has_key_colour else "RGB")
    if mode in _ALPHA_MODES:
        return img.convert("LA" if mode in ("LA", "La") else "RGBA")
    # CMYK, YCbCr, LAB, HSV, RGBX, ...: Pillow knows how to make RGB of them.
    return img.convert("RGB")


def _over_white(img: Image.Image) -> Image.Image:
    """Alpha-composite an ``LA``/``RGBA`` image over white; other modes pass through."""
    if img.mode not in ("LA", "RGBA"):
        return img
    base_mode = img.mode[:-1]
    background = Image.new(base_mode, img.size, (WHITE,) * len(base_mode))
    background.paste(img.convert(base_mode), mask=img.getchannel("A"))
    return background


def open_image(
    path: str | os.PathLike[str], mode: ImageMode, *, draft_size: int | None = None
) -> Image.Image:
    """Decode ``path`` fully into a Pillow image of mode ``mode`` ("RGB" or "L").

    ``draft_size``: when given, JPEGs may be decoded at a reduced scale (1/2, 1/4, 1/8) as
    long as both sides stay >= ``draft_size`` pixels, which makes large photos much faster
    to load when they will be shrunk anyway. GIF/TIFF/WebP animations: the first frame.

    Raises `UnreadableImageError` (naming the file and the reason) for anything that cannot
    be decoded.
    """
    if mode not in ("RGB", "L"):
        raise ValueError(f"mode must be 'RGB' or 'L', not {mode!r}")
    name = os.fspath(path)
    try:
        if os.path.getsize(name) == 0:
            raise UnreadableImageError(name, "empty file (0 bytes)")
        with Image.open(name) as img:
            if draft_size is not None and img.format == "JPEG":
                img.draft(img.mode, (draft_size, draft_size))
            img.load()  # decodes the first frame; raises on truncated data
            file_format = img.format
            img = ImageOps.exif_transpose(img)
            img = _over_white(_normalise_mode(img, file_format))
            return img.convert(mode) if img.mode != mode else img.copy()
    except UnreadableImageError:
        raise
    except UnidentifiedImageError:
        raise UnreadableImageError(name, "not a recognised image format") from None
    except FileNotFoundError:
        raise UnreadableImageError(name, "file not found") from None
    except Exception as exc:  # Pillow plugins raise OSError, ValueError, SyntaxError, ...
        text = str(exc).strip()
        reason = text.splitlines()[0] if text else type(exc).__name__
        raise UnreadableImageError(name, reason) from exc


def pil_to_array(img: Image.Image) -> np.ndarray:
    """``L``/``RGB`` Pillow image -> writable uint8 array of shape (H, W, C), C = 1 or 3."""
    arr = np.array(img, dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr


def decode_image(path: str | os.PathLike[str], mode: ImageMode) -> np.ndarray:
    """Decode an image file to a uint8 array of shape (H, W, 3) for "RGB" or (H, W, 1) for "L".

    Values are 0..255; transparency is composited over white; 16-bit data is scaled to 8-bit.
    Raises `UnreadableImageError` naming the file and the reason when it cannot be decoded.
    """
    return pil_to_array(open_image(path, mode))
