"""The two samplers of cold diffusion (Bansal et al. 2022), pure functions over a restorer
R (``model(x_s, s - 1, **kwargs) -> x0_hat``), a `difforge.cold.ColdProcess` (its D) and an
explicit list of levels T = s_K > ... > s_0 = 0:

- `cold_naive`, Algorithm 1: x_{s'} = D(x0_hat, s');
- `cold`, Algorithm 2 (the paper's improved one): x_{s'} = x_s - D(x0_hat, s) + D(x0_hat, s').

With a perfect restorer both return x0 exactly. Algorithm 2 cancels the restorer's error to
first order (the paper's section 3.3), which is why it is the default. For the ``noise``
degradation D needs z: Algorithm 2 uses the z that x_s implies (which makes it DDIM with
eta = 0), Algorithm 1 draws it fresh from ``generator`` (re-noising, as DDPM).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from difforge.cold import ColdProcess
from difforge.diffusion import Denoiser, standard_normal_like
from difforge.errors import DifforgeError
from difforge.sampling.samplers import Callback, StepInfo


def cold_levels(num_timesteps: int, steps: int) -> np.ndarray:
    """(steps + 1,) int64 levels from T down to 0, evenly spread (step skipping for steps < T)."""
    if not 1 <= steps <= num_timesteps:
        raise DifforgeError(f"steps must be an integer in 1..{num_timesteps} for this model; got {steps!r}")
    return np.round(np.linspace(num_timesteps, 0, steps + 1)).astype(np.int64)


@torch.no_grad()
def cold(
    model: Denoiser,
    process: ColdProcess,
    x_start: torch.Tensor,
    levels: np.ndarray,
    *,
    naive: bool = False,
    model_kwargs: Mapping[str, Any] | None = None,
    clip_denoised: bool = True,
    dynamic_threshold: float | None = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Algorithm 2, x_{s'} = x_s - D(x0_hat, s) + D(x0_hat, s') (``naive``: Algorithm 1,
    x_{s'} = D(x0_hat, s')), from x_start (B, C, H, W) at level ``levels[0]`` down the
    (K + 1,) strictly decreasing ``levels`` to 0; returns the (B, C, H, W) x at level 0."""
    levels = np.asarray(levels, dtype=np.int64)
    if levels.ndim != 1 or len(levels) < 2 or levels[-1] != 0 or np.any(np.diff(levels) >= 0):
        raise DifforgeError(f"cold levels must decrease strictly to 0, got {levels.tolist()}")
    x = x_start
    total = len(levels) - 1
    for index in range(total):
        level = torch.full((x.shape[0],), int(levels[index]), dtype=torch.long, device=x.device)
        level_next = torch.full_like(level, int(levels[index + 1]))
        x0_hat = process.predict_x0(
            model, x, level, model_kwargs, clip=clip_denoised, dynamic_threshold=dynamic_threshold
        )
        if naive:
            z = standard_normal_like(x, generator) if process.degradation.needs_noise else None
            x_next = process.degrade(x0_hat, level_next, z)
        else:
            z = process.estimate_noise(x, x0_hat, level)
            x_next = x - process.degrade(x0_hat, level, z) + process.degrade(x0_hat, level_next, z)
        if callback is not None:
            callback(StepInfo(index, total, float(levels[index] - 1), x, x0_hat, x_next))
        x = x_next
    return x


cold_naive = functools.partial(cold, naive=True)
"""Algorithm 1: x_{s'} = D(x0_hat, s') (`cold` with ``naive=True``)."""
