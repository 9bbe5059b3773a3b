"""What FID is computed on: folders, built-in datasets, statistics files, training runs.

`open_input` turns a command-line string into either a `FeatureStats` (an ``.npz`` written
by ``difforge eval stats``) or an `ImageSource` that yields uint8 image batches:

- ``folder:PATH`` or a folder holding images: every image under it (`difforge.data.io`),
  decoded as RGB (grey files become 3 equal channels); unreadable files are skipped and
  counted (`ImageSource.skipped`);
- ``NAME`` or ``NAME[a:b]`` for a built-in dataset (`difforge.data.builtin`, e.g. ``mnist``,
  ``mnist[:2500]``, ``mnist[2500:]``): the images are taken in a fixed shuffled order
  (`BUILTIN_ORDER_SEED`) because the files are sorted by class, so a prefix, ``-n`` or two
  disjoint slices are class-balanced samples;
- ``run:PATH`` or a run directory (one with ``config.json``/``checkpoints``/a
  ``*.safetensors`` at its top level): ``-n`` images sampled with
  ``difforge.pipeline.Pipeline.from_run(PATH)`` and a `SampleConfig`.

Features of a source are extracted by `difforge.evaluation.features`; statistics are
cached by `difforge.evaluation.cache`.

Every source has a ``fingerprint`` (SHA-256 over what defines its images: relative paths,
sizes and modification times of a folder's files; a built-in's data hash and slice; a run's
top-level files (config, weights) and sampling options), so statistics can be reused while
the data is unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from difforge.errors import DifforgeError
from difforge.evaluation.metrics import MIN_SAMPLES
from difforge.evaluation.stats import FeatureStats
from difforge.sampling import SampleConfig

BUILTIN_ORDER_SEED = 0
"""Seed of the fixed permutation built-in datasets are read in."""

RUN_MARKERS = ("config.json", "checkpoints")
"""Top-level names that make a folder a training run rather than an image folder."""

_BUILTIN_RE = re.compile(r"^(?P<name>[A-Za-z0-9_-]+)(?:\[(?P<start>-?\d*):(?P<stop>-?\d*)\])?$")


@dataclass
class ImageSource:
    """A finite set of images to extract features from.

    ``load(start, stop)`` returns the images ``start..stop`` as a list of uint8 (H, W, C)
    arrays (fewer when some are unreadable: those are appended to ``skipped`` as
    ``(name, reason)``). ``count`` is the number of images before skipping.
    """

    description: str
    fingerprint: str
    count: int
    load: Callable[[int, int], list[np.ndarray]]
    cacheable: bool = True
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def batches(self, batch_size: int) -> Iterator[tuple[int, list[np.ndarray]]]:
        """Yield ``(images_consumed, images)`` per batch, decoding the next batch meanwhile."""
        starts = list(range(0, self.count, batch_size))
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(self.load, 0, min(batch_size, self.count)) if starts else None
            for i, start in enumerate(starts):
                stop = min(start + batch_size, self.count)
                images = pending.result()  # type: ignore[union-attr]
                if i + 1 < len(starts):
                    nxt = starts[i + 1]
                    pending = pool.submit(self.load, nxt, min(nxt + batch_size, self.count))
                yield stop - start, images


def sha256_json(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _file_listing(paths: list[Path], root: Path) -> list[tuple[str, int, int]]:
    out = []
    for p in paths:
        st = p.stat()
        out.append((p.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns))
    return out


def array_source(images: np.ndarray, description: str, fingerprint: str | None = None) -> ImageSource:
    """Images already in memory, uint8 (N, H, W, C); fingerprint defaults to a content hash."""
    if fingerprint is None:
        digest = hashlib.sha256(str(images.shape).encode())
        digest.update(np.ascontiguousarray(images).data)
        fingerprint = "array:" + digest.hexdigest()
    return ImageSource(
        description=description,
        fingerprint=fingerprint,
        count=int(images.shape[0]),
        load=lambda a, b: list(images[a:b]),
    )


def resized_source(source: ImageSource, size: int) -> ImageSource:
    """``source``'s images centre-cropped to squares and resized to ``size`` x ``size``
    (area averaging when shrinking, bilinear when enlarging: `difforge.conditioning.
    resize_images`), to compare with samples at that resolution."""
    import torch

    from difforge.conditioning import resize_images

    def load(start: int, stop: int) -> list[np.ndarray]:
        resized = []
        for image in source.load(start, stop):
            side = min(image.shape[:2])
            top, left = (image.shape[0] - side) // 2, (image.shape[1] - side) // 2
            square = torch.from_numpy(np.ascontiguousarray(image[top : top + side, left : left + side]))
            small = resize_images(square.permute(2, 0, 1)[None].double(), size)[0]
            resized.append(small.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy())
        return resized

    return ImageSource(
        description=f"{source.description} at {size}x{size}",
        fingerprint=f"{source.fingerprint}:resized{size}",
        count=source.count,
        load=load,
        cacheable=source.cacheable,
        skipped=source.skipped,
    )


def folder_source(root: str | os.PathLike[str], num_images: int | None = None) -> ImageSource:
    """All images under ``root`` (sorted), or the first ``num_images``; unreadable ones skipped."""
    from difforge.data.io import UnreadableImageError, decode_image, list_image_files

    root = Path(root)
    files = list_image_files(root)
    if num_images is not None:
        files = files[:num_images]
    source = ImageSource(
        description=f"folder {str(root)!r}",
        fingerprint="folder:" + sha256_json(_file_listing(files, root)),
        count=len(files),
        load=lambda a, b: [],
    )

    def load(start: int, stop: int) -> list[np.ndarray]:
        images = []
        for path in files[start:stop]:
            try:
                images.append(decode_image(path, "RGB"))
            except UnreadableImageError as exc:
                source.skipped.append((exc.path, exc.reason))
        return images

    source.load = load
    return source


def parse_builtin(text: str) -> tuple[str, slice] | None:
    """``"mnist"`` -> ("mnist", slice(None)); ``"mnist[10:20]"`` -> ("mnist", slice(10, 20)).

    None when ``text`` is not a built-in dataset name (with optional slice).
    """
    from difforge.data.builtin import BUILTIN_DATASETS

    match = _BUILTIN_RE.match(text)
    if match is None or match["name"] not in BUILTIN_DATASETS:
        return None
    start = int(match["start"]) if match["start"] else None
    stop = int(match["stop"]) if match["stop"] else None
    return match["name"], slice(start, stop)


def builtin_source(name: str, part: slice = slice(None), num_images: int | None = None) -> ImageSource:
    """Built-in dataset ``name`` in its fixed shuffled order, sliced, then the first ``num_images``."""
    from difforge.data.builtin import load_builtin

    data = load_builtin(name)
    order = np.random.default_rng(BUILTIN_ORDER_SEED).permutation(data.images.shape[0])[part]
    if num_images is not None:
        order = order[:num_images]
    start, stop = part.start, part.stop
    label = name if start is None and stop is None else f"{name}[{start or ''}:{stop or ''}]"
    if num_images is not None:
        label += f" (first {len(order)})"
    images = data.images
    return ImageSource(
        description=f"built-in {label}",
        fingerprint="builtin:" + sha256_json([name, data.source_hash, BUILTIN_ORDER_SEED, order.tolist()]),
        count=int(order.shape[0]),
        load=lambda a, b: list(images[order[a:b]]),
    )


def looks_like_run(path: Path) -> bool:
    """A folder with a run marker (`RUN_MARKERS`) or a ``*.safetensors`` at its top level."""
    return path.is_dir() and (
        any((path / m).exists() for m in RUN_MARKERS) or any(path.glob("*.safetensors"))
    )


def run_source(path: str | os.PathLike[str], num_images: int | None, options: SampleConfig) -> ImageSource:
    """``num_images`` sampled from the training run at ``path`` (lazily, on first load)."""
    path = Path(path)
    if num_images is None or num_images < MIN_SAMPLES:
        raise DifforgeError(
            f"sampling the run {str(path)!r} for FID needs -n N (at least {MIN_SAMPLES} images)"
        )
    # top-level files: config.json and the weights sampled from (model/ema.safetensors)
    listing = _file_listing(sorted(p for p in path.iterdir() if p.is_file()), path)
    samples: list[np.ndarray] = []

    def load(start: int, stop: int) -> list[np.ndarray]:
        if not samples:
            samples.append(sample_run(path, num_images, options))
        return list(samples[0][start:stop])

    shown = ", ".join(f"{k}={v}" for k, v in options.changes().items())
    return ImageSource(
        description=f"run {str(path)!r} ({num_images} samples{', ' + shown if shown else ''})",
        fingerprint="run:" + sha256_json([os.path.realpath(path), listing, num_images, options.to_dict()]),
        count=num_images,
        load=load,
        cacheable=False,
    )


def sample_run(path: Path, num_images: int, options: SampleConfig) -> np.ndarray:
    """Sample a run through `difforge.pipeline.Pipeline` -> uint8 (N, H, W, C); the settings
    that differ from `SampleConfig`'s defaults are passed, the rest are the pipeline's."""
    from difforge.pipeline import Pipeline

    pipe = Pipeline.from_run(path)
    images = np.asarray(pipe(num_images=num_images, **options.changes()))
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] != num_images:
        raise DifforgeError(
            f"the pipeline returned {images.dtype} {images.shape}, expected uint8 ({num_images}, H, W, C)"
        )
    return images


def open_input(
    spec: str, num_images: int | None = None, sampling: SampleConfig | None = None
) -> ImageSource | FeatureStats:
    """Resolve a command-line input (see the module docstring) to stats or an image source."""
    sampling = sampling or SampleConfig()
    for prefix in ("folder:", "run:"):
        if spec.startswith(prefix):
            target = spec[len(prefix) :]
            if prefix == "run:":
                return run_source(target, num_images, sampling)
            return folder_source(target, num_images)
    path = Path(spec)
    if path.suffix == ".npz" and path.is_file():
        return FeatureStats.load(path)
    if path.is_dir():
        if looks_like_run(path):
            return run_source(path, num_images, sampling)
        return folder_source(path, num_images)
    builtin = parse_builtin(spec)
    if builtin is not None:
        return builtin_source(builtin[0], builtin[1], num_images)
    from difforge.data.builtin import BUILTIN_DATASETS

    raise DifforgeError(
        f"{spec!r} is not a folder, a run directory, an .npz statistics file or a built-in "
        f"dataset ({', '.join(BUILTIN_DATASETS)}; slices like mnist[:2500] work)"
    )
