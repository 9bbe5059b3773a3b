"""Distances between feature distributions: Fréchet (FID), KID, precision/recall.

All maths in float64 NumPy. Notation: features ``x`` (n, d), ``y`` (m, d); means ``mu``
(d,); covariances ``sigma`` (d, d), unbiased (divided by n - 1).

Fréchet distance of two Gaussians (Dowson & Landau 1982; FID, Heusel et al. 2017)::

    d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))

Matrix square root, stably: ``S1 S2`` is not symmetric, and with fewer samples than
dimensions (always, for FID on < 2048 images) both covariances are singular, where the
Schur-based ``scipy.linalg.sqrtm(S1 @ S2)`` of the reference implementations loses accuracy,
returns complex parts and needs an ``eps * I`` retry. We use instead that ``S1 S2`` is
similar to the symmetric PSD matrix ``M = S1^(1/2) S2 S1^(1/2)`` (``S1 S2 =
S1^(1/2) M S1^(-1/2)``, and for singular ``S1`` the non-zero eigenvalues of ``AB`` and
``BA`` agree), so ``tr((S1 S2)^(1/2)) = sum_i sqrt(lambda_i(M))``. ``S1^(1/2)`` and the
eigenvalues of ``M`` come from the symmetric eigensolver (``eigh``), which is backward
stable; ``M`` is first reduced to the rank of ``S1`` (see `trace_sqrt_product`).
Eigenvalues below ``d * eps * lambda_max`` (rounding noise, possibly negative) are set to 0
before the square root, so rank-deficient covariances give finite, real results accurate to
~1e-10 relative (checked in the tests against the exact small-sample identity
``tr((S1 S2)^(1/2)) = ||X1c X2c^T||_* / sqrt((n1 - 1)(n2 - 1))``, nuclear norm of the
centred feature matrices' cross product).

KID (Bińkowski et al. 2018): the unbiased estimate of the squared MMD with the cubic
polynomial kernel ``k(a, b) = (a . b / d + 1)^3``, averaged over random subsets::

    MMD^2_u = sum_{i != j} k(x_i, x_j) / (n (n - 1)) + sum_{i != j} k(y_i, y_j) / (m (m - 1))
              - 2 sum_{i, j} k(x_i, y_j) / (n m)

Precision / recall (Kynkäänniemi et al. 2019): each set's manifold is the union of balls
around its points with radius the distance to the point's k-th nearest neighbour in the set;
precision is the fraction of generated samples inside the real manifold, recall the fraction
of real samples inside the generated one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from difforge.errors import DifforgeError

MIN_SAMPLES = 2
"""Fewest feature vectors a (non-degenerate, unbiased) covariance can be estimated from."""


def _check_samples(features: np.ndarray) -> np.ndarray:
    """Features as float64 (n, d); `DifforgeError` with the minimum when n < `MIN_SAMPLES`."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < MIN_SAMPLES:
        n = x.shape[0] if x.ndim == 2 else 0
        raise DifforgeError(f"a covariance needs at least {MIN_SAMPLES} images, got {n}")
    return x


