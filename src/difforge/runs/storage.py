"""Crash-safe files of a run in safetensors: weights, EMA weights, checkpoint folders.

Layout of a run directory::

    config.json                  every setting (see `difforge.runs.config.RunConfig`)
    model.safetensors            latest raw weights      } copied from the newest checkpoint,
    ema.safetensors              latest EMA weights      } for sampling
    checkpoints/step_00001000/   model, ema, trainer.safetensors (the last K are kept)

Every file is written to a temporary name, fsynced and renamed; a checkpoint folder is
assembled under a temporary name and renamed as a whole, so a kill at any moment leaves
the previous checkpoint intact. Nothing is ever pickled (the trainer state's format is
`difforge.training.state`).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from difforge.errors import DifforgeError

CHECKPOINT_DIR = "checkpoints"
_PREFIX = "step_"


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


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via temp file + fsync + rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    _fsync_dir(path.parent)


def save_tensors_atomic(
    path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> None:
    """safetensors file written via temp file + fsync + rename (contiguous CPU copies)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    cpu = {name: tensor.detach().to("cpu").contiguous() for name, tensor in tensors.items()}
    save_file(cpu, str(temporary), metadata=dict(metadata or {}))
    _fsync_file(temporary)
    os.replace(temporary, path)
    _fsync_dir(path.parent)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file; a missing or damaged file is a DifforgeError naming it."""
    if not path.is_file():
        raise DifforgeError(f"{path} is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise DifforgeError(f"{path} is damaged or not a safetensors file ({error})") from None


def load_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise DifforgeError(f"{path} is damaged or not a safetensors file ({error})") from None


# ---- checkpoint folders ------------------------------------------------------------------


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first."""
    root = run_dir / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX) and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX) :]))


def write_checkpoint(
    run_dir: Path,
    step: int,
    files: Mapping[str, tuple[Mapping[str, torch.Tensor], Mapping[str, str]]],
    keep: int,
) -> Path:
    """Write ``files`` (name -> (tensors, metadata)) as checkpoint ``step``, atomically;
    refresh the run's top-level model/ema files; keep the newest ``keep`` checkpoints."""
    root = run_dir / CHECKPOINT_DIR
    final = root / f"{_PREFIX}{step:08d}"
    staging = root / f".tmp-{_PREFIX}{step:08d}-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    for name, (tensors, metadata) in files.items():
        save_tensors_atomic(staging / name, tensors, metadata)
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    _fsync_dir(root)
    for name in ("model.safetensors", "ema.safetensors"):
        if name in files:  # a byte copy of the file just written, not a second serialisation
            temporary = run_dir / f".{name}.tmp-{os.getpid()}"
            shutil.copyfile(final / name, temporary)
            _fsync_file(temporary)
            os.replace(temporary, run_dir / name)
    _fsync_dir(run_dir)
    for old in checkpoint_dirs(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final
