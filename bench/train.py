"""Training throughput: real data through the full data pipeline vs random tensors already
in memory, same model and trainer, alternated A B A B; plus sampling time and peak memory.

    python bench/train.py                 # the default job's settings (mnist preset, batch 64)
    python bench/train.py --quick         # fewer steps

Prints images/s per round, the medians and the ratio real/random (the data pipeline should
not starve the model: target >= 0.95), the time to sample 64 images with dpmpp_2m at 20
steps, and the process's peak resident memory.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import Dataset

from difforge.diffusion import DiffusionConfig
from difforge.pipeline import Pipeline
from difforge.training import TrainConfig, Trainer, prepare_run


class RandomImages(Dataset):
    """N random images in [-1, 1] with labels, held in memory: a data pipeline that costs nothing."""

    def __init__(self, count: int, shape: tuple[int, int, int], num_classes: int) -> None:
        generator = torch.Generator().manual_seed(0)
        self.images = torch.rand((count, *shape), generator=generator) * 2 - 1
        self.labels = torch.randint(0, max(1, num_classes), (count,), generator=generator)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]


def images_per_second(trainer: Trainer, steps: int) -> float:
    batches = trainer._batches()
    trainer.train_step(batches)  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(batches)
    return steps * trainer.config.batch_size * trainer.config.grad_accum / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="mnist")
    parser.add_argument("--preset", default="mnist")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.steps, args.rounds = 5, 2
    config = TrainConfig(data=args.data, preset=args.preset, batch_size=args.batch_size, tensorboard=False)
    model, diffusion, dataset, run_config = prepare_run(config, DiffusionConfig())
    random_data = RandomImages(len(dataset), tuple(dataset[0][0].shape), dataset.num_classes)
    device = torch.device("cpu")
    with tempfile.TemporaryDirectory() as folder:
        trainers = {
            "real": Trainer(
                model, diffusion, dataset, run_config, Path(folder) / "a", device=device, progress=False
            ),
            "random": Trainer(
                model, diffusion, random_data, run_config, Path(folder) / "b", device=device, progress=False
            ),
        }
        results: dict[str, list[float]] = {"real": [], "random": []}
        print(
            f"torch {torch.__version__}, {torch.get_num_threads()} threads, preset {args.preset}, "
            f"batch {args.batch_size}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters"
        )
        for round_index in range(args.rounds):
            for name, trainer in trainers.items():
                rate = images_per_second(trainer, args.steps)
                results[name].append(rate)
                print(f"round {round_index}: {name:6s} {rate:7.1f} images/s")
        real, rand = statistics.median(results["real"]), statistics.median(results["random"])
        print(f"median: real {real:.1f} images/s, random {rand:.1f} images/s, real/random {real / rand:.3f}")

        trainers["real"].save_checkpoint()
        pipe = Pipeline.from_run(Path(folder) / "a", device="cpu")
        pipe(num_images=4, steps=2)  # warm-up
        start = time.perf_counter()
        pipe(num_images=64, sampler="dpmpp_2m", steps=20, classes="random")
        print(f"sampling 64 images, dpmpp_2m, 20 steps: {time.perf_counter() - start:.1f} s")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak resident memory: {peak:.0f} MiB")


if __name__ == "__main__":
    main()
