"""``difforge export --format diffusers`` and ``difforge import``: runs <-> diffusers folders.

An export is a folder that ``diffusers.DDPMPipeline.from_pretrained(DIR)`` loads with no
code of ours::

    model_index.json                        DDPMPipeline = unet + scheduler
    unet/config.json                        UNet2DModel, every key explicit
    unet/diffusion_pytorch_model.safetensors
    scheduler/scheduler_config.json         DDPMScheduler
    difforge.json                           the run's config.json and which weights were
                                            exported: `import_diffusers` reads it back, so
                                            difforge -> diffusers -> difforge is bit-exact

An import reads a ``UNet2DModel`` folder (a pipeline folder or its ``unet/``) and its
scheduler config and writes a run folder (config.json, model and EMA weights, weights.json)
that ``sample``, ``eval`` and ``train --init-from`` take. Both read and write safetensors
only; every check runs before the first file is written, and the folder appears whole
(written under a temporary name, then renamed).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from difforge.diffusion import DiffusionConfig
from difforge.errors import DifforgeError
from difforge.interop.scheduler import scheduler_config_from_diffusers, scheduler_config_to_diffusers
from difforge.interop.unet2d import (
    EXPORTABLE_PRESETS,
    ImportedUNet,
    state_dict_from_diffusers,
    state_dict_to_diffusers,
    unet_config_from_diffusers,
    unet_config_to_diffusers,
)
from difforge.nn import UNet, UNetConfig
from difforge.runs.config import CONFIG_FILE, DataInfo, RunConfig, TrainConfig
from difforge.runs.models import WEIGHT_FILES, find_weights
from difforge.runs.storage import (
    WEIGHTS_FORMAT,
    WEIGHTS_RECORD,
    file_digest,
    load_tensors,
    read_json_object,
    resolve_run_path,
    save_tensors_atomic,
    write_bytes_atomic,
)

UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"
UNET_PICKLE = "diffusion_pytorch_model.bin"
SIDECAR = "difforge.json"
SIDECAR_FORMAT = "difforge-diffusers-export-1"
IMPORTED_PRESET = "imported"
"""`TrainConfig.preset` of an imported run (its network is config.json's, not a preset's)."""


def _json_bytes(data: Any) -> bytes:
    return (json.dumps(data, indent=2) + "\n").encode("utf-8")


def _fresh_folder(out: Path, what: str) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DifforgeError(f"--out {out} already exists: {what} goes to a new (or empty) folder")


def _write_folder(out: Path, write: Callable[[Path], None]) -> None:
    """Run ``write`` into ``out``'s temporary sibling, then rename it to ``out``; on any failure
    nothing is left behind."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".tmp-{out.name}-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        write(staging)
        if out.exists():
            out.rmdir()  # empty: checked by _fresh_folder
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


# ---- export ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportReport:
    """What `export_diffusers` wrote: the folder, the weight file used, the tensor count."""

    out: Path
    weights: Path
    tensors: int


def export_diffusers(run: str | Path, out: str | Path, *, weights: str = "ema") -> ExportReport:
    """Write the run's network (``ema`` or ``raw`` weights) and process as a diffusers
    ``DDPMPipeline`` folder at ``out`` (which must be new or empty). A run diffusers cannot
    hold (a cold or expert run, ConvNeXt or linear/class/channel attention blocks, image or
    multi-label conditioning) is a one-line DifforgeError before anything is written."""
    out = Path(out)
    run_dir, _ = resolve_run_path(run)
    config = RunConfig.load(run_dir)
    if not isinstance(config.model, UNetConfig):
        raise DifforgeError(
            f"{run_dir} is a {config.model.kind} run: diffusers' UNet2DModel holds one network "
            "(export one expert's parent run instead)"
        )
    if not isinstance(config.diffusion, DiffusionConfig):
        raise DifforgeError(
            f"{run_dir} is a {config.diffusion.kind} run: diffusers' DDPM schedulers hold only the "
            "Gaussian process"
        )
    unet_config = unet_config_to_diffusers(config.model)
    scheduler_config = scheduler_config_to_diffusers(config.diffusion)
    _fresh_folder(out, "the export")
    choice = find_weights(run, weights)
    if choice.note is not None:
        raise DifforgeError(choice.note + ": export the checkpoint by name if you mean it")
    tensors = state_dict_to_diffusers(config.model, choice.state)
    sidecar = {
        "format": SIDECAR_FORMAT,
        "run": config.to_dict(),
        "weights": weights,
        "source": {"file": str(choice.path), "sha256": file_digest(choice.path).sha256},
    }
    model_index = {
        "_class_name": "DDPMPipeline",
        "scheduler": ["diffusers", "DDPMScheduler"],
        "unet": ["diffusers", "UNet2DModel"],
    }

    def write(folder: Path) -> None:
        (folder / "unet").mkdir()
        (folder / "scheduler").mkdir()
        write_bytes_atomic(folder / "model_index.json", _json_bytes(model_index))
        write_bytes_atomic(folder / "unet" / CONFIG_FILE, _json_bytes(unet_config))
        save_tensors_atomic(folder / "unet" / UNET_WEIGHTS, tensors, {"format": "pt"})
        write_bytes_atomic(folder / "scheduler" / "scheduler_config.json", _json_bytes(scheduler_config))
        write_bytes_atomic(folder / SIDECAR, _json_bytes(sidecar))

    _write_folder(out, write)
    return ExportReport(out, choice.path, len(tensors))


