"""Crash-safe files of a run in safetensors: weights, EMA weights, checkpoint folders.

Layout of a run directory::

    config.json                  every setting (see `difforge.runs.config.RunConfig`)
    model.safetensors            latest raw weights      } byte copies of the newest checkpoint's
    ema.safetensors              latest EMA weights      } files, for sampling
    weights.json                 size and SHA-256 of the two files above
    checkpoints/step_00001000/   model, ema, trainer.safetensors and manifest.json (the last K)

Every file is written to a temporary name, fsynced and renamed; a checkpoint folder is
assembled under a temporary name (``checkpoints/.tmp-step_N-PID``), its ``manifest.json``
(size and SHA-256 of every file, computed from the bytes written) is written last, and the
folder is renamed as a whole, so a kill at any moment leaves the previous checkpoint intact.
A write that fails (a full disk, an I/O error) removes what it made and changes nothing;
`remove_stale_temporaries` removes what a killed process could not. Readers verify
checkpoints against their manifest (`verify_checkpoint`, `intact_checkpoints`) and the
top-level weights against ``weights.json`` (`verify_weights_file`). Nothing is ever pickled
(the trainer state's format is `difforge.training.state`), and the same tensors and metadata
always give the same bytes (`safetensors_bytes`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import json
import os
import re
import shutil
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from safetensors.torch import save as _serialize

from difforge.errors import DifforgeError

CHECKPOINT_DIR = "checkpoints"
CONFIG_NAME = "config.json"
"""The run's settings file (the same name as `difforge.runs.config.CONFIG_FILE`)."""
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "difforge-checkpoint-1"
WEIGHTS_RECORD = "weights.json"
WEIGHTS_FORMAT = "difforge-weights-1"
TOP_LEVEL_FILES = ("model.safetensors", "ema.safetensors")
"""The checkpoint files copied to the top of the run folder, for sampling."""
CHECKPOINT_FILES = ("model.safetensors", "ema.safetensors", "trainer.safetensors")
"""What the trainer writes in each checkpoint: the files a checkpoint needs to be resumed."""

_PREFIX = "step_"
_STAGING_PREFIX = f".tmp-{_PREFIX}"
_STEP_NAME = re.compile(r"^step_\d+$")
_TEMP_FILE = re.compile(r"^\..+\.tmp-\d+$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 4 << 20
_SPACE_ERRORS = (errno.ENOSPC, errno.EDQUOT)


@dataclass(frozen=True)
class FileDigest:
    """The size in bytes and the SHA-256 (hex) of a file's contents."""

    size: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "size": self.size}


class CheckpointScan(tuple):
    """What `intact_checkpoints` found: unpacks as ``(intact, skipped)``.

    ``intact``: the usable checkpoint folders, oldest first. ``skipped``: ``(folder, reason)``
    for each folder that is not usable, oldest first, the reason a one-line message.
    ``unverified``: ``(folder, note)`` for each folder of ``intact`` that has no manifest
    (written by a difforge before manifests) and was accepted because its files open cleanly.
    """

    intact: list[Path]
    skipped: list[tuple[Path, str]]
    unverified: list[tuple[Path, str]]

    def __new__(
        cls, intact: list[Path], skipped: list[tuple[Path, str]], unverified: list[tuple[Path, str]]
    ) -> CheckpointScan:
        scan = super().__new__(cls, (intact, skipped))
        scan.intact, scan.skipped, scan.unverified = intact, skipped, unverified
        return scan


# ---- low-level writing ---------------------------------------------------------------------


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _describe_os_error(error: OSError) -> str:
    """'no space left on device', 'permission denied', ... (the errno's text, lower case)."""
    if error.errno == errno.ENOSPC:
        return "no space left on device"
    text = os.strerror(error.errno) if error.errno else (error.strerror or str(error) or type(error).__name__)
    return _one_line(text[:1].lower() + text[1:])


