"""Noise schedules of the discrete Gaussian diffusion process.

A schedule is the sequence of variances ``beta_t`` of the forward chain

    q(x_t | x_{t-1}) = N(x_t; sqrt(1 - beta_t) x_{t-1}, beta_t I),     t = 0 .. T-1

(improved-diffusion's convention: t is 0-indexed and ``t = 0`` is already one noising
step, so ``alphas_cumprod[0] = 1 - beta_0``). Every derived quantity is computed once, in
float64 NumPy, and named as in Ho et al. (2020) and Nichol & Dhariwal (2021); the
equation numbers are in ``docs/maths.md``.

Respacing (Nichol & Dhariwal 2021, section 4) keeps K of the T steps: the kept steps
define a new, shorter chain with the same ``alphas_cumprod`` at the kept indices, and a
``timestep_map`` from the new indices back to the original ones (the model is always
called with original indices).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np

from difforge.errors import DifforgeError

ScheduleName = Literal["linear", "cosine", "quadratic", "sigmoid"]
SCHEDULE_NAMES: tuple[str, ...] = ("linear", "cosine", "quadratic", "sigmoid")
ENDPOINT_SCHEDULES: tuple[str, ...] = ("linear", "quadratic", "sigmoid")
"""The named schedules that run between two endpoints, beta_start and beta_end."""

RespacingSpec = str | int | Sequence[int]


def default_linear_endpoints(num_steps: int) -> tuple[float, float]:
    """Ho et al.'s 1e-4 .. 0.02 for T = 1000, scaled by 1000 / T (improved DDPM)."""
    scale = 1000.0 / num_steps
    return scale * 0.0001, scale * 0.02


def _check_endpoints(beta_start: float, beta_end: float) -> None:
    for flag, value in (("--beta-start", beta_start), ("--beta-end", beta_end)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
            raise DifforgeError(f"{flag} must be a number in (0, 1), got {value!r}")
    if not beta_start < beta_end:
        raise DifforgeError(
            f"--beta-start {beta_start:g} must be below --beta-end {beta_end:g} (noise grows with t)"
        )


def cosine_alpha_bar(t: np.ndarray | float, s: float = 0.008) -> np.ndarray | float:
    """alpha_bar(t) = cos^2(((t + s) / (1 + s)) * pi / 2) for t in [0, 1] (Nichol & Dhariwal eq. 17).

    Not normalised by alpha_bar(0): the betas below only use ratios of it.
    """
    return np.cos((np.asarray(t) + s) / (1 + s) * math.pi / 2) ** 2


def betas_from_alpha_bar(
    alpha_bar: Callable[[np.ndarray], np.ndarray], num_steps: int, max_beta: float = 0.999
) -> np.ndarray:
    """beta_i = min(1 - alpha_bar((i+1)/T) / alpha_bar(i/T), max_beta), i = 0 .. T-1 (eq. 17-18)."""
    i = np.arange(num_steps, dtype=np.float64)
    betas = 1.0 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps)
    return np.minimum(betas, max_beta)


