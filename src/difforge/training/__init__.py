"""Training: the `Trainer`, and `prepare_run`, which turns settings into a model, a process
and a dataset. The run's settings themselves live in `difforge.runs.config`."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from difforge.data import ImageDataset, load_dataset
from difforge.errors import DifforgeError
from difforge.nn import UNetConfig
from difforge.process import Process, ProcessConfig
from difforge.runs.config import DataInfo, RunConfig, TrainConfig, conditioning_of
from difforge.runs.models import build_model, load_model
from difforge.runs.storage import resolve_run_path
from difforge.training.batches import DistributedContext
from difforge.training.trainer import Trainer, default_steps

DEFAULT_IMAGE_SIZE = 32


def prepare_run(
    train: TrainConfig, process: ProcessConfig, model_overrides: dict[str, Any] | None = None
) -> tuple[torch.nn.Module, Process, ImageDataset, RunConfig]:
    """Open the data, then build the U-Net (preset + overrides, sized to the data: image
    size, channels, classes, and what the process needs, e.g. learned-variance outputs) and
    the process, seeded by ``train.seed``; a process config with ``fit_to_data`` (the cold
    prior) is fitted to the images first. Returns (model, process, dataset, run config).

    With ``train.init_from`` (a run or one of its checkpoints) the model and the process are
    the parent run's, the data is read at the parent's size and channels, and the model
    starts from the parent's EMA weights."""
    train.validate()
    parent = _parent_run(train.init_from) if train.init_from is not None else None
    if parent is not None:
        process = parent.diffusion
        model_overrides = parent.model.to_dict()
        train = replace(
            train,
            preset=parent.train.preset,
            image_size=parent.model.image_size,
            channels=parent.model.in_channels,
        )
    built = process.build()  # validates the process settings before any data is read
    dataset = load_dataset(
        train.data,
        image_size=train.image_size or DEFAULT_IMAGE_SIZE,
        channels=train.channels,
        class_folders=train.class_folders,
        random_crop=train.random_crop,
        hflip=train.hflip,
    )
    train = replace(train, image_size=dataset.image_size, channels=dataset.channels)
    fit_to_data = getattr(process, "fit_to_data", None)
    if fit_to_data is not None:  # e.g. the cold prior; a no-op once it is stored
        with torch.random.fork_rng(devices=[]):  # augmentations must not move the run's RNG
            process = fit_to_data(lambda index: dataset[index][0], len(dataset))
        built = process.build()
    num_classes = dataset.num_classes if train.conditional else 0
    if parent is not None and num_classes != parent.model.num_classes:
        raise DifforgeError(
            f"--init-from {train.init_from}: the parent model has {parent.model.num_classes} classes and "
            f"this data {num_classes} (pass --no-conditional for unlabelled data, or use data with the "
            "parent's classes)"
        )
    overrides = {
        "image_size": dataset.image_size,
        "in_channels": dataset.channels,
        "num_classes": num_classes,
        **process.model_settings(),
        **(model_overrides or {}),
    }
    model_config = UNetConfig.preset(train.preset, **overrides)
    data_info = DataInfo(
        source=dataset.source,
        class_names=list(dataset.class_names) if num_classes else [],
        fingerprint=dataset.fingerprint,
        num_images=len(dataset),
        skipped=len(dataset.skipped),
        attribution=getattr(dataset, "attribution", "") or "",
    )
    run_config = RunConfig(
        model_config, process, train, data_info, conditioning=conditioning_of(model_config)
    )
    torch.manual_seed(train.seed)
    model = build_model(run_config)
    if parent is not None:
        model.load_state_dict(load_model(train.init_from, parent, "ema").state_dict())  # type: ignore[arg-type]
    return model, built, dataset, run_config


def _parent_run(path: str) -> RunConfig:
    """The config of the run (or checkpoint folder) ``--init-from`` names."""
    run_dir, _ = resolve_run_path(path)
    return RunConfig.load(run_dir)


__all__ = [
    "DataInfo",
    "DistributedContext",
    "RunConfig",
    "TrainConfig",
    "Trainer",
    "default_steps",
    "prepare_run",
]