def _write_chunks(path: Path, chunks: Iterable[bytes | memoryview]) -> FileDigest:
    """Write ``chunks`` to ``path`` (truncating it), flush and fsync; the digest of what was
    written. Raises OSError as it comes."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "wb") as handle:
        for chunk in chunks:
            handle.write(chunk)
            digest.update(chunk)
            size += len(chunk)
        handle.flush()
        os.fsync(handle.fileno())
    return FileDigest(size, digest.hexdigest())


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)


def _remove_tree_quietly(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    except OSError:
        pass


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _atomic(path: Path, write: Callable[[Path], FileDigest | None]) -> FileDigest:
    """``write(temporary)``, fsync, rename to ``path``; the temporary is removed on any failure
    (OSError, SafetensorError, KeyboardInterrupt, ...), which is re-raised as it came."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _temporary(path)
    try:
        digest = write(temporary)
        if not isinstance(digest, FileDigest):  # a stand-in writer (tests) that returned nothing
            _fsync_file(temporary)
            digest = file_digest(temporary)
        os.replace(temporary, path)
    except BaseException:
        _unlink_quietly(temporary)
        raise
    _fsync_dir(path.parent)
    return digest


def _write_error(error: OSError | SafetensorError, path: Path, what: str) -> DifforgeError:
    if isinstance(error, OSError):
        return DifforgeError(f"{_describe_os_error(error)} while writing {path}; {what}")
    return DifforgeError(f"could not write {path} ({_one_line(error)}); {what}")


# ---- safetensors files -----------------------------------------------------------------------


def _safetensors_parts(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None
) -> tuple[bytes, memoryview]:
    """(length + sorted header, tensor data) of the deterministic file: see `safetensors_bytes`."""
    cpu = {name: tensor.detach().to("cpu").contiguous() for name, tensor in tensors.items()}
    raw = _serialize(cpu, metadata=dict(metadata) if metadata else None)
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + length].decode("utf-8"))
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text, memoryview(raw)[8 + length :]