def named_betas(
    name: str, num_steps: int, beta_start: float | None = None, beta_end: float | None = None
) -> np.ndarray:
    """The (T,) float64 betas of a named schedule.

    ``beta_start`` / ``beta_end`` replace the endpoints of the linear, quadratic and sigmoid
    schedules (None: Ho et al.'s, scaled by 1000 / T); both must lie in (0, 1), start < end.

    - ``linear``: Ho et al. (2020), 1e-4 .. 0.02 at T = 1000, endpoints scaled by 1000/T.
    - ``cosine``: Nichol & Dhariwal (2021) eq. 17, s = 0.008, each beta clipped at 0.999.
    - ``quadratic``: linear in sqrt(beta) between the linear schedule's endpoints, squared
      (the ``quad`` schedule of Ho et al.'s code).
    - ``sigmoid``: the linear endpoints joined by a logistic curve over [-6, 6]
      (Ho et al.'s code; also GeoDiff, Xu et al. 2022).
    """
    if not isinstance(num_steps, (int, np.integer)) or isinstance(num_steps, bool) or num_steps < 1:
        raise DifforgeError(f"num_steps must be a positive integer, got {num_steps!r}")
    num_steps = int(num_steps)
    if (beta_start is not None or beta_end is not None) and name not in ENDPOINT_SCHEDULES:
        raise DifforgeError(
            f"--beta-start / --beta-end set the endpoints of the {', '.join(ENDPOINT_SCHEDULES)} "
            f"schedules; the {name} schedule has none"
        )
    default_start, default_end = default_linear_endpoints(num_steps)
    given = beta_start is not None or beta_end is not None
    beta_start = default_start if beta_start is None else beta_start
    beta_end = default_end if beta_end is None else beta_end
    if given:
        _check_endpoints(beta_start, beta_end)
    if name in ENDPOINT_SCHEDULES and beta_end >= 1.0:
        raise DifforgeError(
            f"the {name} schedule needs num_steps >= 21 (its last beta, 0.02 * 1000 / num_steps, "
            f"must be < 1); got num_steps={num_steps}: use more steps or the cosine schedule"
        )
    if name == "linear":
        return np.linspace(beta_start, beta_end, num_steps, dtype=np.float64)
    if name == "cosine":
        return betas_from_alpha_bar(cosine_alpha_bar, num_steps)
    if name == "quadratic":
        return np.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=np.float64) ** 2
    if name == "sigmoid":
        x = np.linspace(-6.0, 6.0, num_steps, dtype=np.float64)
        return 1.0 / (1.0 + np.exp(-x)) * (beta_end - beta_start) + beta_start
    raise DifforgeError(
        f"unknown schedule name {name!r}: expected one of {', '.join(SCHEDULE_NAMES)} "
        "(or pass your own betas to NoiseSchedule(betas))"
    )


def respaced_timesteps(num_steps: int, spec: RespacingSpec) -> list[int]:
    """The sorted original indices kept by a respacing ``spec`` of a T-step chain.

    Same kept steps as improved-diffusion's ``space_timesteps`` for the same spec:

    - ``"ddimK"``: the stride-s grid ``range(0, T, s)`` for the first stride s giving
      exactly K steps (DDIM's even spacing);
    - ``"K"``, ``"10,15,20"`` or ``[10, 15, 20]``: the chain is cut into as many equal
      sections as there are numbers (the first ``T % n`` one step longer) and each section
      keeps that many steps, evenly spread from its first to its last index, rounded
      (half to even, as Python's ``round``).
    """
    if isinstance(spec, str):
        text = spec.strip()
        if text.startswith("ddim"):
            try:
                desired = int(text[len("ddim") :])
            except ValueError:
                raise DifforgeError(
                    f"respacing spec {spec!r}: 'ddim' must be followed by a step count, e.g. 'ddim50'"
                ) from None
            if desired < 1:
                raise DifforgeError(f"respacing spec {spec!r}: the step count must be >= 1")
            for stride in range(1, num_steps):
                if len(range(0, num_steps, stride)) == desired:
                    return list(range(0, num_steps, stride))
            if desired == num_steps:
                return list(range(num_steps))
            raise DifforgeError(
                f"respacing spec {spec!r}: no even stride of the {num_steps}-step schedule "
                f"gives exactly {desired} steps; use a section count such as '{desired}' instead"
            )
        try:
            sections = [int(part) for part in text.split(",")]
        except ValueError:
            raise DifforgeError(
                f"respacing spec {spec!r}: expected 'ddimK', a step count such as '50', "
                "or comma-separated section counts such as '10,15,20'"
            ) from None
    elif isinstance(spec, (int, np.integer)) and not isinstance(spec, bool):
        sections = [int(spec)]
    elif (
        isinstance(spec, Sequence)
        and spec
        and all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in spec)
    ):
        sections = [int(s) for s in spec]
    else:
        raise DifforgeError(f"respacing spec {spec!r}: expected 'ddimK', an int, or a list of section counts")
    if any(count < 0 for count in sections) or sum(sections) < 1:
        raise DifforgeError(f"respacing spec {spec!r}: section counts must be >= 0 and sum to >= 1")

    size_per_section, extra = divmod(num_steps, len(sections))
    kept: list[int] = []
    start = 0
    for i, count in enumerate(sections):
        size = size_per_section + (1 if i < extra else 0)
        if size < count:
            raise DifforgeError(
                f"respacing spec {spec!r}: section {i} has {size} of the {num_steps} steps "
                f"but asks for {count}; ask for at most {size} there or fewer sections"
            )
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0
        for _ in range(count):
            kept.append(start + round(position))
            position += stride
        start += size
    return sorted(set(kept))


