"""Benchmark difforge's U-Net presets against diffusers' UNet2DModel of the same shape.

For each pair (ours ``ddpm-cifar10`` vs diffusers built from the google/ddpm-cifar10-32
config; ours ``small`` vs the same config at (64, 128, 128, 128) channels) it reports:

- inference images/s (batch 64 by default, ``torch.inference_mode``),
- training images/s (forward + MSE loss + backward + AdamW step, batch 32),
- peak memory of each phase (measured in a fresh subprocess per model and phase: RSS
  high-water mark above the post-import baseline on CPU, ``max_memory_allocated`` on CUDA),
- forward FLOPs per image (`torch.utils.flop_counter`), and the achieved fraction of this
  machine's matmul peak, itself measured in the same run (best of several square GEMMs).

The two models are timed alternately (A B A B ...) so that load from other processes hits
both alike; medians and the ratio ours/diffusers are printed. Our models are built with
dropout 0 to match the diffusers config (which has none). On the CPU a third model,
``ours-eager``, is ours with the fused GroupNorm kernel switched off (same weights), to show
what the kernel contributes.

    python bench/unet.py --quick                  # ~4 min on a 2-core CPU
    python bench/unet.py --device cuda --amp bf16 # on a GPU, bf16 autocast for both
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext, suppress
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from difforge.nn import UNet, UNetConfig, cpu_kernels  # noqa: E402
from difforge.training.allocator import keep_freed_memory  # noqa: E402

PAIRS: dict[str, tuple[int, ...]] = {
    "ddpm-cifar10": (128, 256, 256, 256),
    "small": (64, 128, 128, 128),
}


def build_diffusers(block_out_channels: tuple[int, ...]) -> nn.Module:
    """diffusers UNet2DModel with the google/ddpm-cifar10-32 configuration (no download)."""
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        center_input_sample=False,
        time_embedding_type="positional",
        freq_shift=1,
        flip_sin_to_cos=False,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        block_out_channels=block_out_channels,
        layers_per_block=2,
        mid_block_scale_factor=1,
        downsample_padding=0,
        act_fn="silu",
        attention_head_dim=None,
        norm_num_groups=32,
        norm_eps=1e-6,
    )


class DiffusersWrapper(nn.Module):
    """Calls UNet2DModel like ours: ``model(x, t) -> Tensor``."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.inner(x, t, return_dict=False)[0]


def build(which: str, preset: str, device: torch.device) -> nn.Module:
    if device.type != "meta":
        torch.manual_seed(0)
    if which.startswith("ours"):
        model: nn.Module = UNet(UNetConfig.preset(preset, dropout=0.0))
    else:
        model = DiffusersWrapper(build_diffusers(PAIRS[preset]))
    return model.to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def amp_context(device: torch.device, amp: str) -> Any:
    if amp == "none":
        return nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def make_batch(batch: int, device: torch.device) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, 32, 32, generator=g).to(device)
    t = torch.randint(0, 1000, (batch,), generator=g).to(device)
    return x, t


def inference_step(model: nn.Module, batch: int, device: torch.device, amp: str) -> Callable[[], None]:
    x, t = make_batch(batch, device)
    model.eval()

    def step() -> None:
        with torch.inference_mode(), amp_context(device, amp):
            model(x, t)

    return step


def training_step(model: nn.Module, batch: int, device: torch.device, amp: str) -> Callable[[], None]:
    x, t = make_batch(batch, device)
    noise = torch.randn_like(x)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with amp_context(device, amp):
            loss = F.mse_loss(model(x, t).float(), noise)
        loss.backward()
        opt.step()

    return step


def kernels(which: str, step: Callable[[], None]) -> Callable[[], None]:
    """Run ``step`` with our fused CPU kernel on, or off for the ``ours-eager`` ablation."""

    def run() -> None:
        previous = cpu_kernels.set_enabled(which != "ours-eager")
        try:
            step()
        finally:
            cpu_kernels.set_enabled(previous)

    return run