def safetensors_bytes(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> bytes:
    """The safetensors file of ``tensors`` and ``metadata``, always the same bytes for the same
    input (contiguous CPU copies of the tensors are serialised).

    safetensors orders its JSON header arbitrarily (a hash map); this rewrites the header with
    sorted keys and no spaces, padded with spaces so that the data starts at a multiple of 8
    bytes, as the format asks (8-byte little-endian header length N, N bytes of UTF-8 JSON
    header starting with ``{`` and padded with 0x20, then the tensor data, whose
    ``data_offsets`` are relative to the end of the header and so do not change). safetensors
    itself lays out the data deterministically (by dtype, then name).
    """
    head, data = _safetensors_parts(tensors, metadata)
    return head + data.tobytes()


def save_file(
    tensors: Mapping[str, torch.Tensor],
    filename: str | os.PathLike[str],
    metadata: Mapping[str, str] | None = None,
) -> FileDigest:
    """Write the deterministic safetensors file of ``tensors`` (`safetensors_bytes`) to
    ``filename`` (not atomic: callers write to a temporary name), flushed and fsynced; its size
    and SHA-256, hashed from the bytes written. The one place tensors are written, with
    safetensors' signature (tests replace it to simulate a crash or a full disk). Holds one
    serialised copy of the tensors in memory. Raises OSError as it comes."""
    head, data = _safetensors_parts(tensors, metadata)
    chunks = (data[i : i + _CHUNK] for i in range(0, len(data), _CHUNK))
    return _write_chunks(Path(filename), itertools.chain([head], chunks))


def write_bytes_atomic(path: Path, data: bytes) -> FileDigest:
    """Write ``data`` to ``path`` via temp file + fsync + rename; its digest.

    A failure (a full disk, a kill) leaves ``path`` as it was and removes the temporary file;
    an OSError is a one-line DifforgeError naming the file and the errno's text."""
    path = Path(path)
    try:
        return _atomic(path, lambda temporary: _write_chunks(temporary, [data]))
    except OSError as error:
        raise _write_error(error, path, f"{path.name} is unchanged") from None


def save_tensors_atomic(
    path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> FileDigest:
    """A deterministic safetensors file (`safetensors_bytes`) written via temp file + fsync +
    rename; its digest.

    A failure leaves ``path`` as it was and removes the temporary file; an OSError or
    SafetensorError is a one-line DifforgeError naming the file."""
    path = Path(path)
    try:
        return _atomic(path, lambda temporary: save_file(tensors, str(temporary), metadata=metadata))
    except (OSError, SafetensorError) as error:
        raise _write_error(error, path, f"{path.name} is unchanged") from None


def file_digest(path: Path) -> FileDigest:
    """Size and SHA-256 of ``path``, read in 4 MiB chunks. Raises OSError as it comes."""
    digest = hashlib.sha256()
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    size = 0
    with open(path, "rb", buffering=0) as handle:
        while count := handle.readinto(buffer):
            digest.update(view[:count])
            size += count
    return FileDigest(size, digest.hexdigest())


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file; a missing or damaged file is a DifforgeError naming it."""
    if not path.is_file():
        raise DifforgeError(f"{path} is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise DifforgeError(f"{path} is damaged or not a safetensors file ({_one_line(error)})") from None


def load_metadata(path: Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file; a missing or damaged file is a DifforgeError."""
    if not Path(path).is_file():
        raise DifforgeError(f"{path} is missing")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise DifforgeError(f"{path} is damaged or not a safetensors file ({_one_line(error)})") from None


def check_safetensors(path: Path) -> None:
    """Raise a one-line DifforgeError unless ``path`` opens as a safetensors file (header
    parses, every tensor lies inside the file). Reads the header only: a flipped bit in the
    tensor data is not seen (that takes a manifest)."""
    if not Path(path).is_file():
        raise DifforgeError(f"{path} is missing")
    try:
        with safe_open(str(path), framework="pt") as handle:
            list(handle.keys())
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise DifforgeError(f"{path} is damaged or not a safetensors file ({_one_line(error)})") from None


# ---- manifests -------------------------------------------------------------------------------


def _digests_from_json(data: Any, source: Path) -> dict[str, FileDigest]:
    """``{"name": {"size": int, "sha256": hex}}`` -> digests, or a DifforgeError naming ``source``."""
    if not isinstance(data, dict):
        raise DifforgeError(f"{source} is damaged ('files' is not a JSON object)")
    digests = {}
    for name, entry in data.items():
        if not _plain_name(name) or not isinstance(entry, dict):
            raise DifforgeError(f"{source} is damaged (bad entry {name!r})")
        size, sha256 = entry.get("size"), entry.get("sha256")
        if type(size) is not int or size < 0 or not isinstance(sha256, str) or not _SHA256.match(sha256):
            raise DifforgeError(f"{source} is damaged (bad size or SHA-256 for {name!r})")
        digests[name] = FileDigest(size, sha256)
    return digests


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file holding an object; unreadable, not JSON or not an object is a one-line
    DifforgeError naming the file."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DifforgeError(f"{path} is damaged or unreadable ({_one_line(error)})") from None
    if not isinstance(data, dict):
        raise DifforgeError(f"{path} is damaged (not a JSON object)")
    return data


def _read_json(path: Path, expected_format: str) -> dict[str, Any]:
    data = read_json_object(path)
    if data.get("format") != expected_format:
        raise DifforgeError(
            f"{path} has format {data.get('format')!r}, not {expected_format!r} "
            "(written by another difforge version?)"
        )
    return data


def read_manifest(folder: Path) -> dict[str, FileDigest]:
    """The files a checkpoint folder's ``manifest.json`` lists, with their digests; a missing,
    unreadable or malformed manifest is a one-line DifforgeError naming it."""
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        raise DifforgeError(
            f"{path} is missing: the checkpoint is incomplete or was written by a difforge without "
            "manifests; use another checkpoint"
        )
    return _digests_from_json(_read_json(path, MANIFEST_FORMAT).get("files"), path)


def _manifest_bytes(step: int, digests: Mapping[str, FileDigest]) -> bytes:
    files = {name: digest.to_dict() for name, digest in sorted(digests.items())}
    document = {"format": MANIFEST_FORMAT, "step": step, "files": files}
    return (json.dumps(document, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _check_file(path: Path, expected: FileDigest, source: Path) -> None:
    if not path.is_file():
        raise DifforgeError(f"{path} is missing (listed in {source}): the checkpoint is incomplete")
    try:
        size = path.stat().st_size
        if size != expected.size:
            raise DifforgeError(
                f"{path} has {size} bytes, {source} says {expected.size}: the file is truncated or damaged"
            )
        actual = file_digest(path)
    except OSError as error:
        raise DifforgeError(f"{path} cannot be read ({_describe_os_error(error)})") from None
    if actual.sha256 != expected.sha256:
        raise DifforgeError(f"{path} does not match its SHA-256 in {source}: the file is damaged")


def verify_checkpoint(folder: Path, files: Iterable[str] | None = None) -> None:
    """Check a checkpoint folder against its ``manifest.json``: each of ``files`` (default:
    every file the manifest lists) must be listed, present, of the listed size and SHA-256
    (files are streamed in chunks).

    Raises a one-line DifforgeError naming the first problem: not a folder, manifest missing or
    damaged, a file missing (from the folder or the manifest), a size or hash mismatch, a file
    that cannot be read. Returns None when everything checks out."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DifforgeError(f"{folder} is not a checkpoint folder")
    manifest = read_manifest(folder)
    source = folder / MANIFEST_FILE
    names = list(manifest) if files is None else list(files)
    for name in names:
        if name not in manifest:
            raise DifforgeError(f"{folder / name} is not listed in {source}: the checkpoint is incomplete")
        _check_file(folder / name, manifest[name], source)


def check_checkpoint(folder: Path, files: Iterable[str] = CHECKPOINT_FILES) -> str | None:
    """Whether checkpoint ``folder`` can be used for ``files``: None when it is verified against
    its manifest (`verify_checkpoint` of ``files``); a one-line note when it has no manifest
    (a checkpoint of a difforge before manifests) but each of ``files`` is there and opens as a
    safetensors file (`check_safetensors`), so it is accepted unverified. Otherwise a one-line
    DifforgeError naming the problem."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DifforgeError(f"{folder} is not a checkpoint folder")
    if (folder / MANIFEST_FILE).exists():
        verify_checkpoint(folder, files)
        return None
    names = list(files)
    if not any(folder.iterdir()):
        raise DifforgeError(f"{folder} is empty (an interrupted write or deletion)")
    for name in names:
        if not (folder / name).is_file():
            raise DifforgeError(
                f"{folder / name} is missing and there is no {MANIFEST_FILE}: the checkpoint is incomplete"
            )
        check_safetensors(folder / name)
    return (
        f"{folder} has no {MANIFEST_FILE} (written by an older difforge): accepted unverified, "
        f"its files open cleanly"
    )


# ---- checkpoint folders ----------------------------------------------------------------------


def _plain_name(name: object) -> bool:
    return (
        isinstance(name, str)
        and bool(name)
        and name not in (".", "..")
        and "/" not in name
        and "\\" not in name
    )


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoint folders (``checkpoints/step_N``, renamed into place) of a run,
    oldest first. Says nothing about their contents: see `intact_checkpoints`."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_NAME.match(p.name)]
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX) :]))


