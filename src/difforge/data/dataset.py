"""`ImageDataset`: a folder of images or a built-in dataset, as (C, S, S) tensors in [-1, 1].

`load_dataset` is the entry point. It decodes every file once when the dataset is built, so
damaged files are found before training starts (they go to ``skipped`` and are reported once
with a logging warning); the decoded, resized uint8 pixels are kept in memory when they fit
(`CACHE_LIMIT_BYTES`), which makes ``__getitem__`` a few microseconds. Without the cache each
item is decoded again from disk; a file that has become unreadable since is replaced by the
next readable one (deterministically) and counted in ``runtime_failures``, never raised.
"""

from __future__ import annotations

import hashlib
import json
import logging
import operator
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from difforge.conditioning import ClassLabel, ImageCondition, resize_images
from difforge.data.builtin import BUILTIN_DATASETS, load_builtin
from difforge.data.io import (
    ImageMode,
    UnreadableImageError,
    list_image_files,
    max_image_pixels,
    open_image,
    pil_to_array,
    scan_image_folder,
)
from difforge.data.transforms import (
    center_crop,
    random_crop_offsets,
    resize_shorter_side,
    to_model_range,
)
from difforge.errors import DifforgeError

logger = logging.getLogger("difforge.data")

CACHE_LIMIT_BYTES = 1 << 30
"""``cache=None`` keeps decoded pixels in memory when they take less than this (1 GiB)."""

SKIPPED_SHOWN = 5
"""How many skipped file names a report lists before "and N more"."""

_FINGERPRINT_VERSION = 1


@dataclass(frozen=True)
class _Preprocess:
    """Settings that decide the pixels a dataset yields (part of the fingerprint)."""

    image_size: int
    channels: int
    random_crop: bool
    hflip: bool

    @property
    def mode(self) -> ImageMode:
        return "L" if self.channels == 1 else "RGB"

    def prepare(self, img: Image.Image) -> np.ndarray:
        """Decoded image -> uint8 (H, W, C): shorter side resized to ``image_size``.

        Centre-cropped to (S, S, C) unless ``random_crop`` (then cropped per item).
        """
        arr = pil_to_array(resize_shorter_side(img, self.image_size))
        if not self.random_crop:
            arr = np.ascontiguousarray(center_crop(arr, self.image_size))
        return arr


def low_res_condition(image: torch.Tensor, size: int) -> torch.Tensor:
    """The super-resolution condition of a (C, S, S) target in [-1, 1]: its area average
    down to (C, size, size) (exact block means when S / size is whole), rounded to the
    8-bit levels a stored picture or a base model's sample has."""
    levels = torch.round((image + 1) * 127.5)  # the target's own 8-bit levels, exactly
    small = resize_images(levels[None], size)[0]  # sums of whole numbers: ties are exact
    return torch.round(small) / 127.5 - 1


def _hash(payload: dict[str, object]) -> str:
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _format_skipped(skipped: list[tuple[str, str]]) -> str:
    shown = "; ".join(f"{name} ({reason})" for name, reason in skipped[:SKIPPED_SHOWN])
    more = len(skipped) - SKIPPED_SHOWN
    return shown + (f"; and {more} more" if more > 0 else "")