class NoiseSchedule:
    """The betas of a T-step forward chain and every quantity derived from them.

    Args:
        betas: (T,) variances, each in (0, 1). A user schedule must be non-decreasing
            (noise grows with t); a respaced one (given with its ``timestep_map``) need not be.
        timestep_map: (T,) original timestep index of each step; identity when None.

    All attributes are float64 NumPy arrays of shape (T,), indexed by t = 0 .. T-1:

    - ``betas``                       beta_t
    - ``alphas``                      alpha_t = 1 - beta_t
    - ``alphas_cumprod``              alpha_bar_t = prod_{s <= t} alpha_s          (Ho eq. 4)
    - ``alphas_cumprod_prev``         alpha_bar_{t-1}, with alpha_bar_{-1} = 1
    - ``alphas_cumprod_next``         alpha_bar_{t+1}, with alpha_bar_T = 0
    - ``sqrt_alphas_cumprod``, ``sqrt_one_minus_alphas_cumprod``, ``log_one_minus_alphas_cumprod``
    - ``sqrt_recip_alphas_cumprod``   1 / sqrt(alpha_bar_t)
    - ``sqrt_recipm1_alphas_cumprod`` sqrt(1 / alpha_bar_t - 1)
    - ``posterior_variance``          beta~_t = beta_t (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t)  (Ho eq. 7)
    - ``posterior_log_variance_clipped``  log beta~_t with beta~_0 (= 0) replaced by beta~_1
    - ``posterior_mean_coef1``        beta_t sqrt(alpha_bar_{t-1}) / (1 - alpha_bar_t)      (Ho eq. 7)
    - ``posterior_mean_coef2``        (1 - alpha_bar_{t-1}) sqrt(alpha_t) / (1 - alpha_bar_t)
    - ``snr``                         alpha_bar_t / (1 - alpha_bar_t)
    - ``sigmas``                      sqrt((1 - alpha_bar_t) / alpha_bar_t) = 1 / sqrt(snr), the
                                      noise level of the equivalent variance-exploding process
    """

    def __init__(
        self, betas: Sequence[float] | np.ndarray, *, timestep_map: Sequence[int] | None = None
    ) -> None:
        betas = self._validated_betas(betas, must_be_monotone=timestep_map is None)
        num_steps = len(betas)
        if timestep_map is None:
            timestep_map = np.arange(num_steps, dtype=np.int64)
        timestep_map = np.asarray(timestep_map, dtype=np.int64)
        if timestep_map.shape != (num_steps,) or np.any(np.diff(timestep_map) <= 0):
            raise DifforgeError(
                f"timestep_map must be {num_steps} strictly increasing indices, "
                f"got shape {timestep_map.shape}"
            )
        self.num_steps = num_steps
        self.timestep_map = timestep_map
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(self.alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1.0)
        one_minus_prev = 1.0 - self.alphas_cumprod_prev
        one_minus = 1.0 - self.alphas_cumprod
        self.posterior_variance = betas * one_minus_prev / one_minus
        # beta~_0 = 0; its log is clipped to beta~_1 (improved-diffusion). With T = 1 there
        # is no beta~_1 and the t = 0 posterior is never used as a Gaussian.
        first = self.posterior_variance[1] if num_steps > 1 else betas[0]
        self.posterior_log_variance_clipped = np.log(np.append(first, self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / one_minus
        self.posterior_mean_coef2 = one_minus_prev * np.sqrt(self.alphas) / one_minus
        self.snr = self.alphas_cumprod / one_minus
        self.sigmas = np.sqrt(one_minus / self.alphas_cumprod)

    @staticmethod
    def _validated_betas(betas: Sequence[float] | np.ndarray, must_be_monotone: bool) -> np.ndarray:
        try:
            array = np.array(betas, dtype=np.float64)
        except (TypeError, ValueError):
            raise DifforgeError(f"betas must be a 1-D array of numbers, got {type(betas).__name__}") from None
        if array.ndim != 1 or array.size == 0:
            raise DifforgeError(f"betas must be a non-empty 1-D array, got shape {array.shape}")
        if not np.all(np.isfinite(array)) or np.any(array <= 0.0) or np.any(array >= 1.0):
            bad = int(np.flatnonzero(~((array > 0) & (array < 1)))[0])
            raise DifforgeError(
                f"betas must lie in the open interval (0, 1); betas[{bad}] = {float(array[bad])!r}"
            )
        if must_be_monotone and np.any(np.diff(array) < 0):
            bad = int(np.flatnonzero(np.diff(array) < 0)[0]) + 1
            raise DifforgeError(
                f"betas must be non-decreasing (noise grows with t); betas[{bad}] = {float(array[bad])!r} "
                f"< betas[{bad - 1}] = {float(array[bad - 1])!r}"
            )
        return array

    @classmethod
    def named(
        cls, name: str, num_steps: int, beta_start: float | None = None, beta_end: float | None = None
    ) -> NoiseSchedule:
        """A named schedule (``linear``, ``cosine``, ``quadratic``, ``sigmoid``) of T = num_steps
        (endpoints: see `named_betas`)."""
        return cls(named_betas(name, num_steps, beta_start, beta_end))

    def timesteps(self, spec: RespacingSpec) -> np.ndarray:
        """(K,) sorted original timestep indices kept by ``spec`` (see `respaced_timesteps`)."""
        kept = respaced_timesteps(self.num_steps, spec)
        return self.timestep_map[np.asarray(kept, dtype=np.int64)]

    def respace(self, spec: RespacingSpec | np.ndarray) -> tuple[NoiseSchedule, np.ndarray]:
        """Keep K of the T steps; returns (respaced schedule, (K,) timestep_map to original indices).

        ``spec`` is a respacing spec (see `respaced_timesteps`) or an explicit array of kept
        original indices. The respaced chain has beta'_k = 1 - alpha_bar[t_k] / alpha_bar[t_{k-1}]
        (alpha_bar[t_{-1}] = 1), so its alpha_bar at step k equals the original at t_k.
        """
        if isinstance(spec, np.ndarray):
            kept_original = np.unique(spec.astype(np.int64))
            position = np.searchsorted(self.timestep_map, kept_original)
            if (
                kept_original.size == 0
                or np.any(position >= self.num_steps)
                or np.any(self.timestep_map[np.minimum(position, self.num_steps - 1)] != kept_original)
            ):
                raise DifforgeError(
                    "respace: explicit timesteps must be a non-empty subset of the schedule's "
                    f"timesteps 0..{int(self.timestep_map[-1])}"
                )
        else:
            position = np.asarray(respaced_timesteps(self.num_steps, spec), dtype=np.int64)
        alphas_cumprod = self.alphas_cumprod[position]
        betas = 1.0 - alphas_cumprod / np.append(1.0, alphas_cumprod[:-1])
        timestep_map = self.timestep_map[position]
        return NoiseSchedule(betas, timestep_map=timestep_map), timestep_map

    @property
    def is_respaced(self) -> bool:
        """True when some original timesteps were dropped."""
        return not np.array_equal(self.timestep_map, np.arange(self.num_steps))

    def sigma_to_t(self, sigma: np.ndarray) -> np.ndarray:
        """Fractional timestep of a noise level, by linear interpolation in log sigma.

        ``sigma`` is the variance-exploding noise level sqrt((1 - alpha_bar) / alpha_bar);
        the result is clamped to [0, T-1] and expressed in ORIGINAL timestep indices
        (interpolating ``timestep_map`` too for a respaced schedule).
        """
        log_sigma = np.log(np.maximum(np.asarray(sigma, dtype=np.float64), 1e-10))
        log_sigmas = np.log(self.sigmas)
        position = np.interp(log_sigma, log_sigmas, np.arange(self.num_steps, dtype=np.float64))
        return np.interp(position, np.arange(self.num_steps), self.timestep_map.astype(np.float64))

    def __repr__(self) -> str:
        respaced = f", respaced from {int(self.timestep_map[-1]) + 1}" if self.is_respaced else ""
        return f"NoiseSchedule(T={self.num_steps}{respaced})"