def intact_checkpoints(run_dir: Path, files: Iterable[str] = CHECKPOINT_FILES) -> CheckpointScan:
    """Every checkpoint folder of the run checked with `check_checkpoint` for ``files``
    (default: what resuming needs), hashing every file: ``(intact, skipped)`` oldest first,
    with ``.unverified`` naming the intact ones accepted without a manifest. An empty or
    incomplete folder, or one with a damaged file, is in ``skipped`` with its reason.
    Never raises for a damaged checkpoint. See `newest_intact_checkpoint` to stop at the first."""
    names = tuple(files)
    intact: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    unverified: list[tuple[Path, str]] = []
    for folder in checkpoint_dirs(run_dir):
        try:
            note = check_checkpoint(folder, names)
        except DifforgeError as error:
            skipped.append((folder, str(error)))
            continue
        intact.append(folder)
        if note is not None:
            unverified.append((folder, note))
    return CheckpointScan(intact, skipped, unverified)


def newest_intact_checkpoint(
    run_dir: Path, files: Iterable[str] = CHECKPOINT_FILES
) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint folder that `check_checkpoint` accepts for ``files`` (None if
    none), and ``(folder, reason)`` for each newer one skipped, newest first. Hashes only
    the folders it has to."""
    names = tuple(files)
    skipped: list[tuple[Path, str]] = []
    for folder in reversed(checkpoint_dirs(run_dir)):
        try:
            check_checkpoint(folder, names)
        except DifforgeError as error:
            skipped.append((folder, str(error)))
            continue
        return folder, skipped
    return None, skipped


def _read_weights_record(run_dir: Path) -> dict[str, dict[str, Any]]:
    """``weights.json``'s entries, or {} when it is missing or damaged (then it is not used)."""
    path = Path(run_dir) / WEIGHTS_RECORD
    if not path.is_file():
        return {}
    try:
        data = _read_json(path, WEIGHTS_FORMAT)
        files = data.get("files")
        _digests_from_json(files, path)
    except DifforgeError:
        return {}
    return dict(files)


