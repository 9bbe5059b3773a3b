"""Benchmark: cold diffusion (blur) on the built-in MNIST against a Gaussian run.

Two unconditional runs of the ``mnist`` preset with the same budget (``--train-steps``,
default 1500, the quick start's), both on the train split ``mnist[:4000]`` of
``bench/quality.py`` so the last 1,000 images stay held out:

- cold: ``--process cold`` with its defaults (discrete blur, T = 50, incremental 3 x 3
  kernels, L1 loss, the 10-component mean-colour prior);
- Gaussian: the default process (linear schedule, T = 1000, eps, MSE).

Deblurring: the first ``--held`` held-out images are blurred to level K (the cold run's
own D(x0, K)) and restored by

- the cold run: Algorithm 2 (``cold``) over all K levels, Algorithm 1 (``cold_naive``), and
  a single direct restoration R(x_K) (``cold_naive`` with one step);
- the Gaussian run, SDEdit-style (Meng et al. 2022): the blurred image noised to t0 with
  q(x_t0 | x_blurred), then ancestral sampling from t0 down over 25 steps, for each
  strength t0 / T in ``--sdedit`` (0.1, 0.2, 0.4);

and scored by PSNR and SSIM against the clean images (`difforge.evaluation.restoration`),
next to the blurred input's own scores.

Generation: ``-n`` samples of each run, Inception FID against the held-out split and
against all of MNIST-5k (``difforge.evaluation``, statistics cached): the cold run with its
default sampler (cold, 20 of 50 levels) and over all 50 levels, the Gaussian run with its
default (dpmpp_2m_sde, 20 steps) at the same seed.

Usage::

    python bench/cold.py --out bench-out/cold -n 1000
    python bench/cold.py --cold-run RUN --gaussian-run RUN --levels 10,25,40 -n 1000

One JSON line per measurement, then Markdown tables; grids of the restorations and samples
go to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from quality import as_input, split, train

from difforge.evaluation import InceptionFeatureExtractor, array_source, compare_stats, compute_stats
from difforge.evaluation.restoration import psnr, ssim
from difforge.evaluation.sources import builtin_source
from difforge.images import make_grid, save_png, to_uint8
from difforge.pipeline import Pipeline
from difforge.sampling import ddpm

TRAIN_IMAGES = 4000


def trained(run: Path | None, default: Path, steps: int, extra: list[str]) -> tuple[Path, float | None]:
    """``run`` as given, the bench's own run when it is complete, or a fresh one."""
    if run is not None:
        return run, None
    if (default / "ema.safetensors").is_file():
        return default, None
    return default, train(default, steps, extra, all_data=False)


def scores(restored: torch.Tensor, clean: torch.Tensor) -> dict[str, float]:
    return {
        "psnr": round(float(psnr(restored, clean).mean()), 3),
        "ssim": round(float(ssim(restored, clean).mean()), 4),
    }