# ---- import ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DiffusersFolder:
    """The files of a diffusers model: the UNet's config and weights, the scheduler config,
    and difforge's sidecar when the folder is a difforge export."""

    unet_config: Path
    unet_weights: Path
    scheduler_config: Path
    sidecar: Path | None


def find_diffusers_files(source: str | Path) -> DiffusersFolder:
    """The files of a pipeline folder (``model_index.json``, ``unet/``, ``scheduler/``) or of
    a ``unet/`` folder (its scheduler beside it in ``../scheduler/`` or in the folder itself);
    anything missing, or weights only as a pickle (``.bin``), is a one-line DifforgeError."""
    folder = Path(source)
    if not folder.is_dir():
        problem = "is a file" if folder.exists() else "does not exist"
        raise DifforgeError(f"{folder} {problem}: name a diffusers pipeline folder or its unet/ folder")
    root = folder
    if (folder / "model_index.json").is_file():
        index = read_json_object(folder / "model_index.json")
        unet_entry = index.get("unet")
        if not isinstance(unet_entry, list) or unet_entry[-1:] != ["UNet2DModel"]:
            raise DifforgeError(
                f"{folder / 'model_index.json'}: its unet is {unet_entry!r}, not a UNet2DModel "
                "(only those import)"
            )
        unet = folder / "unet"
    elif (folder / CONFIG_FILE).is_file():
        unet, root = folder, folder.parent
    else:
        raise DifforgeError(
            f"{folder} has neither model_index.json nor config.json: not a diffusers pipeline or model folder"
        )
    if not (unet / CONFIG_FILE).is_file():
        raise DifforgeError(f"{unet / CONFIG_FILE} is missing")
    weights = unet / UNET_WEIGHTS
    if not weights.is_file():
        if (unet / UNET_PICKLE).is_file():
            raise DifforgeError(
                f"{unet} holds its weights only as {UNET_PICKLE}, a pickle, which difforge never loads; "
                "if you trust it, convert it with diffusers: UNet2DModel.from_pretrained(DIR)"
                ".save_pretrained(DIR, safe_serialization=True)"
            )
        if (unet / f"{UNET_WEIGHTS}.index.json").is_file():
            raise DifforgeError(f"{unet}: sharded weights are not supported (a UNet2DModel fits in one file)")
        raise DifforgeError(f"{weights} is missing")
    candidates = [root / "scheduler" / "scheduler_config.json", unet / "scheduler_config.json"]
    scheduler = next((c for c in candidates if c.is_file()), None)
    if scheduler is None:
        raise DifforgeError(
            f"no scheduler config for {unet} (looked for {' and '.join(map(str, candidates))}): "
            "difforge needs the noise schedule the model was trained with"
        )
    sidecar = root / SIDECAR
    return DiffusersFolder(unet / CONFIG_FILE, weights, scheduler, sidecar if sidecar.is_file() else None)


@dataclass(frozen=True)
class ImportReport:
    """What `import_diffusers` wrote, and the notes a user should read."""

    out: Path
    config: RunConfig
    notes: tuple[str, ...]


