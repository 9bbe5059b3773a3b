"""Classifier-free guidance (Ho & Salimans 2021) as a wrapper around a denoiser."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from difforge.diffusion import Denoiser

NullCondition = Callable[[torch.Tensor], torch.Tensor] | torch.Tensor | float | int
"""A null condition: a function of the batch's condition (`Condition.null_like`), a scalar
that fills, or a tensor that broadcasts."""


def _null_like(value: torch.Tensor, null: NullCondition) -> torch.Tensor:
    """The null condition for a batch of conditions."""
    if callable(null):
        return null(value)
    null = torch.as_tensor(null, device=value.device)
    if null.ndim == 0:
        return torch.full_like(value, null.item())
    return null.to(value.dtype).expand_as(value)


def classifier_free_guidance(
    model: Denoiser, scale: float, null_condition: Mapping[str, NullCondition]
) -> Denoiser:
    """A denoiser that returns uncond + w (cond - uncond) on the prediction.

    Args:
        model: ``model(x, t, **kwargs) -> output``, (B, C, ...) or (B, 2C, ...) with learned
            variance channels after the prediction.
        scale: the guidance weight w (0 = unconditional, 1 = conditional, > 1 = guided).
        null_condition: for each keyword that is dropped, its null: a function of the batch's
            value (`difforge.conditioning.null_conditions`), a scalar (e.g. the null class
            index, or 0 for multi-hot labels) or a tensor broadcast to the batch.
            Keywords not named here (an image condition, say) are kept in both branches.

    The conditional and null branches run as ONE forward of batch 2B. With learned-range
    variance the variance channels come from the conditional branch (guidance only moves
    the mean). w = 0 and w = 1 need a single branch and skip the other.
    """

    def guided(x: torch.Tensor, t: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if scale == 1.0:
            return model(x, t, **kwargs)
        null_kwargs = dict(kwargs)
        for key, null in null_condition.items():
            if key in kwargs and kwargs[key] is not None:
                null_kwargs[key] = _null_like(kwargs[key], null)
        if scale == 0.0:
            return model(x, t, **null_kwargs)
        both = {
            key: torch.cat([value, null_kwargs[key]]) if isinstance(value, torch.Tensor) else value
            for key, value in kwargs.items()
        }
        output = model(torch.cat([x, x]), torch.cat([t, t]), **both)
        cond, uncond = output.chunk(2)
        channels = x.shape[1]
        guided_prediction = uncond[:, :channels] + scale * (cond[:, :channels] - uncond[:, :channels])
        if cond.shape[1] == channels:
            return guided_prediction
        return torch.cat([guided_prediction, cond[:, channels:]], dim=1)

    return guided
