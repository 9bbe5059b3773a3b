"""Benchmark: a cascade (base 16 px -> super-resolution 32 px) against one 32 px model.

Every run uses the ``mnist`` preset, unconditional, on the train split ``mnist[:4000]`` of
``bench/quality.py`` (the last 1,000 images are held out), with the same number of steps N
(``--train-steps``, default 1500, the quick start's):

- base: 16 x 16 (the data loader's resize of the 32 px digits);
- sr: ``--task superres --low-res 16 --image-size 32`` with the default noise-conditioning
  augmentation (s ~ U(0, 0.5));
- sr-noaug: the same with ``--cond-noise-max 0`` (no augmentation);
- single: one 32 px model trained for 2N steps, the cascade's total (``--single-run`` reuses
  an N-step run of the same data and settings, e.g. ``bench-out/cold/gaussian-run``, and
  resumes a copy of it to 2N, so its N-step FID comes for free).

Measured, each with ``-n`` samples at one seed, FID (Inception, `difforge.evaluation`)
against the held-out 1,000 at the sample's own resolution:

- the base stage at 16 px; the cascade's 32 px samples for each sampling noise level
  ``--cond-noise`` of the augmented stage (sr-noaug takes none) at each guidance scale
  ``--guidances`` (``--sweep-only``: only these and the real inputs below);
- the single model at N and 2N steps;
- the SR stage alone on real low-resolution inputs (the held-out images area-downsampled
  to 16 px, 8-bit): PSNR against the real 32 px images and FID, next to bilinear
  enlargement.

All sampling: the default sampler (dpmpp_2m_sde, 20 steps). Usage::

    python bench/cascade.py --out bench-out/cascade --single-run bench-out/cold/gaussian-run -n 1000

One JSON line per measurement, then a Markdown table; sample grids go to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from quality import export_train_split, split

from difforge.conditioning import resize_images
from difforge.evaluation import InceptionFeatureExtractor, array_source, compare_stats, compute_stats
from difforge.evaluation.restoration import psnr
from difforge.images import make_grid, save_png, to_uint8
from difforge.pipeline import Pipeline, images_to_condition


def train(out: Path, steps: int, extra: list[str]) -> None:
    """Train on the train split unless ``out`` already holds a finished run."""
    if (out / "ema.safetensors").is_file():
        return
    data = str(export_train_split(*split()[:2]))
    command = [sys.executable, "-m", "difforge", "train", data, "--preset", "mnist", "--channels", "1",
               "--no-conditional", "--steps", str(steps), "--out", str(out), "--no-progress",
               *extra]  # fmt: skip
    print("$", " ".join(command), file=sys.stderr, flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True)
    print(f"# trained {out} in {time.perf_counter() - start:.0f} s", flush=True)


def extended(source: Path, out: Path, steps: int) -> Path:
    """A copy of ``source`` resumed to ``steps`` (kept when already there)."""
    if (
        not (out / "ema.safetensors").is_file()
        or json.loads((out / "config.json").read_text())["train"]["steps"] != steps
    ):
        if not out.exists():
            shutil.copytree(source, out)
        command = [sys.executable, "-m", "difforge", "train", "--resume", "--out", str(out),
                   "--steps", str(steps), "--no-progress"]  # fmt: skip
        print("$", " ".join(command), file=sys.stderr, flush=True)
        subprocess.run(command, check=True)
    return out


def low_res(images: np.ndarray, size: int) -> torch.Tensor:
    """(N, S, S, C) uint8 -> (N, C, size, size) in [-1, 1], area-averaged and 8-bit."""
    small = resize_images(images_to_condition(images), size)
    return torch.round((small + 1) * 127.5) / 127.5 - 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-steps", type=int, default=1500)
    parser.add_argument("--single-run", type=Path, help="an N-step 32 px run of the same data to extend")
    parser.add_argument("-n", "--num-images", type=int, default=1000)
    parser.add_argument("--cond-noise", default="0,0.1,0.2,0.4", help="sampling levels of the sr stage")
    parser.add_argument("--guidances", default="1,2", help="guidance scales of the sr stages")
    parser.add_argument(
        "--sweep-only", action="store_true", help="only the sr stages: the sampling sweep and the real inputs"
    )
    parser.add_argument("--out", type=Path, default=Path("bench-out/cascade"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out, steps, count, seed = args.out, args.train_steps, args.num_images, args.seed
    out.mkdir(parents=True, exist_ok=True)

    train(out / "base", steps, ["--image-size", "16"])
    sr_flags = ["--task", "superres", "--low-res", "16", "--image-size", "32"]
    train(out / "sr", steps, sr_flags)
    train(out / "sr-noaug", steps, [*sr_flags, "--cond-noise-max", "0"])
    if args.single_run is not None:
        single_n = args.single_run
    else:
        single_n = out / "single"
        train(single_n, steps, ["--image-size", "32"])
    single_2n = extended(single_n, out / "single-2n", 2 * steps)

    extractor = InceptionFeatureExtractor()
    held = split()[2]
    reference = {
        32: compute_stats(array_source(held, "held-out 32px"), extractor, progress=False),
        16: compute_stats(
            array_source(to_uint8(low_res(held, 16)), "held-out 16px"), extractor, progress=False
        ),
    }
    rows: list[dict[str, Any]] = []

    def record(setting: str, images: np.ndarray, seconds: float, **extra: Any) -> None:
        stats = compute_stats(array_source(images, setting), extractor, progress=False)
        row = {
            "setting": setting,
            "px": images.shape[1],
            "fid": round(compare_stats(reference[images.shape[1]], stats).fid, 2),
            **extra,
            "s_per_image": round(seconds / len(images), 4),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        name = setting.split(" (")[0].replace(" ", "_").replace(",", "").replace("=", "")
        save_png(out / f"{name}.png", make_grid(images[:100], columns=10))

    def timed(call: Any, *args: Any, **kwargs: Any) -> tuple[np.ndarray, float]:
        start = time.perf_counter()
        images = call(*args, seed=seed, **kwargs)
        return images, time.perf_counter() - start

    base = Pipeline.from_run(out / "base", device="cpu")
    base_images, base_seconds = timed(base, count)
    record("base 16px", base_images, base_seconds)
    base_condition = images_to_condition(base_images)
    levels = [float(v) for v in args.cond_noise.split(",")]
    guidances = [float(v) for v in args.guidances.split(",")]
    for name, run, run_levels in (("sr", out / "sr", levels), ("sr-noaug", out / "sr-noaug", [None])):
        stage = Pipeline.from_run(run, device="cpu")
        for guidance in guidances:
            for level in run_levels:
                images, seconds = timed(stage.upscale, base_condition, cond_noise=level, guidance=guidance)
                shown = "" if level is None else f", cond_noise={level:g}"
                record(
                    f"cascade base -> {name}{shown}, guidance={guidance:g}", images, base_seconds + seconds
                )
        level = None  # the default level (COND_NOISE_DEFAULT) of an augmented stage
        # the stage alone, on real 16 px inputs
        real = low_res(held[:count], 16)
        truth = images_to_condition(held[:count])
        images, seconds = timed(stage.upscale, real, cond_noise=level)
        score = round(float(psnr(images_to_condition(images), truth).mean()), 2)
        record(f"{name} on real 16px inputs", images, seconds, psnr=score)
    if args.sweep_only:
        return
    enlarged = to_uint8(resize_images(low_res(held[:count], 16), 32))
    score = round(float(psnr(images_to_condition(enlarged), images_to_condition(held[:count])).mean()), 2)
    record("bilinear enlargement of real 16px inputs", enlarged, 0.0, psnr=score)
    for name, run in (
        (f"single 32px, {steps} steps", single_n),
        (f"single 32px, {2 * steps} steps", single_2n),
    ):
        single = Pipeline.from_run(run, device="cpu")
        images, seconds = timed(single, count)
        record(name, images, seconds)

    print("\n| setting | px | FID | PSNR (dB) | s / image |\n|---|---|---|---|---|")
    for row in rows:
        cells = [row["setting"], row["px"], row["fid"], row.get("psnr", ""), row["s_per_image"]]
        print("| " + " | ".join(map(str, cells)) + " |")


if __name__ == "__main__":
    main()