def _exported_run(files: DiffusersFolder, unet_data: dict[str, Any]) -> tuple[RunConfig | None, str | None]:
    """The run config stored by a difforge export, if it still describes the folder's network."""
    if files.sidecar is None:
        return None, None
    data = read_json_object(files.sidecar)
    if data.get("format") != SIDECAR_FORMAT or not isinstance(data.get("run"), dict):
        return None, f"{files.sidecar} is not a difforge export record: ignored"
    try:
        run = RunConfig.from_dict(data["run"], str(files.sidecar))
        stored = unet_config_to_diffusers(run.model)
    except DifforgeError as error:
        return None, f"{files.sidecar} ignored: {error}"
    theirs = {k: v for k, v in unet_data.items() if not k.startswith("_")}
    ours = {k: v for k, v in stored.items() if not k.startswith("_")}
    if {k: ours[k] for k in theirs if k in ours} != {k: theirs[k] for k in theirs if k in ours}:
        return (
            None,
            f"{files.sidecar} does not describe {files.unet_config} (edited since the export?): ignored",
        )
    return run, None


def _foreign_run(imported: ImportedUNet, process: DiffusionConfig, source: Path) -> RunConfig:
    """The config.json of a model that was not trained by difforge."""
    model = imported.config
    classes = model.num_classes
    train = TrainConfig(
        data="",
        image_size=model.image_size,
        channels=model.in_channels,
        conditional=classes > 0,
        preset=IMPORTED_PRESET,
        p_uncond=0.0,
    )
    data = DataInfo(
        source="",
        class_names=[str(i) for i in range(classes)],
        attribution=f"imported from the diffusers folder {source}",
    )
    return RunConfig(model, process, train, data)


def import_diffusers(source: str | Path, out: str | Path) -> ImportReport:
    """Write the diffusers model at ``source`` as a difforge run at ``out`` (new or empty).

    The run's model.safetensors and ema.safetensors are both the folder's weights. A class
    table gains a null row of zeros (diffusers has no null label), so ``--guidance`` does not
    apply to it; a difforge export is read back with its own config (bit-exact)."""
    out = Path(out)
    files = find_diffusers_files(source)
    unet_data = read_json_object(files.unet_config)
    imported = unet_config_from_diffusers(unet_data, str(files.unet_config))
    process = scheduler_config_from_diffusers(
        read_json_object(files.scheduler_config), str(files.scheduler_config)
    )
    notes: list[str] = []
    run, note = _exported_run(files, unet_data)
    if note is not None:
        notes.append(note)
    if run is not None:
        imported = ImportedUNet(run.model, imported.sin_first, added_null_row=False)
    else:
        learned = process.variance == "learned_range"
        if learned != imported.config.learn_sigma:
            outputs = imported.config.final_out_channels
            raise DifforgeError(
                f"{files.unet_config}: {outputs} output channels for {imported.config.in_channels} input "
                f"channels, but {files.scheduler_config} says variance_type "
                f"{'learned_range' if learned else process.variance} (2C outputs go with learned_range)"
            )
        run = _foreign_run(imported, process, Path(source))
        if imported.added_null_row:
            notes.append(
                "diffusers' class table has no null label: difforge's (class "
                f"{imported.config.num_classes}) is a row of zeros, so sample with classes and guidance 1"
            )
    _fresh_folder(out, "the imported run")
    tensors = {k: v.float() for k, v in load_tensors(files.unet_weights).items()}
    state = state_dict_from_diffusers(imported, tensors, str(files.unet_weights))
    with torch.device("meta"):
        network = UNet(imported.config)
    expected = network.state_dict()
    missing = sorted(set(expected) - set(state))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or wrong:
        problem = f"missing {', '.join(missing[:3])}" if missing else f"misshapen {', '.join(wrong[:3])}"
        raise DifforgeError(f"{files.unet_weights} does not fit {files.unet_config} ({problem})")

    def write(folder: Path) -> None:
        metadata = {"format": "pt"}
        record = {}
        for name in WEIGHT_FILES.values():
            digest = save_tensors_atomic(folder / name, state, metadata)
            record[name] = {**digest.to_dict(), "checkpoint": "imported"}
        document = {"format": WEIGHTS_FORMAT, "files": record}
        write_bytes_atomic(folder / CONFIG_FILE, run.to_json().encode("utf-8"))
        write_bytes_atomic(folder / WEIGHTS_RECORD, _json_bytes(document))

    _write_folder(out, write)
    return ImportReport(out, run, tuple(notes))


__all__ = [
    "EXPORTABLE_PRESETS",
    "ExportReport",
    "ImportReport",
    "export_diffusers",
    "find_diffusers_files",
    "import_diffusers",
]
