"""Benchmark: training speed on a busy machine — OpenMP's spin-waiting against one competitor.

With another busy process on the cores, each OpenMP worker thread that finishes early spins
for a core while the others wait for theirs, and a training step slows far more than the 2x a
fair share would cost. This bench times training steps (forward + MSE + backward + AdamW,
batch 32, random 3x32x32 images) of ours (``small`` preset) and of diffusers' UNet2DModel of
the same shape, each in a fresh subprocess per OpenMP setting, idle and next to one
competing busy process (a single-threaded Python loop), and prints images/s and the slow-down.

Settings compared (environment before torch loads; libgomp reads it once):

- ``default``: nothing set (libgomp spins up to its default count before sleeping);
- ``GOMP_SPINCOUNT=N``: a shorter spin;
- ``OMP_WAIT_POLICY=PASSIVE``: no spinning at all.

    python bench/contention.py --steps 6 --spincounts 10000,100000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def worker(which: str, steps: int) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import torch
    from unet import build, training_step  # bench/unet.py: the same models and step as the U-Net bench

    step = training_step(build(which, "small", torch.device("cpu")), 32, torch.device("cpu"), "none")
    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    print(json.dumps({"images_per_s": steps * 32 / (time.perf_counter() - start)}))


def timed_run(which: str, steps: int, env: dict[str, str], loaded: bool) -> float:
    competitor = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if loaded else None
    try:
        out = subprocess.run(
            [sys.executable, __file__, "--worker", which, "--steps", str(steps)],
            env={**os.environ, **env}, capture_output=True, text=True, check=True,
        )  # fmt: skip
    finally:
        if competitor is not None:
            competitor.kill()
            competitor.wait()
    return float(json.loads(out.stdout.strip().splitlines()[-1])["images_per_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", choices=("ours", "diffusers"))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--spincounts", default="10000")
    parser.add_argument("--models", default="ours,diffusers")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.steps)
        return
    settings: dict[str, dict[str, str]] = {"default": {}}
    for count in args.spincounts.split(","):
        settings[f"GOMP_SPINCOUNT={count}"] = {"GOMP_SPINCOUNT": count}
    settings["OMP_WAIT_POLICY=PASSIVE"] = {"OMP_WAIT_POLICY": "PASSIVE"}
    clean = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    os.environ.clear()
    os.environ.update(clean)
    print("| model | setting | idle images/s | loaded images/s | slow-down | idle vs default |")
    print("|---|---|---:|---:|---:|---:|")
    for which in args.models.split(","):
        baseline = None
        for name, env in settings.items():
            idle = timed_run(which, args.steps, env, loaded=False)
            loaded = timed_run(which, args.steps, env, loaded=True)
            baseline = baseline or idle
            ratios = f"{idle / loaded:.2f}x | {idle / baseline:.3f}"
            print(f"| {which} | {name} | {idle:.1f} | {loaded:.1f} | {ratios} |", flush=True)


if __name__ == "__main__":
    main()