def verify_weights_file(run_dir: Path, name: str) -> str | None:
    """Check the run's top-level weight file ``name`` (``model.safetensors`` or
    ``ema.safetensors``): None when its size and SHA-256 match ``weights.json`` or the
    manifest of the newest checkpoint that lists it (they are byte copies of that
    checkpoint's files); a one-line note when neither records it (a run of a difforge before
    manifests) and it opens as a safetensors file (accepted unverified). Otherwise a one-line
    DifforgeError: missing, truncated, damaged, or left half-updated by an interrupted write."""
    run_dir = Path(run_dir)
    path = run_dir / name
    if not path.is_file():
        raise DifforgeError(f"{path} is missing")
    expected: list[tuple[str, FileDigest]] = []
    record = _read_weights_record(run_dir).get(name)
    if record is not None:
        expected.append((WEIGHTS_RECORD, FileDigest(record["size"], record["sha256"])))
    for folder in reversed(checkpoint_dirs(run_dir)):
        try:
            manifest = read_manifest(folder)
        except DifforgeError:
            continue
        if name in manifest:
            expected.append((f"{folder.name}/{MANIFEST_FILE}", manifest[name]))
            break
    if not expected:
        check_safetensors(path)
        return f"{path} is not recorded in {WEIGHTS_RECORD} or a manifest: accepted unverified"
    sources = " and ".join(source for source, _ in expected)
    try:
        size = path.stat().st_size
        candidates = [digest for _, digest in expected if digest.size == size]
        if not candidates:
            raise DifforgeError(
                f"{path} has {size} bytes, not what {sources} records: it is truncated or damaged"
            )
        actual = file_digest(path)
    except OSError as error:
        raise DifforgeError(f"{path} cannot be read ({_describe_os_error(error)})") from None
    if not any(digest.sha256 == actual.sha256 for digest in candidates):
        raise DifforgeError(
            f"{path} does not match its SHA-256 in {sources}: it is damaged or was left half-updated "
            "by an interrupted write"
        )
    return None


def _copy_checked(source: Path, target: Path, expected: FileDigest) -> None:
    """Copy ``source`` to ``target`` (fsynced), hashing what is read; OSError if it differs
    from ``expected`` (what was written)."""

    def chunks() -> Iterable[bytes]:
        with open(source, "rb") as handle:
            while chunk := handle.read(_CHUNK):
                yield chunk

    copied = _write_chunks(target, chunks())
    if copied != expected:
        raise OSError(errno.EIO, f"{source} reads back different from what was written")


def _write_failure(
    error: OSError | SafetensorError, name: str, current: Path | None, previous: Path | None, run_dir: Path
) -> DifforgeError:
    kept = (
        f"the previous checkpoint {previous.name} is intact"
        if previous is not None
        else "the run had no checkpoint before it and nothing was changed"
    )
    where = f" ({current})" if current is not None else ""
    if isinstance(error, OSError):
        what = _describe_os_error(error)
        advice = "free some space" if error.errno in _SPACE_ERRORS else "fix the cause"
    else:
        what = f"a safetensors error ({_one_line(error)})"
        advice = "fix the cause"
    return DifforgeError(
        f"{what} while writing checkpoint {name}{where}; {kept}; {advice} and resume with: "
        f"difforge train --resume --out {run_dir}"
    )