def mean_and_covariance(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (d,) and unbiased covariance (d, d), both float64, of features (n, d).

    Raises `DifforgeError` when ``n < MIN_SAMPLES``.
    """
    x = _check_samples(features)
    mu = x.mean(axis=0)
    xc = x - mu
    sigma = (xc.T @ xc) / (x.shape[0] - 1)
    return mu, sigma


def _eigh_clipped(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigen-decomposition of symmetric ``a`` with rounding-noise eigenvalues set to 0.

    Returns ``(w, v)``, ``a ~= v diag(w) v^T``, ``w >= 0``; values below
    ``d * eps * max|w|`` (the eigensolver's backward error) count as zero.
    """
    sym = (a + a.T) * 0.5
    # LAPACK syevd through torch (MKL): same algorithm as numpy.linalg.eigh, several times
    # faster on a 2048 x 2048 covariance than numpy's bundled OpenBLAS here.
    w_t, v_t = torch.linalg.eigh(torch.from_numpy(np.ascontiguousarray(sym)))
    w, v = w_t.numpy(), v_t.numpy()
    tol = sym.shape[0] * np.finfo(np.float64).eps * max(float(np.abs(w).max(initial=0.0)), 1e-300)
    return np.where(w > tol, w, 0.0), v


def sqrtm_psd(a: np.ndarray) -> np.ndarray:
    """Symmetric PSD square root ``a^(1/2)`` (d, d) of a symmetric PSD (d, d) matrix.

    ``a = V diag(w) V^T -> V diag(sqrt(w)) V^T`` with ``w`` clipped as in `_eigh_clipped`,
    so near-singular or slightly indefinite inputs (few samples) give a finite real result.
    """
    w, v = _eigh_clipped(np.asarray(a, dtype=np.float64))
    return (v * np.sqrt(w)) @ v.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """``tr((S1 S2)^(1/2)) = sum_i sqrt(lambda_i(S1^(1/2) S2 S1^(1/2)))`` (see module doc).

    With ``S1 = V_r diag(w_r) V_r^T`` over its r non-zero eigenvalues and
    ``B = V_r diag(sqrt(w_r))`` (d, r), the non-zero eigenvalues of ``S1^(1/2) S2 S1^(1/2)
    = B B^T S2 B B^T`` are those of the r x r matrix ``B^T S2 B``, so the second
    eigenproblem shrinks to the rank of ``S1`` (r <= n1 - 1 for n1 samples).
    """
    w, v = _eigh_clipped(np.asarray(sigma1, dtype=np.float64))
    keep = w > 0.0
    b = v[:, keep] * np.sqrt(w[keep])
    small, _ = _eigh_clipped(b.T @ np.asarray(sigma2, dtype=np.float64) @ b)
    return float(np.sqrt(small).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Squared Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), float64.

    ``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))``; mu (d,), sigma (d, d).
    Tiny negative results from rounding (identical inputs) are returned as is, not clipped.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise DifforgeError(
            f"feature statistics do not match: means {mu1.shape} vs {mu2.shape}, "
            f"covariances {sigma1.shape} vs {sigma2.shape}"
        )
    return _frechet(mu1 - mu2, sigma1, sigma2)


def _frechet(diff: np.ndarray, sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """``|diff|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))``."""
    trace_sqrt = trace_sqrt_product(sigma1, sigma2)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)


