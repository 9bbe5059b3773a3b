"""Previews during training: a sample grid and a denoising strip, made by a callback the
trainer calls every ``sample_every`` steps (and at the end).

The grid has one column per class for class-conditional runs; other conditions (multi-hot
labels, an image) are taken from the first items of the dataset, and a run with an image
condition shows condition | sample | data image side by side. A process that cannot generate
from nothing (a cold run whose fully degraded image still depends on the picture) restores
the first dataset images from their fully degraded versions instead; the strip then shows
the degradation walked back. Sampling uses the run's
`TrainConfig.preview_sampling` (the `SampleConfig` defaults with the preview sampler and
steps) and the EMA weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import default_collate

from difforge.conditioning import (
    ClassLabel,
    ImageCondition,
    null_conditions,
    prepare_conditions,
    resize_images,
)
from difforge.images import make_grid, save_png, to_uint8
from difforge.sampling import StepInfo, generate

if TYPE_CHECKING:
    from difforge.training.trainer import Trainer

STRIP_IMAGES = 4
"""Images of the grid shown in the denoising strip."""
STRIP_FRAMES = 8
"""About how many steps the strip shows (plus the last)."""


def preview_items(trainer: Trainer, count: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The first ``count`` dataset items (cycled), collated: (count, C, H, W) images and the
    raw cond dict, drawn without moving the run's RNG."""
    with torch.random.fork_rng(devices=[]):  # augmentations must not move the run's RNG
        torch.manual_seed(trainer.config.seed)
        items = [trainer.dataset[i % len(trainer.dataset)] for i in range(count)]
    return default_collate(items)  # type: ignore[no-any-return]


def _one_per_class(trainer: Trainer) -> int:
    """Classes of a single-label run (its grid has a column per class), else 0."""
    labels = trainer.conditions.get(ClassLabel.key)
    return labels.num_classes if isinstance(labels, ClassLabel) else 0


def preview_conditions(trainer: Trainer, count: int) -> dict[str, torch.Tensor]:
    """The cond dict of a preview grid of ``count`` images (on the trainer's device): class
    labels cycled, every other condition (multi-hot labels, images) from the first dataset
    items, an augmented image condition at the sampling level (`SampleConfig.cond_noise`)."""
    conditions = trainer.conditions
    num_classes = _one_per_class(trainer)
    raw: dict[str, torch.Tensor] = {}
    others = [key for key in conditions if key != ClassLabel.key or not num_classes]
    if others:
        collated = preview_items(trainer, count)[1]
        raw.update({key: collated[key] for key in others})
    if num_classes:
        raw[ClassLabel.key] = torch.arange(count) % num_classes
    level = trainer.config.preview_sampling().cond_noise_for(True)
    return prepare_conditions(raw, conditions, device=trainer.device, cond_noise=level)


@torch.no_grad()
def write_preview(trainer: Trainer) -> Path | None:
    """Sample the preview grid and strip into ``RUN/samples`` (and TensorBoard); rank 0 only."""
    if not trainer.ctx.is_main:
        return None
    config = trainer.config
    count = config.preview_images
    conditions = trainer.conditions
    columns = min(_one_per_class(trainer), count) or None
    frames: list[tuple[torch.Tensor, torch.Tensor]] = []

    def keep(info: StepInfo) -> None:
        if info.index % max(1, info.total // STRIP_FRAMES) == 0 or info.index == info.total - 1:
            frames.append((info.x[:STRIP_IMAGES].clone(), info.pred_x0[:STRIP_IMAGES].clone()))

    sampling = config.preview_sampling().for_superres(config.task == "superres")
    sampling = sampling.updated(steps=min(sampling.steps, trainer.process.num_timesteps))
    channels, size = trainer.image_shape[0], trainer.image_shape[1]
    start = None
    if not getattr(trainer.process, "can_generate", True):  # a restoration-only run restores data
        images = preview_items(trainer, count)[0].to(trainer.device)
        top = torch.full((count,), trainer.process.num_timesteps, dtype=torch.long, device=trainer.device)
        start = trainer.process.degrade(images, top)  # type: ignore[attr-defined]
    samples = generate(
        trainer.ema.model,
        trainer.process,
        (count, channels, size, size),
        sampling,
        cond=preview_conditions(trainer, count),
        null_cond=null_conditions(conditions) if config.p_uncond > 0 else None,
        generator=torch.Generator(device=trainer.device).manual_seed(sampling.seed),
        callback=keep,
        device=trainer.device,
        start=start,
    )
    shown = to_uint8(samples)
    if ImageCondition.key in conditions:  # condition | sample | data, two triples a row
        items = preview_items(trainer, count)
        condition = resize_images(items[1][ImageCondition.key].float(), size)
        if condition.shape[1] != channels:  # a grey condition of colour images, or the reverse
            condition = condition.mean(1, keepdim=True).expand(-1, channels, -1, -1)
        triples = np.stack([to_uint8(condition), shown, to_uint8(items[0])], axis=1)
        shown, columns = triples.reshape(-1, *shown.shape[1:]), 6
    grid = make_grid(shown, columns=columns)
    folder = trainer.run_dir / "samples"
    path = save_png(folder / f"step_{trainer.step:08d}.png", grid)
    save_png(folder / "latest.png", grid)
    writer = trainer.tensorboard()
    if writer is not None:
        writer.add_image("samples", grid, trainer.step, dataformats="HWC")
    if frames:  # a sampler that reports no steps gets no strip
        strip_rows = [torch.cat([x for x, _ in frames], dim=3), torch.cat([p for _, p in frames], dim=3)]
        strip = make_grid(to_uint8(torch.cat(strip_rows, dim=0)), columns=1)
        save_png(folder / f"strip_{trainer.step:08d}.png", strip)
        if writer is not None:
            writer.add_image("denoising", strip, trainer.step, dataformats="HWC")
    return path
