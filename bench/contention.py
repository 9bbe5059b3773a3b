"""Benchmark: training speed on a busy machine — OpenMP's spin-waiting against one competitor.

With another busy process on the cores, each OpenMP worker thread that finishes early spins
for a core while the others wait for theirs, and a training step slows far more than the 2x a
fair share would cost. This bench times training steps (forward + MSE + backward + AdamW,
batch 32, random 3x32x32 images) of ours (``small`` preset) and of diffusers' UNet2DModel of
the same shape, each in a fresh subprocess per OpenMP setting, idle and next to one
competing busy process (a single-threaded Python loop), and prints images/s and the slow-down.

Settings compared:

- ``default``: nothing set, all cores (libgomp spins up to its default count before sleeping);
- ``governor``: ``difforge train``'s default, `difforge.runs.threads.ThreadGovernor` ticking
  once per step (fewer threads while other processes keep cores busy);
- ``GOMP_SPINCOUNT=N``: a shorter spin (environment set before torch loads);
- ``OMP_WAIT_POLICY=PASSIVE``: no spinning at all.

Every run first trains for ``--warmup-s`` seconds (the governor's first decisions fall in
it; in a real run they take the first few seconds of many minutes), then times ``--steps``.

    python bench/contention.py --steps 12 --spincounts 10000
    python bench/contention.py --settings default,governor --rounds 3   # medians of 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple


def worker(which: str, steps: int, warmup_s: float, governed: bool) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import torch
    from unet import build, training_step  # bench/unet.py: the same models and step as the U-Net bench

    from difforge.runs.threads import ThreadGovernor

    step = training_step(build(which, "small", torch.device("cpu")), 32, torch.device("cpu"), "none")
    governor = ThreadGovernor(enabled=governed, interval_s=1.0)
    start = time.perf_counter()
    while True:
        step()
        governor.tick()
        if time.perf_counter() - start >= warmup_s:
            break
    start = time.perf_counter()
    for _ in range(steps):
        step()
        governor.tick()
    seconds = time.perf_counter() - start
    print(json.dumps({"images_per_s": steps * 32 / seconds, "threads": governor.threads}))


class Setting(NamedTuple):
    """How a worker runs: environment before torch loads, and whether the governor ticks."""

    env: dict[str, str]
    governed: bool = False


def timed_run(which: str, steps: int, setting: Setting, loaded: bool, warmup_s: float) -> float:
    competitor = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if loaded else None
    command = [
        sys.executable,
        __file__,
        "--worker",
        which,
        "--steps",
        str(steps),
        "--warmup-s",
        str(warmup_s),
    ]
    try:
        out = subprocess.run(
            command + (["--governed"] if setting.governed else []),
            env={**os.environ, **setting.env},
            capture_output=True, text=True, check=True,
        )  # fmt: skip
    finally:
        if competitor is not None:
            competitor.kill()
            competitor.wait()
    return float(json.loads(out.stdout.strip().splitlines()[-1])["images_per_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", choices=("ours", "diffusers"))
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup-s", type=float, default=4.0)
    parser.add_argument("--governed", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--spincounts", default="10000", help="GOMP_SPINCOUNT values to try ('' = none)")
    parser.add_argument("--models", default="ours,diffusers")
    parser.add_argument("--settings", default="", help="only these settings, comma-separated ('' = all)")
    parser.add_argument("--rounds", type=int, default=1, help="rounds over all cells; medians are printed")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.steps, args.warmup_s, args.governed)
        return
    settings = {"default": Setting({}), "governor": Setting({}, governed=True)}
    for count in filter(None, args.spincounts.split(",")):
        settings[f"GOMP_SPINCOUNT={count}"] = Setting({"GOMP_SPINCOUNT": count})
    settings["OMP_WAIT_POLICY=PASSIVE"] = Setting({"OMP_WAIT_POLICY": "PASSIVE"})
    if args.settings:
        settings = {name: settings[name] for name in args.settings.split(",")}
    clean = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    os.environ.clear()
    os.environ.update(clean)
    cells = [(which, name) for which in args.models.split(",") for name in settings]
    runs: dict[tuple[str, str, bool], list[float]] = {}
    for round_ in range(args.rounds):  # rounds interleave the cells, so a slow spell hits all of them
        for which, name in cells:
            for loaded in (False, True):
                speed = timed_run(which, args.steps, settings[name], loaded=loaded, warmup_s=args.warmup_s)
                runs.setdefault((which, name, loaded), []).append(speed)
                state = "loaded" if loaded else "idle"
                print(f"round {round_ + 1}: {which} {name} {state} {speed:.1f} images/s", flush=True)
    print("\n| model | setting | idle images/s | loaded images/s | slow-down | idle vs first setting |")
    print("|---|---|---:|---:|---:|---:|")
    for which in args.models.split(","):
        baseline = None
        for name in settings:
            idle = statistics.median(runs[(which, name, False)])
            loaded = statistics.median(runs[(which, name, True)])
            baseline = baseline or idle
            ratios = f"{idle / loaded:.2f}x | {idle / baseline:.3f}"
            print(f"| {which} | {name} | {idle:.1f} | {loaded:.1f} | {ratios} |", flush=True)


if __name__ == "__main__":
    main()
