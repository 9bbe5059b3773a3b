"""The order of training examples: a per-epoch permutation from (seed, epoch), split over
ranks, with every item's augmentation seeded by its position in the run, so a run that is
interrupted and resumed sees exactly the same batches as one that never stopped."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler


@dataclass
class DistributedContext:
    """Rank and world size; world 1 when not launched by torchrun."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class SeededItems(Dataset):
    """Wraps a dataset so that item (index, seed) is made under torch.manual_seed(seed):
    random crops and flips then depend on the position in the run, not on the worker or
    on what came before, which makes resumed runs identical."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]


class EpochBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of (index, item seed) for one epoch of one rank, from batch ``start`` on.

    The epoch's permutation comes from (seed, epoch); rank r takes every world-th index
    (the permutation is padded by wrapping so that every rank gets as many)."""

    def __init__(
        self, size: int, batch_size: int, seed: int, epoch: int, start: int, ctx: DistributedContext
    ):
        self.size, self.batch_size, self.seed, self.epoch, self.start = size, batch_size, seed, epoch, start
        self.ctx = ctx

    @staticmethod
    def batches_per_epoch(size: int, batch_size: int, world_size: int) -> int:
        per_rank = math.ceil(size / world_size)
        return max(1, per_rank // batch_size)

    def _indices(self) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        per_rank = math.ceil(self.size / self.ctx.world_size)
        order = (order * (1 + (per_rank * self.ctx.world_size) // max(1, self.size)))[
            : per_rank * self.ctx.world_size
        ]
        return order[self.ctx.rank :: self.ctx.world_size]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        indices = self._indices()
        batch = min(self.batch_size, len(indices))
        count = self.batches_per_epoch(self.size, self.batch_size, self.ctx.world_size)
        base = (self.seed * 1_000_003 + self.epoch) * 10_000_019
        for b in range(self.start, count):
            chunk = indices[b * batch : (b + 1) * batch]
            yield [(i, (base + b * batch + k) % (2**63 - 1)) for k, i in enumerate(chunk)]

    def __len__(self) -> int:
        return self.batches_per_epoch(self.size, self.batch_size, self.ctx.world_size) - self.start