def timed(step: Callable[[], None], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    step()
    sync(device)
    return time.perf_counter() - start


def matmul_peak(device: torch.device, amp: str, quick: bool) -> float:
    """Best achieved GEMM FLOP/s over a few square sizes (the machine's practical peak)."""
    dtype = torch.float32
    if amp != "none":
        dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    sizes = [2048, 3072] if device.type == "cpu" else [4096, 8192]
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        a @ b
        for _ in range(2 if quick else 4):
            best = max(best, 2 * n**3 / timed(lambda a=a, b=b: a @ b, device))
    return best


def flops_per_image(which: str, preset: str) -> float:
    """Forward FLOPs per image, counted on the meta device (shapes only, so every op,
    attention included, goes through its countable reference kernels)."""
    from torch.utils.flop_counter import FlopCounterMode

    meta = torch.device("meta")
    with meta:
        model = build(which, preset, meta).eval()
        x, t = torch.empty(2, 3, 32, 32), torch.zeros(2, dtype=torch.long)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x, t)
    return counter.get_total_flops() / 2


def memory_worker(args: argparse.Namespace) -> None:
    """Subprocess: one model, one phase; print its peak memory above the baseline in bytes."""
    device = torch.device(args.device)
    if device.type == "cpu":
        baseline = _rss("VmRSS")
        with suppress(OSError):  # reset the RSS high-water mark to the current RSS (Linux >= 4)
            Path("/proc/self/clear_refs").write_text("5")
    else:
        baseline = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    model = build(args.which, args.preset, device)
    make = inference_step if args.phase == "inference" else training_step
    step = kernels(args.which, make(model, args.batch, device, args.amp))
    for _ in range(2):
        step()
    sync(device)
    peak = _rss("VmHWM") if device.type == "cpu" else torch.cuda.max_memory_allocated(device)
    print(json.dumps({"peak": peak - baseline}))


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def peak_memory(args: argparse.Namespace, which: str, preset: str, phase: str, batch: int) -> float:
    cmd = [
        sys.executable,
        __file__,
        "--_memory-worker",
        "--device",
        args.device,
        "--amp",
        args.amp,
        "--which",
        which,
        "--preset",
        preset,
        "--phase",
        phase,
        "--batch",
        str(batch),
        "--threads",
        str(args.threads),
    ]
    if args.keep_freed_memory:  # the subprocess's peak then reflects the same malloc settings
        cmd.append("--keep-freed-memory")
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak"]


def compare(args: argparse.Namespace, preset: str, peak: float) -> list[dict[str, Any]]:
    device = torch.device(args.device)
    names = ["ours", "diffusers"]
    if device.type == "cpu" and cpu_kernels.library() is not None and not args.no_ablation:
        names.insert(1, "ours-eager")
    models = {which: build(which, preset, device) for which in names}
    n_params = {w: sum(p.numel() for p in m.parameters()) for w, m in models.items()}
    flops = {w: flops_per_image(w, preset) for w in models}
    batches = {"inference": args.infer_batch, "training": args.train_batch}
    rows = []
    for phase in args.phases.split(","):
        batch = batches[phase]
        times: dict[str, list[float]] = {w: [] for w in models}
        if not args.memory_only:
            make = inference_step if phase == "inference" else training_step
            steps = {w: kernels(w, make(m, batch, device, args.amp)) for w, m in models.items()}
            for _ in range(args.warmup):
                for step in steps.values():
                    step()
            order = list(steps)
            for r in range(args.repeats):  # A B A B ..., the order rotated every round
                for w in order[r % len(order) :] + order[: r % len(order)]:
                    times[w].append(timed(steps[w], device))
                    print(f"  {preset} {phase} {w}: {times[w][-1]:.3f} s", flush=True)
            del steps
        mem = {}
        if not args.no_memory:
            mem = {w: peak_memory(args, w, preset, phase, batch) for w in models}
        for w in models:
            ips = batch / statistics.median(times[w]) if times[w] else float("nan")
            passes = 1 if phase == "inference" else 3  # backward ~ 2x forward
            rows.append(
                {
                    "preset": preset,
                    "model": w,
                    "phase": phase,
                    "batch": batch,
                    "params": n_params[w],
                    "images_per_s": ips,
                    "times_s": [round(s, 3) for s in times[w]],
                    "gflop_per_image": flops[w] / 1e9,
                    # achieved FLOP/s over the matmul peak, counting this model's own FLOPs ...
                    "peak_fraction": ips * passes * flops[w] / peak,
                    # ... and counting diffusers' FLOPs for the same function (same work done)
                    "ref_peak_fraction": ips * passes * flops["diffusers"] / peak,
                    "peak_mem_mib": mem.get(w, float("nan")) / 2**20,
                }
            )
        theirs = rows[-1]
        for ours in rows[-len(models) : -1]:
            ours["ratio"] = ours["images_per_s"] / theirs["images_per_s"]
            ours["mem_ratio"] = ours["peak_mem_mib"] / theirs["peak_mem_mib"]
            # Same-round ratios: a slow spell of the machine hits both steps of a round alike.
            paired = sorted(d / o for o, d in zip(times[ours["model"]], times["diffusers"], strict=True))
            ours["round_ratios"] = [round(r, 3) for r in paired]
            print(
                f"{preset:13s} {phase:9s} {ours['model']} {ours['images_per_s']:7.2f} img/s  diffusers "
                f"{theirs['images_per_s']:7.2f} img/s  ratio {ours['ratio']:.2f}x  "
                f"{_spread(paired)}  mem {ours['peak_mem_mib']:.0f} vs {theirs['peak_mem_mib']:.0f} MiB",
                flush=True,
            )
    return rows


