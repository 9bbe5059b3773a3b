"""Benchmark: FID of a class-conditional run against its guidance scale (picks `GUIDED_DEFAULT`).

For each scale w, samples N class-balanced images (classes 0..K-1 cycled) from the run with
the same seed and otherwise default `SampleConfig` settings, and prints Inception FID against
the reference (default: all of the built-in MNIST-5k, the default run's training data).
The reference statistics come from the statistics cache after the first run.

Usage: ``python bench/guidance.py RUN [--scales 1,2,3] [-n 500] [--ref mnist] [--sampler S --steps K]``
"""

from __future__ import annotations

import argparse
import time

from difforge.evaluation import (
    InceptionFeatureExtractor,
    array_source,
    compare_stats,
    compute_stats,
    open_input,
)
from difforge.pipeline import Pipeline
from difforge.sampling import SampleConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run")
    parser.add_argument("--scales", default="1,2,3")
    parser.add_argument("-n", "--num-images", type=int, default=500)
    parser.add_argument("--ref", default="mnist")
    parser.add_argument("--sampler", default=None)
    parser.add_argument("--steps", type=int, default=SampleConfig.steps)
    args = parser.parse_args()

    extractor = InceptionFeatureExtractor()
    reference = open_input(args.ref)
    if not hasattr(reference, "mu"):
        reference = compute_stats(reference, extractor, progress=False, use_cache=True)  # type: ignore[arg-type]
    pipe = Pipeline.from_run(args.run, device="cpu")
    classes = list(range(pipe.num_classes)) or None
    print(f"run {args.run}: {args.num_images} images per scale, reference {reference.source}")  # type: ignore[union-attr]
    print("| guidance | sampler | steps | FID | s/image |")
    print("|---|---|---|---|---|")
    for scale in (float(s) for s in args.scales.split(",")):
        config = SampleConfig(sampler=args.sampler, steps=args.steps, guidance=scale)
        start = time.perf_counter()
        images = pipe(args.num_images, classes=classes, config=config)
        seconds = (time.perf_counter() - start) / args.num_images
        stats = compute_stats(array_source(images, f"w={scale:g}"), extractor, progress=False)
        fid = compare_stats(reference, stats).fid  # type: ignore[arg-type]
        sampler = config.sampler_for(pipe.process.default_sampler)
        print(f"| {scale:g} | {sampler} | {args.steps} | {fid:.2f} | {seconds:.3f} |", flush=True)


if __name__ == "__main__":
    main()
