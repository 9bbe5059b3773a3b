"""Feature statistics of a source, computed once and cached while its data is unchanged.

The cache key is SHA-256 over (source fingerprint, network hash, resolution,
preprocessing); a cached file is used only when its recorded fingerprint and network match.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

from difforge.errors import DifforgeError
from difforge.evaluation.features import check_count, extract_features
from difforge.evaluation.inception import (
    INCEPTION_SIZE,
    PREPROCESSING,
    WEIGHTS_SHA256,
    InceptionFeatureExtractor,
    default_cache_dir,
)
from difforge.evaluation.sources import ImageSource, sha256_json
from difforge.evaluation.stats import FeatureStats

NETWORK_IDENTITY = (WEIGHTS_SHA256, INCEPTION_SIZE, PREPROCESSING)
"""(network hash, resolution, preprocessing) every `InceptionFeatureExtractor` reports."""


def stats_cache_path(source: ImageSource) -> Path:
    """``<cache>/fid/stats/<sha256(fingerprint, network, resolution, preprocessing)>.npz``."""
    key = sha256_json([source.fingerprint, *NETWORK_IDENTITY])
    return default_cache_dir() / "fid" / "stats" / f"{key}.npz"


def compute_stats(
    source: ImageSource,
    extractor: InceptionFeatureExtractor | Callable[[], InceptionFeatureExtractor],
    batch_size: int = 16,
    progress: bool = True,
    use_cache: bool = False,
) -> FeatureStats:
    """Features -> `FeatureStats` (with features kept) of ``source``.

    ``extractor``: the network, or a zero-argument callable returning it, called only when
    features must actually be computed (not for a too-small source or a cache hit).
    ``use_cache``: reuse / write `stats_cache_path` for cacheable sources (folders,
    built-ins); a cached file is used only if its fingerprint and network match.
    """
    check_count(source)
    cache_path = stats_cache_path(source) if use_cache and source.cacheable else None
    if cache_path is not None and cache_path.is_file():
        try:
            cached = FeatureStats.load(cache_path)
        except DifforgeError:
            cached = None
        if cached is not None and matches(cached, source):
            return cached
    if not isinstance(extractor, InceptionFeatureExtractor):
        extractor = extractor()
    start = time.perf_counter()
    features = extract_features(source, extractor, batch_size, progress)
    stats = FeatureStats.from_features(
        features,
        fingerprint=source.fingerprint,
        network=extractor.network_hash,
        resolution=extractor.resolution,
        preprocessing=extractor.preprocessing,
        source=source.description,
    )
    if progress:
        seconds = time.perf_counter() - start
        print(
            f"{source.description}: {features.shape[0]} images in {seconds:.1f} s "
            f"({features.shape[0] / max(seconds, 1e-9):.1f} images/s)",
            file=sys.stderr,
        )
    if source.skipped:
        first = source.skipped[0]
        print(
            f"{source.description}: skipped {len(source.skipped)} unreadable image(s), "
            f"first {first[0]!r}: {first[1]}",
            file=sys.stderr,
        )
    if cache_path is not None and not source.skipped:
        stats.save(cache_path, keep_features=True)
    return stats


def matches(stats: FeatureStats, source: ImageSource) -> bool:
    """Whether ``stats`` were computed from ``source`` with the standard network."""
    return (
        stats.fingerprint == source.fingerprint
        and (stats.network, stats.resolution, stats.preprocessing) == NETWORK_IDENTITY
    )
