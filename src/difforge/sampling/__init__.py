"""Samplers as plain functions (see `difforge.sampling.samplers`) and one dispatcher."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from difforge.diffusion import Denoiser, GaussianDiffusion
from difforge.errors import DifforgeError
from difforge.sampling.guidance import classifier_free_guidance
from difforge.sampling.samplers import (
    Callback,
    DiscreteDenoiser,
    StepInfo,
    ddim,
    ddpm,
    dpmpp_2m,
    euler,
    heun,
    karras_sigmas,
    logsnr_sigmas,
    sigmas_for_timesteps,
    uniform_timesteps,
)

SAMPLER_NAMES: tuple[str, ...] = ("ddpm", "ddim", "euler", "heun", "dpmpp_2m")
SPACINGS: tuple[str, ...] = ("uniform", "logsnr", "karras")
_ODE_SAMPLERS = {"euler": euler, "heun": heun, "dpmpp_2m": dpmpp_2m}


def model_evaluations(sampler: str, steps: int) -> int:
    """Number of network evaluations (NFE) of ``steps`` steps (before guidance doubling)."""
    return 2 * steps - 1 if sampler == "heun" else steps


def noise_levels(diffusion: GaussianDiffusion, steps: int, spacing: str) -> np.ndarray:
    """(steps + 1,) decreasing noise levels ending in 0 for the ODE samplers."""
    if spacing == "karras":
        return karras_sigmas(diffusion, steps)
    if spacing == "logsnr":
        return logsnr_sigmas(diffusion, steps)
    if spacing == "uniform":
        return sigmas_for_timesteps(
            diffusion, diffusion.schedule.timestep_map[uniform_timesteps(diffusion.num_timesteps, steps)]
        )
    raise DifforgeError(f"spacing must be one of {', '.join(SPACINGS)}; got {spacing!r}")


def sample(
    model: Denoiser,
    diffusion: GaussianDiffusion,
    noise: torch.Tensor,
    *,
    sampler: str = "dpmpp_2m",
    steps: int = 20,
    eta: float = 0.0,
    spacing: str = "karras",
    model_kwargs: Mapping[str, Any] | None = None,
    clip_denoised: bool = True,
    dynamic_threshold: float | None = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Run a sampler by name: (B, C, H, W) unit noise -> (B, C, H, W) samples in about [-1, 1].

    ``ddpm`` and ``ddim`` respace the chain to ``steps`` evenly spread steps (IDDPM's rule);
    ``euler``, ``heun`` and ``dpmpp_2m`` integrate the ODE over ``steps`` noise levels spaced
    by ``spacing`` (uniform in t, uniform in log-SNR, or Karras et al.'s rho = 7).
    """
    if sampler not in SAMPLER_NAMES:
        raise DifforgeError(f"sampler must be one of {', '.join(SAMPLER_NAMES)}; got {sampler!r}")
    total = diffusion.num_timesteps
    if not isinstance(steps, int) or not 1 <= steps <= total:
        raise DifforgeError(f"steps must be an integer in 1..{total} for this model; got {steps!r}")
    options: dict[str, Any] = {
        "model_kwargs": model_kwargs,
        "clip_denoised": clip_denoised,
        "dynamic_threshold": dynamic_threshold,
    }
    if sampler in ("ddpm", "ddim"):
        timesteps = diffusion.schedule.timesteps(str(steps))
        if sampler == "ddim":
            return ddim(
                model, diffusion, noise, timesteps, eta=eta, generator=generator, callback=callback, **options
            )
        return ddpm(model, diffusion, noise, timesteps, generator=generator, callback=callback, **options)
    sigmas = noise_levels(diffusion, steps, spacing)
    return _ODE_SAMPLERS[sampler](model, diffusion, noise, sigmas, callback=callback, **options)


def generate(
    model: Denoiser,
    diffusion: GaussianDiffusion,
    shape: tuple[int, ...],
    *,
    class_labels: torch.Tensor | None = None,
    null_label: int | float | None = None,
    guidance: float = 1.0,
    image_cond: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    **sample_options: Any,
) -> torch.Tensor:
    """Draw unit noise of ``shape`` from ``generator`` and run `sample` on it, with class labels
    (``class_labels`` keyword of the model), an optional image condition and classifier-free
    guidance of weight ``guidance`` against ``null_label``.

    Returns (B, C, H, W) samples on ``device``.
    """
    gen_device = generator.device if generator is not None else torch.device(device)
    noise = torch.randn(shape, generator=generator, device=gen_device).to(device)
    model_kwargs: dict[str, Any] = {}
    if class_labels is not None:
        model_kwargs["class_labels"] = class_labels.to(device)
    if image_cond is not None:
        model_kwargs["image_cond"] = image_cond.to(device)
    denoiser = model
    if guidance != 1.0:
        if class_labels is None or null_label is None:
            raise DifforgeError("guidance needs class labels and a model trained with a null label")
        denoiser = classifier_free_guidance(model, guidance, {"class_labels": null_label})
    return sample(
        denoiser, diffusion, noise, model_kwargs=model_kwargs, generator=generator, **sample_options
    )


__all__ = [
    "SAMPLER_NAMES",
    "SPACINGS",
    "Callback",
    "DiscreteDenoiser",
    "StepInfo",
    "classifier_free_guidance",
    "ddim",
    "ddpm",
    "dpmpp_2m",
    "euler",
    "generate",
    "heun",
    "karras_sigmas",
    "logsnr_sigmas",
    "model_evaluations",
    "noise_levels",
    "sample",
    "sigmas_for_timesteps",
    "uniform_timesteps",
]
