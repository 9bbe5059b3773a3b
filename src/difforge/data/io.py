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

Every failure (empty file, not an image, truncated data, unsupported mode, more pixels than
`max_image_pixels`) becomes an `UnreadableImageError` naming the file and the reason.
Truncated files are detected because Pillow's ``LOAD_TRUNCATED_IMAGES`` is left at its
default (False).

Memory stays bounded for very large images: the declared size is checked against
`max_image_pixels` (`MAX_IMAGE_PIXELS`, or the ``DIFFORGE_MAX_IMAGE_PIXELS`` environment
variable) before any pixel is decoded; with a ``draft_size``, JPEGs are decoded at 1/2, 1/4
or 1/8 scale and every format is box-reduced right after decoding, before the mode
conversions copy it; decodes of more than `LARGE_IMAGE_PIXELS` run one at a time per process.
Inside `open_image` this limit replaces Pillow's own decompression-bomb check (so Pillow's
``DecompressionBombWarning``/``DecompressionBombError`` never reach the user); Pillow's
check keeps working unchanged for any other code in the process.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import stat
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

from difforge.errors import DifforgeError

logger = logging.getLogger("difforge.data")

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

MAX_IMAGE_PIXELS = 1 << 28
"""Default limit on an image's declared width x height: 268,435,456 pixels (16384 x 16384).

Decoding such an image at full size takes about 0.75 GiB as 8-bit RGB (up to ~2.3 GiB while
a palette/alpha image is converted), which a training machine can afford one at a time. It is
3x Pillow's own default (89,478,485 pixels, which refuses 100-150 MP photos and most scans and
panoramas), while a decompression bomb (a few KB claiming e.g. 65535 x 65535 pixels) is still
refused before any pixel is decoded. Override it with ``DIFFORGE_MAX_IMAGE_PIXELS``."""

MAX_PIXELS_ENV = "DIFFORGE_MAX_IMAGE_PIXELS"
"""Environment variable that overrides `MAX_IMAGE_PIXELS` (a positive whole number)."""

LARGE_IMAGE_PIXELS = 1 << 24
"""Decodes of more than this many pixels (after JPEG draft scaling; 16.8 M, ~50 MB as RGB) are
serialised within a process, so decoding threads never hold several huge images at once."""

REDUCING_GAP = 2
"""With a ``draft_size``, images are box-reduced by an integer factor while their shorter side
stays >= ``REDUCING_GAP * draft_size`` (the final antialiased resize does the rest)."""

