"""The Gaussian diffusion process: forward process, posterior, reverse-step parameters,
training losses and likelihood.

Notation follows Ho et al. (2020, "DDPM") and Nichol & Dhariwal (2021, "IDDPM"); every
equation is listed with its test in ``docs/maths.md``. Shapes: ``x0``, ``x_t`` and ``noise``
are (B, C, H, W) (any number of trailing dims works); ``t`` is a (B,) int64 tensor of
timesteps of THIS process, 0 .. T-1 (for a respaced process, ``model_timesteps(t)`` maps
them to the original indices that the model is called with). Coefficients are taken from
float64 tables and cast to the dtype of ``x_t``, so a float64 input gives a float64
computation end to end.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from difforge.errors import DifforgeError, check_number, kind_config_from_mapping
from difforge.schedule import SCHEDULE_NAMES, NoiseSchedule, RespacingSpec
from difforge.timestep_sampling import UniformTimestepSampler, make_timestep_sampler

Prediction = Literal["eps", "x0", "v"]
Variance = Literal["fixed_small", "fixed_large", "learned_range"]
LossType = Literal["mse", "l1", "huber", "hybrid", "vlb"]
PREDICTIONS: tuple[str, ...] = ("eps", "x0", "v")
VARIANCES: tuple[str, ...] = ("fixed_small", "fixed_large", "learned_range")
LOSSES: tuple[str, ...] = ("mse", "l1", "huber", "hybrid", "vlb")
MAX_TIMESTEPS = 100_000
"""The longest training chain accepted (IDDPM's longest is 4000)."""
CUSTOM_SCHEDULE = "custom"
"""`DiffusionConfig.schedule` of a run whose betas are given one by one."""

Denoiser = Callable[..., torch.Tensor]
"""``model(x_t, t_original, **model_kwargs) -> model_output``: (B, C, H, W), or (B, 2C, H, W)
for a learned-range variance (prediction first, then the variance interpolation v)."""


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the first: (B, ...) -> (B,)."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def _choice(value: str, allowed: tuple[str, ...], name: str) -> str:
    if value not in allowed:
        raise DifforgeError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
    return value


# --------------------------------------------------------------------------------------
# Noise of a loop of steps: from a generator, or given explicitly
# --------------------------------------------------------------------------------------

NoiseSource = Callable[[int, torch.Tensor], torch.Tensor]
"""``source(index, like) -> noise``: the standard normal noise of step ``index`` (the 0-based
step counter of a loop), shape, dtype and device of ``like``."""

StepNoise = NoiseSource | torch.Tensor
"""Explicit per-step noise for a loop of K steps: a `NoiseSource`, or a (K, *x.shape) tensor
whose slice ``index`` is the noise of step ``index``."""


def standard_normal_like(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """z ~ N(0, I) of x's shape and dtype, drawn on the generator's device and moved to x's
    (so a CPU generator gives the same numbers whatever device x lives on)."""
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def step_noise_source(
    step_noise: StepNoise | None,
    generator: torch.Generator | None,
    steps: int,
    like: torch.Tensor,
) -> NoiseSource:
    """The noise of each step of a K = ``steps`` step loop over tensors shaped like ``like``.

    Without ``step_noise``, every call draws `standard_normal_like` from ``generator``; with
    it, the draws are replaced exactly: a callable is called as ``step_noise(index, like)``,
    a (K, *like.shape) tensor gives its slice ``index``; either is cast to like's dtype and
    device. A loop asks only at the steps that use noise, in order, so recording the draws of
    a generator and passing them back reproduces its result bit for bit.
    """
    if step_noise is None:
        return lambda index, x: standard_normal_like(x, generator)
    if generator is not None:
        raise DifforgeError("pass either generator or step_noise, not both")
    if isinstance(step_noise, torch.Tensor):
        expected = (steps, *like.shape)
        if tuple(step_noise.shape) != expected:
            raise DifforgeError(
                f"step_noise must have shape {expected} (one slice per step), got {tuple(step_noise.shape)}"
            )
        table = step_noise
        return lambda index, x: table[index].to(device=x.device, dtype=x.dtype)
    if not callable(step_noise):
        kind = type(step_noise).__name__
        raise DifforgeError(f"step_noise must be a tensor or a callable (index, like) -> noise, got {kind}")
    source = step_noise

    def call(index: int, x: torch.Tensor) -> torch.Tensor:
        noise = source(index, x)
        if not isinstance(noise, torch.Tensor) or noise.shape != x.shape:
            got = tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__
            raise DifforgeError(
                f"step_noise({index}, x) must return a tensor of shape {tuple(x.shape)}, got {got}"
            )
        return noise.to(device=x.device, dtype=x.dtype)

    return call


# --------------------------------------------------------------------------------------
# Gaussian likelihood helpers (improved-diffusion's losses.py conventions)
# --------------------------------------------------------------------------------------


def normal_kl(
    mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor
) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats.

    KL = 1/2 (-1 + logvar2 - logvar1 + e^(logvar1 - logvar2) + (mean1 - mean2)^2 e^-logvar2).
    Arguments broadcast against each other.
    """
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Phi(x) ~ 1/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), the approximation DDPM and
    IDDPM use for the discretized decoder (kept so bits/dim match the published numbers)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor
) -> torch.Tensor:
    """log p(x) of 8-bit data x in [-1, 1] under N(means, e^(2 log_scales)) integrated over
    each pixel's bin of width 2/255 (DDPM section 3.3); the edge bins extend to +-infinity.
    Elementwise, in nats."""
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


# --------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DiffusionConfig:
    """Every setting of a `GaussianDiffusion`, serialisable to JSON.

    Attributes:
        schedule: named beta schedule (linear, cosine, quadratic, sigmoid).
        num_timesteps: T, the length of the training chain.
        prediction: what the network predicts: eps (noise), x0 (clean image) or v.
        variance: fixed_small (posterior beta~_t), fixed_large (beta_t) or learned_range.
        loss: mse, l1 or huber on the prediction target; hybrid = mse + vlb_weight * L_vlb;
            vlb = L_vlb alone.
        vlb_weight: lambda of the hybrid loss (IDDPM: 0.001).
        min_snr_gamma: if set, weight the simple loss by min(SNR, gamma) / SNR-ish
            (Hang et al. 2023), per the prediction type.
        huber_delta: the Huber loss's transition point.
        beta_start / beta_end: the endpoints of a linear, quadratic or sigmoid schedule
            (None: Ho et al.'s 1e-4 and 0.02, scaled by 1000 / T).
        betas: a custom schedule, T values in (0, 1), non-decreasing; then ``schedule`` is
            ``custom`` and ``num_timesteps`` is their number.

    ``kind`` names the process in a run's config.json (see `difforge.process`).
    """

    kind: ClassVar[str] = "gaussian"
    flag_help: ClassVar[dict[str, str]] = {
        "schedule": "beta schedule: linear, cosine, quadratic, sigmoid",
        "num_timesteps": "diffusion steps T (cold: degradation levels T)",
        "prediction": "what the network predicts: eps, x0 or v",
        "variance": "reverse-process variance: fixed_small, fixed_large or learned_range",
        "loss": "mse, l1, huber, hybrid (mse + lambda L_vlb, needed for learned_range) or vlb "
        "(cold: l1 or mse, on the restored x0)",
        "vlb_weight": "lambda of the hybrid loss",
        "min_snr_gamma": "min-SNR-gamma loss weighting (e.g. 5; default: off)",
        "huber_delta": "Huber loss transition point",
        "beta_start": "first beta of the linear, quadratic or sigmoid schedule (default: 1e-4 x 1000 / T)",
        "beta_end": "last beta of the linear, quadratic or sigmoid schedule (default: 0.02 x 1000 / T)",
    }
    """The ``difforge train`` help of each field that has a flag."""

    schedule: str = "linear"
    num_timesteps: int = 1000
    prediction: str = "eps"
    variance: str = "fixed_small"
    loss: str = "mse"
    vlb_weight: float = 0.001
    min_snr_gamma: float | None = None
    huber_delta: float = 1.0
    beta_start: float | None = None
    beta_end: float | None = None
    betas: list[float] | None = None

    def noise_schedule(self) -> NoiseSchedule:
        """The schedule these settings name; a bad one is a one-line DifforgeError."""
        check_number("--timesteps", self.num_timesteps, low=1, high=MAX_TIMESTEPS, integer=True)
        if self.betas is None:
            _choice(self.schedule, SCHEDULE_NAMES, "schedule")
            return NoiseSchedule.named(self.schedule, self.num_timesteps, self.beta_start, self.beta_end)
        if self.schedule != CUSTOM_SCHEDULE or self.beta_start is not None or self.beta_end is not None:
            raise DifforgeError(
                f"custom betas go with schedule {CUSTOM_SCHEDULE!r} and no endpoints; got schedule "
                f"{self.schedule!r}"
            )
        if not isinstance(self.betas, (list, tuple)) or len(self.betas) != self.num_timesteps:
            count = len(self.betas) if isinstance(self.betas, (list, tuple)) else "no list of"
            raise DifforgeError(f"the custom schedule has {count} betas for {self.num_timesteps} timesteps")
        return NoiseSchedule(self.betas)

    def build(self) -> GaussianDiffusion:
        """The process; a bad setting is a one-line DifforgeError naming its flag."""
        schedule = self.noise_schedule()
        check_number("--vlb-weight", self.vlb_weight, low=0)
        check_number("--huber-delta", self.huber_delta, low=0, low_open=True)
        if self.min_snr_gamma is not None:
            check_number("--min-snr-gamma", self.min_snr_gamma, low=0, low_open=True)
        return GaussianDiffusion(
            schedule,
            prediction=self.prediction,  # type: ignore[arg-type]
            variance=self.variance,  # type: ignore[arg-type]
            loss=self.loss,  # type: ignore[arg-type]
            vlb_weight=self.vlb_weight,
            min_snr_gamma=self.min_snr_gamma,
            huber_delta=self.huber_delta,
        )

    def model_settings(self) -> dict[str, Any]:
        """What the network must be built with for this process: 2C outputs for learned_range."""
        return {"learn_sigma": self.variance == "learned_range"}

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **asdict(self)}

    def describe(self) -> dict[str, Any]:
        """The settings ``difforge info`` shows: unset ones left out, custom betas summarised."""
        shown = {k: v for k, v in asdict(self).items() if v is not None}
        if self.betas:
            shown["betas"] = f"{len(self.betas)} values, {self.betas[0]:.3g} .. {self.betas[-1]:.3g}"
        return shown

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DiffusionConfig:
        return kind_config_from_mapping(cls, data, "diffusion setting(s)")

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


class PMeanVariance(NamedTuple):
    """Parameters of the reverse step p(x_{t-1} | x_t) = N(mean, variance), shapes of x_t
    (variance and log_variance broadcast against it), and the x0 it implies."""

    mean: torch.Tensor
    variance: torch.Tensor
    log_variance: torch.Tensor
    pred_x0: torch.Tensor


# --------------------------------------------------------------------------------------
# The process
# --------------------------------------------------------------------------------------


class GaussianDiffusion:
    """A discrete Gaussian diffusion process over a `NoiseSchedule`.

    Args:
        schedule: the (possibly respaced) noise schedule, T steps.
        prediction: ``eps``, ``x0`` or ``v`` — the target the network is trained to output.
        variance: ``fixed_small`` (beta~_t, the posterior variance), ``fixed_large``
            (beta_t, with beta~_1 at t = 0 as in IDDPM) or ``learned_range`` (the network
            emits 2C channels; the second half v in [-1, 1] interpolates log beta_t and
            log beta~_t, IDDPM eq. 15).
        loss: see `DiffusionConfig`; None (the default) picks the variance's default:
            ``mse`` for the fixed variances; none for ``learned_range``, whose training
            loss must be named (``hybrid`` or ``vlb``). A process without a loss samples
            and computes likelihoods; only `training_losses` refuses it.

    Implements `difforge.process.Process` (kind ``gaussian``).
    """

    kind: ClassVar[str] = "gaussian"
    default_sampler: ClassVar[str] = "dpmpp_2m_sde"
    """Chosen by ``bench/quality.py`` (docs/benchmarks.md, "Time to quality"): on the default
    MNIST run, 20 steps of DPM-Solver++(2M) SDE give FID 24.7 against the ODE solver's 54.7."""

    def __init__(
        self,
        schedule: NoiseSchedule,
        *,
        prediction: Prediction = "eps",
        variance: Variance = "fixed_small",
        loss: LossType | None = None,
        vlb_weight: float = 0.001,
        min_snr_gamma: float | None = None,
        huber_delta: float = 1.0,
    ) -> None:
        if not isinstance(schedule, NoiseSchedule):
            raise DifforgeError(
                f"schedule must be a NoiseSchedule, got {type(schedule).__name__}; "
                "use NoiseSchedule.named('linear', 1000) or NoiseSchedule(betas)"
            )
        self.schedule = schedule
        self.num_timesteps = schedule.num_steps
        self.prediction = _choice(prediction, PREDICTIONS, "prediction")
        self.variance = _choice(variance, VARIANCES, "variance")
        if loss is None and self.variance != "learned_range":
            loss = "mse"
        self.loss_type: str | None = None if loss is None else _choice(loss, LOSSES, "loss")
        if self.variance == "learned_range" and self.loss_type not in (None, "hybrid", "vlb"):
            raise DifforgeError(
                f"variance 'learned_range' is trained by the variational bound: use loss 'hybrid' "
                f"or 'vlb', not {loss!r}"
            )
        if vlb_weight < 0 or not math.isfinite(vlb_weight):
            raise DifforgeError(f"vlb_weight must be a finite number >= 0, got {vlb_weight!r}")
        if min_snr_gamma is not None and not min_snr_gamma > 0:
            raise DifforgeError(f"min_snr_gamma must be > 0 or None, got {min_snr_gamma!r}")
        if not huber_delta > 0:
            raise DifforgeError(f"huber_delta must be > 0, got {huber_delta!r}")
        self.vlb_weight = float(vlb_weight)
        self.min_snr_gamma = min_snr_gamma
        self.huber_delta = float(huber_delta)
        s = schedule
        self._tables: dict[str, np.ndarray] = {
            "betas": s.betas,
            "alphas_cumprod": s.alphas_cumprod,
            "alphas_cumprod_prev": s.alphas_cumprod_prev,
            "sqrt_alphas_cumprod": s.sqrt_alphas_cumprod,
            "sqrt_one_minus_alphas_cumprod": s.sqrt_one_minus_alphas_cumprod,
            "log_one_minus_alphas_cumprod": s.log_one_minus_alphas_cumprod,
            "sqrt_recip_alphas_cumprod": s.sqrt_recip_alphas_cumprod,
            "sqrt_recipm1_alphas_cumprod": s.sqrt_recipm1_alphas_cumprod,
            "posterior_variance": s.posterior_variance,
            "posterior_log_variance_clipped": s.posterior_log_variance_clipped,
            "posterior_mean_coef1": s.posterior_mean_coef1,
            "posterior_mean_coef2": s.posterior_mean_coef2,
            "log_betas": np.log(s.betas),
            "snr": s.snr,
            # fixed_large: beta_t, but beta~_1 at t = 0 for a better decoder NLL (IDDPM)
            "large_variance": np.append(s.posterior_variance[1:2], s.betas[1:])
            if s.num_steps > 1
            else s.betas,
        }
        self._tables["large_log_variance"] = np.log(self._tables["large_variance"])
        self._cache: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = {}
        self._timestep_map_cache: dict[torch.device, torch.Tensor] = {}

    # ---- bookkeeping ---------------------------------------------------------------

    def timestep_sampler(self, name: str) -> UniformTimestepSampler:
        """The sampler of training timesteps ``name`` (uniform, importance, lognormal) over this chain."""
        return make_timestep_sampler(name, self.num_timesteps, self.schedule.sigmas)

    def settings(self) -> dict[str, Any]:
        """The constructor keywords (not the schedule), to build a sibling process."""
        return {
            "prediction": self.prediction,
            "variance": self.variance,
            "loss": self.loss_type,
            "vlb_weight": self.vlb_weight,
            "min_snr_gamma": self.min_snr_gamma,
            "huber_delta": self.huber_delta,
        }

    def respaced(self, spec: RespacingSpec | np.ndarray) -> GaussianDiffusion:
        """The same process on a respaced schedule (see `NoiseSchedule.respace`)."""
        schedule, _ = self.schedule.respace(spec)
        return GaussianDiffusion(schedule, **self.settings())

    def _table(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """table[t] as (B, 1, ..., 1) in like's dtype and device, for broadcasting."""
        key = (name, like.device, like.dtype)
        table = self._cache.get(key)
        if table is None:
            table = torch.from_numpy(self._tables[name]).to(device=like.device, dtype=like.dtype)
            self._cache[key] = table
        return table[t.to(like.device)].reshape(-1, *([1] * (like.ndim - 1)))

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) original timestep indices for the model, from this process's t."""
        table = self._timestep_map_cache.get(t.device)
        if table is None:
            table = torch.from_numpy(self.schedule.timestep_map).to(t.device)
            self._timestep_map_cache[t.device] = table
        return table[t]

    def _check_t(self, t: torch.Tensor, batch: int) -> None:
        if t.ndim != 1 or t.shape[0] != batch:
            raise DifforgeError(f"t must have shape ({batch},), got {tuple(t.shape)}")

    # ---- forward process -------------------------------------------------------------

    def q_mean_variance(
        self, x0: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q(x_t | x_0) = N(sqrt(alpha_bar_t) x0, (1 - alpha_bar_t) I)   (DDPM eq. 4).

        Returns (mean, variance, log_variance); mean has x0's shape, the others (B, 1, ...)."""
        mean = self._table("sqrt_alphas_cumprod", t, x0) * x0
        variance = 1.0 - self._table("alphas_cumprod", t, x0)
        log_variance = self._table("log_one_minus_alphas_cumprod", t, x0)
        return mean, variance, log_variance

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise   (DDPM eq. 4), shape of x0."""
        if noise is None:
            noise = torch.randn_like(x0)
        if noise.shape != x0.shape:
            raise DifforgeError(f"noise shape {tuple(noise.shape)} != x0 shape {tuple(x0.shape)}")
        self._check_t(t, x0.shape[0])
        return (
            self._table("sqrt_alphas_cumprod", t, x0) * x0
            + self._table("sqrt_one_minus_alphas_cumprod", t, x0) * noise
        )

    def q_posterior(
        self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q(x_{t-1} | x_t, x_0) = N(mu~_t, beta~_t I)   (DDPM eq. 6-7).

        mu~_t = coef1_t x0 + coef2_t x_t. Returns (mean, variance, log_variance_clipped)."""
        if x0.shape != x_t.shape:
            raise DifforgeError(f"x0 shape {tuple(x0.shape)} != x_t shape {tuple(x_t.shape)}")
        mean = (
            self._table("posterior_mean_coef1", t, x_t) * x0
            + self._table("posterior_mean_coef2", t, x_t) * x_t
        )
        variance = self._table("posterior_variance", t, x_t)
        log_variance = self._table("posterior_log_variance_clipped", t, x_t)
        return mean, variance, log_variance

    # ---- conversions between parameterisations ------------------------------------------

    def x0_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)   (DDPM eq. 4 solved for x0)."""
        return (
            self._table("sqrt_recip_alphas_cumprod", t, x_t) * x_t
            - self._table("sqrt_recipm1_alphas_cumprod", t, x_t) * eps
        )

    def eps_from_x0(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """eps = (x_t / sqrt(alpha_bar_t) - x0) / sqrt(1 / alpha_bar_t - 1)."""
        return (self._table("sqrt_recip_alphas_cumprod", t, x_t) * x_t - x0) / self._table(
            "sqrt_recipm1_alphas_cumprod", t, x_t
        )

    def x0_from_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """x0 = sqrt(alpha_bar_t) x_t - sqrt(1 - alpha_bar_t) v   (Salimans & Ho 2022, sec. 4)."""
        return (
            self._table("sqrt_alphas_cumprod", t, x_t) * x_t
            - self._table("sqrt_one_minus_alphas_cumprod", t, x_t) * v
        )

    def v_target(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x0   (Salimans & Ho 2022, eq. 9...)."""
        return (
            self._table("sqrt_alphas_cumprod", t, x0) * eps
            - self._table("sqrt_one_minus_alphas_cumprod", t, x0) * x0
        )

    def pred_x0(self, prediction: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x0 implied by a network prediction of this process's type (C channels)."""
        if self.prediction == "eps":
            return self.x0_from_eps(x_t, t, prediction)
        if self.prediction == "v":
            return self.x0_from_v(x_t, t, prediction)
        return prediction

    def training_target(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """What the network should output at (x_t, t): eps, x0 or v."""
        if self.prediction == "eps":
            return noise
        if self.prediction == "v":
            return self.v_target(x0, t, noise)
        return x0

    def split_output(
        self, model_output: torch.Tensor, x_t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(prediction, variance values or None) from a model output of C or 2C channels."""
        channels = x_t.shape[1]
        if self.variance == "learned_range":
            if model_output.shape[1] != 2 * channels or model_output.shape[2:] != x_t.shape[2:]:
                raise DifforgeError(
                    f"a learned_range model must output {2 * channels} channels "
                    f"(prediction, then variance) of x_t's size; got {tuple(model_output.shape)}"
                )
            return model_output[:, :channels], model_output[:, channels:]
        if model_output.shape != x_t.shape:
            raise DifforgeError(
                f"model output shape {tuple(model_output.shape)} != x_t shape {tuple(x_t.shape)} "
                f"(variance {self.variance!r} expects {channels} channels)"
            )
        return model_output, None

    # ---- reverse process -----------------------------------------------------------------

    def log_variance(
        self, variance_values: torch.Tensor | None, x_t: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """log Sigma of p(x_{t-1} | x_t): learned, v' log beta_t + (1 - v') log beta~_t with
        v' = (v + 1) / 2 (IDDPM eq. 15) from ``variance_values`` (the second half of a
        learned_range network's channels, (B, C, ...)); or the fixed log beta~_t (fixed_small)
        or log beta_t (fixed_large), broadcast against x_t."""
        if variance_values is not None:
            min_log = self._table("posterior_log_variance_clipped", t, x_t)
            max_log = self._table("log_betas", t, x_t)
            fraction = (variance_values + 1.0) / 2.0
            return fraction * max_log + (1.0 - fraction) * min_log
        if self.variance == "fixed_large":
            return self._table("large_log_variance", t, x_t)
        return self._table("posterior_log_variance_clipped", t, x_t)

    def p_mean_variance(
        self,
        model_output: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        *,
        clip_denoised: bool = False,
        dynamic_threshold: float | None = None,
        denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> PMeanVariance:
        """p(x_{t-1} | x_t) from the network output at (x_t, t).

        The mean is the posterior mean at the predicted x0 (DDPM eq. 7 with x0 = x0_hat);
        the variance is fixed or learned (IDDPM eq. 15:
        Sigma = exp(v' log beta_t + (1 - v') log beta~_t), v' = (v + 1) / 2).

        Args:
            model_output: (B, C, ...) or (B, 2C, ...) for learned_range.
            clip_denoised: clamp the predicted x0 to [-1, 1] before the mean.
            dynamic_threshold: Imagen's dynamic thresholding (Saharia et al. 2022): with
                percentile p, s = max(1, quantile_p(|x0|)) per sample, x0 <- clamp(x0, -s, s) / s.
            denoised_fn: any map applied to x0 BEFORE the clipping (improved-diffusion's order).
        """
        self._check_t(t, x_t.shape[0])
        prediction, variance_values = self.split_output(model_output, x_t)
        log_variance = self.log_variance(variance_values, x_t, t)
        if variance_values is not None:
            variance = torch.exp(log_variance)
        elif self.variance == "fixed_large":
            variance = self._table("large_variance", t, x_t)
        else:
            variance = self._table("posterior_variance", t, x_t)
        x0 = self.denoise(prediction, x_t, t, clip_denoised, dynamic_threshold, denoised_fn)
        mean, _, _ = self.q_posterior(x0, x_t, t)
        return PMeanVariance(mean, variance, log_variance, x0)

    def denoise(
        self,
        prediction: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = False,
        dynamic_threshold: float | None = None,
        denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Predicted x0 from a (C-channel) prediction, with the optional clipping rules."""
        x0 = self.pred_x0(prediction, x_t, t)
        if denoised_fn is not None:
            x0 = denoised_fn(x0)
        if dynamic_threshold is not None:
            x0 = dynamic_thresholding(x0, dynamic_threshold)
        elif clip_denoised:
            x0 = x0.clamp(-1.0, 1.0)
        return x0

    # ---- likelihood ----------------------------------------------------------------------

    def vb_terms_bpd(
        self,
        model_output: torch.Tensor,
        x0: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        *,
        clip_denoised: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One term of the variational bound, in bits per dimension: (B,) and the pred x0.

        L_t = KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) for t > 0 and the discretized
        Gaussian decoder NLL L_0 = -log p(x0 | x_1) for t = 0 (DDPM eq. 5; IDDPM eq. 4-5),
        averaged over dimensions and divided by log 2.
        """
        true_mean, _, true_log_variance = self.q_posterior(x0, x_t, t)
        out = self.p_mean_variance(model_output, x_t, t, clip_denoised=clip_denoised)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out.mean, out.log_variance))
        decoder_nll = -mean_flat(
            discretized_gaussian_log_likelihood(
                x0, means=out.mean, log_scales=0.5 * out.log_variance.expand_as(x0)
            )
        )
        return torch.where(t == 0, decoder_nll, kl) / math.log(2.0), out.pred_x0

    def prior_bpd(self, x0: torch.Tensor) -> torch.Tensor:
        """KL(q(x_{T-1} | x0) || N(0, I)) in bits per dimension, (B,) (DDPM eq. 5, L_T).

        Not trainable; near zero for a well-designed schedule."""
        t = torch.full((x0.shape[0],), self.num_timesteps - 1, dtype=torch.long, device=x0.device)
        mean, _, log_variance = self.q_mean_variance(x0, t)
        zero = torch.zeros((), dtype=x0.dtype, device=x0.device)
        return mean_flat(normal_kl(mean, log_variance, zero, zero)) / math.log(2.0)

    @torch.no_grad()
    def calc_bpd_loop(
        self,
        model: Denoiser,
        x0: torch.Tensor,
        *,
        clip_denoised: bool = True,
        model_kwargs: Mapping[str, Any] | None = None,
        generator: torch.Generator | None = None,
        step_noise: StepNoise | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The full variational bound of x0, in bits per dimension.

        Returns ``total_bpd`` (B,) = sum_t L_t + L_T, ``prior_bpd`` (B,), and per-timestep
        (B, T) tensors indexed by t (column t is timestep t of this process): ``vb`` (L_t),
        ``xstart_mse`` (mean squared error of the predicted x0) and ``mse`` (of the implied eps).
        On a respaced process this is an upper bound of a shorter chain: a faster, different
        estimate, not the T-step NLL.

        Unlike improved-diffusion: its ``calc_bpd_loop`` appends t = T-1, ..., 0 and stacks the
        lists as they are, so ITS column j is timestep T-1-j (column 0 is t = T-1); ours is its
        ``.flip(1)`` (ours[:, t] = theirs[:, T-1-t]); ``total_bpd`` and ``prior_bpd`` are the same.

        The loop runs t = T-1 .. 0 and draws one x_t = q_sample(x0, t, noise) per step, the noise
        from ``generator``, or exactly ``step_noise`` (see `step_noise_source`): step ``index``
        is timestep t = T-1-index, so a (T, *x0.shape) tensor holds t = T-1 in slice 0.
        """
        model_kwargs = dict(model_kwargs or {})
        batch = x0.shape[0]
        draw = step_noise_source(step_noise, generator, self.num_timesteps, x0)
        vb, xstart_mse, eps_mse = [], [], []
        for step, index in enumerate(reversed(range(self.num_timesteps))):
            t = torch.full((batch,), index, dtype=torch.long, device=x0.device)
            noise = draw(step, x0)
            x_t = self.q_sample(x0, t, noise)
            output = model(x_t, self.model_timesteps(t), **model_kwargs)
            terms, pred_x0 = self.vb_terms_bpd(output, x0, x_t, t, clip_denoised=clip_denoised)
            vb.append(terms)
            xstart_mse.append(mean_flat((pred_x0 - x0) ** 2))
            eps_mse.append(mean_flat((self.eps_from_x0(x_t, t, pred_x0) - noise) ** 2))
            if progress is not None:
                progress(step + 1, self.num_timesteps)
        per_t = {
            name: torch.stack(values[::-1], dim=1)
            for name, values in (("vb", vb), ("xstart_mse", xstart_mse), ("mse", eps_mse))
        }
        prior = self.prior_bpd(x0)
        return {"total_bpd": per_t["vb"].sum(dim=1) + prior, "prior_bpd": prior, **per_t}

    # ---- training ------------------------------------------------------------------------

    def snr_weight(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Min-SNR-gamma weight of the simple loss (Hang et al. 2023), (B,).

        With SNR_t = alpha_bar_t / (1 - alpha_bar_t): min(SNR, gamma) / SNR for eps,
        min(SNR, gamma) for x0, min(SNR, gamma) / (SNR + 1) for v — each equals
        min(SNR, gamma) in x0-space."""
        snr = self._table("snr", t, like).reshape(-1)
        clipped = snr.clamp(max=float(self.min_snr_gamma))  # type: ignore[arg-type]
        if self.prediction == "eps":
            return clipped / snr
        if self.prediction == "v":
            return clipped / (snr + 1.0)
        return clipped

    def training_losses(
        self,
        model: Denoiser,
        x0: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor | None = None,
        model_kwargs: Mapping[str, Any] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-example training losses at timesteps t: a dict of (B,) tensors.

        - ``mse``: mean squared error of the prediction against its target (eps, x0 or v);
        - ``vb``: L_t in bits/dim with the mean's gradient stopped (only the variance learns
          from it, IDDPM section 3.1); present for every variance type;
        - ``loss``: what to minimise —
          mse | l1 | huber: the simple term (times the min-SNR weight if set);
          hybrid: simple + vlb_weight * T * vb  (= IDDPM's RESCALED_MSE at vlb_weight = 0.001);
          vlb: T * vb with gradients through the mean too (IDDPM's RESCALED_KL).

        Unlike improved-diffusion, ``vb`` is always the unscaled term L_t: improved-diffusion
        scales inside its loss, so its ``vb`` is L_t T / 1000 under RESCALED_MSE (its
        ``loss`` = mse + vb equals our hybrid ``loss``), and its RESCALED_KL ``loss`` is T L_t
        (as ours for vlb), with no ``vb`` entry at all.

        A process built without a loss (``loss=None`` with ``learned_range``) raises a
        `DifforgeError`.
        """
        if self.loss_type is None:
            raise DifforgeError(
                "this learned_range process has no training loss (loss=None): "
                "build it with loss 'hybrid' or 'vlb' to train it"
            )
        if noise is None:
            noise = torch.randn_like(x0)
        x_t = self.q_sample(x0, t, noise)
        output = model(x_t, self.model_timesteps(t), **dict(model_kwargs or {}))
        prediction, variance_values = self.split_output(output, x_t)
        target = self.training_target(x0, t, noise)
        terms: dict[str, torch.Tensor] = {"mse": mean_flat((target - prediction) ** 2)}

        if self.loss_type == "vlb":
            vb, _ = self.vb_terms_bpd(output, x0, x_t, t, clip_denoised=False)
            terms["vb"] = vb
            terms["loss"] = vb * self.num_timesteps
            return terms

        frozen = prediction.detach()
        if variance_values is not None:
            frozen = torch.cat([frozen, variance_values], dim=1)
        vb, _ = self.vb_terms_bpd(frozen, x0, x_t, t, clip_denoised=False)
        terms["vb"] = vb if variance_values is not None else vb.detach()

        if self.loss_type == "l1":
            simple = mean_flat((target - prediction).abs())
        elif self.loss_type == "huber":
            simple = mean_flat(F.huber_loss(prediction, target, reduction="none", delta=self.huber_delta))
        else:
            simple = terms["mse"]
        if self.min_snr_gamma is not None:
            simple = simple * self.snr_weight(t, simple)
        loss = simple
        if self.loss_type == "hybrid":
            loss = loss + self.vlb_weight * self.num_timesteps * terms["vb"]
        terms["loss"] = loss
        return terms


def dynamic_thresholding(x0: torch.Tensor, percentile: float) -> torch.Tensor:
    """Imagen's dynamic thresholding (Saharia et al. 2022, sec. 2.3), shape of x0.

    s = max(1, quantile(|x0|, percentile)) per sample; returns clamp(x0, -s, s) / s."""
    if not 0.0 < percentile <= 1.0:
        raise DifforgeError(f"dynamic_threshold must be a percentile in (0, 1], got {percentile!r}")
    flat = x0.reshape(x0.shape[0], -1).abs()
    s = torch.quantile(flat.float(), percentile, dim=1).to(x0.dtype).clamp(min=1.0)
    s = s.reshape(-1, *([1] * (x0.ndim - 1)))
    return torch.maximum(torch.minimum(x0, s), -s) / s
