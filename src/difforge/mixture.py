"""A Gaussian mixture with full covariances, fitted by EM in float64: the prior that cold
diffusion samples its fully degraded images from (Bansal et al. 2022 fit one to the
per-channel means of the training images; their code used 10 components).

The data is low-dimensional (one mean per channel), so a direct NumPy EM is exact and takes
milliseconds; `tests/test_cold.py` checks its log-likelihood against scikit-learn's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from difforge.errors import DifforgeError

REG_COVAR = 1e-6
"""Added to every covariance's diagonal (scikit-learn's default), so a component of identical
points stays a proper Gaussian."""


def _log_gaussians(x: np.ndarray, means: np.ndarray, covariances: np.ndarray) -> np.ndarray:
    """(N, K) log N(x_n; mu_k, Sigma_k)."""
    n, d = x.shape
    chol = np.linalg.cholesky(covariances)  # (K, d, d)
    diff = x[None, :, :] - means[:, None, :]  # (K, N, d)
    solved = np.linalg.solve(chol, diff.transpose(0, 2, 1))  # (K, d, N): L^-1 (x - mu)
    mahalanobis = (solved**2).sum(axis=1).T  # (N, K)
    log_det = 2.0 * np.log(np.diagonal(chol, axis1=1, axis2=2)).sum(axis=1)  # (K,)
    return -0.5 * (d * math.log(2.0 * math.pi) + log_det[None, :] + mahalanobis)


def _logsumexp(a: np.ndarray) -> np.ndarray:
    peak = a.max(axis=1, keepdims=True)
    return (peak + np.log(np.exp(a - peak).sum(axis=1, keepdims=True)))[:, 0]


@dataclass(frozen=True)
class GaussianMixture:
    """p(x) = sum_k w_k N(x; mu_k, Sigma_k), x in R^d.

    Attributes:
        weights: (K,) mixing weights, summing to 1.
        means: (K, d).
        covariances: (K, d, d), symmetric positive definite.
    """

    weights: np.ndarray
    means: np.ndarray
    covariances: np.ndarray

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    def log_likelihood(self, x: np.ndarray) -> float:
        """Mean log p(x_n) over the rows of (N, d) ``x``."""
        x = np.asarray(x, dtype=np.float64)
        weighted = _log_gaussians(x, self.means, self.covariances) + np.log(self.weights)[None, :]
        return float(_logsumexp(weighted).mean())

    def sample(self, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(count, d) float32 draws on the generator's device: a component by its weight, then
        mu_k + L_k z (L_k L_k^T = Sigma_k)."""
        device = generator.device if generator is not None else torch.device("cpu")
        weights = torch.as_tensor(self.weights, dtype=torch.float64, device=device)
        component = torch.multinomial(weights, count, replacement=True, generator=generator)
        z = torch.randn(count, self.dim, generator=generator, dtype=torch.float64, device=device)
        chol = torch.linalg.cholesky(torch.as_tensor(self.covariances, dtype=torch.float64, device=device))
        means = torch.as_tensor(self.means, dtype=torch.float64, device=device)
        draws = means[component] + torch.einsum("nij,nj->ni", chol[component], z)
        return draws.float()

    def to_dict(self) -> dict[str, Any]:
        return {
            "weights": self.weights.tolist(),
            "means": self.means.tolist(),
            "covariances": self.covariances.tolist(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "the mixture") -> GaussianMixture:
        try:
            weights = np.asarray(data["weights"], dtype=np.float64)
            means = np.asarray(data["means"], dtype=np.float64)
            covariances = np.asarray(data["covariances"], dtype=np.float64)
        except (KeyError, TypeError, ValueError) as error:
            raise DifforgeError(f"{source} is damaged: {error}") from None
        k = weights.shape[0] if weights.ndim == 1 else -1
        if (
            k < 1
            or means.ndim != 2
            or means.shape[0] != k
            or covariances.shape != (k, means.shape[1], means.shape[1])
            or not np.all(np.isfinite(covariances))
            or not np.isclose(weights.sum(), 1.0)
            or np.any(weights < 0)
        ):
            raise DifforgeError(f"{source} is damaged: inconsistent weights, means and covariances")
        try:
            np.linalg.cholesky(covariances)
        except np.linalg.LinAlgError:
            raise DifforgeError(f"{source} is damaged: a covariance is not positive definite") from None
        return cls(weights, means, covariances)


def _kmeans_plus_plus(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """(k, d) starting means: k-means++ seeding (Arthur & Vassilvitskii 2007)."""
    centres = [x[rng.integers(len(x))]]
    for _ in range(1, k):
        distance2 = ((x[:, None, :] - np.asarray(centres)[None]) ** 2).sum(axis=2).min(axis=1)
        total = distance2.sum()
        index = rng.integers(len(x)) if total <= 0 else rng.choice(len(x), p=distance2 / total)
        centres.append(x[index])
    return np.asarray(centres)


def fit_gaussian_mixture(
    x: np.ndarray, components: int = 10, *, seed: int = 0, max_iter: int = 200, tol: float = 1e-4
) -> GaussianMixture:
    """EM for a full-covariance mixture of ``min(components, distinct rows)`` components on (N, d) ``x``.

    Starts from k-means++ means, equal weights and the data's covariance; stops when the
    mean log-likelihood improves by less than ``tol`` (or after ``max_iter`` rounds).
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2 or not np.all(np.isfinite(x)):
        raise DifforgeError("a Gaussian mixture needs at least 2 finite points")
    n, d = x.shape
    k = max(1, min(components, len(np.unique(x, axis=0))))
    rng = np.random.default_rng(seed)
    means = _kmeans_plus_plus(x, k, rng)
    spread = np.atleast_2d(np.cov(x, rowvar=False)) + REG_COVAR * np.eye(d)
    covariances = np.repeat(spread[None], k, axis=0)
    weights = np.full(k, 1.0 / k)
    previous = -np.inf
    for _ in range(max_iter):
        weighted = _log_gaussians(x, means, covariances) + np.log(weights)[None, :]
        log_norm = _logsumexp(weighted)
        responsibilities = np.exp(weighted - log_norm[:, None])  # E-step: (N, K)
        counts = responsibilities.sum(axis=0) + 10 * np.finfo(np.float64).eps
        weights = counts / n  # M-step
        means = responsibilities.T @ x / counts[:, None]
        diff = x[None, :, :] - means[:, None, :]
        covariances = np.einsum("kn,kni,knj->kij", responsibilities.T, diff, diff) / counts[:, None, None]
        covariances += REG_COVAR * np.eye(d)[None]
        current = float(log_norm.mean())
        if current - previous < tol:
            break
        previous = current
    return GaussianMixture(weights / weights.sum(), means, covariances)