UNREADABLE_FOLDER = "unreadable folder"
"""Start of the reason recorded for a sub-folder that cannot be listed."""

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_EXIF_ORIENTATION = 0x0112
_ORIENTATION_TRANSPOSE = {  # EXIF orientation -> the transpose that makes the image upright
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_LARGE_DECODE = threading.Lock()


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


class _TooManyPixels(Image.DecompressionBombError):
    """An image whose declared size is over the pixel limit (raised inside `open_image`)."""

    def __init__(self, size: tuple[int, int], limit: int) -> None:
        self.size = size
        self.limit = limit
        width, height = size
        super().__init__(
            f"{width}x{height} = {width * height:,} pixels, over the limit of {limit:,}; "
            f"set {MAX_PIXELS_ENV} to raise it"
        )


def max_image_pixels() -> int:
    """The pixel limit in force: ``DIFFORGE_MAX_IMAGE_PIXELS`` when set, else `MAX_IMAGE_PIXELS`.

    The variable takes a positive whole number (``400000000``, ``400_000_000`` or ``4e8``); it
    is read on every call. Raises `DifforgeError` (one line) for any other value.
    """
    text = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not text:
        return MAX_IMAGE_PIXELS
    value = 0
    try:
        value = int(text)
    except ValueError:
        with contextlib.suppress(ValueError):
            number = float(text)
            value = int(number) if number.is_integer() else 0
    if value < 1:
        raise DifforgeError(
            f"{MAX_PIXELS_ENV}={text!r} is not a positive whole number of pixels "
            f"(the default is {MAX_IMAGE_PIXELS}; e.g. 4e8 allows 20000x20000 images)"
        )
    return value


def _check_pixels(size: tuple[int, int], limit: int) -> None:
    """Raise `_TooManyPixels` when ``size`` (width, height) has more than ``limit`` pixels."""
    if max(1, size[0]) * max(1, size[1]) > limit:
        raise _TooManyPixels((size[0], size[1]), limit)


_size_limit = threading.local()
"""``value``: the pixel limit while this thread is inside `open_image` (else unset/None)."""


def _install_size_check() -> None:
    """Put difforge's size check in place of Pillow's ``Image._decompression_bomb_check``.

    Pillow calls that function with each image's (and GIF frame's) declared size; it warns
    above ``Image.MAX_IMAGE_PIXELS`` and raises above twice that. While the current thread is
    inside `open_image` the replacement applies `max_image_pixels` instead (raising
    `_TooManyPixels`, never warning); everywhere else it calls Pillow's own check unchanged.
    A Pillow without that function keeps its own check (whose errors `open_image` catches).
    """
    pillow_check: Callable[..., None] | None = getattr(Image, "_decompression_bomb_check", None)
    if pillow_check is None:
        return
    original: Callable[..., None] = getattr(pillow_check, "__wrapped__", pillow_check)  # on reload

    @functools.wraps(original)
    def size_check(size: tuple[int, int], *args: Any, **kwargs: Any) -> None:
        limit = getattr(_size_limit, "value", None)
        if limit is None:
            original(size, *args, **kwargs)
        else:
            _check_pixels(size, limit)

    Image._decompression_bomb_check = size_check  # type: ignore[assignment]


_install_size_check()


@dataclass
class FolderListing:
    """What `scan_image_folder` found under a folder.

    Attributes:
        root: the folder.
        files: the image files that can be opened, sorted by their path relative to ``root``.
        stats: `os.stat` of each file (of a symlink's target), in the same order.
        skipped: (path relative to ``root``, reason), sorted by path, of every image name that
            cannot be opened ("broken symlink (...)", "symlink loop", "not a regular file",
            "cannot read: ...") and of every sub-folder that cannot be listed (its name ends
            with ``/``, its reason is ``"unreadable folder: <error>"``).
    """

    root: Path
    files: list[Path] = field(default_factory=list)
    stats: list[os.stat_result] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def unreadable_folders(self) -> int:
        """How many entries of ``skipped`` are folders."""
        return sum(reason.startswith(UNREADABLE_FOLDER) for _, reason in self.skipped)


def _stat_image(path: str) -> os.stat_result | str:
    """`os.stat` of an image file (following symlinks), or why it cannot be opened."""
    try:
        info = os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symlink loop"
        if exc.errno in (errno.ENOENT, errno.ENOTDIR) and os.path.islink(path):
            try:
                return f"broken symlink: {os.readlink(path)!r} does not exist"
            except OSError:
                return "broken symlink"
        if exc.errno == errno.ENOENT:
            return "file not found"
        return f"cannot read: {exc.strerror or exc}"
    if not stat.S_ISREG(info.st_mode):  # a FIFO would block the reader for ever
        return "not a regular file"
    return info


def _first(skipped: list[tuple[str, str]]) -> str:
    name, reason = skipped[0]
    return f"{name} ({reason})"


def scan_image_folder(root: str | os.PathLike[str]) -> FolderListing:
    """Walk ``root`` for image files; list the ones that cannot be opened apart.

    Files are matched by suffix (`IMAGE_EXTENSIONS`, case-insensitive); hidden files and
    folders (names starting with ``.``) are ignored; symlinked folders are followed once.
    Broken symlinks, symlink loops and special files with an image suffix, and sub-folders
    that cannot be listed (no permission, I/O error), go to ``skipped`` instead of ``files``.
    The order is the path relative to ``root`` (POSIX form), whatever the file system's
    listing order.

    Raises `DifforgeError` (one line, naming the path) when ``root`` does not exist, is not a
    folder, cannot be listed, or holds no image file that can be opened.
    """
    root = Path(root)
    if not root.exists():
        raise DifforgeError(f"data folder {str(root)!r} does not exist")
    if not root.is_dir():
        raise DifforgeError(f"data path {str(root)!r} is not a folder")
    found: list[tuple[str, Path, os.stat_result]] = []
    skipped: list[tuple[str, str]] = []
    errors: list[OSError] = []
    seen_dirs: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, onerror=errors.append, followlinks=True):
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
            rel = path.relative_to(root).as_posix()
            result = _stat_image(str(path))
            if isinstance(result, str):
                skipped.append((rel, result))
            else:
                found.append((rel, path, result))
    for error in errors:  # os.walk could not list these folders
        text = error.strerror or str(error)
        where = os.path.abspath(error.filename) if isinstance(error.filename, str) else None
        if where is None or where == os.path.abspath(root):
            raise DifforgeError(f"cannot read data folder {str(root)!r}: {text}")
        rel = os.path.relpath(where, os.path.abspath(root)).replace(os.sep, "/")
        skipped.append((rel + "/", f"{UNREADABLE_FOLDER}: {text}"))
    found.sort(key=lambda item: item[0])
    skipped.sort()
    if not found:
        bad_files = [item for item in skipped if not item[1].startswith(UNREADABLE_FOLDER)]
        if bad_files:
            raise DifforgeError(
                f"none of the {len(bad_files)} image files in {str(root)!r} can be read "
                f"(e.g. {_first(bad_files)})"
            )
        if skipped:
            folders = f"{len(skipped)} folder{'s' if len(skipped) > 1 else ''}"
            raise DifforgeError(
                f"no image files found in {str(root)!r}; {folders} could not be read: {_first(skipped)}"
            )
        exts = ", ".join(IMAGE_EXTENSIONS)
        raise DifforgeError(f"no image files ({exts}) found in {str(root)!r}")
    return FolderListing(
        root=root,
        files=[path for _, path, _ in found],
        stats=[info for _, _, info in found],
        skipped=skipped,
    )