def write_checkpoint(
    run_dir: Path,
    step: int,
    files: Mapping[str, tuple[Mapping[str, torch.Tensor], Mapping[str, str]]],
    keep: int,
) -> Path:
    """Write ``files`` (name -> (tensors, metadata)) as checkpoint folder ``step``, atomically;
    refresh the run's top-level model/ema files and ``weights.json``; keep the newest ``keep``
    checkpoints (``keep <= 0``: keep all). Returns the checkpoint folder.

    Order: every file into ``checkpoints/.tmp-step_N-PID`` (fsynced, hashed while written),
    ``manifest.json`` last, the top-level copies and ``weights.json`` under temporary names
    (fsynced); then the folder is renamed to ``step_N`` (an existing ``step_N`` is moved aside
    first and removed after), the top-level files are renamed over the old ones
    (``weights.json`` last), and only then are older checkpoints pruned (`prune_checkpoints`).

    Guarantees: a kill at any moment leaves the previous checkpoints complete (at worst
    temporaries for `remove_stale_temporaries`, and one checkpoint over ``keep`` until the
    next write). A failure (OSError such as a full disk, SafetensorError, KeyboardInterrupt)
    removes the staging folder and every temporary it made, puts back what it moved, prunes
    nothing, and is raised again; an OSError or SafetensorError as a one-line DifforgeError
    ("no space left on device while writing checkpoint step_N (file); the previous checkpoint
    step_M is intact; ...")."""
    run_dir = Path(run_dir)
    for file_name in files:
        if not _plain_name(file_name) or file_name == MANIFEST_FILE or file_name.startswith("."):
            raise DifforgeError(f"bad checkpoint file name {file_name!r}")
    root = run_dir / CHECKPOINT_DIR
    name = f"{_PREFIX}{step:08d}"
    final = root / name
    pid = os.getpid()
    staging = root / f"{_STAGING_PREFIX}{step:08d}-{pid}"
    aside = root / f"{_STAGING_PREFIX}{step:08d}-{pid}-replaced"
    existing = checkpoint_dirs(run_dir)
    previous = existing[-1] if existing else None
    temporaries: list[Path] = []
    current: Path | None = None
    moved_aside = committed = False
    try:
        current = staging
        _remove_tree_quietly(staging)
        staging.mkdir(parents=True)
        digests: dict[str, FileDigest] = {}
        for file_name, (tensors, metadata) in files.items():
            current = staging / file_name
            digest = save_file(tensors, str(current), metadata=dict(metadata or {}))
            if not isinstance(digest, FileDigest):  # a stand-in writer (tests) that returned nothing
                _fsync_file(current)
                digest = file_digest(current)
            digests[file_name] = digest
        current = staging / MANIFEST_FILE
        _write_chunks(current, [_manifest_bytes(step, digests)])
        _fsync_dir(staging)

        renames: list[tuple[Path, Path]] = []
        record = _read_weights_record(run_dir)
        for top in TOP_LEVEL_FILES:
            if top in digests:
                current = _temporary(run_dir / top)
                temporaries.append(current)
                _copy_checked(staging / top, current, digests[top])
                renames.append((current, run_dir / top))
                record[top] = {**digests[top].to_dict(), "checkpoint": name}
        if renames:
            current = _temporary(run_dir / WEIGHTS_RECORD)
            temporaries.append(current)
            document = {"format": WEIGHTS_FORMAT, "files": dict(sorted(record.items()))}
            _write_chunks(current, [(json.dumps(document, indent=2, sort_keys=True) + "\n").encode()])
            renames.append((current, run_dir / WEIGHTS_RECORD))

        current = final
        if final.exists():
            _remove_tree_quietly(aside)
            os.replace(final, aside)
            moved_aside = True
        os.replace(staging, final)
        committed = True
        _fsync_dir(root)
        for temporary, target in renames:
            current = target
            os.replace(temporary, target)
        _fsync_dir(run_dir)
    except BaseException as error:
        _roll_back(staging, final, aside, moved_aside, committed, temporaries)
        if isinstance(error, (OSError, SafetensorError)):
            raise _write_failure(error, name, current, previous, run_dir) from None
        raise
    if moved_aside:
        _remove_tree_quietly(aside)
    prune_checkpoints(run_dir, keep, protect=final)
    return final


