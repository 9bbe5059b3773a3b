"""Conditioning as a dict of tensors, from the dataset to the model.

A dataset item is ``(image, cond)`` with ``cond`` a dict keyed by condition kind; the
trainer moves it to the device, `prepare_conditions` turns raw values into what the model
takes and applies classifier-free dropout per kind, and the model receives the dict as
keyword arguments (``model(x_t, t, **cond)``). `Pipeline` and `difforge.sampling.generate`
take the same keys, and classifier-free guidance replaces every condition by its null in
the unconditional branch.

The kinds (``CONDITION_KINDS``), each a `Condition` with a ``key`` (the dict key and the
model's keyword), ``prepare`` and ``null_like``:

==============  =================================  ======================================
kind / key      value per batch                    null
==============  =================================  ======================================
class_labels    (B,) int64 in 0..K-1, -1 unknown   K (the model's extra "no class" row)
                multi-label runs: (B, L) multi-hot  the all-zero row
image_cond      (B, C', h, w) float in [-1, 1]     zeros (mid-grey)
==============  =================================  ======================================

An image condition may carry a `NoiseAugmentation` (super-resolution): `prepare_conditions`
then corrupts it with Gaussian noise of a level s in [0, 1] (random per example in
training, fixed when sampling) and adds ``cond_noise_level`` = s to the dict, which the
model embeds.

Adding a condition is one `Condition` class plus one line in `CONDITION_KINDS`; the model
must accept its key as a keyword.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch
import torch.nn.functional as F

from difforge.errors import DifforgeError


class Condition(Protocol):
    """One kind of condition: ``key`` names it in the cond dict and as the model keyword."""

    key: ClassVar[str]

    def prepare(self, value: torch.Tensor) -> torch.Tensor:
        """A dataset's raw batch (B, ...) -> what the model takes (B, ...)."""
        ...

    def null_like(self, value: torch.Tensor) -> torch.Tensor:
        """The null condition for a prepared batch, of value's shape, dtype and device."""
        ...


@dataclass(frozen=True)
class ClassLabel:
    """A single class label per image; ``num_classes`` (K) is also the null label."""

    num_classes: int
    key: ClassVar[str] = "class_labels"

    def prepare(self, value: torch.Tensor) -> torch.Tensor:
        labels = value.long()
        return torch.where(labels < 0, self.null_like(labels), labels)

    def null_like(self, value: torch.Tensor) -> torch.Tensor:
        return torch.full_like(value, self.num_classes)