def frechet_distance_features(x: np.ndarray, y: np.ndarray) -> float:
    """`frechet_distance` of the Gaussians fitted to features x (n1, d) and y (n2, d), exactly,
    in the ``r <= n1 + n2`` dimensional span of the centred features.

    Both covariances live in ``span(Q)``, ``Q`` (d, r) an orthonormal basis of the rows of
    the centred ``[Xc; Yc]`` (thin QR), so with coordinates ``A = Xc Q``, ``B = Yc Q``:
    ``S1 = Q (A^T A / (n1 - 1)) Q^T``, likewise ``S2``, and every term of the distance is the
    same for the r x r matrices (traces and eigenvalues are invariant under ``Q``). Costs
    O(d r^2) instead of a d x d eigendecomposition: the fast path when ``n1 + n2 < d``.
    """
    x = _check_samples(x)
    y = _check_samples(y)
    if x.shape[1] != y.shape[1]:
        raise DifforgeError(f"feature sizes differ: {x.shape[1]} vs {y.shape[1]}")
    mu1, mu2 = x.mean(axis=0), y.mean(axis=0)
    xc, yc = x - mu1, y - mu2
    q, _ = np.linalg.qr(np.concatenate([xc, yc]).T)  # (d, r), r = min(d, n1 + n2)
    a, b = xc @ q, yc @ q
    s1 = a.T @ a / (x.shape[0] - 1)
    s2 = b.T @ b / (y.shape[0] - 1)
    return _frechet(mu1 - mu2, s1, s2)


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Cubic polynomial kernel matrix ``(x y^T / d + 1)^3``: (n, d), (m, d) -> (n, m)."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 (U-statistic) between samples x (n, d) and y (m, d), cubic kernel.

    See the module docstring; needs n, m >= 2. Its expectation over i.i.d. draws is the
    population MMD^2 exactly (it can be negative).
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n, m = x.shape[0], y.shape[0]
    if n < MIN_SAMPLES or m < MIN_SAMPLES:
        raise DifforgeError(f"KID needs at least {MIN_SAMPLES} images per set, got {n} and {m}")
    kxx = polynomial_kernel(x, x)
    kyy = polynomial_kernel(y, y)
    kxy = polynomial_kernel(x, y)
    sxx = (kxx.sum() - np.trace(kxx)) / (n * (n - 1))
    syy = (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(sxx + syy - 2.0 * kxy.mean())


@dataclass(frozen=True)
class KIDResult:
    """KID estimate: ``mean`` and ``std`` of MMD^2_u over ``num_subsets`` of ``subset_size``."""

    mean: float
    std: float
    num_subsets: int
    subset_size: int


def kernel_inception_distance(
    x: np.ndarray,
    y: np.ndarray,
    num_subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> KIDResult:
    """KID between features x (n, d) and y (m, d): `mmd2_unbiased` averaged over subsets.

    Each subset draws ``min(subset_size, n, m)`` rows of x and of y without replacement
    (seeded, reproducible), as in StyleGAN3's and clean-fid's KID.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    size = min(subset_size, x.shape[0], y.shape[0])
    if size < MIN_SAMPLES:
        raise DifforgeError(
            f"KID needs at least {MIN_SAMPLES} images per set, got {x.shape[0]} and {y.shape[0]}"
        )
    rng = np.random.default_rng(seed)
    values = np.array(
        [
            mmd2_unbiased(
                x[rng.choice(x.shape[0], size, replace=False)],
                y[rng.choice(y.shape[0], size, replace=False)],
            )
            for _ in range(num_subsets)
        ]
    )
    return KIDResult(float(values.mean()), float(values.std()), num_subsets, size)


def _kth_neighbour_radii(x: np.ndarray, k: int, chunk: int) -> np.ndarray:
    """Distance from each row of x (n, d) to its k-th nearest other row: (n,)."""
    radii = np.empty(x.shape[0])
    sq = (x * x).sum(axis=1)
    for start in range(0, x.shape[0], chunk):
        block = x[start : start + chunk]
        d2 = sq[start : start + chunk, None] + sq[None, :] - 2.0 * block @ x.T
        # index k (0 is the point itself, distance 0) after a partial sort
        radii[start : start + chunk] = np.partition(np.maximum(d2, 0.0), k, axis=1)[:, k]
    return np.sqrt(radii)


def _inside_manifold(points: np.ndarray, centres: np.ndarray, radii: np.ndarray, chunk: int) -> np.ndarray:
    """Boolean (len(points),): is each point within ``radii[j]`` of some ``centres[j]``."""
    inside = np.zeros(points.shape[0], dtype=bool)
    sq_c = (centres * centres).sum(axis=1)
    r2 = radii * radii
    for start in range(0, points.shape[0], chunk):
        block = points[start : start + chunk]
        d2 = (block * block).sum(axis=1)[:, None] + sq_c[None, :] - 2.0 * block @ centres.T
        inside[start : start + chunk] = (d2 <= r2[None, :]).any(axis=1)
    return inside


def precision_recall(
    real: np.ndarray, fake: np.ndarray, k: int = 3, chunk: int = 1024
) -> tuple[float, float]:
    """Improved precision and recall (k-NN manifolds): real (n, d), fake (m, d) -> (P, R)."""
    real = np.asarray(real, dtype=np.float64)
    fake = np.asarray(fake, dtype=np.float64)
    if min(real.shape[0], fake.shape[0]) <= k:
        raise DifforgeError(
            f"precision/recall with k={k} needs more than {k} images per set, "
            f"got {real.shape[0]} and {fake.shape[0]}"
        )
    real_radii = _kth_neighbour_radii(real, k, chunk)
    fake_radii = _kth_neighbour_radii(fake, k, chunk)
    precision = float(_inside_manifold(fake, real, real_radii, chunk).mean())
    recall = float(_inside_manifold(real, fake, fake_radii, chunk).mean())
    return precision, recall
