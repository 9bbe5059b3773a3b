"""The sampler registry: name -> (the pure sampler, its model evaluations for K steps, the
process kinds it applies to, and the adapter that runs it from a `SampleConfig`).

`difforge.sampling.sample`, the CLI's ``--sampler`` choices, ``difforge eval samplers``
and every "unknown sampler" error read `SAMPLERS`. Adding a sampler is one pure function
(in `difforge.sampling.samplers` or anywhere) plus one `register_sampler` call.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from difforge.cold import ColdProcess
from difforge.diffusion import Denoiser, GaussianDiffusion
from difforge.errors import DifforgeError
from difforge.sampling.cold import cold, cold_levels, cold_naive
from difforge.sampling.samplers import (
    Callback,
    RestartInterval,
    ddim,
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
    restart,
    sigmas_for_timesteps,
    uniform_timesteps,
)

if TYPE_CHECKING:
    from difforge.sampling.config import SampleConfig

SPACINGS: tuple[str, ...] = ("uniform", "logsnr", "karras")

Runner = Callable[..., torch.Tensor]
"""``run(model, process, noise, config, *, model_kwargs, generator, callback) -> x0``."""


@dataclass(frozen=True)
class SamplerEntry:
    """One registered sampler.

    Attributes:
        name: what ``--sampler`` and ``sample(sampler=...)`` call it.
        function: the pure sampler (``difforge.sampling.ddim`` etc.), for the researcher.
        run: the adapter from a `SampleConfig` (steps, eta, spacing, clipping) to ``function``.
        evaluations: model evaluations (NFE, before guidance doubling) of K steps.
        processes: the process kinds (``Process.kind``) it applies to.
        summary: one line for help texts and reports.
        options: the sampler's own `SampleConfig` settings (``eta``, ``s_churn``, ...) and
            their defaults, the one place those defaults live; a config that leaves one
            None gets this value, and setting one the sampler does not take is an error.
    """

    name: str
    function: Callable[..., torch.Tensor]
    run: Runner
    evaluations: Callable[[int], int]
    processes: tuple[str, ...]
    summary: str = ""
    options: Mapping[str, float] = field(default_factory=dict)


SAMPLERS: dict[str, SamplerEntry] = {}


def register_sampler(
    name: str,
    function: Callable[..., torch.Tensor],
    run: Runner,
    *,
    processes: tuple[str, ...],
    evaluations: Callable[[int], int] = lambda steps: steps,
    summary: str = "",
    options: Mapping[str, float] | None = None,
) -> SamplerEntry:
    """Add (or replace) a sampler; returns its entry."""
    entry = SamplerEntry(name, function, run, evaluations, tuple(processes), summary, dict(options or {}))
    SAMPLERS[name] = entry
    return entry


def sampler_names(process_kind: str | None = None) -> tuple[str, ...]:
    """Registered samplers, all or those that apply to ``process_kind``."""
    return tuple(n for n, e in SAMPLERS.items() if process_kind is None or process_kind in e.processes)


def get_sampler(name: str, process_kind: str | None = None) -> SamplerEntry:
    """The entry of ``name``; a one-line DifforgeError for an unknown or inapplicable name."""
    entry = SAMPLERS.get(name)
    if entry is None:
        raise DifforgeError(f"sampler must be one of {', '.join(sampler_names())}; got {name!r}")
    if process_kind is not None and process_kind not in entry.processes:
        raise DifforgeError(
            f"sampler {name!r} does not apply to a {process_kind!r} process; "
            f"use one of {', '.join(sampler_names(process_kind))}"
        )
    return entry


def model_evaluations(sampler: str, steps: int) -> int:
    """Number of network evaluations (NFE) of ``steps`` steps (before guidance doubling)."""
    return get_sampler(sampler).evaluations(steps)


# ---- the built-in samplers of the Gaussian process ------------------------------------------


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


def _respaced_timesteps(diffusion: GaussianDiffusion, config: SampleConfig) -> np.ndarray:
    """``config.steps`` kept timesteps of the chain (IDDPM's section spacing ``"K"``)."""
    return diffusion.schedule.timesteps(str(config.steps))


def _spaced_noise_levels(diffusion: GaussianDiffusion, config: SampleConfig) -> np.ndarray:
    return noise_levels(diffusion, config.steps, config.spacing)


def _runner(
    solver: Callable[..., torch.Tensor],
    schedule: Callable[[GaussianDiffusion, SampleConfig], np.ndarray],
    *,
    stochastic: bool,
    extra: Callable[[np.ndarray], dict[str, Any]] | None = None,
) -> Runner:
    """The adapter of a Gaussian sampler: its timesteps or noise levels from ``schedule``,
    clipping from the config, the sampler's own options (`SamplerEntry.options`, resolved by
    `SampleConfig.sampler_options`), the generator for the samplers that draw noise."""

    def run(
        model: Denoiser,
        diffusion: GaussianDiffusion,
        noise: torch.Tensor,
        config: SampleConfig,
        *,
        model_kwargs: Mapping[str, Any] | None = None,
        generator: torch.Generator | None = None,
        callback: Callback | None = None,
    ) -> torch.Tensor:
        options: dict[str, Any] = {
            "model_kwargs": model_kwargs,
            "clip_denoised": config.clip,
            "dynamic_threshold": config.dynamic_threshold,
            "callback": callback,
            **config.sampler_options(SAMPLERS[config.sampler_for(diffusion.default_sampler)]),
        }
        if stochastic:
            options["generator"] = generator
        levels = schedule(diffusion, config)
        if extra is not None:
            options.update(extra(levels))
        return solver(model, diffusion, noise, levels, **options)

    return run


_GAUSSIAN = (GaussianDiffusion.kind,)
register_sampler(
    "ddpm",
    ddpm,
    _runner(ddpm, _respaced_timesteps, stochastic=True),
    processes=_GAUSSIAN,
    summary="ancestral sampling on the respaced chain",
)
register_sampler(
    "ddim",
    ddim,
    _runner(ddim, _respaced_timesteps, stochastic=True),
    processes=_GAUSSIAN,
    summary="DDIM with eta on the respaced chain",
    options={"eta": 0.0},
)
register_sampler(
    "ddim_var",
    ddim_var,
    _runner(ddim_var, _respaced_timesteps, stochastic=True),
    processes=_GAUSSIAN,
    summary="DDIM with the model's own reverse variance (learned or fixed) as its noise",
)
register_sampler(
    "euler",
    euler,
    _runner(euler, _spaced_noise_levels, stochastic=False),
    processes=_GAUSSIAN,
    summary="Euler on the probability-flow ODE",
)
register_sampler(
    "heun",
    heun,
    _runner(heun, _spaced_noise_levels, stochastic=False),
    processes=_GAUSSIAN,
    evaluations=lambda steps: 2 * steps - 1,
    summary="Heun (EDM Alg. 1) on the probability-flow ODE",
)
register_sampler(
    "dpmpp_2m",
    dpmpp_2m,
    _runner(dpmpp_2m, _spaced_noise_levels, stochastic=False),
    processes=_GAUSSIAN,
    summary="DPM-Solver++(2M) on the probability-flow ODE",
)
register_sampler(
    "euler_ancestral",
    euler_ancestral,
    _runner(euler_ancestral, _spaced_noise_levels, stochastic=True),
    processes=_GAUSSIAN,
    summary="Euler ancestral: Euler to sigma_down, then fresh noise up to the next level",
    options={"eta": 1.0, "s_noise": 1.0},
)
register_sampler(
    "dpmpp_2m_sde",
    dpmpp_2m_sde,
    _runner(dpmpp_2m_sde, _spaced_noise_levels, stochastic=True),
    processes=_GAUSSIAN,
    summary="DPM-Solver++(2M) SDE: the multistep solver with fresh noise each step",
    options={"eta": 1.0, "s_noise": 1.0},
)
register_sampler(
    "edm",
    edm,
    _runner(edm, _spaced_noise_levels, stochastic=True),
    processes=_GAUSSIAN,
    evaluations=lambda steps: 2 * steps - 1,
    summary="EDM's stochastic Heun sampler (Alg. 2: churn s_churn in [s_tmin, s_tmax])",
    # the stochastic settings EDM used for ImageNet-64 (Karras et al. 2022); not tuned here
    options={"s_churn": 40.0, "s_tmin": 0.05, "s_tmax": 50.0, "s_noise": 1.003},
)

RESTART_LOW, RESTART_HIGH, RESTART_STEPS, RESTART_REPEATS = 0.06, 0.30, 3, 2
"""The restart interval of ``--sampler restart``: from the main level nearest sigma = 0.06 up to
0.30 and back in 3 Heun steps, twice (the interval Xu et al. 2023 report for EDM's CIFAR-10
models, whose sigma is ours: data in [-1, 1]); not tuned here."""


def _restart_interval(levels: np.ndarray) -> dict[str, Any]:
    inner = levels[1:-1]  # a restart starts at a level strictly between the first and 0
    if inner.size == 0:
        return {"intervals": ()}
    index = 1 + int(np.argmin(np.abs(np.log(inner) - np.log(RESTART_LOW))))
    high = max(RESTART_HIGH, 2.0 * float(levels[index]))
    return {"intervals": (RestartInterval(index, high, RESTART_STEPS, RESTART_REPEATS),)}


register_sampler(
    "restart",
    restart,
    _runner(restart, _spaced_noise_levels, stochastic=True, extra=_restart_interval),
    processes=_GAUSSIAN,
    evaluations=lambda steps: 2 * steps - 1 + (2 * RESTART_STEPS * RESTART_REPEATS if steps >= 2 else 0),
    summary="Restart sampling (Xu et al. 2023): Heun, plus noise-and-retrace around sigma 0.06-0.3",
    options={"s_noise": 1.0},
)


# ---- the samplers of the cold process -------------------------------------------------------


def _cold_runner(naive: bool) -> Runner:
    """The adapter of `cold` (Algorithm 2) or Algorithm 1: ``config.steps`` evenly spread
    levels from the process's T (or the restoration's start) to 0, clipping from the config."""

    def run(
        model: Denoiser,
        process: ColdProcess,
        x_start: torch.Tensor,
        config: SampleConfig,
        *,
        model_kwargs: Mapping[str, Any] | None = None,
        generator: torch.Generator | None = None,
        callback: Callback | None = None,
    ) -> torch.Tensor:
        return cold(
            model,
            process,
            x_start,
            cold_levels(process.num_timesteps, config.steps),
            naive=naive,
            model_kwargs=model_kwargs,
            clip_denoised=config.clip,
            dynamic_threshold=config.dynamic_threshold,
            generator=generator,
            callback=callback,
        )

    return run


_COLD = (ColdProcess.kind,)
register_sampler(
    "cold",
    cold,
    _cold_runner(naive=False),
    processes=_COLD,
    summary="cold diffusion's Algorithm 2: x - D(x0_hat, s) + D(x0_hat, s'), step skipping",
)
register_sampler(
    "cold_naive",
    cold_naive,
    _cold_runner(naive=True),
    processes=_COLD,
    summary="cold diffusion's Algorithm 1: D(x0_hat, s'), step skipping",
)
