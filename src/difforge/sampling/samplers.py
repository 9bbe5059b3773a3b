"""Samplers: short pure functions of a denoiser, a process, the starting noise and an
explicit list of timesteps (or noise levels).

Every sampler takes ``model(x, t, **model_kwargs) -> model_output`` (the network, or a
guidance wrapper around it), called with ORIGINAL timestep indices also under respacing,
a `GaussianDiffusion`, ``noise`` (B, C, H, W) of unit variance — x_T for the discrete
samplers, scaled to the first noise level by the ODE samplers — and returns x_0 (B, C, H, W).
Randomness comes only from ``generator``; ``callback(StepInfo)`` sees each step.

Two families:

- on the discrete chain, given kept timesteps: `ddpm` (ancestral, DDPM eq. 11 / IDDPM with
  any variance) and `ddim` (Song et al. 2021, eq. 12 with eta);
- on the probability-flow ODE in the variance-exploding variables x = x_t / sqrt(alpha_bar_t),
  sigma = sqrt((1 - alpha_bar_t) / alpha_bar_t) (Karras et al. 2022, "EDM"), given a
  decreasing list of noise levels ending in 0: `euler`, `heun` (EDM Alg. 1) and `dpmpp_2m`
  (DPM-Solver++(2M), Lu et al. 2022, Alg. 2). The noise-level lists come from
  `sigmas_for_timesteps`, `karras_sigmas` or `logsnr_sigmas`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from difforge.diffusion import Denoiser, GaussianDiffusion, dynamic_thresholding
from difforge.errors import DifforgeError


class StepInfo(NamedTuple):
    """What a sampler shows its callback at each model evaluation step.

    ``index`` counts from 0 to ``total - 1``; ``timestep`` is the original (possibly
    fractional) timestep given to the model; ``x`` the sample the model saw, ``pred_x0``
    its predicted clean image (both (B, C, H, W), in the x_t scale of the discrete chain)."""

    index: int
    total: int
    timestep: float
    x: torch.Tensor
    pred_x0: torch.Tensor


Callback = Callable[[StepInfo], None]


def _noise_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise of x's shape, drawn on the generator's device (so a CPU
    generator gives the same numbers whatever device x lives on)."""
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def _process_for(diffusion: GaussianDiffusion, timesteps: Sequence[int] | np.ndarray) -> GaussianDiffusion:
    """The (respaced) process whose steps are exactly ``timesteps`` (original indices)."""
    kept = np.unique(np.asarray(timesteps, dtype=np.int64))
    if kept.size != len(timesteps):
        raise DifforgeError("timesteps must not repeat")
    if np.array_equal(kept, diffusion.schedule.timestep_map):
        return diffusion
    return diffusion.respaced(kept)


def _batch_t(index: int, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), index, dtype=torch.long, device=x.device)