@dataclass(frozen=True)
class MultiHotLabels:
    """Several labels per image: a (B, L) multi-hot float vector; the all-zero row is null
    (an image listed without labels trains the null too)."""

    num_labels: int
    key: ClassVar[str] = "class_labels"

    def prepare(self, value: torch.Tensor) -> torch.Tensor:
        if value.ndim != 2 or value.shape[1] != self.num_labels:
            raise DifforgeError(f"multi-hot labels must be (B, {self.num_labels}), got {tuple(value.shape)}")
        return value.float()

    def null_like(self, value: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(value)


COND_NOISE_KEY = "cond_noise_level"
"""The model keyword of an augmented image condition's noise level s, (B,) float in [0, 1]."""


@dataclass(frozen=True)
class NoiseAugmentation:
    """Noise-conditioning augmentation of an image condition (Ho et al. 2021, "Cascaded
    Diffusion Models", section 3.2).

    At level s in [0, 1] the condition c becomes ``cos(pi s / 2) c + sin(pi s / 2) z``,
    z ~ N(0, I): the variance-preserving path from the clean condition (s = 0) to pure noise
    (s = 1). Training draws s ~ U(0, ``max_level``) per example; sampling uses one fixed
    level (``difforge sample --cond-noise``). With ``blur_sigma`` > 0 training also blurs
    half of the conditions (per example) with a Gaussian of std ~ U(0, ``blur_sigma``)
    pixels of the condition, before the noise.
    """

    max_level: float
    blur_sigma: float = 0.0

    def corrupt(
        self, image: torch.Tensor, level: torch.Tensor, generator: torch.Generator | None
    ) -> torch.Tensor:
        """(B, C, h, w) condition at levels (B,) -> the noised condition, same shape."""
        angle = (level.to(image.dtype) * (math.pi / 2)).reshape(-1, 1, 1, 1)
        noise = torch.randn(image.shape, generator=generator, device=image.device, dtype=image.dtype)
        return torch.cos(angle) * image + torch.sin(angle) * noise

    def train(
        self, image: torch.Tensor, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Training augmentation: (corrupted condition, levels (B,)); draws blur (when on),
        then s, then the noise, from ``generator``."""
        batch = image.shape[0]
        if self.blur_sigma > 0:
            draws = torch.rand((2, batch), generator=generator, device=image.device)
            sigma = torch.where(draws[0] < 0.5, draws[1] * self.blur_sigma, torch.zeros_like(draws[1]))
            image = gaussian_blur(image, sigma)
        level = torch.rand((batch,), generator=generator, device=image.device) * self.max_level
        return self.corrupt(image, level, generator), level


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur each (C, h, w) image of a batch by its own std ``sigma`` (B,) in pixels (0 = as
    is), with a separable kernel of radius ceil(3 max sigma) and reflected borders."""
    largest = float(sigma.max())
    if largest == 0:
        return images
    radius = max(1, math.ceil(3 * largest))
    offsets = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    safe = sigma.to(images.dtype).clamp_min(1e-6)[:, None]
    kernel = torch.exp(-0.5 * (offsets[None, :] / safe) ** 2)
    kernel = torch.where((sigma > 0)[:, None], kernel, (offsets == 0).to(images.dtype)[None, :])
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    batch, channels, height, width = images.shape
    flat = images.reshape(1, batch * channels, height, width)
    taps = kernel.repeat_interleave(channels, dim=0)
    flat = F.pad(flat, (radius, radius, 0, 0), mode="reflect")
    flat = F.conv2d(flat, taps[:, None, None, :], groups=batch * channels)
    flat = F.pad(flat, (0, 0, radius, radius), mode="reflect")
    flat = F.conv2d(flat, taps[:, None, :, None], groups=batch * channels)
    return flat.reshape(batch, channels, height, width)


@dataclass(frozen=True)
class ImageCondition:
    """An image concatenated to the model input as channels.

    ``prepare`` resizes a batch to ``size`` x ``size`` (area averaging when shrinking,
    bilinear when enlarging; 0 = as given) and checks its ``channels`` (0 = any); the
    model then resizes it to its own resolution. ``augmentation``: see `NoiseAugmentation`.
    """

    size: int = 0
    channels: int = 0
    augmentation: NoiseAugmentation | None = None
    key: ClassVar[str] = "image_cond"

    def prepare(self, value: torch.Tensor) -> torch.Tensor:
        value = value.float() if not value.is_floating_point() else value
        if value.ndim != 4 or (self.channels and value.shape[1] != self.channels):
            want = f"(B, {self.channels or 'C'}, h, w)"
            raise DifforgeError(f"the image condition must be {want}, got {tuple(value.shape)}")
        if self.size and tuple(value.shape[-2:]) != (self.size, self.size):
            value = resize_images(value, self.size)
        return value

    def null_like(self, value: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(value)


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, size, size): area averaging when shrinking (exact block means
    for an integer factor), bilinear (align_corners=False) when enlarging."""
    if images.shape[-1] >= size and images.shape[-2] >= size:
        return F.interpolate(images, size=(size, size), mode="area")
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)


@dataclass(frozen=True)
class ConditionContext:
    """What a condition kind may need to know about the run it belongs to.

    ``num_classes``: classes (or, with ``multi_label``, labels); ``image_size`` and
    ``image_channels``: the size and channels of the image condition; ``cond_noise_max``
    and ``cond_blur``: its training augmentation (0 = none).
    """

    num_classes: int = 0
    multi_label: bool = False
    image_size: int = 0
    image_channels: int = 0
    cond_noise_max: float = 0.0
    cond_blur: float = 0.0


def _labels(context: ConditionContext) -> Condition:
    return MultiHotLabels(context.num_classes) if context.multi_label else ClassLabel(context.num_classes)


def _image(context: ConditionContext) -> Condition:
    augmentation = None
    if context.cond_noise_max > 0 or context.cond_blur > 0:
        augmentation = NoiseAugmentation(context.cond_noise_max, context.cond_blur)
    return ImageCondition(context.image_size, context.image_channels, augmentation)


CONDITION_KINDS: dict[str, Callable[[ConditionContext], Condition]] = {
    ClassLabel.key: _labels,
    ImageCondition.key: _image,
}
"""kind -> factory of its `Condition` for one run; the one registry of condition kinds."""


def build_conditions(kinds: Sequence[str], context: ConditionContext) -> dict[str, Condition]:
    """The run's conditions, keyed by kind, in the order given."""
    conditions: dict[str, Condition] = {}
    for kind in kinds:
        factory = CONDITION_KINDS.get(kind)
        if factory is None:
            raise DifforgeError(
                f"unknown condition kind {kind!r}; known: {', '.join(sorted(CONDITION_KINDS))}"
            )
        conditions[kind] = factory(context)
    return conditions


def prepare_conditions(
    cond: Mapping[str, torch.Tensor],
    conditions: Mapping[str, Condition],
    *,
    p_uncond: float = 0.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    cond_noise: float | None = None,
) -> dict[str, torch.Tensor]:
    """A batch's cond dict as the model takes it, with augmentation and classifier-free
    dropout.

    Keys not in ``conditions`` are dropped (a dataset may carry labels an unconditional run
    does not use); a key in ``conditions`` missing from ``cond`` is an error. A condition
    with a `NoiseAugmentation` is corrupted first, at a random level per example when
    ``cond_noise`` is None (training) or at level ``cond_noise`` (sampling), and the levels
    go to ``cond_noise_level``. With ``p_uncond`` > 0 each kind is then replaced by its
    null independently, per example, with probability ``p_uncond`` (one
    ``torch.rand((B,), generator)`` draw per kind, in the order of ``conditions``).
    """
    prepared: dict[str, torch.Tensor] = {}
    for key, condition in conditions.items():
        if key not in cond:
            raise DifforgeError(f"the data gives no {key!r} condition, which this model needs")
        value = cond[key]
        if device is not None:
            value = value.to(device, non_blocking=True)
        value = condition.prepare(value)
        augmentation: NoiseAugmentation | None = getattr(condition, "augmentation", None)
        if augmentation is not None:
            if cond_noise is None:
                value, level = augmentation.train(value, generator)
            else:
                level = torch.full((value.shape[0],), float(cond_noise), device=value.device)
                value = augmentation.corrupt(value, level, generator)
            prepared[COND_NOISE_KEY] = level
        if p_uncond > 0:
            drop = torch.rand((value.shape[0],), generator=generator, device=value.device) < p_uncond
            drop = drop.reshape(-1, *([1] * (value.ndim - 1)))
            value = torch.where(drop, condition.null_like(value), value)
        prepared[key] = value
    return prepared


def null_conditions(conditions: Mapping[str, Condition]) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """key -> null maker, the form `difforge.sampling.classifier_free_guidance` takes."""
    return {key: condition.null_like for key, condition in conditions.items()}
