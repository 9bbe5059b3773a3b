"""Benchmark: time to quality on the built-in MNIST — FID and digit recognition per sampler.

Trains (or reuses) a class-conditional run, then for each sampling setting draws N
class-balanced images (digits 0-9 cycled, one seed for all settings) and reports:

- Inception FID against the held-out split (``mnist[4000:]``, 1,000 images in the built-in
  shuffled order of ``difforge eval``) and against all of MNIST-5k, with the project's own
  ``difforge.evaluation`` stack (reference statistics cached);
- recognition: the share of samples that a small CNN, trained here on the train split
  (``mnist[:4000]``) and cached under ``$DIFFORGE_CACHE/bench``, classifies as the requested
  digit (its held-out accuracy is printed: the ceiling of this number);
- NFE per image (guidance's doubled batch counted once) and sampling seconds per image.

One JSON line per setting, then a Markdown table; a 10x10 grid per setting in ``--out``.

Training (``--train-steps``) runs ``difforge train`` on the train split exported as class
folders (or with ``--all-data`` on all of MNIST-5k, as the quick start does), with any extra
``--train-args``; ``--run DIR`` reuses a run instead. A run trained on all of MNIST-5k has
seen the held-out split: its held-out FID is then marked as such.

Usage::

    python bench/quality.py --train-steps 1500 --out bench-out/default \\
        --settings dpmpp_2m:20:3,ddpm:50:3,dpmpp_2m_sde:20:3,edm:12:3:s_churn=10 -n 1000
    python bench/quality.py --run runs/mnist --settings dpmpp_2m:20 -n 1000

A setting is ``sampler:steps[:guidance][:name=value...]`` with `SampleConfig` field names
(``eta``, ``s_churn``, ``s_tmin``, ``s_tmax``, ``s_noise``, ``spacing``, ``clip``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from difforge.data.builtin import load_builtin
from difforge.evaluation import InceptionFeatureExtractor, array_source, compare_stats, compute_stats
from difforge.evaluation.sources import BUILTIN_ORDER_SEED, builtin_source
from difforge.images import make_grid, save_png
from difforge.packages import default_cache_dir
from difforge.pipeline import Pipeline
from difforge.sampling import SampleConfig, get_sampler

TRAIN_IMAGES = 4000
"""The first 4,000 of MNIST-5k's built-in shuffled order train; the last 1,000 are held out."""