class ImageDataset(Dataset[tuple[torch.Tensor, dict[str, torch.Tensor]]]):
    """Images as float32 (C, S, S) tensors in [-1, 1] with their conditioning dict.

    Build it with `load_dataset`. ``dataset[i]`` returns ``(image, cond)``: ``image`` float32
    of shape (channels, image_size, image_size) with 0 -> -1 and 255 -> 1, ``cond`` the dict
    of `difforge.conditioning`: ``"class_labels"`` an int64 0-d tensor (the class id, or -1
    when the dataset is unlabelled), or with a label table (`with_label_table`) a float32
    (L,) multi-hot vector; ``"image_cond"`` when the dataset has paired conditions
    (`with_paired_conditions`: the condition image, cropped and flipped with its target)
    or a ``low_res`` size (super-resolution: the target area-downsampled to low_res x
    low_res and rounded to 8 bits, as a base model's samples are), float32 (C', h, w) in
    [-1, 1]. Random crops and flips draw from torch's global RNG. Holds no open file:
    pickles for DataLoader workers.

    Attributes:
        source: the folder (absolute path) or the built-in name.
        kind: "folder" or "builtin".
        image_size: S, the side of every image in pixels.
        channels: C, 1 (grey) or 3 (RGB).
        class_names: one name per class id (empty when unlabelled).
        num_classes: ``len(class_names)`` (0 when unlabelled).
        fingerprint: 16 hex digits identifying the sources and the preprocessing settings.
        skipped: (path relative to the folder, reason) of each file that could not be opened
            or decoded (broken symlink, symlink loop, damaged, over the pixel limit, ...) and
            of each sub-folder that could not be listed (its name ends with ``/``).
        attribution: credit/licence line to print (built-ins; empty for folders).
        cached: whether decoded pixels are held in memory.
        runtime_failures: files (in this process) that failed in ``__getitem__`` and were
            replaced by another sample.
        multi_label: ``class_names`` are the labels of a multi-hot table.
        paired: the condition images, item i the condition of target i (or None).
        low_res: the side of the super-resolution condition (0 = none).
        excluded: (path, reason) of each readable image left out because it has no entry in
            the label table or no paired condition.
        notes: one line per such exclusion and per unused table entry or condition file,
            for the training report.
    """

    def __init__(
        self,
        *,
        source: str,
        kind: str,
        preprocess: _Preprocess,
        labels: np.ndarray,
        class_names: list[str],
        fingerprint: str,
        pixels: np.ndarray | list[np.ndarray] | None,
        files: list[str],
        skipped: list[tuple[str, str]],
        attribution: str = "",
        paired: ImageDataset | None = None,
        low_res: int = 0,
        excluded: list[tuple[str, str]] | None = None,
        notes: list[str] | None = None,
    ) -> None:
        if pixels is None and not files:
            raise ValueError("an ImageDataset needs either pixels or files")
        self.source = source
        self.kind = kind
        self._pre = preprocess
        self.image_size = preprocess.image_size
        self.channels = preprocess.channels
        self.random_crop = preprocess.random_crop
        self.hflip = preprocess.hflip
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        self.fingerprint = fingerprint
        self.skipped = list(skipped)
        self.attribution = attribution
        self.runtime_failures = 0
        self.multi_label = labels.ndim == 2
        self._labels = np.ascontiguousarray(labels, dtype=np.float32 if self.multi_label else np.int64)
        self.paired = paired
        self.low_res = low_res
        self.excluded = list(excluded or [])
        self.notes = list(notes or [])
        self._pixels = pixels
        self._files = files
        self._failed: set[int] = set()

    # ------------------------------------------------------------------ properties
    @property
    def cached(self) -> bool:
        return self._pixels is not None

    @property
    def cache_bytes(self) -> int:
        """Bytes of uint8 pixels held in memory (0 when not cached)."""
        if self._pixels is None:
            return 0
        if isinstance(self._pixels, np.ndarray):
            return int(self._pixels.nbytes)
        return sum(int(a.nbytes) for a in self._pixels)

    @property
    def labels(self) -> np.ndarray:
        """int64 (N,) class id of every item (-1 when unlabelled), or float32 (N, L) multi-hot
        with a label table; read-only view."""
        view = self._labels.view()
        view.setflags(write=False)
        return view

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, S, S) of every image tensor."""
        return (self.channels, self.image_size, self.image_size)

    # ------------------------------------------------------------------ items
    def __len__(self) -> int:
        return int(self._labels.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        n = len(self)
        index = operator.index(index)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} images")
        if self._pixels is not None:
            arr = self._pixels[index]
            partner = None if self.paired is None else self.paired._pixels_at(index)
        else:
            index, arr, partner = self._load(index)
        size = self.image_size
        if self.random_crop:
            top, left = random_crop_offsets(arr.shape[0], arr.shape[1], size)
            arr = arr[top : top + size, left : left + size]
        image = to_model_range(arr)
        flip = self.hflip and bool(torch.rand(()) < 0.5)
        if flip:
            image = image.flip(-1)
        cond = {ClassLabel.key: self._label(index)}
        if partner is not None:
            condition = to_model_range(partner)
            cond[ImageCondition.key] = condition.flip(-1) if flip else condition
        elif self.low_res:
            cond[ImageCondition.key] = low_res_condition(image, self.low_res)
        return image, cond

    def _label(self, index: int) -> torch.Tensor:
        if self.multi_label:
            return torch.from_numpy(self._labels[index].copy())
        return torch.tensor(int(self._labels[index]), dtype=torch.int64)

    def _pixels_at(self, index: int) -> np.ndarray:
        """The cached pixels of item ``index`` (a paired dataset is cached with its targets)."""
        assert self._pixels is not None
        return self._pixels[index]

    def _load(self, index: int) -> tuple[int, np.ndarray, np.ndarray | None]:
        """Decode item ``index`` (and its paired condition) from disk, or the next readable
        pair if either fails now."""
        n = len(self._files)
        for step in range(n):
            j = (index + step) % n
            if j in self._failed:
                continue
            try:
                img = open_image(self._files[j], self._pre.mode, draft_size=self.image_size)
                partner = None
                if self.paired is not None:
                    paired = self.paired
                    partner = paired._pre.prepare(
                        open_image(paired._files[j], paired._pre.mode, draft_size=paired.image_size)
                    )
                return j, self._pre.prepare(img), partner
            except UnreadableImageError as exc:
                self._failed.add(j)
                self.runtime_failures += 1
                logger.warning("%s; using another image in its place", exc)
        raise DifforgeError(f"no image in {self.source!r} can be read any more")

    # ------------------------------------------------------------------ reporting
    def summary(self) -> str:
        """One line: source, count, shape, classes, cache, skipped files (first few names)."""
        what = f"built-in {self.source!r}" if self.kind == "builtin" else repr(self.source)
        parts = [f"{what}: {len(self)} images of {self.channels}x{self.image_size}x{self.image_size}"]
        if self.num_classes:
            names = ", ".join(self.class_names[:10])
            more = ", ..." if self.num_classes > 10 else ""
            what = "labels" if self.multi_label else "classes"
            parts.append(f"{self.num_classes} {what} ({names}{more})")
        else:
            parts.append("unlabelled")
        if self.paired is not None:
            parts.append(f"paired with {self.paired.channels}-channel conditions from {self.paired.source!r}")
        if self.low_res:
            parts.append(f"super-resolution from {self.low_res}x{self.low_res}")
        if self.excluded:
            parts.append(f"{len(self.excluded)} images left out: {_format_skipped(self.excluded)}")
        if self.cached:
            parts.append(f"cached in memory ({self.cache_bytes / 2**20:.1f} MiB)")
        if self.skipped:
            parts.append(f"{len(self.skipped)} unreadable files skipped: {_format_skipped(self.skipped)}")
        return "; ".join(parts)

    def __repr__(self) -> str:
        return f"ImageDataset({self.summary()})"


# ---------------------------------------------------------------------- building
def _check_settings(image_size: int, channels: int | None) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise DifforgeError(f"image size must be a positive integer, not {image_size!r}")
    if channels not in (None, 1, 3):
        raise DifforgeError(f"channels must be 1 (grey) or 3 (RGB), not {channels!r}")


def _class_labels(root: Path, rel_paths: list[str], skipped: list[str]) -> tuple[list[str], np.ndarray]:
    """Labels from the first-level sub-folder of each file (class names sorted).

    ``skipped``: relative paths of the entries the listing skipped (broken symlinks,
    unreadable folders, ...); the class folders they lie in keep their ids.
    """
    loose = [p for p in rel_paths if "/" not in p]
    if loose:
        raise DifforgeError(
            f"class folders: {len(loose)} image(s) lie directly in {str(root)!r} (e.g. "
            f"{loose[0]!r}); put every image in a sub-folder named after its class"
        )
    first = [p.split("/", 1)[0] for p in rel_paths]
    names = sorted(set(first) | {p.split("/", 1)[0] for p in skipped if "/" in p})
    ids = {name: i for i, name in enumerate(names)}
    return names, np.array([ids[f] for f in first], dtype=np.int64)


def _is_grey(arr: np.ndarray) -> bool:
    """Whether an (H, W, 3) uint8 array has R == G == B everywhere."""
    return bool((arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all())


def _from_folder(
    root: Path,
    *,
    image_size: int,
    channels: int | None,
    class_folders: bool,
    random_crop: bool,
    hflip: bool,
    cache: bool | None,
) -> ImageDataset:
    max_image_pixels()  # a bad DIFFORGE_MAX_IMAGE_PIXELS fails before anything is read
    listing = scan_image_folder(root)  # broken symlinks, unreadable folders: listing.skipped
    files, stats = listing.files, listing.stats
    rel = [f.relative_to(root).as_posix() for f in files]
    if class_folders:
        class_names, labels = _class_labels(root, rel, [name for name, _ in listing.skipped])
    else:
        class_names, labels = [], np.full(len(files), -1, dtype=np.int64)

    sources = [[r, s.st_size, s.st_mtime_ns] for r, s in zip(rel, stats, strict=True)]
    decode_mode: ImageMode = "L" if channels == 1 else "RGB"
    trial = _Preprocess(image_size, channels or 3, random_crop, hflip)
    estimate = len(files) * image_size * image_size * trial.channels
    keep = cache if cache is not None else estimate <= CACHE_LIMIT_BYTES

    def decode(path: Path) -> np.ndarray | str:
        try:
            return trial.prepare(open_image(path, decode_mode, draft_size=image_size))
        except UnreadableImageError as exc:
            return exc.reason

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        results: list[np.ndarray | str | bool] = []
        for result in pool.map(decode, files):
            if isinstance(result, np.ndarray) and not keep:
                result = channels is None and _is_grey(result)  # only the grey flag is kept
            results.append(result)

    undecodable = [(r, res) for r, res in zip(rel, results, strict=True) if isinstance(res, str)]
    skipped = sorted(listing.skipped + undecodable)
    bad_folders = listing.unreadable_folders
    total_files = len(files) + len(listing.skipped) - bad_folders
    good = [i for i, res in enumerate(results) if not isinstance(res, str)]
    if not good:
        bad_files = [item for item in skipped if not item[0].endswith("/")]  # folders end in /
        raise DifforgeError(
            f"none of the {total_files} image files in {str(root)!r} can be read "
            f"(e.g. {_format_skipped(bad_files[:1])})"
        )
    if channels is None:
        grey = all(_is_grey(r) if isinstance(r, np.ndarray) else r for r in (results[i] for i in good))
        channels = 1 if grey else 3
    pre = _Preprocess(image_size, channels, random_crop, hflip)

    pixels: np.ndarray | list[np.ndarray] | None = None
    if keep:
        arrays = [results[i] for i in good]
        arrays = [a[..., :1].copy() if a.shape[-1] != channels else a for a in arrays]
        if random_crop:
            total = sum(a.nbytes for a in arrays)
            pixels = arrays if cache or total <= CACHE_LIMIT_BYTES else None
        else:
            pixels = np.stack(arrays)
    fingerprint = _hash(
        {
            "v": _FINGERPRINT_VERSION,
            "kind": "folder",
            "files": sources,
            "class_folders": class_folders,
            "settings": [image_size, channels, random_crop, hflip],
        }
    )
    dataset = ImageDataset(
        source=str(root),
        kind="folder",
        preprocess=pre,
        labels=labels[good],
        class_names=class_names,
        fingerprint=fingerprint,
        pixels=pixels,
        files=[str(files[i]) for i in good],
        skipped=skipped,
    )
    if skipped:
        bad_files = len(skipped) - bad_folders
        what = [f"{bad_files} of {total_files} image files"] if bad_files else []
        if bad_folders:
            what.append(f"{bad_folders} unreadable folder{'s' if bad_folders > 1 else ''}")
        logger.warning(
            "skipped %s in %r that cannot be read: %s",
            " and ".join(what),
            str(root),
            _format_skipped(skipped),
        )
    return dataset


def _from_builtin(
    name: str, *, image_size: int, channels: int | None, random_crop: bool, hflip: bool
) -> ImageDataset:
    data = load_builtin(name)
    native_c = data.images.shape[-1]
    channels = channels or native_c
    pre = _Preprocess(image_size, channels, random_crop, hflip)
    images = data.images
    if images.shape[1:3] != (image_size, image_size) or channels != native_c:
        converted = []
        for arr in images:
            img = Image.fromarray(arr[..., 0] if native_c == 1 else arr)
            img = img.convert(pre.mode) if img.mode != pre.mode else img
            converted.append(center_crop(pre.prepare(img), image_size))
        images = np.stack(converted)
    fingerprint = _hash(
        {
            "v": _FINGERPRINT_VERSION,
            "kind": "builtin",
            "name": name,
            "hash": data.source_hash,
            "settings": [image_size, channels, random_crop, hflip],
        }
    )
    return ImageDataset(
        source=name,
        kind="builtin",
        preprocess=pre,
        labels=np.array(data.labels),
        class_names=list(data.class_names),
        fingerprint=fingerprint,
        pixels=np.array(images),  # a writable copy: the loaded arrays are shared, read-only
        files=[],
        skipped=[],
        attribution=data.attribution,
    )


def load_dataset(
    source: str | os.PathLike[str],
    *,
    image_size: int,
    channels: int | None = None,
    class_folders: bool = False,
    random_crop: bool = False,
    hflip: bool = False,
    cache: bool | None = None,
    labels: str | os.PathLike[str] | None = None,
    cond_dir: str | os.PathLike[str] | None = None,
    low_res: int = 0,
) -> ImageDataset:
    """Open a folder of images or a built-in dataset (`BUILTIN_DATASETS`) for training.

    Args:
        source: a folder (searched recursively) or a built-in name; an existing path wins.
        image_size: S; every image's shorter side is resized to S pixels (antialiased
            bicubic), then the centre (or a random) S x S square is cropped.
        channels: 1 (grey) or 3 (RGB). None: a built-in's own (1 for mnist/digits, 3 for
            emoji); for a folder 1 when every readable image is grey, else 3.
        class_folders: label folder images by their first-level sub-folder (class names
            sorted); every image must then be inside a sub-folder. Built-ins are labelled
            (mnist, digits) or not (emoji) whatever this says.
        random_crop: crop a random S x S window (along the longer side) instead of the
            centre, drawn per item; square images are unaffected.
        hflip: mirror each item left-right with probability 1/2.
        cache: keep decoded, resized uint8 pixels in memory. None: when they take less than
            `CACHE_LIMIT_BYTES`. Built-ins are always in memory.
        labels: a label table (`difforge.data.pairing.read_label_table`): multi-hot labels
            for the files it lists; the others are left out (`with_label_table`).
        cond_dir: a folder of condition images paired with the targets by name
            (`with_paired_conditions`).
        low_res: > 0: super-resolution conditions at this size (`with_low_res`).

    Raises `DifforgeError` with a one-line message for a missing folder, a path that is not
    a folder, an unknown name, a folder without a readable image, bad settings, or a
    built-in whose package is not installed. Unreadable files are skipped, not raised.
    """
    _check_settings(image_size, channels)
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.exists():
        dataset = _from_folder(
            path.resolve(),
            image_size=image_size,
            channels=channels,
            class_folders=class_folders,
            random_crop=random_crop,
            hflip=hflip,
            cache=cache,
        )
    elif text in BUILTIN_DATASETS:
        dataset = _from_builtin(
            text, image_size=image_size, channels=channels, random_crop=random_crop, hflip=hflip
        )
    else:
        _unknown_source(text)
    if labels is None and cond_dir is None and not low_res:
        return dataset
    from difforge.data import pairing  # it builds on this module

    if labels is not None:
        dataset = pairing.with_label_table(dataset, labels)
    if cond_dir is not None:
        dataset = pairing.with_paired_conditions(dataset, cond_dir, cache=cache)
    if low_res:
        dataset = pairing.with_low_res(dataset, low_res)
    return dataset


def _unknown_source(text: str) -> NoReturn:
    valid = ", ".join(BUILTIN_DATASETS)
    if os.sep in text or "/" in text or text.startswith((".", "~")):
        raise DifforgeError(f"data folder {text!r} does not exist")
    raise DifforgeError(f"{text!r} is neither an existing folder nor a built-in dataset (built-ins: {valid})")


def load_image_files(
    paths: list[str] | list[Path], image_size: int, channels: int
) -> tuple[torch.Tensor, list[Path], list[tuple[str, str]]]:
    """Single pictures (``difforge restore``'s IMAGES): each file, or every image under a
    folder, decoded as the training data is (shorter side resized to ``image_size``, centre
    crop, ``channels`` 1 = grey or 3 = RGB).

    Returns ((N, C, S, S) float32 in [-1, 1], the N files read, (name, reason) of each file
    that could not be read). A path that does not exist, or nothing readable at all, is a
    one-line DifforgeError."""
    _check_settings(image_size, channels)
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            files.extend(list_image_files(path))
        elif path.exists():
            files.append(path)
        else:
            raise DifforgeError(f"{path}: no such file or folder")
    pre = _Preprocess(image_size, channels, random_crop=False, hflip=False)
    images: list[torch.Tensor] = []
    read: list[Path] = []
    skipped: list[tuple[str, str]] = []
    for file in files:
        try:
            images.append(to_model_range(pre.prepare(open_image(file, pre.mode, draft_size=image_size))))
            read.append(file)
        except UnreadableImageError as error:
            skipped.append((str(file), error.reason))
    if not images:
        first = f": {skipped[0][0]} ({skipped[0][1]})" if skipped else ""
        raise DifforgeError(f"no readable image among the {len(files)} file(s) given{first}")
    return torch.stack(images), read, skipped
