"""Training: the `Trainer`, and `prepare_run`, which turns settings into a model, a process
and a dataset. The run's settings themselves live in `difforge.runs.config`."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from difforge.data import ImageDataset, load_dataset
from difforge.nn import UNetConfig
from difforge.process import Process, ProcessConfig
from difforge.runs.config import DataInfo, RunConfig, TrainConfig, conditioning_of
from difforge.runs.models import build_model
from difforge.training.batches import DistributedContext
from difforge.training.trainer import Trainer, default_steps

DEFAULT_IMAGE_SIZE = 32


def prepare_run(
    train: TrainConfig, process: ProcessConfig, model_overrides: dict[str, Any] | None = None
) -> tuple[torch.nn.Module, Process, ImageDataset, RunConfig]:
    """Open the data, then build the U-Net (preset + overrides, sized to the data: image
    size, channels, classes, and what the process needs, e.g. learned-variance outputs) and
    the process, seeded by ``train.seed``. Returns (model, process, dataset, run config)."""
    train.validate()
    dataset = load_dataset(
        train.data,
        image_size=train.image_size or DEFAULT_IMAGE_SIZE,
        channels=train.channels,
        class_folders=train.class_folders,
        random_crop=train.random_crop,
        hflip=train.hflip,
    )
    train = replace(train, image_size=dataset.image_size, channels=dataset.channels)
    num_classes = dataset.num_classes if train.conditional else 0
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
    built = process.build()
    torch.manual_seed(train.seed)
    return build_model(run_config), built, dataset, run_config


__all__ = [
    "DataInfo",
    "DistributedContext",
    "RunConfig",
    "TrainConfig",
    "Trainer",
    "default_steps",
    "prepare_run",
]