def from_uint8(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


@torch.no_grad()
def sdedit(pipe: Pipeline, blurred: torch.Tensor, strength: float, seed: int) -> torch.Tensor:
    """Noise to t0 = strength (T - 1), then ancestral sampling on 25 kept steps down to 0."""
    process = pipe.process
    t0 = int(round(strength * (process.num_timesteps - 1)))  # type: ignore[attr-defined]
    kept = np.unique(np.linspace(0, t0, 25).round().astype(np.int64))
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(blurred.shape, generator=generator)
    x_t0 = process.q_sample(blurred, torch.full((blurred.shape[0],), t0), noise)  # type: ignore[attr-defined]
    return ddpm(pipe.model, process, x_t0, kept, generator=generator)  # type: ignore[arg-type]


def restore_rows(
    cold_pipe: Pipeline, gauss_pipe: Pipeline, clean: torch.Tensor, levels: list[int], strengths: list[float],
    out: Path, seed: int,
) -> list[dict[str, Any]]:  # fmt: skip
    rows = []
    for level in levels:
        blurred = cold_pipe.degrade(clean, level)
        methods: dict[str, torch.Tensor] = {"blurred input": blurred}
        start = time.perf_counter()
        methods["cold (Alg. 2)"] = from_uint8(
            cold_pipe.restore(blurred, from_t=level, steps=level, seed=seed)
        )
        methods["cold_naive (Alg. 1)"] = from_uint8(
            cold_pipe.restore(blurred, from_t=level, steps=level, sampler="cold_naive", seed=seed)
        )
        methods["direct R(x_K)"] = from_uint8(
            cold_pipe.restore(blurred, from_t=level, steps=1, sampler="cold_naive", seed=seed)
        )
        for strength in strengths:
            methods[f"Gaussian SDEdit t0={strength:g}T"] = sdedit(gauss_pipe, blurred, strength, seed)
        for method, images in methods.items():
            row = {"K": level, "method": method, **scores(images.clamp(-1, 1), clean)}
            rows.append(row)
            print(json.dumps(row), flush=True)
        print(f"# K={level}: {time.perf_counter() - start:.0f} s", flush=True)
        strip = torch.stack([clean[:16], *(m[:16].clamp(-1, 1) for m in methods.values())], dim=1)
        save_png(
            out / f"restore_K{level}.png", make_grid(to_uint8(strip.flatten(0, 1)), columns=len(methods) + 1)
        )
    return rows


def generation_rows(
    cold_pipe: Pipeline, gauss_pipe: Pipeline, count: int, out: Path, seed: int, prior_noises: list[float]
) -> list[dict[str, Any]]:
    extractor = InceptionFeatureExtractor()
    references = {
        "held_out": compute_stats(
            builtin_source("mnist", slice(TRAIN_IMAGES, None)), extractor, progress=False, use_cache=True
        ),
        "all": compute_stats(builtin_source("mnist"), extractor, progress=False, use_cache=True),
    }
    settings = [
        ("cold", cold_pipe, {"steps": 20}),
        ("cold", cold_pipe, {"steps": 50}),
        ("gaussian", gauss_pipe, {"steps": 20}),
    ]
    if prior_noises:  # only the prior-noise sweep
        settings = [("cold", cold_pipe, {"steps": 20, "prior_noise": noise}) for noise in prior_noises]
    rows = []
    default_noise = cold_pipe.process.prior_noise  # type: ignore[attr-defined]
    for name, pipe, fields in settings:
        fields = dict(fields)
        cold_pipe.process.prior_noise = fields.pop("prior_noise", default_noise)  # type: ignore[attr-defined]
        start = time.perf_counter()
        images = pipe(count, seed=seed, **({"sampler": name} if name != "gaussian" else {}), **fields)
        seconds = time.perf_counter() - start
        stats = compute_stats(array_source(images, name), extractor, progress=False)
        label = (
            f"{name} run, {pipe.process.default_sampler if name == 'gaussian' else name}:{fields['steps']}"
        )
        if name == "cold":
            label += f", prior noise {cold_pipe.process.prior_noise:g}"  # type: ignore[attr-defined]
        row = {
            "setting": label,
            "fid_held_out": round(compare_stats(references["held_out"], stats).fid, 2),
            "fid_all": round(compare_stats(references["all"], stats).fid, 2),
            "s_per_image": round(seconds / count, 4),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        suffix = f"_noise{cold_pipe.process.prior_noise:g}" if prior_noises else ""  # type: ignore[attr-defined]
        save_png(out / f"samples_{name}_{fields['steps']}{suffix}.png", make_grid(images[:100], columns=10))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cold-run", type=Path, help="reuse this cold run instead of training")
    parser.add_argument("--gaussian-run", type=Path, help="reuse this Gaussian run instead of training")
    parser.add_argument("--train-steps", type=int, default=1500)
    parser.add_argument("--levels", default="10,25,40", help="blur levels K to restore from")
    parser.add_argument("--sdedit", default="0.1,0.2,0.4", help="SDEdit strengths t0 / T of the Gaussian run")
    parser.add_argument("--held", type=int, default=500, help="held-out images to restore")
    parser.add_argument(
        "-n", "--num-images", type=int, default=1000, help="samples per run for FID (0: skip)"
    )
    parser.add_argument("--out", type=Path, default=Path("bench-out/cold"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--prior-noises",
        default="",
        help="instead: FID of cold:20 at each of these prior noises, e.g. 0,0.001",
    )
    args = parser.parse_args()
    prior_noises = [float(v) for v in args.prior_noises.split(",")] if args.prior_noises else []

    args.out.mkdir(parents=True, exist_ok=True)
    extra = ["--no-conditional"]
    cold_run, cold_seconds = trained(
        args.cold_run, args.out / "cold-run", args.train_steps, [*extra, "--process", "cold"]
    )
    gauss_run, gauss_seconds = trained(args.gaussian_run, args.out / "gaussian-run", args.train_steps, extra)
    cold_pipe = Pipeline.from_run(cold_run, device="cpu")
    gauss_pipe = Pipeline.from_run(gauss_run, device="cpu")
    print(
        f"# cold run {cold_run} ({cold_seconds or 'reused'} s), "
        f"Gaussian run {gauss_run} ({gauss_seconds or 'reused'} s)"
    )
    torch.manual_seed(args.seed)
    held = split()[2]
    clean = as_input(held[: args.held])
    levels = [int(k) for k in args.levels.split(",")]
    strengths = [float(s) for s in args.sdedit.split(",")]
    restored = (
        []
        if prior_noises
        else restore_rows(cold_pipe, gauss_pipe, clean, levels, strengths, args.out, args.seed)
    )
    generated = (
        generation_rows(cold_pipe, gauss_pipe, args.num_images, args.out, args.seed, prior_noises)
        if args.num_images
        else []
    )

    if restored:
        print(f"\n| method | {' | '.join(f'K={k} PSNR / SSIM' for k in levels)} |")
        print(f"|---|{'---|' * len(levels)}")
    for method in dict.fromkeys(r["method"] for r in restored):
        cells = [next(r for r in restored if r["K"] == k and r["method"] == method) for k in levels]
        print(f"| {method} | " + " | ".join(f"{c['psnr']:.2f} / {c['ssim']:.3f}" for c in cells) + " |")
    if generated:
        print("\n| samples | FID held-out | FID all | s/image |\n|---|---|---|---|")
        for r in generated:
            print(
                f"| {r['setting']} | {r['fid_held_out']:.1f} | {r['fid_all']:.1f} | {r['s_per_image']:.3f} |"
            )


if __name__ == "__main__":
    main()
