"""Cold diffusion (Bansal et al. 2022, arXiv 2208.09392): a deterministic degradation
D(x0, s) as the forward process, a restoration network R(x_s, s) ~ x0 trained with L1 (the
paper's) or L2, and sampling that walks the degradation back (`difforge.sampling.cold`).

Levels and the network's timestep: level s = 1 .. T is what D applies; the network is
called with t = s - 1 in 0 .. T - 1, the range every process's training timesteps take (the
paper's code does the same: its step t applies t + 1 blurs). Level 0 is the clean image.

Generation from nothing needs a degradation whose last level forgets all but the per-channel
mean (``endpoint == "mean"``: discrete blur, mask with ``discrete``, fade to ``mean``,
pixelate down to 1 x 1): the run then stores a Gaussian mixture fitted to the training
images' channel means, and x_T is a draw from it, broadcast over the image, plus N(0,
prior_noise^2) per pixel to break the symmetry (the paper's 0.002). The ``noise``
degradation starts from N(0, I).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, ClassVar

import numpy as np
import torch

from difforge.degradations import (
    BLUR_PADDINGS,
    BLUR_ROUTINES,
    DEGRADATIONS,
    Degradation,
    DegradationSettings,
    build_degradation,
    parse_target,
)
from difforge.diffusion import dynamic_thresholding, mean_flat
from difforge.errors import DifforgeError, check_number, kind_config_from_mapping
from difforge.mixture import GaussianMixture, fit_gaussian_mixture
from difforge.schedule import SCHEDULE_NAMES
from difforge.timestep_sampling import UniformTimestepSampler, make_timestep_sampler

COLD_LOSSES: tuple[str, ...] = ("l1", "mse")
MAX_COLD_TIMESTEPS = 10_000
PRIOR_IMAGES = 20_000
"""At most this many training images (evenly spread) are read to fit the prior."""

# the settings that matter for each degradation (the others are kept at their defaults)
_RELEVANT: dict[str, tuple[str, ...]] = {
    "blur": ("blur_routine", "blur_std", "blur_size", "blur_padding", "discrete"),
    "mask": ("mask_std", "mask_start", "target", "discrete"),
    "pixelate": ("pixelate_min",),
    "fade": ("target",),
    "decolorize": (),
    "noise": ("noise_schedule",),
}


@dataclass(frozen=True)
class ColdConfig:
    """Every setting of a `ColdProcess`, serialisable to JSON (``"kind": "cold"``).

    Attributes:
        degradation: blur, mask, pixelate, fade, decolorize or noise (`difforge.degradations`).
        num_timesteps: T, the number of degradation levels (the paper: 50).
        loss: l1 (the paper's) or mse, between R(D(x0, s), s - 1) and x0.
        blur_routine / blur_std / blur_size / blur_padding: the blur's per-step kernel std
            (`difforge.degradations.blur_stds`), kernel size and boundary (the paper's MNIST
            and CIFAR-10 runs: incremental, 0.1, 3, circular).
        discrete: the last level of blur and mask is the fill itself (blur: the per-channel
            mean image), so D(x, T) keeps only the mean colour and the run can generate.
        mask_std / mask_start: the Gaussian mask of step i has std mask_std (i - 1 + mask_start).
        target: the fill of mask and fade: mean, black, white, grey or #rrggbb.
        pixelate_min: the side, in pixels, of the most pixelated level (1: the mean colour).
        noise_schedule: the beta schedule of the ``noise`` degradation.
        prior_noise: std of the per-pixel noise added to a generated x_T (the paper: 0.002).
        prior_components: Gaussian-mixture components of the prior (the paper's code: 10).
        quantize: train on degraded images rounded to 8-bit levels, as the paper's code does
            for discrete blur. The restorer then learns to ignore changes below 1/255, such
            as the prior's symmetry-breaking noise (without it that noise is amplified into
            scattered strokes: docs/benchmarks.md, "Cold diffusion"), and it sees what an
            8-bit picture to restore holds.
        prior: the fitted prior (`GaussianMixture.to_dict`), written when training starts.
    """

    kind: ClassVar[str] = "cold"
    flag_help: ClassVar[dict[str, str]] = {
        "degradation": f"cold process: the degradation D(x0, t): {', '.join(DEGRADATIONS)}",
        "blur_routine": f"cold blur: per-step kernel std routine: {', '.join(BLUR_ROUTINES)}",
        "blur_std": "cold blur: the routine's std parameter (incremental: step i has std blur_std * i)",
        "blur_size": "cold blur: odd kernel size of one step",
        "blur_padding": f"cold blur: image boundary: {', '.join(BLUR_PADDINGS)}",
        "discrete": "cold blur and mask: the last level is the fill itself (blur: the mean colour), "
        "so the run can generate from nothing",
        "mask_std": "cold mask: std growth of the Gaussian mask per step, in pixels",
        "mask_start": "cold mask: the first step's mask std, in units of --mask-std",
        "target": "cold mask and fade: what pixels fade to: mean (each image's mean colour), "
        "black, white, grey or #rrggbb",
        "pixelate_min": "cold pixelate: side in pixels of the coarsest level (1 = the mean colour)",
        "noise_schedule": f"cold noise: beta schedule: {', '.join(SCHEDULE_NAMES)}",
        "prior_noise": "cold generation: std of the noise added to a generated fully degraded image",
        "prior_components": "cold generation: Gaussian-mixture components fitted to the images' mean colours",
        "quantize": "cold: train on degraded images rounded to 8 bits (robust to the generation noise)",
    }

    degradation: str = "blur"
    num_timesteps: int = 50
    loss: str = "l1"
    blur_routine: str = "incremental"
    blur_std: float = 0.1
    blur_size: int = 3
    blur_padding: str = "circular"
    discrete: bool = True
    mask_std: float = 0.1
    mask_start: float = 11.0
    target: str = "mean"
    pixelate_min: int = 1
    noise_schedule: str = "cosine"
    prior_noise: float = 0.002
    prior_components: int = 10
    quantize: bool = True
    prior: dict[str, Any] | None = None

    def degradation_settings(self) -> DegradationSettings:
        names = {f.name for f in fields(DegradationSettings)}
        return DegradationSettings(**{k: v for k, v in asdict(self).items() if k in names})

    def validate(self) -> ColdConfig:
        """Raise a one-line DifforgeError for a bad setting; returns self."""
        self.checked_degradation()
        return self

    def checked_degradation(self) -> Degradation:
        """The degradation, after every setting is checked (the fill target even when this
        degradation has none, the stored prior when there is one)."""
        if self.degradation not in DEGRADATIONS:
            raise DifforgeError(
                f"--degradation must be one of {', '.join(DEGRADATIONS)}; got {self.degradation!r}"
            )
        check_number("--timesteps", self.num_timesteps, low=1, high=MAX_COLD_TIMESTEPS, integer=True)
        if self.loss not in COLD_LOSSES:
            raise DifforgeError(
                f"--loss of a cold process must be one of {', '.join(COLD_LOSSES)}; got {self.loss!r}"
            )
        check_number("--blur-std", self.blur_std, low=0, low_open=True)
        check_number("--mask-std", self.mask_std, low=0, low_open=True)
        check_number("--mask-start", self.mask_start, low=0, low_open=True)
        check_number("--prior-noise", self.prior_noise, low=0)
        check_number("--prior-components", self.prior_components, low=1, high=1000, integer=True)
        if self.noise_schedule not in SCHEDULE_NAMES:
            raise DifforgeError(
                f"--noise-schedule must be one of {', '.join(SCHEDULE_NAMES)}; got {self.noise_schedule!r}"
            )
        parse_target(self.target)
        degradation = build_degradation(self.degradation_settings())  # its own checks
        if self.prior is not None:
            GaussianMixture.from_dict(self.prior, "the run's cold prior (config.json)")
        return degradation

    def build(self) -> ColdProcess:
        """The process; a bad setting is a one-line DifforgeError naming its flag."""
        degradation = self.checked_degradation()
        prior = None if self.prior is None else GaussianMixture.from_dict(self.prior)
        return ColdProcess(
            degradation,
            loss=self.loss,
            prior=prior,
            prior_noise=self.prior_noise,
            quantize=self.quantize,
        )

    def model_settings(self) -> dict[str, Any]:
        """The network predicts x0 only (no variance channels)."""
        return {"learn_sigma": False}

    def fit_to_data(self, images: Callable[[int], torch.Tensor], count: int) -> ColdConfig:
        """Check the degradation against the training images (decolorize and a colour target
        need RGB) and return this config with the prior fitted to their channel means, when
        the degradation can generate and no prior is stored yet. ``images(i)`` is image i,
        (C, H, W) in [-1, 1]; at most `PRIOR_IMAGES` of the ``count`` are read."""
        degradation = build_degradation(self.degradation_settings())
        if count < 1:
            raise DifforgeError("cold training needs at least one image")
        first = images(0)[None]
        top = torch.full((1,), degradation.num_timesteps, dtype=torch.long)
        degradation.degrade(first, top, torch.zeros_like(first) if degradation.needs_noise else None)
        if self.prior is not None or degradation.endpoint != "mean":
            return self
        if count < 2:
            raise DifforgeError("cold generation needs at least 2 training images to fit its prior")
        indices = np.unique(np.linspace(0, count - 1, min(count, PRIOR_IMAGES)).round().astype(np.int64))
        means = np.stack([images(int(i)).double().mean(dim=(1, 2)).numpy() for i in indices])
        mixture = fit_gaussian_mixture(means, self.prior_components, seed=0)
        return replace(self, prior=mixture.to_dict())

    def describe(self) -> dict[str, Any]:
        """The settings that matter for this degradation (for ``difforge info``)."""
        shown = ("degradation", "num_timesteps", "loss", *_RELEVANT[self.degradation], "quantize")
        settings: dict[str, Any] = {name: getattr(self, name) for name in shown}
        if build_degradation(self.degradation_settings()).endpoint == "mean":
            settings["prior"] = (
                "none yet" if self.prior is None else f"{len(self.prior['weights'])}-component mixture"
            )
        return settings

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **asdict(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ColdConfig:
        return kind_config_from_mapping(cls, data, "cold process setting(s)")


def quantize_8bit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images rounded to the nearest of the 256 levels of an 8-bit picture."""
    return torch.round((x.clamp(-1, 1) + 1) * 127.5) / 127.5 - 1


class ColdProcess:
    """The cold process of one degradation (see the module docstring).

    ``num_timesteps`` is T, or K for the view `up_to(K)` that restoration walks back from
    level K; levels above it are never used.
    """

    kind: ClassVar[str] = "cold"
    default_sampler: ClassVar[str] = "cold"

    def __init__(
        self,
        degradation: Degradation,
        *,
        loss: str = "l1",
        prior: GaussianMixture | None = None,
        prior_noise: float = 0.002,
        quantize: bool = False,
        num_timesteps: int | None = None,
    ) -> None:
        self.degradation = degradation
        self.quantize = quantize
        self.loss = loss
        self.prior = prior
        self.prior_noise = prior_noise
        self.num_timesteps = degradation.num_timesteps if num_timesteps is None else num_timesteps

    def up_to(self, level: int) -> ColdProcess:
        """The same process with its walk starting at ``level`` (1 .. T) instead of T."""
        check_number("--from-t", level, low=1, high=self.degradation.num_timesteps, integer=True)
        return ColdProcess(
            self.degradation,
            loss=self.loss,
            prior=self.prior,
            prior_noise=self.prior_noise,
            num_timesteps=level,
        )

    @property
    def can_generate(self) -> bool:
        """Whether x_T can be drawn without an image (`prior_sample`)."""
        return self.num_timesteps == self.degradation.num_timesteps and (
            self.degradation.endpoint == "normal"
            or (self.degradation.endpoint == "mean" and self.prior is not None)
        )

    def degrade(
        self, x0: torch.Tensor, level: torch.Tensor, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, C, H, W) D(x0, level) for (B,) levels in 0..T (``noise`` for the noise degradation)."""
        return self.degradation.degrade(x0, level, noise)

    def estimate_noise(
        self, x_t: torch.Tensor, x0_hat: torch.Tensor, level: torch.Tensor
    ) -> torch.Tensor | None:
        return self.degradation.estimate_noise(x_t, x0_hat, level)

    def predict_x0(
        self,
        model: Callable[..., torch.Tensor],
        x: torch.Tensor,
        level: torch.Tensor,
        model_kwargs: Mapping[str, Any] | None = None,
        *,
        clip: bool = True,
        dynamic_threshold: float | None = None,
    ) -> torch.Tensor:
        """x0_hat = R(x, level - 1), clamped to [-1, 1] (``clip``) or dynamically thresholded."""
        x0_hat = model(x, level - 1, **dict(model_kwargs or {}))
        if x0_hat.shape != x.shape:
            raise DifforgeError(
                f"a cold model must return x0 of shape {tuple(x.shape)}, got {tuple(x0_hat.shape)}"
            )
        if dynamic_threshold is not None:
            return dynamic_thresholding(x0_hat, dynamic_threshold)
        return x0_hat.clamp(-1, 1) if clip else x0_hat

    def training_losses(
        self,
        model: Callable[..., torch.Tensor],
        x0: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor | None = None,
        model_kwargs: Mapping[str, Any] | None = None,
    ) -> dict[str, torch.Tensor]:
        """L1 (or MSE) between R(D(x0, t + 1), t) and x0, per example: ``{"loss", "l1"|"mse"}``."""
        if noise is None and self.degradation.needs_noise:
            noise = torch.randn_like(x0)
        with torch.no_grad():
            x_t = self.degrade(x0, t + 1, noise)
            if self.quantize:
                x_t = quantize_8bit(x_t)
        x0_hat = model(x_t, t, **dict(model_kwargs or {}))
        error = x0_hat - x0
        loss = mean_flat(error.abs()) if self.loss == "l1" else mean_flat(error**2)
        return {"loss": loss, self.loss: loss.detach()}

    def timestep_sampler(self, name: str) -> UniformTimestepSampler:
        if name == "lognormal":
            raise DifforgeError(
                "--timestep-sampler lognormal needs a Gaussian process (it samples noise levels)"
            )
        return make_timestep_sampler(name, self.num_timesteps)

    def prior_sample(self, shape: tuple[int, ...], generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, C, H, W) fully degraded images x_T to generate from (on the generator's device)."""
        device = generator.device if generator is not None else torch.device("cpu")
        if self.num_timesteps != self.degradation.num_timesteps:
            raise DifforgeError("a restoration view (up_to) cannot generate; start from a degraded image")
        if self.degradation.endpoint == "normal":
            return torch.randn(shape, generator=generator, device=device)
        if self.degradation.endpoint != "mean":
            raise DifforgeError(
                f"this cold {self.degradation.name} run cannot generate from nothing: its fully degraded "
                "image still depends on the picture (blur and mask need --discrete, fade and mask "
                "--target mean, pixelate --pixelate-min 1); restore images with difforge restore instead"
            )
        if self.prior is None:
            raise DifforgeError("this cold run has no fitted prior yet (it is written when training starts)")
        if shape[1] != self.prior.dim:
            raise DifforgeError(f"the run's prior has {self.prior.dim} channels, asked for {shape[1]}")
        colours = self.prior.sample(shape[0], generator=generator)
        x_t = colours.to(device).reshape(shape[0], shape[1], 1, 1).expand(shape).contiguous()
        return x_t + self.prior_noise * torch.randn(shape, generator=generator, device=device)
