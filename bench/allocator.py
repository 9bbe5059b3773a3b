"""CPU training step with glibc's default malloc settings vs `keep_freed_memory` (the Trainer's).

The malloc settings are process-wide, so every measurement runs in a fresh subprocess; the two
settings alternate (A B A B ...) over ``--rounds`` rounds. Each subprocess builds the preset,
runs warm-up steps, then times ``--steps`` steps of forward + MSE loss + backward + AdamW
(fp32, batch ``--batch``) and counts minor page faults and system CPU time per step.

    python bench/allocator.py                         # mnist preset, batch 64 (the default job)
    python bench/allocator.py --preset small --batch 32
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

WORKER = """
import json, resource, statistics, sys, time
import torch, torch.nn.functional as F
from difforge.nn import UNet, UNetConfig
from difforge.training.allocator import keep_freed_memory
mode, preset = sys.argv[1], sys.argv[2]
batch, steps, threads = (int(a) for a in sys.argv[3:6])
applied = keep_freed_memory() if mode == "tuned" else False
torch.set_num_threads(threads)
torch.manual_seed(0)
model = UNet(UNetConfig.preset(preset, dropout=0.0))
cfg = model.config
x = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size)
t = torch.randint(0, 1000, (batch,))
noise = torch.randn_like(x)
kwargs = {"class_labels": torch.randint(0, cfg.num_classes, (batch,))} if cfg.num_classes else {}
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
def step():
    opt.zero_grad(set_to_none=True)
    F.mse_loss(model(x, t, **kwargs), noise).backward()
    opt.step()
for _ in range(3):
    step()
usage = lambda: resource.getrusage(resource.RUSAGE_SELF)
before, times = usage(), []
for _ in range(steps):
    start = time.perf_counter(); step(); times.append(time.perf_counter() - start)
after = usage()
faults = (after.ru_minflt - before.ru_minflt) / steps
sys_s = (after.ru_stime - before.ru_stime) / steps
print(json.dumps({"applied": applied, "step_s": statistics.median(times), "faults": faults, "sys_s": sys_s}))
"""


def run(mode: str, args: argparse.Namespace) -> dict[str, float]:
    numbers = [str(n) for n in (args.batch, args.steps, args.threads)]
    cmd = [sys.executable, "-c", WORKER, mode, args.preset, *numbers]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="mnist")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=10, help="timed steps per subprocess")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    results: dict[str, list[dict[str, float]]] = {"default": [], "tuned": []}
    for r in range(args.rounds):
        for mode in ("default", "tuned") if r % 2 == 0 else ("tuned", "default"):
            res = run(mode, args)
            results[mode].append(res)
            print(
                f"round {r} {mode:7s} {1e3 * res['step_s']:7.1f} ms/step  {res['faults']:8.0f} faults/step  "
                f"{1e3 * res['sys_s']:5.0f} ms sys/step  (applied: {res['applied']})",
                flush=True,
            )
    med = {m: statistics.median(x["step_s"] for x in rs) for m, rs in results.items()}
    pairs = zip(results["default"], results["tuned"], strict=True)
    paired = sorted(d["step_s"] / t["step_s"] for d, t in pairs)
    print(
        f"\n{args.preset} batch {args.batch}: default {1e3 * med['default']:.1f} ms/step, tuned "
        f"{1e3 * med['tuned']:.1f} ms/step; speed-up {med['default'] / med['tuned']:.3f}x "
        f"(per-round {paired[0]:.3f}-{paired[-1]:.3f})"
    )


if __name__ == "__main__":
    main()
