"""Likelihood in bits/dim and the sampler report (FID/KID against NFE for several samplers).

``difforge eval nll RUN --data DATA -n N``: the variational bound of N data images under
the run's model (``GaussianDiffusion.calc_bpd_loop``), mean and standard error. With
``--respace K`` the bound of a K-step respaced chain is computed instead: a faster,
different (looser) number, labelled as an estimate.

``difforge eval samplers RUN --ref DATA --samplers ddpm:1000,ddim:50,dpmpp_2m:20 -n N``:
samples N images per sampler with the same seeds, and writes a Markdown and a JSON table
(sampler, steps, NFE, FID, KID, seconds per image), a plot of FID against NFE (with
matplotlib, `difforge.evaluation.plots`) and one grid per sampler.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils.data import default_collate

from difforge.conditioning import prepare_conditions
from difforge.errors import DifforgeError
from difforge.evaluation.cache import compute_stats
from difforge.evaluation.metrics import frechet_distance, frechet_distance_features, kernel_inception_distance
from difforge.evaluation.plots import has_matplotlib, plot_fid_vs_nfe
from difforge.evaluation.sources import array_source
from difforge.evaluation.stats import FeatureStats
from difforge.images import make_grid, save_png
from difforge.sampling import SampleConfig, model_evaluations, sampler_names

# ---- likelihood ------------------------------------------------------------------------------


@dataclass
class NLLResult:
    """Bits per dimension of ``count`` images: mean, standard error, and the prior term."""

    bits_per_dim: float
    standard_error: float
    prior_bits_per_dim: float
    count: int
    chain_steps: int
    respaced: bool

    def describe(self) -> str:
        kind = (
            f"ESTIMATE on a {self.chain_steps}-step respaced chain (a bound of a different, shorter "
            "chain; faster, not the model's NLL)"
            if self.respaced
            else f"variational bound over all {self.chain_steps} steps"
        )
        return (
            f"NLL: {self.bits_per_dim:.4f} ± {self.standard_error:.4f} bits/dim "
            f"({self.count} images; prior term {self.prior_bits_per_dim:.5f}; {kind})"
        )


def check_has_likelihood(process: object) -> None:
    """A one-line DifforgeError unless the process has a variational bound (Gaussian)."""
    if not hasattr(process, "calc_bpd_loop"):
        raise DifforgeError(
            f"nll needs a likelihood: a Gaussian run (this run's process is "
            f"{getattr(process, 'kind', '?')!r}, which has none)"
        )


def negative_log_likelihood(
    pipe: object,
    data: str,
    num_images: int,
    *,
    batch_size: int = 64,
    respace: int | None = None,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> NLLResult:
    """Bits/dim of the first ``num_images`` images of ``data`` under a `Pipeline`'s model.

    Images are prepared as for training at the model's size and channels; a
    class-conditional model sees the images' labels when the data has them, the null
    label otherwise."""
    from difforge.data import load_dataset

    model, diffusion, config = pipe.model, pipe.diffusion, pipe.run_config  # type: ignore[attr-defined]
    check_has_likelihood(diffusion)
    dataset = load_dataset(data, image_size=config.model.image_size, channels=config.model.in_channels)
    count = min(num_images, len(dataset))
    if count < 2:
        raise DifforgeError(f"--num-images: need at least 2 images for a standard error, got {count}")
    if respace is not None:
        if not 1 <= respace <= diffusion.num_timesteps:
            raise DifforgeError(f"--respace must be in 1..{diffusion.num_timesteps}, got {respace}")
        diffusion = diffusion.respaced(str(respace))
    device = pipe.device  # type: ignore[attr-defined]
    generator = torch.Generator(device=device).manual_seed(seed)
    totals, priors = [], []
    for start in range(0, count, batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, count))]
        x0 = torch.stack([image for image, _ in items]).to(device)
        kwargs = prepare_conditions(
            default_collate([cond for _, cond in items]),
            pipe.conditions,
            device=device,  # type: ignore[attr-defined]
        )
        out = diffusion.calc_bpd_loop(model, x0, model_kwargs=kwargs, generator=generator, progress=progress)
        totals.append(out["total_bpd"].double().cpu())
        priors.append(out["prior_bpd"].double().cpu())
    total = torch.cat(totals)
    return NLLResult(
        bits_per_dim=float(total.mean()),
        standard_error=float(total.std() / math.sqrt(len(total))),
        prior_bits_per_dim=float(torch.cat(priors).mean()),
        count=len(total),
        chain_steps=diffusion.num_timesteps,
        respaced=respace is not None and respace != pipe.diffusion.num_timesteps,  # type: ignore[attr-defined]
    )


# ---- sampler report --------------------------------------------------------------------------


@dataclass
class SamplerRow:
    sampler: str
    steps: int
    nfe: int
    fid: float
    kid: float | None
    seconds_per_image: float
    grid: str


def parse_sampler_list(text: str) -> list[tuple[str, int]]:
    """``"ddpm:1000,ddim:50,dpmpp_2m:20"`` -> [(name, steps), ...]."""
    chosen = []
    for item in text.split(","):
        name, _, steps = item.strip().partition(":")
        if name not in sampler_names() or not steps.isdigit() or int(steps) < 1:
            raise DifforgeError(
                f"--samplers: {item.strip()!r} is not NAME:STEPS with NAME one of "
                f"{', '.join(sampler_names())}"
            )
        chosen.append((name, int(steps)))
    if not chosen:
        raise DifforgeError("--samplers: give at least one NAME:STEPS")
    return chosen


def sampler_report(
    pipe: object,
    reference: FeatureStats,
    samplers: list[tuple[str, int]],
    num_images: int,
    extractor: Callable[[], object],
    out_dir: Path,
    *,
    sampling: SampleConfig | None = None,
    inception_batch_size: int = 16,
    kid: bool = True,
    progress: bool = True,
) -> list[SamplerRow]:
    """Sample ``num_images`` per (sampler, steps) with the same seed, measure FID (and KID
    when the reference has features) against ``reference``, and write the report files.
    ``sampling``: every setting but the sampler and steps (the same seed for every sampler)."""
    sampling = sampling or SampleConfig()
    guidance = sampling.guidance_for(pipe.guidable)  # type: ignore[attr-defined]
    rows = []
    for name, steps in samplers:
        if steps > pipe.diffusion.num_timesteps:  # type: ignore[attr-defined]
            raise DifforgeError(f"--samplers: {name}:{steps} asks for more steps than the model's T")
        start = time.perf_counter()
        images = pipe(num_images, config=sampling.updated(sampler=name, steps=steps))  # type: ignore[operator]
        seconds = (time.perf_counter() - start) / num_images
        stats = compute_stats(
            array_source(images, f"{name}:{steps}"), extractor, inception_batch_size,  # type: ignore[arg-type]
            progress=progress, use_cache=False,
        )  # fmt: skip
        reference.check_compatible(stats)
        if reference.features is not None and reference.count + stats.count < reference.mu.shape[0]:
            fid = frechet_distance_features(reference.features, stats.features)  # type: ignore[arg-type]
        else:
            fid = frechet_distance(reference.mu, reference.sigma, stats.mu, stats.sigma)
        kid_value = None
        if kid and reference.features is not None and stats.features is not None:
            size = min(1000, reference.count, stats.count)
            kid_value = kernel_inception_distance(reference.features, stats.features, 100, size).mean
        grid = save_png(out_dir / f"grid_{name}_{steps}.png", make_grid(images[:64]))
        nfe = model_evaluations(name, steps) * (2 if guidance not in (0.0, 1.0) else 1)
        rows.append(SamplerRow(name, steps, nfe, fid, kid_value, seconds, grid.name))
    write_report(rows, out_dir, num_images, reference.source)
    return rows


def write_report(rows: list[SamplerRow], out_dir: Path, num_images: int, reference: str) -> None:
    """``report.md``, ``report.json`` and, with matplotlib, ``fid_vs_nfe.png`` in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = [
        f"Sampler report: {num_images} images per sampler against {reference}",
        "",
        "| sampler | steps | NFE | FID | KID | s/image | grid |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        kid = "-" if r.kid is None else f"{r.kid:.5f}"
        cells = [r.sampler, r.steps, r.nfe, f"{r.fid:.3f}", kid, f"{r.seconds_per_image:.3f}", r.grid]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    (out_dir / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    payload = {"num_images": num_images, "reference": reference, "rows": [asdict(r) for r in rows]}
    (out_dir / "report.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    if has_matplotlib():
        plot_fid_vs_nfe(
            rows, out_dir / "fid_vs_nfe.png", f"{num_images} images per sampler against {reference}"
        )
