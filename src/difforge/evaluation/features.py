"""Inception features of an `ImageSource`, with a progress bar and the minimum count."""

from __future__ import annotations

import sys

import numpy as np

from difforge.errors import DifforgeError
from difforge.evaluation.inception import InceptionFeatureExtractor
from difforge.evaluation.metrics import MIN_SAMPLES
from difforge.evaluation.sources import ImageSource


def extract_features(
    source: ImageSource,
    extractor: InceptionFeatureExtractor,
    batch_size: int = 16,
    progress: bool = True,
) -> np.ndarray:
    """Features (n, 2048) float32 of every readable image of ``source``, with a progress bar.

    Raises `DifforgeError` with the minimum when fewer than `MIN_SAMPLES` images (after
    skipping unreadable ones) remain.
    """
    from tqdm import tqdm

    check_count(source)
    chunks: list[np.ndarray] = []
    bar = tqdm(
        total=source.count,
        unit="img",
        desc=f"Inception {source.description}",
        disable=not progress,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    with bar:
        for consumed, images in source.batches(batch_size):
            if images:
                chunks.append(extractor(images))
            bar.update(consumed)
            if source.skipped:
                bar.set_postfix(skipped=len(source.skipped))
    n = sum(c.shape[0] for c in chunks)
    if n < MIN_SAMPLES:
        raise DifforgeError(
            f"{source.description}: only {n} readable image(s) ({len(source.skipped)} "
            f"unreadable skipped); FID needs at least {MIN_SAMPLES}"
        )
    return np.concatenate(chunks)


def check_count(source: ImageSource) -> None:
    """Raise `DifforgeError` naming the minimum when ``source`` has too few images."""
    if source.count < MIN_SAMPLES:
        raise DifforgeError(
            f"{source.description} has {source.count} image(s); FID needs at least "
            f"{MIN_SAMPLES} (and 2048 or more for values comparable with papers)"
        )