def _spread(sorted_ratios: list[float]) -> str:
    """'per-round median 1.23x [1.18-1.27]': median and quartiles of the same-round ratios."""
    if not sorted_ratios:
        return "per-round n/a"
    q = statistics.quantiles(sorted_ratios, n=4) if len(sorted_ratios) > 1 else sorted_ratios * 3
    return f"per-round median {q[1]:.2f}x [{q[0]:.2f}-{q[2]:.2f}]"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--quick", action="store_true", help="few repeats (noisy, for a first look)")
    p.add_argument("--presets", default="ddpm-cifar10,small", help="comma-separated pairs to run")
    p.add_argument("--phases", default="inference,training", help="inference and/or training")
    p.add_argument("--repeats", type=int, default=None, help="timed steps per model and phase")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--infer-batch", type=int, default=64)
    p.add_argument("--train-batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument(
        "--no-ablation", action="store_true", help="skip 'ours-eager' (ours without the fused CPU kernel)"
    )
    p.add_argument("--memory-only", action="store_true", help="only the peak-memory subprocesses")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    p.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="glibc malloc keeps freed blocks (as difforge's Trainer does on CPU), for all models",
    )
    p.add_argument("--_memory-worker", dest="memory_worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--which", default="ours", help=argparse.SUPPRESS)
    p.add_argument("--preset", default="small", help=argparse.SUPPRESS)
    p.add_argument("--phase", default="inference", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=64, help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.keep_freed_memory and not keep_freed_memory():
        raise SystemExit("--keep-freed-memory: not applicable here (needs Linux with glibc)")
    if args.memory_worker:
        memory_worker(args)
        return
    if args.repeats is None:
        args.repeats = 3 if args.quick else 7
    device = torch.device(args.device)
    peak = matmul_peak(device, args.amp, args.quick)
    print(
        f"device {device} ({os.cpu_count()} cpus, {torch.get_num_threads()} threads), "
        f"torch {torch.__version__}, amp {args.amp}; matmul peak {peak / 1e9:.1f} GFLOP/s",
        flush=True,
    )
    rows = []
    for preset in args.presets.split(","):
        rows += compare(args, preset, peak)
    print()
    print(
        "| preset | model | phase | batch | params | img/s | ratio | GFLOP/img "
        "| % peak (own FLOPs) | % peak (diffusers FLOPs) | peak MiB |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ratio = f"{r['ratio']:.2f}x ({_spread(r['round_ratios'])})" if "ratio" in r else ""
        print(
            f"| {r['preset']} | {r['model']} | {r['phase']} | {r['batch']} | "
            f"{r['params'] / 1e6:.2f}M | {r['images_per_s']:.2f} | {ratio} | "
            f"{r['gflop_per_image']:.2f} | {100 * r['peak_fraction']:.0f}% | "
            f"{100 * r['ref_peak_fraction']:.0f}% | "
            f"{r['peak_mem_mib']:.0f} |"
        )
    if args.json:
        args.json.write_text(json.dumps({"matmul_peak": peak, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
