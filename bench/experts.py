"""Benchmark: is branching into timestep experts worth it? A compute-matched comparison.

The parent: the ``mnist`` preset, unconditional, trained N steps on the train split
``mnist[:4000]`` of ``bench/quality.py`` (``--parent``; ``bench-out/cold/gaussian-run`` is
such a run with N = 1500). Then M more optimizer steps (``--steps``, default 1500), spent
either way:

- continued: the parent resumed for M more steps (``--continued`` reuses such a run, e.g.
  ``bench-out/cascade/single-2n``; otherwise a copy of the parent is resumed here);
- experts: ``--init-from PARENT --experts 2 --steps M``: two copies of the parent's EMA
  network, each fine-tuned for M / 2 steps on its half of t (cut at equal probability mass
  of the uniform timestep distribution: t < 500 and t >= 500).

Both then hold the same number of training steps and cost the same to sample (one network
evaluation per step). Measured: FID (Inception, `difforge.evaluation`) of ``-n`` samples at
one seed against the held-out 1,000 images and against all of MNIST-5k, with DDPM ancestral
sampling and DPM-Solver++(2M) at 20 steps each, and the default sampler (dpmpp_2m_sde 20).

Usage::

    python bench/experts.py --parent bench-out/cold/gaussian-run \\
        --continued bench-out/cascade/single-2n --out bench-out/experts -n 1000

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

from quality import export_train_split, split

from difforge.evaluation import InceptionFeatureExtractor, array_source, compare_stats, compute_stats
from difforge.evaluation.sources import builtin_source
from difforge.images import make_grid, save_png
from difforge.pipeline import Pipeline

TRAIN_IMAGES = 4000
SAMPLERS = (("ddpm", 20), ("dpmpp_2m", 20), ("dpmpp_2m_sde", 20))


def run(command: list[str]) -> float:
    print("$", " ".join(command), file=sys.stderr, flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True)
    return time.perf_counter() - start


def steps_of(run_dir: Path) -> int:
    return int(json.loads((run_dir / "config.json").read_text())["train"]["steps"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parent", type=Path, required=True, help="the N-step parent run")
    parser.add_argument("--continued", type=Path, help="the parent resumed for M more steps (reused)")
    parser.add_argument("--steps", type=int, default=1500, help="M, the extra steps of both arms")
    parser.add_argument("-n", "--num-images", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path("bench-out/experts"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out, extra = args.out, args.steps
    out.mkdir(parents=True, exist_ok=True)
    parent_steps = steps_of(args.parent)

    continued = args.continued or out / "continued"
    if args.continued is None and not (continued / "ema.safetensors").is_file():
        shutil.copytree(args.parent, continued, dirs_exist_ok=True)
    if steps_of(continued) != parent_steps + extra:
        run([sys.executable, "-m", "difforge", "train", "--resume", "--out", str(continued),
             "--steps", str(parent_steps + extra), "--no-progress"])  # fmt: skip
    experts = out / "experts"
    if not (experts / "ema.safetensors").is_file():
        data = str(export_train_split(*split()[:2]))
        seconds = run([sys.executable, "-m", "difforge", "train", data, "--class-folders", "--no-conditional",
                       "--init-from", str(args.parent), "--experts", "2", "--steps", str(extra),
                       "--out", str(experts), "--no-progress"])  # fmt: skip
        print(f"# trained the experts in {seconds:.0f} s", flush=True)

    extractor = InceptionFeatureExtractor()
    references = {
        "held_out": compute_stats(
            builtin_source("mnist", slice(TRAIN_IMAGES, None)), extractor, progress=False, use_cache=True
        ),
        "all": compute_stats(builtin_source("mnist"), extractor, progress=False, use_cache=True),
    }
    rows: list[dict[str, Any]] = []
    arms = (
        (f"parent ({parent_steps} steps)", args.parent),
        (f"continued ({parent_steps} + {extra} steps)", continued),
        (f"2 experts ({parent_steps} + 2 x {extra // 2} steps)", experts),
    )
    for name, run_dir in arms:
        pipe = Pipeline.from_run(run_dir, device="cpu")
        for sampler, steps in SAMPLERS:
            start = time.perf_counter()
            images = pipe(args.num_images, sampler=sampler, steps=steps, seed=args.seed)
            seconds = time.perf_counter() - start
            stats = compute_stats(array_source(images, name), extractor, progress=False)
            row = {
                "arm": name,
                "sampler": f"{sampler}:{steps}",
                "fid_held_out": round(compare_stats(references["held_out"], stats).fid, 2),
                "fid_all": round(compare_stats(references["all"], stats).fid, 2),
                "s_per_image": round(seconds / args.num_images, 4),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
            tag = run_dir.name.replace("-", "_")
            save_png(out / f"samples_{tag}_{sampler}.png", make_grid(images[:100], columns=10))

    print("\n| arm | sampler | FID held-out | FID all | s / image |\n|---|---|---|---|---|")
    for row in rows:
        cells = [row["arm"], row["sampler"], row["fid_held_out"], row["fid_all"], row["s_per_image"]]
        print("| " + " | ".join(map(str, cells)) + " |")


if __name__ == "__main__":
    main()
