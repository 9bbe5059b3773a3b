"""Samplers: short pure functions of a denoiser, a process, the starting noise and an
explicit list of timesteps (or noise levels).

Every sampler takes ``model(x, t, **model_kwargs) -> model_output`` (the network, or a
guidance wrapper around it), called with ORIGINAL timestep indices also under respacing,
a `GaussianDiffusion`, ``noise`` (B, C, H, W) of unit variance — x_T for the discrete
samplers, scaled to the first noise level by the ODE samplers — and returns x_0 (B, C, H, W).
Randomness comes only from ``generator``, or from explicit per-step noise ``step_noise``
(see `difforge.diffusion.step_noise_source`); ``callback(StepInfo)`` sees each step.

Two families:

- on the discrete chain, given kept timesteps: `ddpm` (ancestral, DDPM eq. 11 / IDDPM with
  any variance) and `ddim` (Song et al. 2021, eq. 12 with eta), loops of the single steps
  `p_sample_step` and `ddim_step`, which also run on their own with a different t per example;
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

from difforge.diffusion import (
    Denoiser,
    GaussianDiffusion,
    StepNoise,
    dynamic_thresholding,
    standard_normal_like,
    step_noise_source,
)
from difforge.errors import DifforgeError

Timesteps = Sequence[int] | np.ndarray | str
"""The kept steps of a discrete sampler: original timestep indices (any order; a list is always
indices, never section counts), or a respacing spec string of improved-diffusion, read by
``diffusion.schedule.timesteps(spec)`` (see `difforge.schedule.respaced_timesteps`):

- "ddimK": DDIM's even stride, range(0, T, s) for the smallest stride s that gives exactly K
  steps ("ddim50" at T = 1000: s = 20, so 0, 20, 40, ..., 980); for some K no stride does,
  an error;
- "K" or "10,15,20": the chain cut into as many equal sections as there are counts, each
  keeping its count of steps spread evenly from its first to its last index, rounded half to
  even ("50" at T = 1000: round(j 999 / 49), j = 0 .. 49, so 0, 20, 41, 61, ..., 979, 999,
  always including T - 1).

`difforge.sampling.sample` with ``steps=K`` uses ``schedule.timesteps(str(K))``, the section
spacing "K", not "ddimK": at T = 1000, "50" and "ddim50" share only the timesteps 0 and 20.
"""


class StepInfo(NamedTuple):
    """What a sampler shows its callback at each model evaluation step, after the step.

    ``index`` counts from 0 to ``total - 1``; ``timestep`` is the original (possibly
    fractional) timestep given to the model; ``x`` the sample the model saw, ``pred_x0``
    its predicted clean image and ``x_next`` the sample after the step (the next step's
    ``x``; at the last step the returned sample), all (B, C, H, W) in the x_t scale of the
    discrete chain (the ODE samplers divide by sqrt(1 + sigma^2) at each one's noise level)."""

    index: int
    total: int
    timestep: float
    x: torch.Tensor
    pred_x0: torch.Tensor
    x_next: torch.Tensor


Callback = Callable[[StepInfo], None]


class StepOutput(NamedTuple):
    """One reverse step: ``x_prev`` the sample at the next (lower) noise level and ``pred_x0``
    the x0_hat it was computed from (after clipping), both (B, C, H, W)."""

    x_prev: torch.Tensor
    pred_x0: torch.Tensor


def _process_for(diffusion: GaussianDiffusion, timesteps: Timesteps) -> GaussianDiffusion:
    """The (respaced) process whose steps are exactly ``timesteps`` (original indices or a spec)."""
    if isinstance(timesteps, str):
        timesteps = diffusion.schedule.timesteps(timesteps)
    kept = np.unique(np.asarray(timesteps, dtype=np.int64))
    if kept.size != len(timesteps):
        raise DifforgeError("timesteps must not repeat")
    if np.array_equal(kept, diffusion.schedule.timestep_map):
        return diffusion
    return diffusion.respaced(kept)


def _batch_t(index: int, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), index, dtype=torch.long, device=x.device)


def _per_example(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) on x's device, to broadcast against x."""
    return values.to(x.device).reshape(-1, *([1] * (x.ndim - 1)))


