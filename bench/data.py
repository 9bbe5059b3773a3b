"""Throughput of the data layer: images/s of a DataLoader over the built-in mnist and over a
folder of generated JPEG photos (cached and decoded on the fly).

Run: ``PYTHONPATH=src python bench/data.py`` (add ``--quick`` for a short run). Prints one
line per measurement; the numbers are recorded in docs/data.md.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from difforge.data import ImageDataset, load_dataset


def images_per_second(dataset: ImageDataset, *, batch_size: int, workers: int, epochs: int) -> float:
    """Best-of-``epochs`` images/s of a shuffled DataLoader iteration (collation included)."""
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        drop_last=True,
        persistent_workers=workers > 0,
    )
    best = 0.0
    for _ in range(epochs):
        start = time.perf_counter()
        count = sum(int(images.shape[0]) for images, _ in loader)
        best = max(best, count / (time.perf_counter() - start))
    return best


def getitem_microseconds(dataset: ImageDataset, repeats: int) -> float:
    """Mean time of one ``dataset[i]`` in microseconds."""
    indices = torch.randint(0, len(dataset), (repeats,)).tolist()
    start = time.perf_counter()
    for i in indices:
        dataset[i]
    return (time.perf_counter() - start) / repeats * 1e6


def make_photos(folder: Path, count: int, side: int) -> None:
    """``count`` smooth random colour JPEGs of ``side`` x ``side * 4 // 3`` pixels."""
    rng = np.random.default_rng(0)
    for i in range(count):
        small = rng.integers(0, 256, (side // 16, side // 12, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((side * 4 // 3, side), Image.Resampling.BICUBIC)
        img.save(folder / f"{i:05d}.jpg", quality=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer epochs and files")
    args = parser.parse_args()
    epochs = 1 if args.quick else 3
    torch.manual_seed(0)

    start = time.perf_counter()
    mnist = load_dataset("mnist", image_size=32)
    print(f"mnist: load_dataset {time.perf_counter() - start:.2f} s; {mnist.summary()}")
    print(f"mnist: dataset[i] {getitem_microseconds(mnist, 20000):.1f} us")
    flip = load_dataset("mnist", image_size=32, hflip=True)
    print(f"mnist hflip: dataset[i] {getitem_microseconds(flip, 20000):.1f} us")
    for workers in (0, 2):
        rate = images_per_second(mnist, batch_size=64, workers=workers, epochs=epochs)
        print(f"mnist: DataLoader batch 64, {workers} workers: {rate:,.0f} images/s")

    count = 64 if args.quick else 256
    with tempfile.TemporaryDirectory() as tmp:
        make_photos(Path(tmp), count, 480)
        for cache in (True, False):
            start = time.perf_counter()
            photos = load_dataset(tmp, image_size=64, cache=cache)
            built = time.perf_counter() - start
            print(
                f"{count} JPEGs 640x480 -> 64, cache={cache}: load_dataset {built:.2f} s "
                f"({count / built:,.0f} files/s)"
            )
            for workers in (0, 2):
                rate = images_per_second(photos, batch_size=64, workers=workers, epochs=epochs)
                print(f"  DataLoader batch 64, {workers} workers: {rate:,.0f} images/s")


if __name__ == "__main__":
    main()
