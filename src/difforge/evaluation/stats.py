"""Feature statistics files (``.npz``): what `eval stats` writes and `eval fid` reads.

A file holds (NumPy ``.npz``, plain arrays only, read with ``allow_pickle=False``):

============== ============== =========================================================
key            dtype / shape  meaning
============== ============== =========================================================
format         str            ``"difforge-fid-stats"``
version        int64          `STATS_VERSION`
mu             float64 (d,)   mean of the features
sigma          float64 (d, d) unbiased covariance of the features
count          int64          number of images
fingerprint    str            the data's fingerprint (see ``sources.py``)
network        str            SHA-256 of the feature network's weights file
resolution     int64          the network's input side (299)
preprocessing  str            preprocessing identifier (`inception.PREPROCESSING`)
source         str            human description of the data ("folder ...", "mnist[:500]")
features       float32 (n, d) optional: the features themselves (KID, precision/recall)
============== ============== =========================================================

Two statistics are comparable only when ``network``, ``resolution`` and ``preprocessing``
agree; `check_compatible` refuses otherwise, naming the field and both values.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from difforge.errors import DifforgeError
from difforge.evaluation.metrics import mean_and_covariance

STATS_FORMAT = "difforge-fid-stats"
STATS_VERSION = 1
_REQUIRED = (
    "format",
    "version",
    "mu",
    "sigma",
    "count",
    "fingerprint",
    "network",
    "resolution",
    "preprocessing",
    "source",
)


@dataclass(frozen=True)
class FeatureStats:
    """Gaussian summary of one image set's features, plus where they came from.

    ``mu`` (d,), ``sigma`` (d, d) float64; ``features`` (n, d) float32 or None.
    """

    mu: np.ndarray
    sigma: np.ndarray
    count: int
    fingerprint: str
    network: str
    resolution: int
    preprocessing: str
    source: str
    features: np.ndarray | None = None

    @classmethod
    def from_features(
        cls,
        features: np.ndarray,
        *,
        fingerprint: str,
        network: str,
        resolution: int,
        preprocessing: str,
        source: str,
        keep_features: bool = True,
    ) -> FeatureStats:
        """Mean and covariance (float64) of features (n, d); see `mean_and_covariance`."""
        mu, sigma = mean_and_covariance(features)
        return cls(
            mu=mu,
            sigma=sigma,
            count=int(features.shape[0]),
            fingerprint=fingerprint,
            network=network,
            resolution=int(resolution),
            preprocessing=preprocessing,
            source=source,
            features=np.asarray(features, dtype=np.float32) if keep_features else None,
        )

    def save(self, path: str | os.PathLike[str], keep_features: bool = False) -> Path:
        """Write an ``.npz`` (suffix added if missing); features only if ``keep_features``."""
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_name(path.name + ".npz")
        arrays: dict[str, np.ndarray] = {
            "format": np.array(STATS_FORMAT),
            "version": np.array(STATS_VERSION, dtype=np.int64),
            "mu": self.mu.astype(np.float64),
            "sigma": self.sigma.astype(np.float64),
            "count": np.array(self.count, dtype=np.int64),
            "fingerprint": np.array(self.fingerprint),
            "network": np.array(self.network),
            "resolution": np.array(self.resolution, dtype=np.int64),
            "preprocessing": np.array(self.preprocessing),
            "source": np.array(self.source),
        }
        if keep_features and self.features is not None:
            arrays["features"] = self.features.astype(np.float32)
        if path.parent != Path(""):
            path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> FeatureStats:
        """Read and validate a statistics file (never unpickles anything).

        Raises `DifforgeError` naming the file when it is missing, not an ``.npz``, lacks a
        field, or has inconsistent shapes.
        """
        name = os.fspath(path)
        try:
            with np.load(name, allow_pickle=False) as data:
                missing = [k for k in _REQUIRED if k not in data.files]
                if missing:
                    raise DifforgeError(
                        f"{name!r} is not a difforge statistics file (missing {', '.join(missing)})"
                    )
                fields = {k: data[k] for k in data.files}
        except DifforgeError:
            raise
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
            raise DifforgeError(f"cannot read statistics file {name!r}: {exc}") from None
        if str(fields["format"]) != STATS_FORMAT or int(fields["version"]) != STATS_VERSION:
            raise DifforgeError(
                f"{name!r} has format {str(fields['format'])!r} version "
                f"{int(fields['version'])}; expected {STATS_FORMAT!r} version {STATS_VERSION}"
            )
        mu = np.asarray(fields["mu"], dtype=np.float64)
        sigma = np.asarray(fields["sigma"], dtype=np.float64)
        features = fields.get("features")
        if (
            mu.ndim != 1
            or sigma.shape != (mu.shape[0], mu.shape[0])
            or (features is not None and (features.ndim != 2 or features.shape[1] != mu.shape[0]))
        ):
            raise DifforgeError(f"statistics file {name!r} is damaged: mu {mu.shape}, sigma {sigma.shape}")
        return cls(
            mu=mu,
            sigma=sigma,
            count=int(fields["count"]),
            fingerprint=str(fields["fingerprint"]),
            network=str(fields["network"]),
            resolution=int(fields["resolution"]),
            preprocessing=str(fields["preprocessing"]),
            source=str(fields["source"]),
            features=None if features is None else np.asarray(features, dtype=np.float32),
        )

    def check_compatible(self, other: FeatureStats) -> None:
        """Raise `DifforgeError` unless both come from the same network/resolution/preprocessing."""
        for field, label in (
            ("network", "feature network (weights SHA-256)"),
            ("resolution", "network input resolution"),
            ("preprocessing", "preprocessing"),
        ):
            mine, theirs = getattr(self, field), getattr(other, field)
            if mine != theirs:
                raise DifforgeError(
                    f"cannot compare {self.source!r} with {other.source!r}: different {label} "
                    f"({_short(mine)} vs {_short(theirs)}); recompute the statistics with "
                    "'difforge eval stats'"
                )


def _short(value: object) -> str:
    text = str(value)
    return text[:16] + "..." if len(text) > 24 else text
