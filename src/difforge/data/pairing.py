"""Conditions that come with the data: a table of labels per file, condition images paired
with the targets by name, and the low-resolution input of a super-resolution stage.

Each takes an `ImageDataset` of a folder and returns a new one (`load_dataset` applies them
in this order: labels, pairs, low resolution). Nothing is ever matched by position: a file
is labelled or paired only by its name, and every file left out on either side is listed
(``ImageDataset.excluded`` / ``notes``) and reported once when training starts.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from difforge.data.dataset import (
    SKIPPED_SHOWN,
    ImageDataset,
    _format_skipped,
    _from_folder,
    _hash,
)
from difforge.errors import DifforgeError

MAX_LABELS = 4096
"""The most distinct labels a label table may name."""

_TRUE = {"1", "true", "yes", "y"}
_FALSE = {"0", "-1", "false", "no", "n", ""}
_SEPARATORS = (";", "|")


def _listing(names: list[str], what: str) -> str:
    shown = ", ".join(names[:SKIPPED_SHOWN])
    more = len(names) - SKIPPED_SHOWN
    return f"{len(names)} {what}: {shown}" + (f", and {more} more" if more > 0 else "")


# ---------------------------------------------------------------------- label tables
def _split_names(cell: str) -> list[str]:
    for separator in _SEPARATORS:
        cell = cell.replace(separator, ",")
    return [name.strip() for name in cell.split(",") if name.strip()]


def _table_from_csv(text: str, path: Path) -> dict[str, list[str]]:
    rows = [row for row in csv.reader(io.StringIO(text)) if any(cell.strip() for cell in row)]
    if len(rows) < 2:
        raise DifforgeError(
            f"--labels {path}: a CSV label table needs a header row and at least one row "
            "(file,labels or file,<label>,<label>...)"
        )
    header, body = [cell.strip() for cell in rows[0]], rows[1:]
    if len(header) < 2:
        raise DifforgeError(f"--labels {path}: the header must name the file column and at least one more")
    cells = [cell.strip().lower() for row in body for cell in row[1:]]
    names_column = len(header) == 2 and header[1].lower() in ("labels", "label", "tags")
    attributes = not names_column and all(cell in _TRUE | _FALSE for cell in cells)
    table: dict[str, list[str]] = {}
    for number, row in enumerate(body, start=2):
        if len(row) > len(header):
            raise DifforgeError(
                f"--labels {path}: line {number} has {len(row)} cells for {len(header)} columns"
            )
        name = row[0].strip()
        if not name:
            raise DifforgeError(f"--labels {path}: line {number} names no file")
        if attributes:  # a 0/1 attribute table: the header names the labels
            labels = [header[i] for i, cell in enumerate(row) if i > 0 and cell.strip().lower() in _TRUE]
        else:
            labels = [label for cell in row[1:] for label in _split_names(cell)]
        if name in table:
            raise DifforgeError(f"--labels {path}: {name!r} is listed twice (lines differ?)")
        table[name] = labels
    return table


def _table_from_json(text: str, path: Path) -> dict[str, list[str]]:
    try:
        data: Any = json.loads(text)
    except json.JSONDecodeError as error:
        raise DifforgeError(f"--labels {path}: not valid JSON ({error})") from None
    if isinstance(data, list):  # [{"file": ..., "labels": [...]}, ...]
        pairs = []
        for item in data:
            if not isinstance(item, dict) or "file" not in item or "labels" not in item:
                raise DifforgeError(
                    f'--labels {path}: a JSON list must hold {{"file": ..., "labels": [...]}}'
                )
            pairs.append((item["file"], item["labels"]))
    elif isinstance(data, dict):
        pairs = list(data.items())
    else:
        raise DifforgeError(f"--labels {path}: JSON must map file names to label lists")
    table: dict[str, list[str]] = {}
    for name, labels in pairs:
        if isinstance(labels, str):
            labels = _split_names(labels)
        if (
            not isinstance(name, str)
            or not isinstance(labels, list)
            or not all(isinstance(x, str) for x in labels)
        ):
            raise DifforgeError(f"--labels {path}: {name!r} must map to a list of label names")
        if name in table:
            raise DifforgeError(f"--labels {path}: {name!r} is listed twice")
        table[name] = [label.strip() for label in labels if label.strip()]
    return table


def read_label_table(path: str | Path) -> dict[str, list[str]]:
    """A label file -> {file name: [label names]}.

    - ``.json``: ``{"a.png": ["smiling", "glasses"], ...}`` (a value may also be one
      comma-separated string) or ``[{"file": "a.png", "labels": [...]}, ...]``;
    - ``.csv`` (or any other name): a header row, then one row per file. Either the cells
      after the file name hold label names (``file,labels`` then ``a.png,"smiling;glasses"``
      or ``a.png,smiling,glasses``; ``,`` ``;`` ``|`` separate), or every cell is 0/1
      (also -1, true/false, yes/no) and the header names the labels (CelebA's attribute
      table: ``file,Smiling,Eyeglasses``).

    A missing, unreadable or malformed file is a one-line DifforgeError with the line."""
    path = Path(path)
    if not path.is_file():
        raise DifforgeError(f"--labels {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise DifforgeError(f"--labels {path}: cannot be read ({error})") from None
    table = _table_from_json(text, path) if path.suffix.lower() == ".json" else _table_from_csv(text, path)
    if not table:
        raise DifforgeError(f"--labels {path}: the table lists no file")
    return table


def _relative_names(dataset: ImageDataset) -> list[str]:
    root = Path(dataset.source)
    return [Path(f).relative_to(root).as_posix() for f in dataset._files]


def _match_keys(keys: Iterable[str], rel_paths: list[str], path: Path) -> dict[str, int]:
    """table key -> index of the file it names: the path relative to the data folder, or a
    file name that only one file has."""
    by_path = {rel: i for i, rel in enumerate(rel_paths)}
    by_name: dict[str, list[int]] = {}
    for i, rel in enumerate(rel_paths):
        by_name.setdefault(PurePosixPath(rel).name, []).append(i)
    matched: dict[str, int] = {}
    for key in keys:
        normal = key.replace("\\", "/")
        normal = normal[2:] if normal.startswith("./") else normal
        if normal in by_path:
            matched[key] = by_path[normal]
        elif "/" not in normal and len(by_name.get(normal, [])) > 1:
            places = [rel_paths[i] for i in by_name[normal][:2]]
            raise DifforgeError(
                f"--labels {path}: {key!r} could be {places[0]} or {places[1]}: "
                "name files by their path relative to the data folder"
            )
        elif "/" not in normal and normal in by_name:
            matched[key] = by_name[normal][0]
    return matched


def with_label_table(dataset: ImageDataset, labels_path: str | Path) -> ImageDataset:
    """The images of a folder that the label table lists, with multi-hot labels (the
    vocabulary, sorted, becomes ``class_names``). Images the table does not list are left
    out and counted; table entries naming no readable image are reported."""
    path = Path(labels_path)
    if dataset.kind != "folder":
        raise DifforgeError(
            f"--labels names files, so DATA must be a folder, not the built-in {dataset.source!r}"
        )
    table = read_label_table(path)
    rel_paths = _relative_names(dataset)
    matched = _match_keys(table, rel_paths, path)
    if not matched:
        raise DifforgeError(
            f"--labels {path}: none of its {len(table)} file names is an image in {dataset.source!r} "
            f"(e.g. {next(iter(table))!r}; name files by their path relative to the folder)"
        )
    vocabulary = sorted({label for key in matched for label in table[key]})
    if not vocabulary:
        raise DifforgeError(f"--labels {path}: the files it lists have no labels")
    if len(vocabulary) > MAX_LABELS:
        raise DifforgeError(f"--labels {path}: {len(vocabulary)} distinct labels; at most {MAX_LABELS}")
    column = {label: i for i, label in enumerate(vocabulary)}
    by_index = {index: key for key, index in matched.items()}
    keep = sorted(by_index)
    multi_hot = np.zeros((len(keep), len(vocabulary)), dtype=np.float32)
    for row, index in enumerate(keep):
        for label in table[by_index[index]]:
            multi_hot[row, column[label]] = 1.0
    left_out = [(rel_paths[i], "not in the label table") for i in range(len(rel_paths)) if i not in by_index]
    notes = []
    if left_out:
        notes.append(
            f"--labels: left out {_listing([name for name, _ in left_out], 'images the table does not list')}"
        )
    unmatched = [key for key in table if key not in matched]
    if unmatched:
        notes.append(f"--labels: {_listing(unmatched, 'table entries name no readable image')}")
    unused = sorted({label for key in unmatched for label in table[key]} - set(vocabulary))
    if unused:
        notes.append(
            f"--labels: {_listing(unused, 'labels occur only on missing files and are not learned')}"
        )
    digest = _hash({"table": sorted((key, sorted(set(table[key]))) for key in matched)})
    return _select(
        dataset,
        keep,
        labels=multi_hot,
        class_names=vocabulary,
        fingerprint=_hash({"base": dataset.fingerprint, "labels": digest}),
        excluded=left_out,
        notes=notes,
    )


# ---------------------------------------------------------------------- paired images
def with_paired_conditions(
    dataset: ImageDataset, cond_dir: str | Path, *, cache: bool | None
) -> ImageDataset:
    """Targets paired with the images of ``cond_dir`` by relative path without the
    extension (``a/x.png`` <-> ``a/x.jpg``); the condition is read as the targets are
    (shorter side resized to S, centre crop; grey when every condition is grey) and is
    flipped with its target. Unpaired files on either side are left out and listed."""
    if dataset.kind != "folder":
        raise DifforgeError(
            f"--cond-dir pairs files by name, so DATA must be a folder, not {dataset.source!r}"
        )
    if dataset.random_crop:
        raise DifforgeError("--cond-dir with --random-crop is not supported: the pair would be cropped apart")
    root = Path(cond_dir).expanduser()
    if not root.is_dir():
        raise DifforgeError(f"--cond-dir {cond_dir}: {'not a folder' if root.exists() else 'does not exist'}")
    keep_in_memory = dataset.cached if cache is None else cache
    conditions = _from_folder(
        root.resolve(),
        image_size=dataset.image_size,
        channels=None,
        class_folders=False,
        random_crop=False,
        hflip=False,
        cache=keep_in_memory,
    )
    if conditions.cached != dataset.cached:
        raise DifforgeError(
            f"--cond-dir {cond_dir}: the targets and their conditions do not both fit in memory; "
            "use a smaller --image-size"
        )

    def stems(names: list[str]) -> dict[str, int]:
        found: dict[str, int] = {}
        for i, name in enumerate(names):
            stem = PurePosixPath(name).with_suffix("").as_posix()
            if stem in found:
                raise DifforgeError(
                    f"{names[found[stem]]} and {name} have the same name: each file must pair with one other"
                )
            found[stem] = i
        return found

    target_names, cond_names = _relative_names(dataset), _relative_names(conditions)
    targets, sources = stems(target_names), stems(cond_names)
    common = [stem for stem in targets if stem in sources]
    if not common:
        raise DifforgeError(
            f"--cond-dir {cond_dir}: no file pairs with an image of {dataset.source!r} (files pair by "
            f"their path without extension: {target_names[0]!r} with "
            f"{PurePosixPath(target_names[0]).with_suffix('.png')})"
        )
    keep = sorted(targets[stem] for stem in common)
    kept = set(keep)
    partner = [sources[PurePosixPath(target_names[i]).with_suffix("").as_posix()] for i in keep]
    unpaired = [(name, "no condition image") for i, name in enumerate(target_names) if i not in kept]
    notes = []
    if unpaired:
        notes.append(
            f"--cond-dir: left out {_listing([n for n, _ in unpaired], 'targets without a condition')}"
        )
    used = set(partner)
    unused = [name for i, name in enumerate(cond_names) if i not in used]
    if unused:
        notes.append(f"--cond-dir: {_listing(unused, 'condition images pair with no target')}")
    if conditions.skipped:
        notes.append(
            f"--cond-dir: {len(conditions.skipped)} unreadable condition files: "
            f"{_format_skipped(conditions.skipped)}"
        )
    paired = _select(conditions, partner, fingerprint=conditions.fingerprint)
    return _select(
        dataset,
        keep,
        fingerprint=_hash({"base": dataset.fingerprint, "paired": conditions.fingerprint, "pairs": partner}),
        paired=paired,
        excluded=unpaired,
        notes=notes,
    )


# ---------------------------------------------------------------------- super-resolution
def with_low_res(dataset: ImageDataset, low_res: int) -> ImageDataset:
    """The dataset with super-resolution conditions: each target area-downsampled to
    ``low_res`` (see `difforge.data.dataset.low_res_condition`)."""
    return _select(
        dataset,
        list(range(len(dataset))),
        fingerprint=_hash({"base": dataset.fingerprint, "low_res": low_res}),
        low_res=low_res,
    )


def _select(
    dataset: ImageDataset,
    keep: list[int],
    *,
    fingerprint: str,
    labels: np.ndarray | None = None,
    class_names: list[str] | None = None,
    paired: ImageDataset | None = None,
    low_res: int | None = None,
    excluded: list[tuple[str, str]] | None = None,
    notes: list[str] | None = None,
) -> ImageDataset:
    """Items ``keep`` of ``dataset`` (in that order), with the given parts replaced."""
    pixels = dataset._pixels
    if isinstance(pixels, np.ndarray):
        pixels = pixels[keep]
    elif pixels is not None:
        pixels = [pixels[i] for i in keep]
    if paired is None and dataset.paired is not None:
        paired = _select(dataset.paired, keep, fingerprint=dataset.paired.fingerprint)
    return ImageDataset(
        source=dataset.source,
        kind=dataset.kind,
        preprocess=dataset._pre,
        labels=labels if labels is not None else dataset._labels[keep],
        class_names=class_names if class_names is not None else dataset.class_names,
        fingerprint=fingerprint,
        pixels=pixels,
        files=[dataset._files[i] for i in keep] if dataset._files else [],
        skipped=dataset.skipped,
        attribution=dataset.attribution,
        paired=paired,
        low_res=dataset.low_res if low_res is None else low_res,
        excluded=dataset.excluded + (excluded or []),
        notes=dataset.notes + (notes or []),
    )
