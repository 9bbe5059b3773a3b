"""Restoration quality: PSNR and SSIM of restored images against the clean ones.

Both take (N, C, H, W) tensors in the model's range [-1, 1] (the dynamic range L = 2) and
return one value per image, computed in float64:

- PSNR = 10 log10(L^2 / MSE), MSE over all pixels and channels of the image;
- SSIM (Wang et al. 2004, eq. 13) with their settings: an 11 x 11 Gaussian window of
  std 1.5 (separable, normalised), K1 = 0.01, K2 = 0.03, population (co)variances, averaged
  over the positions where the window fits inside the image (``valid``) and over channels.
  scikit-image's ``structural_similarity(gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=2)`` is the reference in ``tests/test_cold.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DATA_RANGE = 2.0
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def psnr(restored: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """(N,) peak signal-to-noise ratio in dB (inf for identical images)."""
    mse = (restored.double() - clean.double()).pow(2).flatten(1).mean(dim=1)
    return 10.0 * torch.log10(DATA_RANGE**2 / mse)


def _gaussian_window(like: torch.Tensor) -> torch.Tensor:
    offsets = torch.arange(SSIM_WINDOW, dtype=torch.float64, device=like.device) - SSIM_WINDOW // 2
    weights = torch.exp(-(offsets**2) / (2 * SSIM_SIGMA**2))
    return weights / weights.sum()


def _filter(x: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Separable 'valid' Gaussian filtering of (N*C, 1, H, W)."""
    x = F.conv2d(x, window.reshape(1, 1, -1, 1))
    return F.conv2d(x, window.reshape(1, 1, 1, -1))


def ssim(restored: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """(N,) mean structural similarity, in [-1, 1] (1 for identical images)."""
    if restored.shape != clean.shape or restored.ndim != 4:
        raise ValueError(
            f"ssim needs two (N, C, H, W) tensors of one shape, got {restored.shape}, {clean.shape}"
        )
    if min(restored.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"ssim needs images of at least {SSIM_WINDOW} x {SSIM_WINDOW} pixels")
    n, c, h, w = restored.shape
    x = restored.double().reshape(n * c, 1, h, w)
    y = clean.double().reshape(n * c, 1, h, w)
    window = _gaussian_window(x)
    mu_x, mu_y = _filter(x, window), _filter(y, window)
    var_x = _filter(x * x, window) - mu_x**2
    var_y = _filter(y * y, window) - mu_y**2
    cov = _filter(x * y, window) - mu_x * mu_y
    c1, c2 = (SSIM_K1 * DATA_RANGE) ** 2, (SSIM_K2 * DATA_RANGE) ** 2
    index = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return index.reshape(n, c, -1).mean(dim=(1, 2))


__all__ = ["DATA_RANGE", "psnr", "ssim"]