def _checked_noise(noise: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if noise.shape != x.shape:
        raise DifforgeError(f"noise must have x's shape {tuple(x.shape)}, got {tuple(noise.shape)}")
    return noise.to(device=x.device, dtype=x.dtype)


MODEL_SIGMA = "model"
"""`ddim_step`'s ``eta`` that takes sigma^2 from the model's reverse variance (`ddim_var`)."""


def _checked_eta(eta: float) -> float:
    if eta < 0:
        raise DifforgeError(f"eta must be >= 0, got {eta!r}")
    return float(eta)


# --------------------------------------------------------------------------------------
# Single reverse steps of the discrete chain
# --------------------------------------------------------------------------------------


def p_sample_step(
    model: Denoiser,
    diffusion: GaussianDiffusion,
    x: torch.Tensor,
    t: torch.Tensor,
    *,
    model_kwargs: Mapping[str, Any] | None = None,
    clip_denoised: bool = True,
    dynamic_threshold: float | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> StepOutput:
    """One ancestral step x_t -> x_{t-1} = mu_theta(x_t, t) + exp(1/2 log Sigma_theta(x_t, t)) z,
    z ~ N(0, I), and x_{t-1} = mu_theta(x_t, t) (no noise) in the rows where t = 0
    (DDPM Alg. 2 with the variance of ``diffusion``: fixed or learned, IDDPM).

    Args:
        x: (B, C, H, W) x_t.
        t: (B,) int64 timesteps of THIS (possibly respaced) process, 0 .. T-1, one per example
            (any mix); the model is called once, at ``diffusion.model_timesteps(t)``.
        noise: z, (B, C, H, W); if None it is drawn from ``generator`` (unless every t = 0,
            when nothing is drawn).

    Returns x_{t-1} and the (clipped) x0_hat, both (B, C, H, W).
    """
    output = model(x, diffusion.model_timesteps(t), **dict(model_kwargs or {}))
    out = diffusion.p_mean_variance(
        output, x, t, clip_denoised=clip_denoised, dynamic_threshold=dynamic_threshold
    )
    noisy = _per_example(t > 0, x)
    if noise is None:
        if not bool(noisy.any()):
            return StepOutput(out.mean, out.pred_x0)
        noise = standard_normal_like(x, generator)
    noise = _checked_noise(noise, x)
    x_prev = torch.where(noisy, out.mean + torch.exp(0.5 * out.log_variance) * noise, out.mean)
    return StepOutput(x_prev, out.pred_x0)


class _DDIMCoefficients(NamedTuple):
    scale_x0: torch.Tensor  # sqrt(alpha_bar_s)
    scale_eps: torch.Tensor  # sqrt(1 - alpha_bar_s - sigma^2)
    sigma: torch.Tensor
    stochastic: bool  # some sigma > 0
    room: torch.Tensor  # 1 - alpha_bar_s, the largest sigma^2


def _ddim_coefficients(
    diffusion: GaussianDiffusion, t: torch.Tensor, t_prev: torch.Tensor, eta: float, x: torch.Tensor
) -> _DDIMCoefficients:
    """The coefficients of DDIM eq. 12 per example, each (B, 1, ..., 1) in x's dtype and device,
    s = t_prev and alpha_bar_{-1} = 1.

    Gathered from the float64 alpha_bar table and computed in float64 NumPy, then rounded once
    to x's dtype: the same numbers as scalar float64 maths on a single t (no float32 table)."""
    batch = x.shape[0]
    if t.shape != (batch,) or t_prev.shape != (batch,):
        raise DifforgeError(
            f"t and t_prev must have shape ({batch},), got {tuple(t.shape)} and {tuple(t_prev.shape)}"
        )
    now = t.detach().cpu().numpy().astype(np.int64)
    prev = t_prev.detach().cpu().numpy().astype(np.int64)
    if np.any(now >= diffusion.num_timesteps) or np.any(prev < -1) or np.any(prev >= now):
        raise DifforgeError(
            f"ddim_step needs -1 <= t_prev < t <= {diffusion.num_timesteps - 1} per example "
            f"(this process's indices), got t={now.tolist()}, t_prev={prev.tolist()}"
        )
    alphas_cumprod = diffusion.schedule.alphas_cumprod
    alpha_bar = alphas_cumprod[now]
    alpha_bar_prev = np.where(prev >= 0, alphas_cumprod[np.maximum(prev, 0)], 1.0)
    sigma = eta * np.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * np.sqrt(1 - alpha_bar / alpha_bar_prev)
    scale_eps = np.sqrt(np.maximum(1 - alpha_bar_prev - sigma**2, 0.0))
    rows = np.stack([np.sqrt(alpha_bar_prev), scale_eps, sigma, 1 - alpha_bar_prev])
    scale_x0_t, scale_eps_t, sigma_t, room_t = (
        _per_example(row, x) for row in torch.from_numpy(rows).to(x.dtype)
    )
    return _DDIMCoefficients(scale_x0_t, scale_eps_t, sigma_t, bool(np.any(sigma > 0)), room_t)


def ddim_step(
    model: Denoiser,
    diffusion: GaussianDiffusion,
    x: torch.Tensor,
    t: torch.Tensor,
    t_prev: torch.Tensor,
    *,
    eta: float | str = 0.0,
    model_kwargs: Mapping[str, Any] | None = None,
    clip_denoised: bool = True,
    dynamic_threshold: float | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> StepOutput:
    """One DDIM step (Song et al. 2021, eq. 12) from x_t to x_s, s = t_prev, per example:

        x_s = sqrt(alpha_bar_s) x0_hat + sqrt(1 - alpha_bar_s - sigma^2) eps_hat + sigma z,
        sigma = eta sqrt((1 - alpha_bar_s) / (1 - alpha_bar_t)) sqrt(1 - alpha_bar_t / alpha_bar_s),

    with eps_hat re-derived from the (possibly clipped) x0_hat and alpha_bar_{-1} = 1, so
    t_prev = -1 is the step to the data (sigma = 0). eta = 0 is deterministic; eta = 1 with
    t_prev = t - 1 has the DDPM posterior variance.

    Args:
        x: (B, C, H, W) x_t.
        t, t_prev: (B,) int64 indices of THIS (possibly respaced) process with
            -1 <= t_prev < t <= T-1, one pair per example (any mix; t_prev need not be t - 1);
            the model is called once, at ``diffusion.model_timesteps(t)``. The coefficients are
            gathered from the float64 alpha_bar table and computed in float64 before the cast
            to x's dtype.
        noise: z, (B, C, H, W), used where sigma > 0; if None it is drawn from ``generator``
            when some sigma > 0 (eta > 0 and some t_prev >= 0), else nothing is drawn.

    Returns x_s and the (clipped) x0_hat, both (B, C, H, W).
    """
    own_variance = eta == MODEL_SIGMA
    if own_variance and bool((t_prev != t - 1).any()):
        raise DifforgeError(
            "DDIM with the model's variance needs t_prev = t - 1 (the step its variance is for)"
        )
    coefficients = _ddim_coefficients(diffusion, t, t_prev, 1.0 if own_variance else _checked_eta(eta), x)
    output = model(x, diffusion.model_timesteps(t), **dict(model_kwargs or {}))
    prediction, variance_values = diffusion.split_output(output, x)
    pred_x0 = diffusion.denoise(prediction, x, t, clip_denoised, dynamic_threshold)
    eps = diffusion.eps_from_x0(x, t, pred_x0)
    sigma, scale_eps = coefficients.sigma, coefficients.scale_eps
    if own_variance:  # sigma^2 = Sigma_theta per pixel, at most 1 - alpha_bar_s
        room = coefficients.room
        sigma_sq = torch.minimum(torch.exp(diffusion.log_variance(variance_values, x, t)), room)
        sigma, scale_eps = sigma_sq.sqrt(), (room - sigma_sq).clamp_min(0).sqrt()
    x_prev = coefficients.scale_x0 * pred_x0 + scale_eps * eps
    if not coefficients.stochastic:
        return StepOutput(x_prev, pred_x0)
    noise = _checked_noise(standard_normal_like(x, generator) if noise is None else noise, x)
    return StepOutput(torch.where(sigma > 0, x_prev + sigma * noise, x_prev), pred_x0)


# --------------------------------------------------------------------------------------
# Discrete samplers: loops of the single steps
# --------------------------------------------------------------------------------------


@torch.no_grad()
def ddpm(
    model: Denoiser,
    diffusion: GaussianDiffusion,
    noise: torch.Tensor,
    timesteps: Timesteps,
    *,
    model_kwargs: Mapping[str, Any] | None = None,
    clip_denoised: bool = True,
    dynamic_threshold: float | None = None,
    generator: torch.Generator | None = None,
    step_noise: StepNoise | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Ancestral sampling, K = len(timesteps) `p_sample_step` calls on the respaced chain:
    x_{t-1} = mu_theta(x_t, t) + sigma_t z, z ~ N(0, I), no noise at the last step (DDPM Alg. 2
    with the variance of ``diffusion``: fixed or learned, IDDPM; respaced chain, IDDPM sec. 4).

    ``timesteps``: kept original indices, or a spec string such as "ddim50", "250" or
    "10,15,20" (see `Timesteps`). ``sample(steps=50)`` respaces with "50", improved-diffusion's
    section spacing (0, 20, 41, ..., 979, 999 at T = 1000), not DDIM's stride "ddim50"
    (0, 20, ..., 980).

    z of step ``index`` (0 .. K-2) comes from ``generator``, or is exactly ``step_noise``'s
    (a callable ``(index, x) -> z`` called at steps 0 .. K-2, or a (K, *noise.shape) tensor
    whose last slice is unused); all-zero ``step_noise`` gives the mean path.
    """
    process = _process_for(diffusion, timesteps)
    total = process.num_timesteps
    draw = step_noise_source(step_noise, generator, total, noise)
    x = noise
    for step, index in enumerate(reversed(range(total))):
        out = p_sample_step(
            model,
            process,
            x,
            _batch_t(index, x),
            model_kwargs=model_kwargs,
            clip_denoised=clip_denoised,
            dynamic_threshold=dynamic_threshold,
            noise=draw(step, x) if index > 0 else None,
        )
        if callback is not None:
            timestep = float(process.schedule.timestep_map[index])
            callback(StepInfo(step, total, timestep, x, out.pred_x0, out.x_prev))
        x = out.x_prev
    return x


@torch.no_grad()
def ddim(
    model: Denoiser,
    diffusion: GaussianDiffusion,
    noise: torch.Tensor,
    timesteps: Timesteps,
    *,
    eta: float | str = 0.0,
    model_kwargs: Mapping[str, Any] | None = None,
    clip_denoised: bool = True,
    dynamic_threshold: float | None = None,
    generator: torch.Generator | None = None,
    step_noise: StepNoise | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12), K = len(timesteps) `ddim_step` calls, each from t to
    the previous kept step s:

        x_s = sqrt(alpha_bar_s) x0_hat + sqrt(1 - alpha_bar_s - sigma^2) eps_hat + sigma z,
        sigma = eta sqrt((1 - alpha_bar_s) / (1 - alpha_bar_t)) sqrt(1 - alpha_bar_t / alpha_bar_s),

    with eps_hat re-derived from the (possibly clipped) x0_hat. eta = 0 is deterministic;
    eta = 1 has the DDPM posterior variance on the kept chain.

    ``timesteps``: as in `ddpm` (indices or a spec string, see `Timesteps`); note that
    ``sample(sampler="ddim", steps=50)`` runs on "50", not on "ddim50", DDIM's own spacing.

    With eta > 0, z of step ``index`` (0 .. K-2) comes from ``generator``, or is exactly
    ``step_noise``'s (as in `ddpm`: a callable called at steps 0 .. K-2, or a (K, *noise.shape)
    tensor whose last slice is unused); with eta = 0 no noise is used or asked for.

    ``eta="model"`` (`ddim_var`) takes sigma^2 per pixel from the model's reverse variance
    Sigma_theta(x_t, t) on the kept chain (learned or fixed), capped at 1 - alpha_bar_s.
    """
    stochastic = eta == MODEL_SIGMA or _checked_eta(eta) > 0  # type: ignore[arg-type]
    process = _process_for(diffusion, timesteps)
    total = process.num_timesteps
    draw = step_noise_source(step_noise, generator, total, noise)
    x = noise
    for step, index in enumerate(reversed(range(total))):
        t = _batch_t(index, x)
        out = ddim_step(
            model,
            process,
            x,
            t,
            t - 1,
            eta=eta,
            model_kwargs=model_kwargs,
            clip_denoised=clip_denoised,
            dynamic_threshold=dynamic_threshold,
            noise=draw(step, x) if stochastic and index > 0 else None,
        )
        if callback is not None:
            timestep = float(process.schedule.timestep_map[index])
            callback(StepInfo(step, total, timestep, x, out.pred_x0, out.x_prev))
        x = out.x_prev
    return x


def ddim_var(
    model: Denoiser,
    diffusion: GaussianDiffusion,
    noise: torch.Tensor,
    timesteps: Timesteps,
    **options: Any,
) -> torch.Tensor:
    """`ddim` whose noise at each kept step is the model's own reverse variance,
    sigma^2 = min(Sigma_theta(x_t, t), 1 - alpha_bar_s) per pixel (``eta="model"``): a
    learned_range model's learned variance (IDDPM eq. 15), else the fixed one (fixed_small:
    beta~_t, which is DDIM with eta = 1; fixed_large: beta_t). The rest of the DDIM update
    keeps x_s's marginal variance. Options as `ddim`'s."""
    return ddim(model, diffusion, noise, timesteps, eta=MODEL_SIGMA, **options)


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
    index: int,
    total: int,
    sigmas: tuple[float, float],
    x: torch.Tensor,
    x0: torch.Tensor,
    x_next: torch.Tensor,
) -> None:
    """Step ``index`` of ``total``: the model saw x at noise level ``sigmas[0]`` and the step
    went to ``sigmas[1]``; shown in the x_t scale, x / sqrt(1 + sigma^2)."""
    if callback is not None:
        sigma, sigma_next = sigmas
        callback(
            StepInfo(
                index,
                total,
                denoiser.timestep(sigma),
                x / math.sqrt(1.0 + sigma**2),
                x0,
                x_next / math.sqrt(1.0 + sigma_next**2),
            )
        )


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


def _heun_step(
    denoiser: DiscreteDenoiser, x: torch.Tensor, sigma: float, sigma_next: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One Heun step of dx/dsigma = (x - D(x, sigma)) / sigma from sigma to sigma_next (EDM
    Alg. 1, lines 5-8): Euler, then the trapezoid of both slopes unless sigma_next = 0.
    Returns x at sigma_next and the first evaluation's x0_hat."""
    x0 = denoiser(x, sigma)
    slope = (x - x0) / sigma
    x_next = x + slope * (sigma_next - sigma)
    if sigma_next != 0.0:
        slope_next = (x_next - denoiser(x_next, sigma_next)) / sigma_next
        x_next = x + 0.5 * (slope + slope_next) * (sigma_next - sigma)
    return x_next, x0


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
    x_T of the discrete chain in VE variables. ``denoiser_options`` go to `DiscreteDenoiser`.
    Deterministic: no generator or step noise is needed (or taken)."""
    denoiser, levels, x = _ode_setup(model, diffusion, noise, sigmas, denoiser_options)
    for i in range(len(levels) - 1):
        sigma, sigma_next = levels[i], levels[i + 1]
        x0 = denoiser(x, sigma)
        x_next = x + (x - x0) / sigma * (sigma_next - sigma)
        _report(callback, denoiser, i, len(levels) - 1, (sigma, sigma_next), x, x0, x_next)
        x = x_next
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
    of the slopes at both ends; the last step (to sigma = 0) is plain Euler. 2 calls per step
    (the callback sees the first one's x0_hat). Deterministic: no generator or step noise."""
    denoiser, levels, x = _ode_setup(model, diffusion, noise, sigmas, denoiser_options)
    for i in range(len(levels) - 1):
        sigma, sigma_next = levels[i], levels[i + 1]
        x_next, x0 = _heun_step(denoiser, x, sigma, sigma_next)
        _report(callback, denoiser, i, len(levels) - 1, (sigma, sigma_next), x, x0, x_next)
        x = x_next
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
    x_next = x0_hat). One model call per step. Deterministic: no generator or step noise."""
    denoiser, levels, x = _ode_setup(model, diffusion, noise, sigmas, denoiser_options)
    previous_x0: torch.Tensor | None = None
    previous_h = 0.0
    for i in range(len(levels) - 1):
        sigma, sigma_next = levels[i], levels[i + 1]
        x0 = denoiser(x, sigma)
        if sigma_next == 0.0:
            x_next = x0
        else:
            h = math.log(sigma) - math.log(sigma_next)
            if previous_x0 is None:
                direction = x0
            else:
                r = previous_h / h
                direction = (1.0 + 1.0 / (2.0 * r)) * x0 - (1.0 / (2.0 * r)) * previous_x0
            x_next = (sigma_next / sigma) * x - math.expm1(-h) * direction
            previous_x0, previous_h = x0, h
        _report(callback, denoiser, i, len(levels) - 1, (sigma, sigma_next), x, x0, x_next)
        x = x_next
    return x


# --------------------------------------------------------------------------------------
# Stochastic samplers in variance-exploding variables
# --------------------------------------------------------------------------------------
#
# Each adds fresh noise along the way, which corrects the errors of an imperfect denoiser
# that a deterministic ODE solver carries to the end (EDM sec. 4). Noise comes from
# ``generator`` or exactly from ``step_noise`` (``(index, x) -> z`` or a (K, *noise.shape)
# tensor, as in `ddpm`), asked for only at the steps that use it, in order.


def _stochastic_setup(
    model: Denoiser,
    diffusion: GaussianDiffusion,
    noise: torch.Tensor,
    sigmas: Sequence[float] | np.ndarray,
    denoiser_options: dict[str, Any],
    step_noise: StepNoise | None,
    generator: torch.Generator | None,
) -> tuple[DiscreteDenoiser, list[float], torch.Tensor, Callable[[int, torch.Tensor], torch.Tensor]]:
    """`_ode_setup` plus the noise source of a K-step stochastic loop (z of step i)."""
    denoiser, levels, x = _ode_setup(model, diffusion, noise, sigmas, denoiser_options)
    return denoiser, levels, x, step_noise_source(step_noise, generator, len(levels) - 1, noise)


def ancestral_levels(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_down, sigma_up) of an ancestral step from sigma to sigma_next in VE variables:

        sigma_up = min(sigma_next, eta sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2)),
        sigma_down = sqrt(sigma_next^2 - sigma_up^2),

    a deterministic step to sigma_down, then noise of std sigma_up brings the level back to
    sigma_next. eta = 1 is the DDPM posterior's variance, eta = 0 the plain ODE step."""
    if sigma_next == 0.0:
        return 0.0, 0.0
    sigma_up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    return math.sqrt(sigma_next**2 - sigma_up**2), sigma_up


@torch.no_grad()
def euler_ancestral(
    model: Denoiser,
    diffusion: GaussianDiffusion,
    noise: torch.Tensor,
    sigmas: Sequence[float] | np.ndarray,
    *,
    eta: float = 1.0,
    s_noise: float = 1.0,
    generator: torch.Generator | None = None,
    step_noise: StepNoise | None = None,
    callback: Callback | None = None,
    **denoiser_options: Any,
) -> torch.Tensor:
    """Euler ancestral: per step an Euler step of the probability-flow ODE to sigma_down, then
    x += s_noise sigma_up z (`ancestral_levels`); one model call per step, the last step (to 0)
    returns x0_hat. z of step i (0 .. K-2) comes from ``generator`` or ``step_noise``."""
    denoiser, levels, x, draw = _stochastic_setup(
        model, diffusion, noise, sigmas, denoiser_options, step_noise, generator
    )
    total = len(levels) - 1
    eta = _checked_eta(eta)
    for i in range(total):
        sigma, sigma_next = levels[i], levels[i + 1]
        x0 = denoiser(x, sigma)
        sigma_down, sigma_up = ancestral_levels(sigma, sigma_next, eta)
        x_next = x + (x - x0) / sigma * (sigma_down - sigma)
        if sigma_up > 0.0:
            x_next = x_next + (s_noise * sigma_up) * draw(i, x)
        _report(callback, denoiser, i, total, (sigma, sigma_next), x, x0, x_next)
        x = x_next
    return x


@torch.no_grad()
def dpmpp_2m_sde(
    model: Denoiser,
    diffusion: GaussianDiffusion,
    noise: torch.Tensor,
    sigmas: Sequence[float] | np.ndarray,
    *,
    eta: float = 1.0,
    s_noise: float = 1.0,
    generator: torch.Generator | None = None,
    step_noise: StepNoise | None = None,
    callback: Callback | None = None,
    **denoiser_options: Any,
) -> torch.Tensor:
    """DPM-Solver++(2M) SDE (Lu et al. 2022b, the SDE variant of Alg. 2; midpoint form), data
    prediction in VE variables with h = log sigma - log sigma_next:

        x_next = (sigma_next / sigma) e^{-eta h} x + (1 - e^{-(1 + eta) h}) x0_hat_i
                 + 1/2 (1 - e^{-(1 + eta) h}) / r (x0_hat_i - x0_hat_{i-1})
                 + s_noise sigma_next sqrt(1 - e^{-2 eta h}) z,          r = h_{i-1} / h_i,

    first order at the first step, x_next = x0_hat at the last one (sigma_next = 0). eta = 1
    is diffusers' "sde-dpmsolver++", eta = 0 is `dpmpp_2m` exactly. One model call per step;
    z of step i (0 .. K-2) comes from ``generator`` or ``step_noise``."""
    denoiser, levels, x, draw = _stochastic_setup(
        model, diffusion, noise, sigmas, denoiser_options, step_noise, generator
    )
    total = len(levels) - 1
    eta = _checked_eta(eta)
    previous_x0: torch.Tensor | None = None
    previous_h = 0.0
    for i in range(total):
        sigma, sigma_next = levels[i], levels[i + 1]
        x0 = denoiser(x, sigma)
        if sigma_next == 0.0:
            x_next = x0
        else:
            h = math.log(sigma) - math.log(sigma_next)
            gain = -math.expm1(-(1.0 + eta) * h)
            x_next = (sigma_next / sigma) * math.exp(-eta * h) * x + gain * x0
            if previous_x0 is not None:
                x_next = x_next + (0.5 * gain * h / previous_h) * (x0 - previous_x0)
            if eta > 0.0:
                x_next = x_next + (s_noise * sigma_next * math.sqrt(-math.expm1(-2.0 * eta * h))) * draw(i, x)
            previous_x0, previous_h = x0, h
        _report(callback, denoiser, i, total, (sigma, sigma_next), x, x0, x_next)
        x = x_next
    return x


def _checked_churn(s_churn: float, s_tmin: float, s_tmax: float, s_noise: float) -> None:
    if s_churn < 0 or s_noise < 0 or s_tmin < 0 or s_tmax < s_tmin:
        raise DifforgeError(
            f"need s_churn >= 0, s_noise >= 0 and 0 <= s_tmin <= s_tmax, got s_churn={s_churn}, "
            f"s_tmin={s_tmin}, s_tmax={s_tmax}, s_noise={s_noise}"
        )


@torch.no_grad()
def edm(
    model: Denoiser,
    diffusion: GaussianDiffusion,
    noise: torch.Tensor,
    sigmas: Sequence[float] | np.ndarray,
    *,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
    generator: torch.Generator | None = None,
    step_noise: StepNoise | None = None,
    callback: Callback | None = None,
    **denoiser_options: Any,
) -> torch.Tensor:
    """EDM's stochastic sampler (Karras et al. 2022, Alg. 2): at each level sigma_i in
    [s_tmin, s_tmax] the noise is first raised to sigma_hat = (1 + gamma) sigma_i,

        gamma = min(s_churn / K, sqrt(2) - 1),  x_hat = x + sqrt(sigma_hat^2 - sigma_i^2) s_noise z,

    then a Heun step (`heun`) goes from sigma_hat to sigma_{i+1}; Euler at the last step.
    s_churn = 0 is `heun` exactly. 2K - 1 model calls; z of step i (only at the churned
    steps) comes from ``generator`` or ``step_noise``."""
    _checked_churn(s_churn, s_tmin, s_tmax, s_noise)
    denoiser, levels, x, draw = _stochastic_setup(
        model, diffusion, noise, sigmas, denoiser_options, step_noise, generator
    )
    total = len(levels) - 1
    gamma_max = min(s_churn / total, math.sqrt(2.0) - 1.0)
    for i in range(total):
        sigma, sigma_next = levels[i], levels[i + 1]
        gamma = gamma_max if s_tmin <= sigma <= s_tmax else 0.0
        if gamma > 0.0:
            sigma_hat = sigma * (1.0 + gamma)
            x = x + (s_noise * math.sqrt(sigma_hat**2 - sigma**2)) * draw(i, x)
            sigma = sigma_hat
        x_next, x0 = _heun_step(denoiser, x, sigma, sigma_next)
        _report(callback, denoiser, i, total, (sigma, sigma_next), x, x0, x_next)
        x = x_next
    return x


class RestartInterval(NamedTuple):
    """One restart interval of `restart`: when the main path reaches ``sigmas[index]`` (the
    low end), ``repeats`` times add noise up to ``sigma_high`` and integrate back down in
    ``steps`` Heun steps (Karras spacing, rho = 7)."""

    index: int
    sigma_high: float
    steps: int
    repeats: int


@torch.no_grad()
def restart(
    model: Denoiser,
    diffusion: GaussianDiffusion,
    noise: torch.Tensor,
    sigmas: Sequence[float] | np.ndarray,
    *,
    intervals: Sequence[RestartInterval] = (),
    s_noise: float = 1.0,
    generator: torch.Generator | None = None,
    step_noise: StepNoise | None = None,
    callback: Callback | None = None,
    **denoiser_options: Any,
) -> torch.Tensor:
    """Restart sampling (Xu et al. 2023, Alg. 1): Heun on the probability-flow ODE over
    ``sigmas``; at the low end sigma_low = sigmas[r.index] of each interval r, ``r.repeats``
    times

        x <- x + s_noise sqrt(sigma_high^2 - sigma_low^2) z,  then Heun from sigma_high back to sigma_low,

    which contracts the accumulated error like an SDE while the steps stay those of an ODE.
    No intervals is `heun` exactly. Model calls: 2K - 1 + sum(2 steps repeats); the j-th
    restart's z (0, 1, ... over all intervals in order) comes from ``generator`` or ``step_noise``.
    """
    denoiser, levels, x = _ode_setup(model, diffusion, noise, sigmas, denoiser_options)
    main = len(levels) - 1
    plan = {r.index: r for r in intervals}
    for r in intervals:
        if not (0 < r.index < main and r.sigma_high > levels[r.index] and r.steps >= 1 and r.repeats >= 0):
            raise DifforgeError(
                f"a restart interval needs 0 < index < {main}, sigma_high > sigmas[index], steps >= 1 "
                f"and repeats >= 0; got {tuple(r)}"
            )
    if len(plan) != len(intervals):
        raise DifforgeError("restart intervals must start at different levels")
    total = main + sum(r.steps * r.repeats for r in intervals)
    draw = step_noise_source(step_noise, generator, max(1, sum(r.repeats for r in intervals)), noise)
    reported = restarts = 0

    def heun_to(x: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
        nonlocal reported
        x_next, x0 = _heun_step(denoiser, x, sigma, sigma_next)
        _report(callback, denoiser, reported, total, (sigma, sigma_next), x, x0, x_next)
        reported += 1
        return x_next

    for i in range(main):
        x = heun_to(x, levels[i], levels[i + 1])
        interval = plan.get(i + 1)
        if interval is None:
            continue
        low, high = levels[i + 1], interval.sigma_high
        ramp = np.linspace(0.0, 1.0, interval.steps + 1)
        segment = (high ** (1 / 7) + ramp * (low ** (1 / 7) - high ** (1 / 7))) ** 7
        segment[-1] = low
        for _ in range(interval.repeats):
            x = x + (s_noise * math.sqrt(high**2 - low**2)) * draw(restarts, x)
            restarts += 1
            for j in range(interval.steps):
                x = heun_to(x, float(segment[j]), float(segment[j + 1]))
    return x
