"""Training: settings (`TrainConfig`, `RunConfig`), the `Trainer`, and `prepare_run`, which
turns settings into a model, a process and a dataset."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from difforge.data import ImageDataset, load_dataset
from difforge.diffusion import DiffusionConfig, GaussianDiffusion
from difforge.nn import UNet, UNetConfig
from difforge.training.config import DataInfo, RunConfig, TrainConfig
from difforge.training.trainer import DistributedContext, Trainer, default_steps, resolve_device

DEFAULT_IMAGE_SIZE = 32


def prepare_run(
    train: TrainConfig, diffusion: DiffusionConfig, model_overrides: dict[str, Any] | None = None
) -> tuple[UNet, GaussianDiffusion, ImageDataset, RunConfig]:
    """Open the data, then build the U-Net (preset + overrides, sized to the data: image
    size, channels, classes, learned-variance outputs) and the process, seeded by
    ``train.seed``. Returns (model, diffusion, dataset, run config)."""
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
        "learn_sigma": diffusion.variance == "learned_range",
        **(model_overrides or {}),
    }
    model_config = UNetConfig.preset(train.preset, **overrides)
    process = diffusion.build()
    torch.manual_seed(train.seed)
    model = UNet(model_config)
    data_info = DataInfo(
        source=dataset.source,
        class_names=list(dataset.class_names) if num_classes else [],
        fingerprint=dataset.fingerprint,
        num_images=len(dataset),
        skipped=len(dataset.skipped),
        attribution=getattr(dataset, "attribution", "") or "",
    )
    return model, process, dataset, RunConfig(model_config, diffusion, train, data_info)


__all__ = [
    "DataInfo",
    "DistributedContext",
    "RunConfig",
    "TrainConfig",
    "Trainer",
    "default_steps",
    "prepare_run",
    "resolve_device",
]
