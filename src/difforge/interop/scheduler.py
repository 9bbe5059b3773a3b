"""difforge's `DiffusionConfig` <-> a diffusers scheduler config (``DDPMScheduler``'s keys).

Both count t from 0 with ``alphas_cumprod[0] = 1 - beta_0`` and call the network with the
integer t, so a schedule maps by its betas:

=====================================  ============================================
difforge                               diffusers
=====================================  ============================================
``linear`` (``beta_start/beta_end``)   ``linear`` with the same endpoints
``quadratic``                          ``scaled_linear`` (linear in sqrt(beta))
``cosine``                             ``squaredcos_cap_v2``
``sigmoid``                            ``sigmoid``
``custom`` (``betas``)                 ``trained_betas``
``prediction`` eps / x0 / v            ``prediction_type`` epsilon / sample / v_prediction
``variance`` fixed_small / fixed_large / learned_range   ``variance_type`` of the same names
=====================================  ============================================

diffusers computes its tables in float32 from these numbers, difforge in float64.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from difforge.diffusion import CUSTOM_SCHEDULE, DiffusionConfig
from difforge.errors import DifforgeError
from difforge.schedule import default_linear_endpoints

_SCHEDULE_NAMES = {
    "linear": "linear",
    "quadratic": "scaled_linear",
    "cosine": "squaredcos_cap_v2",
    "sigmoid": "sigmoid",
}
_PREDICTIONS = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
_VARIANCES = {
    "fixed_small": "fixed_small",
    "fixed_small_log": "fixed_small",
    "fixed_large": "fixed_large",
    "fixed_large_log": "fixed_large",
    "learned_range": "learned_range",
}


def scheduler_config_to_diffusers(process: DiffusionConfig) -> dict[str, Any]:
    """The ``DDPMScheduler`` config of a Gaussian process (every key explicit); clipping of
    the predicted x0 to [-1, 1] on, as difforge samples by default."""
    process.noise_schedule()  # a bad setting fails here, before anything is written
    default_start, default_end = default_linear_endpoints(process.num_timesteps)
    start = default_start if process.beta_start is None else process.beta_start
    end = default_end if process.beta_end is None else process.beta_end
    custom = process.betas is not None
    return {
        "_class_name": "DDPMScheduler",
        "num_train_timesteps": process.num_timesteps,
        "beta_start": start,
        "beta_end": end,
        "beta_schedule": "linear" if custom else _SCHEDULE_NAMES[process.schedule],
        "trained_betas": list(process.betas) if custom else None,
        "variance_type": process.variance,
        "clip_sample": True,
        "clip_sample_range": 1.0,
        "prediction_type": _PREDICTIONS[process.prediction],
        "thresholding": False,
        "dynamic_thresholding_ratio": 0.995,
        "sample_max_value": 1.0,
        "timestep_spacing": "leading",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
    }


def scheduler_config_from_diffusers(data: Mapping[str, Any], source: str) -> DiffusionConfig:
    """The Gaussian process of a diffusers scheduler config (DDPM, DDIM, PNDM, ... share
    these keys); a setting difforge cannot hold is a one-line DifforgeError naming ``source``."""
    steps = data.get("num_train_timesteps", 1000)
    schedule = data.get("beta_schedule", "linear")
    prediction = data.get("prediction_type", "epsilon")
    variance = data.get("variance_type", "fixed_small")
    problems = []
    if data.get("rescale_betas_zero_snr"):
        problems.append("rescale_betas_zero_snr (a last alpha_bar of 0)")
    if prediction not in _PREDICTIONS.values():
        problems.append(f"prediction_type={prediction!r}")
    if variance not in _VARIANCES:
        problems.append(f"variance_type={variance!r}")
    names = {v: k for k, v in _SCHEDULE_NAMES.items()}
    trained = data.get("trained_betas")
    if trained is None and schedule not in names:
        problems.append(f"beta_schedule={schedule!r}")
    if problems:
        raise DifforgeError(f"{source}: not supported by difforge: {'; '.join(problems)}")
    ours = {v: k for k, v in _PREDICTIONS.items()}[prediction]
    learned = _VARIANCES[variance] == "learned_range"
    settings: dict[str, Any] = {
        "num_timesteps": steps,
        "prediction": ours,
        "variance": _VARIANCES[variance],
        "loss": "hybrid" if learned else "mse",
    }
    if trained is not None:
        settings.update(schedule=CUSTOM_SCHEDULE, betas=[float(b) for b in trained])
    else:
        settings["schedule"] = names[schedule]
        if settings["schedule"] != "cosine":
            start, end = data.get("beta_start", 0.0001), data.get("beta_end", 0.02)
            if (start, end) != default_linear_endpoints(steps):
                settings.update(beta_start=float(start), beta_end=float(end))
    config = DiffusionConfig(**settings)
    try:
        config.noise_schedule()
    except DifforgeError as error:
        raise DifforgeError(f"{source}: {error}") from None
    return config