@torch.no_grad()
def ddpm(
    model: Denoiser,
    diffusion: GaussianDiffusion,
    noise: torch.Tensor,
    timesteps: Sequence[int] | np.ndarray,
    *,
    model_kwargs: Mapping[str, Any] | None = None,
    clip_denoised: bool = True,
    dynamic_threshold: float | None = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Ancestral sampling: x_{t-1} = mu_theta(x_t, t) + sigma_t z, z ~ N(0, I), no noise at the
    last step (DDPM Alg. 2 with the variance of ``diffusion``: fixed or learned, IDDPM).

    ``timesteps``: the kept original indices (all T for the full chain; e.g.
    ``schedule.timesteps("100")`` to sample in 100 steps on the respaced chain, IDDPM sec. 4).
    """
    process = _process_for(diffusion, timesteps)
    kwargs = dict(model_kwargs or {})
    x = noise
    total = process.num_timesteps
    for step, index in enumerate(reversed(range(total))):
        t = _batch_t(index, x)
        t_model = process.model_timesteps(t)
        out = process.p_mean_variance(
            model(x, t_model, **kwargs),
            x,
            t,
            clip_denoised=clip_denoised,
            dynamic_threshold=dynamic_threshold,
        )
        if callback is not None:
            callback(StepInfo(step, total, float(process.schedule.timestep_map[index]), x, out.pred_x0))
        x = out.mean
        if index > 0:
            x = x + torch.exp(0.5 * out.log_variance) * _noise_like(x, generator)
    return x


@torch.no_grad()
def ddim(
    model: Denoiser,
    diffusion: GaussianDiffusion,
    noise: torch.Tensor,
    timesteps: Sequence[int] | np.ndarray,
    *,
    eta: float = 0.0,
    model_kwargs: Mapping[str, Any] | None = None,
    clip_denoised: bool = True,
    dynamic_threshold: float | None = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12), from t to the previous kept step s:

        x_s = sqrt(alpha_bar_s) x0_hat + sqrt(1 - alpha_bar_s - sigma^2) eps_hat + sigma z,
        sigma = eta sqrt((1 - alpha_bar_s) / (1 - alpha_bar_t)) sqrt(1 - alpha_bar_t / alpha_bar_s),

    with eps_hat re-derived from the (possibly clipped) x0_hat. eta = 0 is deterministic;
    eta = 1 has the DDPM posterior variance on the kept chain.
    """
    if eta < 0:
        raise DifforgeError(f"eta must be >= 0, got {eta!r}")
    process = _process_for(diffusion, timesteps)
    kwargs = dict(model_kwargs or {})
    x = noise
    total = process.num_timesteps
    for step, index in enumerate(reversed(range(total))):
        t = _batch_t(index, x)
        prediction, _ = process.split_output(model(x, process.model_timesteps(t), **kwargs), x)
        pred_x0 = process.denoise(prediction, x, t, clip_denoised, dynamic_threshold)
        if callback is not None:
            callback(StepInfo(step, total, float(process.schedule.timestep_map[index]), x, pred_x0))
        eps = process.eps_from_x0(x, t, pred_x0)
        alpha_bar = float(process.schedule.alphas_cumprod[index])
        alpha_bar_prev = float(process.schedule.alphas_cumprod_prev[index])
        sigma = (
            eta
            * math.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar))
            * math.sqrt(1 - alpha_bar / alpha_bar_prev)
        )
        x = math.sqrt(alpha_bar_prev) * pred_x0 + math.sqrt(max(1 - alpha_bar_prev - sigma**2, 0.0)) * eps
        if index > 0 and sigma > 0:
            x = x + sigma * _noise_like(x, generator)
    return x


# --------------------------------------------------------------------------------------
# Noise levels for the ODE samplers
# --------------------------------------------------------------------------------------


def uniform_timesteps(num_timesteps: int, steps: int) -> np.ndarray:
    """(steps,) decreasing integer timesteps round(linspace(T-1, 0, steps + 1))[:-1]: even in t,
    skipping t = 0 (diffusers' ``linspace`` spacing)."""
    if not 1 <= steps <= num_timesteps:
        raise DifforgeError(f"steps must be in 1..{num_timesteps}, got {steps}")
    return np.linspace(0, num_timesteps - 1, steps + 1).round()[::-1][:-1].astype(np.int64)


def sigmas_for_timesteps(diffusion: GaussianDiffusion, timesteps: Sequence[int] | np.ndarray) -> np.ndarray:
    """(K + 1,) decreasing noise levels sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) at the
    given original timesteps (any order), then 0."""
    schedule = diffusion.schedule
    kept = np.sort(np.asarray(timesteps, dtype=np.int64))[::-1]
    position = np.searchsorted(schedule.timestep_map, kept)
    if (
        kept.size == 0
        or np.any(position >= schedule.num_steps)
        or np.any(schedule.timestep_map[np.minimum(position, schedule.num_steps - 1)] != kept)
    ):
        raise DifforgeError("timesteps must be a non-empty subset of the process's timesteps")
    return np.append(schedule.sigmas[position], 0.0)


def karras_sigmas(
    diffusion: GaussianDiffusion,
    steps: int,
    *,
    rho: float = 7.0,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
) -> np.ndarray:
    """(steps + 1,) noise levels of EDM eq. 5, then 0:

        sigma_i = (sigma_max^(1/rho) + i / (n - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,

    sigma_min and sigma_max default to the schedule's smallest and largest noise levels."""
    if steps < 1:
        raise DifforgeError(f"steps must be >= 1, got {steps}")
    sigmas = diffusion.schedule.sigmas
    low = float(sigmas[0]) if sigma_min is None else sigma_min
    high = float(sigmas[-1]) if sigma_max is None else sigma_max
    ramp = np.linspace(0.0, 1.0, steps)
    levels = (high ** (1 / rho) + ramp * (low ** (1 / rho) - high ** (1 / rho))) ** rho
    return np.append(levels, 0.0)


