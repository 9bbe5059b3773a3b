"""Previews during training: a sample grid and a denoising strip, made by a callback the
trainer calls every ``sample_every`` steps (and at the end).

The grid has one column per class for class-conditional runs; other conditions (an
image, say) are taken from the first items of the dataset. A process that cannot generate
from nothing (a cold run whose fully degraded image still depends on the picture) restores
the first dataset images from their fully degraded versions instead; the strip then shows
the degradation walked back. Sampling uses the run's
`TrainConfig.preview_sampling` (the `SampleConfig` defaults with the preview sampler and
steps) and the EMA weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.utils.data import default_collate

from difforge.conditioning import ClassLabel, null_conditions, prepare_conditions
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


def preview_conditions(trainer: Trainer, count: int) -> dict[str, torch.Tensor]:
    """The cond dict of a preview grid of ``count`` images (on the trainer's device)."""
    conditions = trainer.conditions
    raw: dict[str, torch.Tensor] = {}
    others = [key for key in conditions if key != ClassLabel.key]
    if others:
        collated = preview_items(trainer, count)[1]
        raw.update({key: collated[key] for key in others})
    if ClassLabel.key in conditions:
        num_classes = conditions[ClassLabel.key].num_classes  # type: ignore[attr-defined]
        raw[ClassLabel.key] = torch.arange(count) % num_classes
    return prepare_conditions(raw, conditions, device=trainer.device)


@torch.no_grad()
def write_preview(trainer: Trainer) -> Path | None:
    """Sample the preview grid and strip into ``RUN/samples`` (and TensorBoard); rank 0 only."""
    if not trainer.ctx.is_main:
        return None
    config = trainer.config
    count = config.preview_images
    conditions = trainer.conditions
    columns = None
    if ClassLabel.key in conditions:
        columns = min(conditions[ClassLabel.key].num_classes, count)  # type: ignore[attr-defined]
    frames: list[tuple[torch.Tensor, torch.Tensor]] = []

    def keep(info: StepInfo) -> None:
        if info.index % max(1, info.total // STRIP_FRAMES) == 0 or info.index == info.total - 1:
            frames.append((info.x[:STRIP_IMAGES].clone(), info.pred_x0[:STRIP_IMAGES].clone()))

    sampling = config.preview_sampling()
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
    grid = make_grid(to_uint8(samples), columns=columns)
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