def split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train images, train labels, held-out images, held-out labels), uint8 (N, 32, 32, 1)."""
    data = load_builtin("mnist")
    order = np.random.default_rng(BUILTIN_ORDER_SEED).permutation(data.images.shape[0])
    train, held = order[:TRAIN_IMAGES], order[TRAIN_IMAGES:]
    return data.images[train], data.labels[train], data.images[held], data.labels[held]


# ---- the digit classifier --------------------------------------------------------------------


def classifier_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Dropout(0.3), nn.Linear(64 * 4 * 4, 10),
    )  # fmt: skip


def as_input(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


@torch.no_grad()
def predict(net: nn.Module, images: np.ndarray) -> np.ndarray:
    net.eval()
    return np.concatenate(
        [net(as_input(images[i : i + 500])).argmax(1).numpy() for i in range(0, len(images), 500)]
    )


def digit_classifier(train_x: np.ndarray, train_y: np.ndarray, epochs: int = 12) -> nn.Module:
    """The CNN trained on the train split (seeded; cached as safetensors, no pickle)."""
    path = default_cache_dir() / "bench" / f"mnist-classifier-{TRAIN_IMAGES}-{epochs}.safetensors"
    net = classifier_net()
    if path.is_file():
        net.load_state_dict(load_file(path))
        return net
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
    inputs, labels = as_input(train_x), torch.from_numpy(train_y.astype(np.int64))
    shift = torch.Generator().manual_seed(1)
    for _ in range(epochs):
        net.train()
        for batch in torch.randperm(len(inputs)).split(64):
            x = inputs[batch]
            dx, dy = torch.randint(-2, 3, (2,), generator=shift).tolist()  # small translations
            x = torch.roll(x, shifts=(dx, dy), dims=(2, 3))
            loss = nn.functional.cross_entropy(net(x), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(net.state_dict(), str(path))
    return net


# ---- training --------------------------------------------------------------------------------


def export_train_split(images: np.ndarray, labels: np.ndarray) -> Path:
    """The train split as PNG class folders ``<cache>/bench/mnist-train/<digit>/<i>.png``."""
    root = default_cache_dir() / "bench" / f"mnist-train-{TRAIN_IMAGES}"
    if (root / "complete").is_file():
        return root
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        save_png(root / str(int(label)) / f"{i:05d}.png", image[..., 0])
    (root / "complete").write_text("ok\n")
    return root


def train(out: Path, steps: int, extra: list[str], all_data: bool) -> float:
    """Train on the train split (or the built-in mnist); returns the wall-clock seconds."""
    if all_data:
        data = ["mnist"]
    else:
        data = [
            str(export_train_split(*split()[:2])),
            "--class-folders",
            "--image-size",
            "32",
            "--channels",
            "1",
        ]
    command = [sys.executable, "-m", "difforge", "train", *data, "--preset", "mnist",
               "--steps", str(steps), "--out", str(out), "--no-progress", *extra]  # fmt: skip
    print("$", " ".join(command), file=sys.stderr, flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True)
    return time.perf_counter() - start


# ---- one setting -----------------------------------------------------------------------------


def parse_setting(text: str) -> tuple[str, dict[str, Any]]:
    """``"edm:12:3:s_churn=10"`` -> (label, SampleConfig fields)."""
    parts = text.split(":")
    fields: dict[str, Any] = {"sampler": parts[0], "steps": int(parts[1])}
    for part in parts[2:]:
        if "=" not in part:
            fields["guidance"] = float(part)
            continue
        name, value = part.split("=", 1)
        fields[name] = {"true": True, "false": False}.get(value.lower(), value)
        if isinstance(fields[name], str) and name != "spacing":
            fields[name] = float(value)
    return text, fields


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, help="reuse this run instead of training")
    parser.add_argument("--train-steps", type=int, default=1500)
    parser.add_argument("--train-args", default="", help="extra difforge train flags, one string")
    parser.add_argument(
        "--all-data", action="store_true", help="train on all of MNIST-5k (as the quick start does) instead"
    )
    parser.add_argument("--settings", default="dpmpp_2m:20,ddpm:50")
    parser.add_argument("-n", "--num-images", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path("bench-out/quality"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--weights", choices=("ema", "raw"), default="ema", help="the run's EMA or raw weights"
    )
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    train_x, train_y, held_x, held_y = split()
    train_seconds = None
    run = args.run
    if run is None:
        run = args.out / "run"
        train_seconds = train(run, args.train_steps, args.train_args.split(), args.all_data)
    pipe = Pipeline.from_run(run, device="cpu", weights=args.weights)
    seen_held_out = pipe.run_config.data.source == "mnist"  # the built-in: all of MNIST-5k

    net = digit_classifier(train_x, train_y)
    classifier_accuracy = float((predict(net, held_x) == held_y).mean())
    extractor = InceptionFeatureExtractor()
    references = {
        "held_out": compute_stats(
            builtin_source("mnist", slice(TRAIN_IMAGES, None)), extractor, progress=False, use_cache=True
        ),
        "all": compute_stats(builtin_source("mnist"), extractor, progress=False, use_cache=True),
    }
    trained_on = "all of MNIST-5k" if seen_held_out else f"mnist[:{TRAIN_IMAGES}]"
    took = f", {train_seconds:.0f} s" if train_seconds else ""
    print(
        f"# run {run}, {args.weights} weights (trained on {trained_on}{took}); {args.num_images} images "
        f"per setting; classifier held-out accuracy {classifier_accuracy:.3f}",
        flush=True,
    )
    classes = np.arange(args.num_images) % 10
    rows = []
    for label, fields in (parse_setting(s) for s in args.settings.split(",")):
        config = SampleConfig(seed=args.seed, **fields).validate()
        nfe = get_sampler(config.sampler_for(pipe.process.default_sampler)).evaluations(config.steps)
        start = time.perf_counter()
        images = pipe(args.num_images, classes=classes.tolist(), config=config)
        seconds = time.perf_counter() - start
        stats = compute_stats(array_source(images, label), extractor, progress=False)
        row = {
            "setting": label,
            "nfe": nfe,
            "guidance": config.guidance_for(pipe.guidable),
            "fid_held_out": round(compare_stats(references["held_out"], stats).fid, 2),
            "fid_all": round(compare_stats(references["all"], stats).fid, 2),
            "recognised": round(float((predict(net, images) == classes).mean()), 4),
            "s_per_image": round(seconds / args.num_images, 4),
            "held_out_seen_in_training": seen_held_out,
            "train_seconds": train_seconds,
            "run": str(run),
            "weights": args.weights,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        grid = make_grid(images[:100], columns=10)  # classes cycle 0-9: one column per digit
        save_png(args.out / f"{label.replace(':', '_').replace('=', '-')}.png", grid)
    print("\n| setting | NFE | guidance | FID held-out | FID all | recognised | s/image |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        held = f"{r['fid_held_out']:.1f}" + (" (seen)" if seen_held_out else "")
        print(
            f"| {r['setting']} | {r['nfe']} | {r['guidance']:g} | {held} | {r['fid_all']:.1f} | "
            f"{100 * r['recognised']:.1f}% | {r['s_per_image']:.3f} |"
        )


if __name__ == "__main__":
    main()
