"""The picture strips of docs/cold.md: D(x0, s) of every degradation at nine levels
s = 0, T/8, ..., T (T = 50, the defaults of ``difforge train --process cold``), on three
MNIST digits and three emoji (decolorize and the colour fade need RGB).

Usage::

    python bench/cold_strips.py --out docs/images
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from difforge.cold import ColdConfig
from difforge.data import load_builtin
from difforge.images import make_grid, save_png, to_uint8

STRIPS = {
    "blur": ColdConfig(),
    "mask": ColdConfig(degradation="mask", target="grey", discrete=False),
    "pixelate": ColdConfig(degradation="pixelate"),
    "fade": ColdConfig(degradation="fade"),
    "decolorize": ColdConfig(degradation="decolorize"),
    "noise": ColdConfig(degradation="noise"),
}


def pictures(name: str, indices: list[int]) -> torch.Tensor:
    images = load_builtin(name).images[indices]
    tensor = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1)
    if tensor.shape[-1] != 32:
        tensor = torch.nn.functional.interpolate(tensor, size=32, mode="area")
    return tensor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/images"))
    args = parser.parse_args()
    digits = pictures("mnist", [0, 2600, 4700]).expand(-1, 3, -1, -1)
    emoji = pictures("emoji", [10, 200, 1500])
    x0 = torch.cat([digits, emoji])
    for name, config in STRIPS.items():
        process = replace(config).build()
        levels = np.linspace(0, process.num_timesteps, 9).round().astype(int)
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
        columns = [process.degrade(x0, torch.full((len(x0),), int(s)), noise) for s in levels]
        grid = make_grid(
            to_uint8(torch.stack(columns, dim=1).flatten(0, 1).clamp(-1, 1)), columns=len(levels)
        )
        print(save_png(args.out / f"cold_{name}.png", grid))


if __name__ == "__main__":
    main()