def logsnr_sigmas(diffusion: GaussianDiffusion, steps: int) -> np.ndarray:
    """(steps + 1,) noise levels even in log-SNR (= -2 log sigma) from the largest to the
    smallest of the schedule, then 0 (the spacing DPM-Solver recommends, Lu et al. 2022)."""
    if steps < 1:
        raise DifforgeError(f"steps must be >= 1, got {steps}")
    sigmas = diffusion.schedule.sigmas
    levels = np.exp(np.linspace(math.log(sigmas[-1]), math.log(sigmas[0]), steps))
    return np.append(levels, 0.0)


def _checked_sigmas(sigmas: Sequence[float] | np.ndarray) -> list[float]:
    levels = [float(s) for s in np.asarray(sigmas, dtype=np.float64).reshape(-1)]
    if len(levels) < 2 or levels[-1] != 0.0 or any(b >= a for a, b in zip(levels, levels[1:], strict=False)):
        raise DifforgeError("sigmas must be a strictly decreasing list of noise levels ending in 0")
    return levels


# --------------------------------------------------------------------------------------
# ODE samplers in variance-exploding variables
# --------------------------------------------------------------------------------------


class DiscreteDenoiser:
    """D(x, sigma) = x0_hat: a discrete-time network as a denoiser of x = x0 + sigma n.

    The network sees x_t = x / sqrt(1 + sigma^2) at timestep t(sigma) (log-sigma
    interpolation of the schedule; rounded to the nearest integer when ``quantize``,
    as diffusers' DPM-Solver and k-diffusion do), and its prediction is turned into x0 with
    alpha_bar = 1 / (1 + sigma^2): eps gives x0 = x - sigma eps, v gives
    x0 = sqrt(alpha_bar) x_t - sqrt(1 - alpha_bar) v, x0 is taken as it is.
    """

    def __init__(
        self,
        model: Denoiser,
        diffusion: GaussianDiffusion,
        *,
        model_kwargs: Mapping[str, Any] | None = None,
        quantize: bool = True,
        clip_denoised: bool = True,
        dynamic_threshold: float | None = None,
    ) -> None:
        self.model = model
        self.diffusion = diffusion
        self.model_kwargs = dict(model_kwargs or {})
        self.quantize = quantize
        self.clip_denoised = clip_denoised
        self.dynamic_threshold = dynamic_threshold

    def timestep(self, sigma: float) -> float:
        t = float(self.diffusion.schedule.sigma_to_t(np.asarray(sigma)))
        return float(round(t)) if self.quantize else t

    def __call__(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """x: (B, C, H, W) at noise level sigma (a float) -> x0_hat (B, C, H, W)."""
        scale = 1.0 / math.sqrt(1.0 + sigma**2)  # sqrt(alpha_bar)
        x_t = x * scale
        t_value = self.timestep(sigma)
        t_model = torch.full(
            (x.shape[0],), t_value, device=x.device, dtype=torch.long if self.quantize else x.dtype
        )
        prediction, _ = self.diffusion.split_output(self.model(x_t, t_model, **self.model_kwargs), x_t)
        if self.diffusion.prediction == "eps":
            x0 = x - sigma * prediction
        elif self.diffusion.prediction == "v":
            x0 = scale * x_t - sigma * scale * prediction
        else:
            x0 = prediction
        if self.dynamic_threshold is not None:
            x0 = dynamic_thresholding(x0, self.dynamic_threshold)
        elif self.clip_denoised:
            x0 = x0.clamp(-1.0, 1.0)
        return x0


def _report(
    callback: Callback | None,
    denoiser: DiscreteDenoiser,
    i: int,
    total: int,
    x: torch.Tensor,
    sigma: float,
    x0: torch.Tensor,
) -> None:
    if callback is not None:
        callback(StepInfo(i, total, denoiser.timestep(sigma), x / math.sqrt(1.0 + sigma**2), x0))


def _ode_setup(
    model: Denoiser,
    diffusion: GaussianDiffusion,
    noise: torch.Tensor,
    sigmas: Sequence[float] | np.ndarray,
    options: dict[str, Any],
) -> tuple[DiscreteDenoiser, list[float], torch.Tensor]:
    denoiser = DiscreteDenoiser(model, diffusion, **options)
    levels = _checked_sigmas(sigmas)
    return denoiser, levels, noise * math.sqrt(1.0 + levels[0] ** 2)


@torch.no_grad()
def euler(
    model: Denoiser,
    diffusion: GaussianDiffusion,
    noise: torch.Tensor,
    sigmas: Sequence[float] | np.ndarray,
    *,
    callback: Callback | None = None,
    **denoiser_options: Any,
) -> torch.Tensor:
    """Euler's method on the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma
    (EDM eq. 3), one model call per step. ``noise`` is scaled to sqrt(1 + sigma_0^2), the
    x_T of the discrete chain in VE variables. ``denoiser_options`` go to `DiscreteDenoiser`."""
    denoiser, levels, x = _ode_setup(model, diffusion, noise, sigmas, denoiser_options)
    total = len(levels) - 1
    for i in range(total):
        sigma, sigma_next = levels[i], levels[i + 1]
        x0 = denoiser(x, sigma)
        _report(callback, denoiser, i, total, x, sigma, x0)
        x = x + (x - x0) / sigma * (sigma_next - sigma)
    return x


@torch.no_grad()
def heun(
    model: Denoiser,
    diffusion: GaussianDiffusion,
    noise: torch.Tensor,
    sigmas: Sequence[float] | np.ndarray,
    *,
    callback: Callback | None = None,
    **denoiser_options: Any,
) -> torch.Tensor:
    """Heun's second-order method (EDM Alg. 1, no churn): an Euler step, then the trapezoid
    of the slopes at both ends; the last step (to sigma = 0) is plain Euler. 2 calls per step."""
    denoiser, levels, x = _ode_setup(model, diffusion, noise, sigmas, denoiser_options)
    total = len(levels) - 1
    for i in range(total):
        sigma, sigma_next = levels[i], levels[i + 1]
        x0 = denoiser(x, sigma)
        _report(callback, denoiser, i, total, x, sigma, x0)
        slope = (x - x0) / sigma
        x_euler = x + slope * (sigma_next - sigma)
        if sigma_next == 0.0:
            x = x_euler
            continue
        slope_next = (x_euler - denoiser(x_euler, sigma_next)) / sigma_next
        x = x + 0.5 * (slope + slope_next) * (sigma_next - sigma)
    return x


@torch.no_grad()
def dpmpp_2m(
    model: Denoiser,
    diffusion: GaussianDiffusion,
    noise: torch.Tensor,
    sigmas: Sequence[float] | np.ndarray,
    *,
    callback: Callback | None = None,
    **denoiser_options: Any,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2), data prediction, multistep, in VE variables
    with lambda = -log sigma and h = lambda_next - lambda:

        x_next = (sigma_next / sigma) x - (e^{-h} - 1) D,
        D = (1 + 1 / (2r)) x0_hat_i - 1 / (2r) x0_hat_{i-1},  r = h_{i-1} / h_i,

    first order (D = x0_hat_i) at the first step and at the last one (sigma_next = 0, where
    x_next = x0_hat). One model call per step."""
    denoiser, levels, x = _ode_setup(model, diffusion, noise, sigmas, denoiser_options)
    total = len(levels) - 1
    previous_x0: torch.Tensor | None = None
    previous_h = 0.0
    for i in range(total):
        sigma, sigma_next = levels[i], levels[i + 1]
        x0 = denoiser(x, sigma)
        _report(callback, denoiser, i, total, x, sigma, x0)
        if sigma_next == 0.0:
            x = x0
            break
        h = math.log(sigma) - math.log(sigma_next)
        if previous_x0 is None:
            direction = x0
        else:
            r = previous_h / h
            direction = (1.0 + 1.0 / (2.0 * r)) * x0 - (1.0 / (2.0 * r)) * previous_x0
        x = (sigma_next / sigma) * x - math.expm1(-h) * direction
        previous_x0, previous_h = x0, h
    return x