def list_image_files(root: str | os.PathLike[str]) -> list[Path]:
    """All image files under ``root`` that can be opened, recursively, in a deterministic order.

    `scan_image_folder`'s ``files``: matched by suffix (`IMAGE_EXTENSIONS`, case-insensitive),
    hidden files and folders ignored, symlinked folders followed once, sorted by the path
    relative to ``root``. Broken symlinks, symlink loops, special files and unreadable
    sub-folders are left out with one logging warning (logger ``difforge.data``) naming them.

    Raises `DifforgeError` naming the path when ``root`` does not exist, is not a folder,
    cannot be listed, or holds no image file that can be opened.
    """
    listing = scan_image_folder(root)
    if listing.skipped:
        shown = "; ".join(f"{name} ({reason})" for name, reason in listing.skipped[:5])
        more = len(listing.skipped) - 5
        logger.warning(
            "left out %d entries of %r that cannot be read: %s%s",
            len(listing.skipped),
            str(listing.root),
            shown,
            f"; and {more} more" if more > 0 else "",
        )
    return listing.files


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


def _reduce(img: Image.Image, draft_size: int) -> Image.Image:
    """Box-reduce ``img`` by the largest integer factor that keeps its shorter side
    >= ``REDUCING_GAP * draft_size`` (alpha is premultiplied by Pillow); as is when < 2."""
    factor = min(img.size) // (REDUCING_GAP * draft_size)
    return img.reduce(factor) if factor >= 2 else img


def _decode(img: Image.Image, mode: ImageMode, draft_size: int | None) -> Image.Image:
    """Decode an opened image: load, normalise the mode, reduce, composite, turn upright."""
    img.load()  # decodes the first frame; raises on truncated data
    file_format = img.format
    orientation = img.getexif().get(_EXIF_ORIENTATION, 1)  # read before reduce() drops tags
    img = _normalise_mode(img, file_format)
    if draft_size is not None:
        img = _reduce(img, draft_size)  # before the copies below, which then stay small
    img = _over_white(img)
    transpose = _ORIENTATION_TRANSPOSE.get(orientation)
    if transpose is not None:
        img = img.transpose(transpose)
    return img.convert(mode) if img.mode != mode else img.copy()


# Pillow's plugins warn about damaged files they still half-read ("Corrupt EXIF data", ...):
# such a file is either decoded or skipped and counted here, so the warning would only add
# lines to the one-line report. Only warnings raised from inside Pillow are silenced.
warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")


def open_image(
    path: str | os.PathLike[str], mode: ImageMode, *, draft_size: int | None = None
) -> Image.Image:
    """Decode ``path`` fully into a Pillow image of mode ``mode`` ("RGB" or "L").

    ``draft_size``: when given, the image will be shrunk to about that size anyway, so it is
    decoded with bounded memory: JPEGs at a reduced scale (1/2, 1/4, 1/8) keeping both sides
    >= ``draft_size``, then any format is box-reduced right after decoding while its shorter
    side stays >= ``REDUCING_GAP * draft_size`` (see `REDUCING_GAP`). Without it the image
    keeps its full size. GIF/TIFF/WebP animations: the first frame.

    An image whose declared width x height is over `max_image_pixels` is refused before its
    pixels are decoded; decodes over `LARGE_IMAGE_PIXELS` run one at a time in a process.

    Raises `UnreadableImageError` (naming the file and the reason) for anything that cannot
    be decoded, and `DifforgeError` when ``DIFFORGE_MAX_IMAGE_PIXELS`` holds a bad value.
    """
    if mode not in ("RGB", "L"):
        raise ValueError(f"mode must be 'RGB' or 'L', not {mode!r}")
    name = os.fspath(path)
    limit = max_image_pixels()
    try:
        if os.path.getsize(name) == 0:
            raise UnreadableImageError(name, "empty file (0 bytes)")
        _size_limit.value = limit  # Pillow's size check applies `limit` in this thread
        try:
            with warnings.catch_warnings():  # Pillow half-reading a damaged file warns; it is counted instead
                warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
                with Image.open(name) as img:
                    _check_pixels(img.size, limit)  # in case Pillow did not call the check
                    if draft_size is not None and img.format == "JPEG":
                        img.draft(img.mode, (draft_size, draft_size))
                    width, height = img.size
                    large = width * height > LARGE_IMAGE_PIXELS
                    with _LARGE_DECODE if large else contextlib.nullcontext():
                        return _decode(img, mode, draft_size)
        finally:
            _size_limit.value = None
    except UnreadableImageError:
        raise
    except _TooManyPixels as exc:
        raise UnreadableImageError(name, str(exc)) from None
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
