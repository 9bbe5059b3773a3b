"""Training: the `Trainer`, and `prepare_run`, which turns settings into a model, a process
and a dataset. The run's settings themselves live in `difforge.runs.config`."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import replace
from typing import Any

import torch

from difforge.data import ImageDataset, load_dataset
from difforge.errors import DifforgeError
from difforge.nn import UNetConfig
from difforge.nn.experts import ExpertsConfig, equal_mass_bounds, parse_bounds
from difforge.process import Process, ProcessConfig
from difforge.runs.config import DEFAULT_IMAGE_SIZE, DataInfo, RunConfig, TrainConfig, conditioning_of
from difforge.runs.models import build_model, find_weights, load_model
from difforge.runs.storage import resolve_run_path
from difforge.training.batches import DistributedContext
from difforge.training.trainer import Trainer, default_steps

logger = logging.getLogger("difforge.training")


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
            task=parent.train.task,
            low_res=parent.train.low_res,
        ).validate()
    built = process.build()  # validates the process settings before any data is read
    branching = train.experts is not None or train.expert_bounds is not None
    bounds = _expert_bounds(train, parent, built) if branching else None
    dataset = load_dataset(
        train.data,
        image_size=train.image_size or DEFAULT_IMAGE_SIZE,
        channels=train.channels,
        class_folders=train.class_folders,
        random_crop=train.random_crop,
        hflip=train.hflip,
        labels=train.labels,
        cond_dir=train.cond_dir,
        low_res=train.low_res_size() if train.task == "superres" else 0,
    )
    train = replace(train, image_size=dataset.image_size, channels=dataset.channels)
    fit_to_data = getattr(process, "fit_to_data", None)
    if fit_to_data is not None:  # e.g. the cold prior; a no-op once it is stored
        with torch.random.fork_rng(devices=[]):  # augmentations must not move the run's RNG
            process = fit_to_data(lambda index: dataset[index][0], len(dataset))
        built = process.build()
    conditioning = _conditioning_settings(train, dataset)
    if parent is not None:
        _check_parent_conditioning(train.init_from or "", parent, conditioning)
    overrides = {
        "image_size": dataset.image_size,
        "in_channels": dataset.channels,
        **conditioning,
        **process.model_settings(),
        **(model_overrides or {}),
    }
    model_config: Any
    if parent is not None and isinstance(parent.model, ExpertsConfig):  # fine-tuning an ensemble
        model_config = parent.model
    elif parent is not None:  # the parent's network (an imported run has no preset)
        model_config = UNetConfig.from_dict(overrides)
    else:
        model_config = UNetConfig.preset(train.preset, **overrides)
    if bounds is not None:
        model_config = _expert_config(train, parent, model_config, bounds)
    data_info = DataInfo(
        source=dataset.source,
        class_names=list(dataset.class_names) if conditioning["num_classes"] else [],
        fingerprint=dataset.fingerprint,
        num_images=len(dataset),
        skipped=len(dataset.skipped),
        excluded=len(dataset.excluded),
        cond_source=dataset.paired.source if dataset.paired is not None else "",
        attribution=getattr(dataset, "attribution", "") or "",
    )
    run_config = RunConfig(
        model_config, process, train, data_info, conditioning=conditioning_of(model_config)
    )
    torch.manual_seed(train.seed)
    model = build_model(run_config)
    if parent is not None:
        state = load_model(train.init_from, parent, "ema").state_dict()  # type: ignore[arg-type]
        if not branching:
            model.load_state_dict(state)
        for number, expert in enumerate(model.experts if branching else []):  # type: ignore[union-attr]
            _start_expert(number, expert, state)
    return model, built, dataset, run_config


def _start_expert(number: int, expert: torch.nn.Module, parent_state: dict[str, torch.Tensor]) -> None:
    """An expert starts from the parent's EMA weights; one of another size takes the
    tensors whose names and shapes match and keeps its fresh initialisation elsewhere."""
    own = expert.state_dict()
    matching = {k: v for k, v in parent_state.items() if k in own and own[k].shape == v.shape}
    if len(matching) == len(own) == len(parent_state):
        expert.load_state_dict(parent_state)
        return
    expert.load_state_dict(matching, strict=False)
    logger.warning(
        "expert %d differs in size from the parent: %d of its %d tensors copied from the parent, "
        "the other %d freshly initialised",
        number, len(matching), len(own), len(own) - len(matching),
    )  # fmt: skip


def _expert_bounds(train: TrainConfig, parent: RunConfig | None, process: Process) -> tuple[int, ...]:
    """The bounds of ``--expert-bounds``, or ``--experts K`` ranges of equal probability mass
    under the training timestep distribution; checked before any data is read."""
    if parent is None or isinstance(parent.model, ExpertsConfig):
        raise DifforgeError(
            "--experts: the parent run is already an ensemble; fine-tune it without --experts"
        )
    if train.expert_bounds is not None:
        return parse_bounds(train.expert_bounds, process.num_timesteps)
    sampler = process.timestep_sampler(train.timestep_sampler)
    return equal_mass_bounds(sampler.probabilities(), int(train.experts or 0))


def _expert_config(
    train: TrainConfig, parent: RunConfig | None, network: Any, bounds: tuple[int, ...]
) -> ExpertsConfig:
    """K copies of the parent's network, with the parent's EMA file hash for provenance."""
    assert parent is not None
    choice = find_weights(train.init_from or "", "ema")
    digest = hashlib.sha256(choice.path.read_bytes()).hexdigest()
    provenance = {"run": str(train.init_from), "ema_sha256": digest, "fingerprint": parent.data.fingerprint}
    count = len(bounds) - 1
    widths = train.expert_widths()
    if widths is not None and len(widths) != count:
        raise DifforgeError(f"--expert-channels gives {len(widths)} widths for {count} experts")
    networks = [
        network if widths is None else replace(network, base_channels=w) for w in widths or [0] * count
    ]
    return ExpertsConfig(bounds, networks, provenance)


def _conditioning_settings(train: TrainConfig, dataset: ImageDataset) -> dict[str, Any]:
    """The model settings the data's conditions need: classes or labels, the image
    condition's channels, the embedding of its augmentation level."""
    image_channels = 0
    if dataset.paired is not None:
        image_channels = dataset.paired.channels
    elif dataset.low_res:
        image_channels = dataset.channels
    num_classes = dataset.num_classes if train.conditional else 0
    return {
        "num_classes": num_classes,
        "multi_label": dataset.multi_label and num_classes > 0,
        "image_cond_channels": image_channels,
        "cond_noise_embed": image_channels > 0 and train.condition_noise_max() > 0,
    }


def _check_parent_conditioning(init_from: str, parent: RunConfig, conditioning: dict[str, Any]) -> None:
    """The data must give the conditions the parent model was built for."""
    what = {
        "num_classes": "classes or labels",
        "multi_label": "multi-label conditioning",
        "image_cond_channels": "image-condition channels",
        "cond_noise_embed": "noise-augmentation embedding (--cond-noise-max > 0)",
    }
    for name, value in conditioning.items():
        theirs = getattr(parent.model, name, None)
        if theirs != value:
            raise DifforgeError(
                f"--init-from {init_from}: the parent model has {theirs} {what[name]} and this data "
                f"{value} (pass --no-conditional for unlabelled data, or use data with the parent's "
                "conditions)"
            )


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
