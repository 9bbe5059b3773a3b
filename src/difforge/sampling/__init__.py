"""Sampling: samplers as plain functions (`difforge.sampling.samplers`), their registry
(`difforge.sampling.registry`), the settings (`SampleConfig`) and two dispatchers:

- `sample`: a registered sampler by name on given starting noise;
- `generate`: noise from a generator, the conditioning dict and classifier-free guidance.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from difforge.diffusion import Denoiser
from difforge.errors import DifforgeError
from difforge.process import draw_prior
from difforge.sampling.cold import cold, cold_levels, cold_naive
from difforge.sampling.config import GUIDED_DEFAULT, SampleConfig
from difforge.sampling.guidance import classifier_free_guidance
from difforge.sampling.registry import (
    SAMPLERS,
    SPACINGS,
    SamplerEntry,
    get_sampler,
    model_evaluations,
    noise_levels,
    register_sampler,
    sampler_names,
)
from difforge.sampling.samplers import (
    Callback,
    DiscreteDenoiser,
    RestartInterval,
    StepInfo,
    StepOutput,
    ancestral_levels,
    ddim,
    ddim_step,
    ddim_var,
    ddpm,
    dpmpp_2m,
    dpmpp_2m_sde,
    edm,
    euler,
    euler_ancestral,
    heun,
    karras_sigmas,
    logsnr_sigmas,
    p_sample_step,
    restart,
    sigmas_for_timesteps,
    uniform_timesteps,
)

SAMPLER_NAMES: tuple[str, ...] = sampler_names()
"""The built-in samplers (`sampler_names()` also lists those registered later)."""
DEFAULT_STEPS: int = SampleConfig.steps
"""`SampleConfig`'s default steps; `sample` cuts them to a shorter chain."""


def sample(
    model: Denoiser,
    process: Any,
    noise: torch.Tensor,
    config: SampleConfig | None = None,
    *,
    model_kwargs: Mapping[str, Any] | None = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    **settings: Any,
) -> torch.Tensor:
    """Run a registered sampler: (B, C, H, W) unit noise -> (B, C, H, W) samples in about [-1, 1].

    ``config`` (default `SampleConfig()`) with ``settings`` (its field names: ``sampler``,
    ``steps``, ``eta``, ``spacing``, ``clip``, ``dynamic_threshold``) applied on top; the
    ``clip_denoised`` keyword is accepted as ``clip``. Guidance and the seed are `generate`'s
    business. For the Gaussian process ``ddpm`` and ``ddim`` respace the chain to ``steps``
    evenly spread steps (IDDPM's rule); ``euler``, ``heun`` and ``dpmpp_2m`` integrate the
    ODE, and ``euler_ancestral``, ``dpmpp_2m_sde`` and ``edm`` the reverse SDE, over ``steps``
    noise levels spaced by ``spacing`` (uniform in t, uniform in log-SNR, or Karras et al.'s
    rho = 7).
    """
    if "clip_denoised" in settings:
        settings["clip"] = settings.pop("clip_denoised")
    config = (config or SampleConfig()).updated(**settings).validate(process.kind)
    entry = get_sampler(config.sampler_for(process.default_sampler), process.kind)
    total = process.num_timesteps
    if config.steps == DEFAULT_STEPS and total < DEFAULT_STEPS:  # a short chain (cold, T = 10): all of it
        config = config.updated(steps=total)
    if not 1 <= config.steps <= total:
        raise DifforgeError(f"steps must be an integer in 1..{total} for this model; got {config.steps!r}")
    return entry.run(
        model, process, noise, config, model_kwargs=model_kwargs, generator=generator, callback=callback
    )


def generate(
    model: Denoiser,
    process: Any,
    shape: tuple[int, ...],
    config: SampleConfig | None = None,
    *,
    cond: Mapping[str, torch.Tensor] | None = None,
    null_cond: Mapping[str, Callable[[torch.Tensor], torch.Tensor] | torch.Tensor | float | int]
    | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    callback: Callback | None = None,
    start: torch.Tensor | None = None,
) -> torch.Tensor:
    """Draw x_T of ``shape`` from ``generator`` (unit noise, or the process's prior:
    `difforge.process.draw_prior`), or take ``start`` (e.g. a degraded image to restore),
    and run `sample` on it with the
    conditioning dict ``cond`` (model keywords, e.g. ``class_labels``, ``image_cond``) and
    classifier-free guidance against ``null_cond`` (key -> null maker or value, see
    `difforge.conditioning.null_conditions`) at ``config.guidance_for(bool(null_cond))``.

    Returns (B, C, H, W) samples on ``device``.
    """
    config = config or SampleConfig()
    noise = draw_prior(process, shape, generator, device) if start is None else start.to(device)
    model_kwargs = {key: value.to(device) for key, value in (cond or {}).items()}
    denoiser = model
    guidance = config.guidance_for(bool(null_cond) and bool(model_kwargs))
    if guidance != 1.0:
        if not null_cond or not model_kwargs:
            raise DifforgeError(
                "guidance needs a condition and a model trained with its null (label dropout)"
            )
        denoiser = classifier_free_guidance(model, guidance, null_cond)
    return sample(
        denoiser, process, noise, config, model_kwargs=model_kwargs, generator=generator, callback=callback
    )


__all__ = [
    "GUIDED_DEFAULT",
    "SAMPLERS",
    "SAMPLER_NAMES",
    "SPACINGS",
    "Callback",
    "DiscreteDenoiser",
    "SampleConfig",
    "SamplerEntry",
    "StepInfo",
    "StepOutput",
    "classifier_free_guidance",
    "cold",
    "cold_levels",
    "cold_naive",
    "ancestral_levels",
    "ddim",
    "ddim_var",
    "ddim_step",
    "ddpm",
    "dpmpp_2m",
    "dpmpp_2m_sde",
    "edm",
    "euler",
    "euler_ancestral",
    "generate",
    "get_sampler",
    "heun",
    "karras_sigmas",
    "logsnr_sigmas",
    "model_evaluations",
    "noise_levels",
    "p_sample_step",
    "register_sampler",
    "restart",
    "RestartInterval",
    "sample",
    "sampler_names",
    "sigmas_for_timesteps",
    "uniform_timesteps",
]
