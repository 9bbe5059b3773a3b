"""The ``difforge`` command line: ``train``, ``sample``, ``info`` and ``eval``.

Every user mistake ends in one line ``difforge: error: ...`` and exit status 2, never a
traceback. Defaults come from the config dataclasses, never from here.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from difforge import __version__
from difforge.errors import DifforgeError
from difforge.flags import add_dataclass_flags, dataclass_values, field_default

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors and "did you mean" for mistyped flags."""

    known_options: list[str] = []

    def error(self, message: str) -> NoReturn:
        if "unrecognized arguments:" in message:
            unknown = message.split("unrecognized arguments:", 1)[1].split()
            hints = []
            for word in unknown:
                match = difflib.get_close_matches(word.split("=")[0], self.known_options, n=1, cutoff=0.6)
                if match:
                    hints.append(f"{word} (did you mean {match[0]}?)")
                else:
                    hints.append(word)
            message = "unrecognized arguments: " + ", ".join(hints)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


# ---- train ----------------------------------------------------------------------------------

_TRAIN_HELP = {
    "image_size": "training resolution S; images are resized and cropped to S x S (default: 32)",
    "channels": "1 (grey) or 3 (RGB) (default: the data's own)",
    "class_folders": "label images by their first-level sub-folder (class-conditional training)",
    "conditional": "train class-conditionally when the data has labels",
    "random_crop": "crop a random square instead of the centre",
    "hflip": "random horizontal flips",
    "preset": "U-Net preset: tiny, mnist, small, ddpm-cifar10, iddpm-cifar10, adm-imagenet64",
    "steps": "optimizer steps (default: from --epochs, else 1500 for the mnist preset)",
    "epochs": "passes over the data (used when --steps is not given)",
    "batch_size": "images per optimizer step per device, before accumulation",
    "grad_accum": "micro-batches accumulated per optimizer step",
    "lr": "AdamW learning rate (after the warm-up)",
    "warmup_steps": "linear learning-rate warm-up steps",
    "weight_decay": "AdamW weight decay",
    "grad_clip": "clip the gradient norm to this (0 = off)",
    "ema_decay": "EMA decay of the weights used for sampling",
    "p_uncond": "probability of dropping the class label (classifier-free guidance)",
    "timestep_sampler": "uniform, or importance (IDDPM loss-second-moment sampling of t)",
    "mixed_precision": "auto (bf16/fp16 on CUDA, off on CPU), no, bf16 or fp16",
    "seed": "random seed (initialisation, data order, noise)",
    "sample_every": "write a sample grid and denoising strip every N steps (0 = at the end only)",
    "checkpoint_every": "write a checkpoint every N steps (0 = at the end only)",
    "log_every": "log metrics every N steps",
    "keep_checkpoints": "how many checkpoints to keep",
    "num_workers": "DataLoader worker processes",
    "tensorboard": "write TensorBoard events",
    "preview_images": "images in the sample grid made during training",
    "preview_sampler": "sampler of the grid made during training (default: the process's own, as for sample)",
    "preview_steps": "sampler steps of the grid made during training",
}

_DIFFUSION_HELP = {
    "schedule": "beta schedule: linear, cosine, quadratic, sigmoid",
    "num_timesteps": "diffusion steps T",
    "prediction": "what the network predicts: eps, x0 or v",
    "variance": "reverse-process variance: fixed_small, fixed_large or learned_range",
    "loss": "mse, l1, huber, hybrid (mse + lambda L_vlb, needed for learned_range) or vlb",
    "vlb_weight": "lambda of the hybrid loss",
    "min_snr_gamma": "min-SNR-gamma loss weighting (e.g. 5; default: off)",
    "huber_delta": "Huber loss transition point",
}


def _add_train(subparsers: Any) -> None:
    from difforge.diffusion import DiffusionConfig
    from difforge.runs.config import TrainConfig

    parser = subparsers.add_parser(
        "train",
        help="train a model on a folder of images or a built-in dataset",
        description="Train a diffusion model. With no DATA: the built-in MNIST digits, class-conditional, "
        "sized to finish in about 15 minutes on a 2-core CPU.",
    )
    parser.add_argument(
        "data",
        nargs="?",
        default=field_default(TrainConfig, "data"),
        help="a folder of images (searched recursively) or a built-in dataset: mnist, digits, emoji "
        "(default: %(default)s)",
    )
    parser.add_argument("--out", help="run folder (default: runs/<data name>)")
    parser.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its newest checkpoint"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default: auto)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_dataclass_flags(parser, TrainConfig, _TRAIN_HELP, "train.")
    add_dataclass_flags(
        parser, DiffusionConfig, _DIFFUSION_HELP, "diffusion.", {"num_timesteps": "--timesteps"}
    )
    parser.set_defaults(func=_run_train)