def _roll_back(
    staging: Path, final: Path, aside: Path, moved_aside: bool, committed: bool, temporaries: list[Path]
) -> None:
    """Undo a failed `write_checkpoint`, best effort (each step on its own)."""
    for temporary in temporaries:
        _unlink_quietly(temporary)
    _remove_tree_quietly(staging)
    if committed:
        failed = final.with_name(f"{staging.name}-failed")
        try:
            os.replace(final, failed)
        except OSError:
            failed = final
        _remove_tree_quietly(failed)
    if moved_aside and not final.exists():
        with contextlib.suppress(OSError):
            os.replace(aside, final)
    _fsync_dir(final.parent)


def prune_checkpoints(run_dir: Path, keep: int, *, protect: Path | None = None) -> list[Path]:
    """Remove the oldest checkpoint folders so that at most ``keep`` remain (``keep <= 0``:
    none is removed), never ``protect`` (the one just written): it and the newest
    ``keep - 1`` others are kept. Each folder is renamed to a ``.tmp-step_*`` name before it
    is deleted, so a kill never leaves a half-deleted ``step_N``. Returns the removed folders;
    a folder that cannot be removed is left (never raises for it)."""
    if keep <= 0:
        return []
    found = checkpoint_dirs(run_dir)
    others = [folder for folder in found if folder != protect]
    others_kept = keep - (1 if protect in found else 0)
    doomed = others[:-others_kept] if others_kept > 0 else others
    removed = []
    for folder in doomed:
        trash = folder.with_name(f"{_STAGING_PREFIX}{folder.name[len(_PREFIX) :]}-{os.getpid()}-pruned")
        try:
            os.replace(folder, trash)
        except OSError:
            continue
        _remove_tree_quietly(trash)
        removed.append(folder)
    if removed:
        _fsync_dir(Path(run_dir) / CHECKPOINT_DIR)
    return removed


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Remove what an interrupted writer (killed, any pid) left in ``run_dir``:
    ``checkpoints/.tmp-step_*`` folders and ``.NAME.tmp-PID`` files anywhere in the run
    folder. Returns the removed paths, sorted. Call it only while no other process writes
    to the run (when a training run starts or resumes). A path that cannot be removed is
    skipped (it never raises for one)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    removed: list[Path] = []
    root = run_dir / CHECKPOINT_DIR
    if root.is_dir():
        for entry in root.iterdir():
            if entry.name.startswith(_STAGING_PREFIX):
                _remove_tree_quietly(entry)
                if not entry.exists() and not entry.is_symlink():
                    removed.append(entry)
    for directory, _, names in os.walk(run_dir):
        for file_name in names:
            if _TEMP_FILE.match(file_name):
                path = Path(directory) / file_name
                _unlink_quietly(path)
                if not path.exists():
                    removed.append(path)
    return sorted(removed)


def resolve_run_path(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """``(run folder holding config.json, folder holding the weight files)`` for a run folder
    (``RUN`` -> ``(RUN, RUN)``) or one of its checkpoints (``RUN/checkpoints/step_N`` ->
    ``(RUN, RUN/checkpoints/step_N)``). Checks only that the folders and config.json exist;
    anything else is a one-line DifforgeError saying what to name instead."""
    given = Path(path)
    expect = f"name a run folder (RUN) or one of its checkpoints (RUN/{CHECKPOINT_DIR}/step_N)"
    if not given.exists():
        raise DifforgeError(f"{str(path)!r} does not exist: {expect}")
    if not given.is_dir():
        raise DifforgeError(f"{given} is a file, not a folder: {expect}")
    if _STEP_NAME.match(given.name) and given.parent.name == CHECKPOINT_DIR:
        run = given.parent.parent
        if not (run / CONFIG_NAME).is_file():
            raise DifforgeError(
                f"{given} looks like a checkpoint folder, but {run / CONFIG_NAME} is missing: "
                "a checkpoint is read with its run's config.json"
            )
        return run, given
    if (given / CONFIG_NAME).is_file():
        return given, given
    if given.name.startswith(_STAGING_PREFIX):
        raise DifforgeError(f"{given} is an unfinished checkpoint left by an interrupted write: {expect}")
    raise DifforgeError(
        f"{given} is neither a run folder (it has no {CONFIG_NAME}) nor a checkpoint folder: {expect}"
    )