def _distributed_context() -> Any:
    from difforge.training import DistributedContext

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistributedContext()
    import torch
    import torch.distributed as dist

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    return DistributedContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank)


def _run_train(args: argparse.Namespace) -> int:
    import torch

    from difforge.diffusion import DiffusionConfig
    from difforge.runs import RunConfig, TrainConfig, resolve_device
    from difforge.training import Trainer, prepare_run

    train_values = dataclass_values(args, "train.")
    diffusion_values = dataclass_values(args, "diffusion.")
    train_values["data"] = args.data
    ctx = _distributed_context()
    out = Path(args.out) if args.out else Path("runs") / Path(str(args.data).rstrip("/")).name
    if args.resume:
        saved = RunConfig.load(out)
        for name in ("steps", "epochs", "sample_every", "checkpoint_every", "num_workers", "tensorboard"):
            setattr(saved.train, name, train_values[name])
        train_config, diffusion_config = saved.train, saved.diffusion
        model_overrides = saved.model.to_dict()
    else:
        train_config = TrainConfig(**train_values).validate()
        if (out / "config.json").exists():
            raise DifforgeError(
                f"{out} already holds a run: pass --resume to continue it, or choose another --out"
            )
        diffusion_config = DiffusionConfig(**diffusion_values)
        model_overrides = None
    device = resolve_device(args.device)
    if device.type == "cuda" and ctx.world_size > 1:
        device = torch.device("cuda", ctx.local_rank)
    model, diffusion, dataset, run_config = prepare_run(train_config, diffusion_config, model_overrides)
    trainer = Trainer(
        model, diffusion, dataset, run_config, out, device=device, ctx=ctx, progress=not args.no_progress
    )
    if args.resume:
        trainer.resume()
    if ctx.is_main:
        params = sum(p.numel() for p in model.parameters())
        print(
            f"difforge {__version__}: training {train_config.preset} {_model_name(run_config)} "
            f"({params / 1e6:.2f}M parameters) "
            f"on {dataset.source} ({len(dataset)} images, {dataset.num_classes} classes, "
            f"{dataset.image_size}x{dataset.image_size}x{dataset.channels}) for {trainer.total_steps} steps "
            f"on {device}{f' x {ctx.world_size}' if ctx.world_size > 1 else ''}; run folder: {out}",
            file=sys.stderr,
        )
        if dataset.skipped:
            print(dataset.summary(), file=sys.stderr)
        if run_config.data.attribution:
            print(run_config.data.attribution, file=sys.stderr)
    try:
        trainer.train()
    except KeyboardInterrupt:
        path = trainer.save_checkpoint()
        if ctx.is_main:
            print(
                f"\ninterrupted at step {trainer.step}; saved {path}. Continue with: "
                f"difforge train --resume --out {out}",
                file=sys.stderr,
            )
        return 130
    finally:
        if ctx.world_size > 1:
            import torch.distributed as dist

            dist.destroy_process_group()
    if ctx.is_main:
        print(f"done: {out}/ema.safetensors; sample with: difforge sample {out}", file=sys.stderr)
    return 0


# ---- sample ---------------------------------------------------------------------------------


def _add_sample(subparsers: Any) -> None:
    from difforge.sampling.config import add_sample_flags

    parser = subparsers.add_parser("sample", help="sample images from a trained run")
    parser.add_argument("run", help="run folder written by difforge train")
    parser.add_argument("-n", "--num-images", type=int, default=64, help="how many images (default: 64)")
    add_sample_flags(parser)
    parser.add_argument(
        "--class",
        dest="classes",
        action="append",
        help="class name or id, repeatable or comma-separated, cycled over the images (default: random)",
    )
    parser.add_argument(
        "--weights", choices=("ema", "raw"), default="ema", help="EMA or raw weights (default: ema)"
    )
    parser.add_argument("--out", help="output grid PNG (default: RUN/samples/sample_<seed>.png)")
    parser.add_argument("--no-grid", action="store_true", help="do not write the grid PNG")
    parser.add_argument("--images-dir", help="also write every image as its own PNG into this folder")
    parser.add_argument("--gif", help="write a GIF of the denoising (x_t at every step, then the result)")
    parser.add_argument("--fps", type=float, default=8.0, help="GIF frames per second (default: 8)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default: auto)")
    parser.set_defaults(func=_run_sample)


def _run_sample(args: argparse.Namespace) -> int:
    import torch

    from difforge.images import make_grid, save_gif, save_png, to_uint8
    from difforge.pipeline import Pipeline
    from difforge.sampling.config import sample_config_from_args

    if args.num_images < 1:
        raise DifforgeError(f"--num-images must be >= 1, got {args.num_images}")
    if args.fps <= 0:
        raise DifforgeError(f"--fps must be > 0, got {args.fps}")
    if args.no_grid and not args.images_dir and not args.gif:
        raise DifforgeError("nothing to write: --no-grid needs --images-dir or --gif")
    sampling = sample_config_from_args(args)
    pipe = Pipeline.from_run(args.run, device=args.device, weights=args.weights)
    classes = None
    if args.classes:
        classes = [part.strip() for item in args.classes for part in item.split(",") if part.strip()]
    frames: dict[int, list[torch.Tensor]] = {}

    def keep(batch: int, info: Any) -> None:
        frames.setdefault(info.index, []).append(info.x.detach().cpu())

    columns = None
    if pipe.num_classes and classes:
        columns = len(classes) if len(classes) <= 16 else None
    images = pipe(args.num_images, classes=classes, config=sampling, callback=keep if args.gif else None)
    written = []
    if not args.no_grid:
        out = Path(args.out) if args.out else Path(args.run) / "samples" / f"sample_seed{sampling.seed}.png"
        written.append(save_png(out, make_grid(images, columns=columns)))
    if args.images_dir:
        folder = Path(args.images_dir)
        for index, image in enumerate(images):
            save_png(folder / f"{index:05d}.png", image)
        written.append(folder)
    if args.gif:
        grids = [make_grid(to_uint8(torch.cat(frames[i])), columns=columns) for i in sorted(frames)]
        grids.append(make_grid(images, columns=columns))
        written.append(save_gif(args.gif, grids, fps=args.fps))
    print(f"wrote {len(images)} images: " + ", ".join(str(p) for p in written), file=sys.stderr)
    return 0


def _model_name(config: Any) -> str:
    return "U-Net" if config.model.kind == "unet" else f"{config.model.kind} model"


# ---- info -----------------------------------------------------------------------------------


def _add_info(subparsers: Any) -> None:
    parser = subparsers.add_parser("info", help="show a run's settings and progress")
    parser.add_argument("run", help="run folder")
    parser.add_argument("--json", action="store_true", help="print config.json as JSON")
    parser.set_defaults(func=_run_info)


def _run_info(args: argparse.Namespace) -> int:
    from difforge.runs import RunConfig
    from difforge.runs.storage import checkpoint_dirs

    config = RunConfig.load(args.run)
    if args.json:
        print(config.to_json(), end="")
        return 0
    run = Path(args.run)
    checkpoints = checkpoint_dirs(run)
    last_metrics: dict[str, Any] = {}
    metrics = run / "metrics.jsonl"
    if metrics.is_file():
        lines = metrics.read_text(encoding="utf-8").strip().splitlines()
        if lines:
            try:
                last_metrics = json.loads(lines[-1])
            except json.JSONDecodeError:
                last_metrics = {}
    model = config.model
    print(f"run:        {run}")
    print(f"version:    difforge {config.difforge_version}")
    data = config.data
    print(f"data:       {data.source} ({data.num_images} images, fingerprint {data.fingerprint})")
    classes = ", ".join(config.data.class_names) if config.data.class_names else "none"
    print(f"classes:    {classes}")
    print(f"conditions: {', '.join(config.conditioning or []) or 'none'}")
    print(
        f"model:      {config.train.preset} {_model_name(config)}, "
        f"{model.image_size}x{model.image_size}x{model.in_channels}"
    )
    settings = {k: v for k, v in config.diffusion.to_dict().items() if k != "kind"}
    print(f"process:    {config.diffusion.kind}, " + ", ".join(f"{k} {v}" for k, v in settings.items()))
    if checkpoints:
        print(f"checkpoints: {', '.join(p.name for p in checkpoints)}")
    else:
        print("checkpoints: none")
    if last_metrics:
        print(
            f"last log:   step {last_metrics.get('step')}, loss {last_metrics.get('loss', float('nan')):.4f}"
        )
    return 0


# ---- main -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="difforge", description="Train image diffusion models and sample from them.")
    parser.add_argument("--version", action="version", version=f"difforge {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    _add_train(subparsers)
    _add_sample(subparsers)
    _add_info(subparsers)
    from difforge.evaluation.commands import add_eval_parser

    add_eval_parser(subparsers)
    options: list[str] = []
    for sub in subparsers.choices.values():
        for action in sub._actions:
            options.extend(s for s in action.option_strings if s.startswith("--"))
    _Parser.known_options = sorted(set(options))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return int(args.func(args) or 0)
    except DifforgeError as error:
        print(f"difforge: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except OSError as error:  # a full disk, a read-only folder: the system's word, on one line
        print(f"difforge: error: {error}", file=sys.stderr)
        return 1
