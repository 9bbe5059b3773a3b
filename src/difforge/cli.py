"""The ``difforge`` command line: ``train``, ``sample``, ``restore``, ``upscale``, ``info`` and
``eval``.

Every user mistake ends in one line ``difforge: error: ...`` and exit status 2, never a
traceback. Defaults come from the config dataclasses, never from here.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from difforge import __version__
from difforge.errors import DifforgeError, check_number
from difforge.flags import (
    add_alternative_flags,
    add_dataclass_flags,
    add_override_flags,
    dataclass_values,
    field_default,
)

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
    "lr_schedule": "learning rate after the warm-up: constant; cosine or linear (decay to --lr-min over "
    "the run); step (times --lr-decay-factor every --lr-decay-every steps)",
    "lr_min": "the floor of the cosine, linear and step schedules",
    "lr_decay_every": "steps between two decays of the step schedule",
    "lr_decay_factor": "factor of each decay of the step schedule",
    "weight_decay": "AdamW weight decay",
    "grad_clip": "clip the gradient norm to this (0 = off)",
    "ema_decay": "EMA decay of the weights used for sampling",
    "p_uncond": "probability of dropping each condition (class, labels, condition picture) to its null, "
    "each on its own draw (classifier-free guidance)",
    "timestep_sampler": "uniform, importance (IDDPM loss-second-moment sampling of t) or lognormal "
    "(EDM's ln sigma ~ N(-1.2, 1.2^2), not reweighted)",
    "mixed_precision": "auto (bf16/fp16 on CUDA, off on CPU), no, bf16 or fp16",
    "seed": "random seed (initialisation, data order, noise)",
    "sample_every": "write a sample grid and denoising strip every N steps (0 = at the end only)",
    "sample_every_epoch": "write the sample grid at the end of every epoch instead (and at the end)",
    "previews": "write sample grids while training and at the end (--no-previews: none at all)",
    "checkpoint_every": "write a checkpoint every N steps (0 = at the end only)",
    "log_every": "log metrics every N steps",
    "keep_checkpoints": "how many checkpoints to keep",
    "num_workers": "DataLoader worker processes",
    "tensorboard": "write TensorBoard events",
    "preview_images": "images in the sample grid made during training",
    "preview_sampler": "sampler of the grid made during training (default: the process's own, as for sample)",
    "preview_steps": "sampler steps of the grid made during training",
    "max_nonfinite_steps": "stop after this many steps in a row with a non-finite loss or gradient "
    "(such steps are skipped and counted)",
    "threads": "CPU threads of torch: auto (all cores, fewer while other processes keep cores busy) "
    "or a fixed N (bit-exact resume needs a fixed N)",
    "init_from": "start from this run's (or checkpoint's) EMA weights, model and process: fine-tuning "
    "(default: a fresh model)",
    "labels": "a label table (CSV or JSON: file -> label names) for multi-label conditioning; images "
    "it does not list are left out and counted",
    "cond_dir": "a folder of condition images paired with DATA's files by path without extension "
    "(image-to-image); unpaired files are left out and listed",
    "task": "generate, or superres: a super-resolution stage conditioned on each image area-downsampled "
    "to --low-res",
    "low_res": "input side of a superres stage (default: --image-size / 2; the factor must be 2-8)",
    "cond_noise_max": "noise-conditioning augmentation: the image condition is noised at a level "
    "s ~ U(0, this), s in [0, 1], and s is given to the model (default: 0.5 for superres, else off)",
    "cond_blur": "also blur half the image conditions in training, Gaussian std ~ U(0, this) pixels",
    "experts": "branch the --init-from run into K timestep experts (eDiff-I), cut at equal probability "
    "mass of the training timesteps; they train one after another, each on its range, --steps / K each",
    "expert_bounds": "the same with explicit bounds 0,b1,...,T, e.g. 0,300,700,1000",
    "expert_channels": "base width of each expert, e.g. 64,96 (default: the parent's); tensors that do "
    "not fit are freshly initialised, and training says how many",
}


_MODEL_HELP = {
    "base_channels": "channels of the first (full-resolution) level",
    "channel_mult": "channel multiplier per level, e.g. 1,2,2,4: one level per number, each but the last "
    "followed by a 2x downsampling",
    "num_res_blocks": "units per level on the way down (the way up has one more)",
    "attention_resolutions": "feature-map sides whose levels get self-attention, e.g. 16,8, or none",
    "num_heads": "attention heads (when --head-channels is not given)",
    "head_channels": "channels per attention head (heads = channels / this)",
    "dropout": "dropout in every residual block",
    "norm_groups": "GroupNorm groups",
    "resample": "conv (strided conv down, nearest + conv up) or resblock (BigGAN / ADM residual resampling)",
    "scale_shift": "AdaGN scale-shift conditioning of the residual blocks (else an added bias, as DDPM)",
    "blocks": "per-level recipe, one per level separated by /, e.g. res/res,attn/convnext,cls_attn,chn_attn; "
    "kinds: res, convnext, attn, linear_attn, cls_attn, chn_attn",
    "mid_blocks": "the bottleneck's recipe, e.g. res,attn,res",
    "convnext_mult": "hidden-width multiplier of ConvNeXt blocks",
    "cls_attn_tokens": "key/value tokens a cls_attn block makes from the class embedding",
    "time_embed_dim": "width of the timestep and class embedding (default: 4 x --base-channels)",
    "gradient_checkpointing": "recompute activations in the backward pass (less memory, one more forward)",
}
"""The U-Net's fields that are `difforge train` flags: applied on top of ``--preset`` (each
flag's default is the preset's), saved in config.json with the rest of the network."""
_MODEL_FLAG_NAMES = {"attention_resolutions": "--attention-res"}

_TRAIN_GROUPS = {
    "data and conditioning": (
        "image_size", "channels", "class_folders", "conditional", "random_crop", "hflip", "labels",
        "cond_dir", "task", "low_res", "cond_noise_max", "cond_blur", "p_uncond", "num_workers",
    ),
    "model (the preset, then these on top of it)": (
        "preset", "init_from", "experts", "expert_bounds", "expert_channels",
    ),
    "process": ("timestep_sampler",),
    "optimisation": (
        "steps", "epochs", "batch_size", "grad_accum", "lr", "warmup_steps", "lr_schedule", "lr_min",
        "lr_decay_every", "lr_decay_factor", "weight_decay", "grad_clip", "ema_decay", "mixed_precision",
        "seed", "threads", "max_nonfinite_steps",
    ),
    "previews": (
        "sample_every", "sample_every_epoch", "previews", "preview_images", "preview_sampler",
        "preview_steps",
    ),
    "checkpoints and logs": ("checkpoint_every", "keep_checkpoints", "log_every", "tensorboard"),
}  # fmt: skip
"""The sections of ``difforge train --help``; every train flag is in one."""


def _process_flag_help() -> dict[str, str]:
    """Field -> help of every process kind's flags (the first kind's text for a shared field)."""
    from difforge.process import PROCESS_KINDS

    helps: dict[str, str] = {}
    for config_class in PROCESS_KINDS.values():
        for name, text in getattr(config_class, "flag_help", {}).items():
            helps.setdefault(name, text)
    return helps


def _add_train(subparsers: Any) -> None:
    from difforge.nn import UNetConfig
    from difforge.process import PROCESS_KINDS
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
        default=None,
        help="a folder of images (searched recursively) or a built-in dataset: mnist, digits, emoji "
        f"(default: {field_default(TrainConfig, 'data')}; with --resume: the run's own)",
    )
    parser.add_argument("--out", help="run folder (default: runs/<data name>)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its newest intact checkpoint, with its saved plan; "
        f"flags given with it change only {', '.join(_flag(n) for n in RESUME_CHANGEABLE)}",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default: auto)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--betas",
        default=None,
        metavar="FILE",
        help="a custom beta schedule: T numbers in a text file (commas or white space) or a .npy array",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="read the data and build the model, print the architecture, train nothing and write nothing",
    )
    groups = {title: parser.add_argument_group(title) for title in _TRAIN_GROUPS}
    for title, names in _TRAIN_GROUPS.items():
        add_dataclass_flags(groups[title], TrainConfig, {n: _TRAIN_HELP[n] for n in names}, "train.")
        if title.startswith("model"):
            add_override_flags(groups[title], UNetConfig, _MODEL_HELP, "model.", _MODEL_FLAG_NAMES)
        if title == "process":
            groups[title].add_argument(
                "--process",
                dest="process_kind",
                default=None,
                help=f"the forward process: {', '.join(PROCESS_KINDS)} "
                "(default: gaussian; with --resume: the run's own)",
            )
            add_alternative_flags(
                groups[title], PROCESS_KINDS, _process_flag_help(), "diffusion.", _FLAG_NAMES
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


RESUME_CHANGEABLE = (
    "steps",
    "epochs",
    "lr",
    "grad_clip",
    "sample_every",
    "sample_every_epoch",
    "previews",
    "checkpoint_every",
    "log_every",
    "keep_checkpoints",
    "num_workers",
    "tensorboard",
    "preview_images",
    "preview_sampler",
    "preview_steps",
    "max_nonfinite_steps",
    "threads",
)
"""The train settings a resumed run may change; the others would make it another run."""
INHERITED_FROM_PARENT = ("preset", "image_size", "channels", "task", "low_res")
"""Train settings that ``--init-from`` takes from the parent run (with its process)."""


def _flag(name: str) -> str:
    return _FLAG_NAMES.get(name, "--" + name.replace("_", "-"))


_FLAG_NAMES = {"num_timesteps": "--timesteps"}


def _resumed_plan(saved: Any, args: argparse.Namespace) -> tuple[Any, list[str]]:
    """The saved run's TrainConfig with the explicitly given changeable flags applied, and a
    note per change ("changed: --steps 300 -> 500"); any other explicit flag that differs
    from the saved value is refused with one line."""
    from dataclasses import replace

    explicit: set[str] = getattr(args, "explicit", set())
    train_values = dataclass_values(args, "train.")
    diffusion_values = dataclass_values(args, "diffusion.")
    refused = [
        (_flag(name), getattr(saved.diffusion, name, None), value)
        for name, value in diffusion_values.items()
        if value is not None and value != getattr(saved.diffusion, name, None)
    ]
    if args.process_kind is not None and args.process_kind != saved.diffusion.kind:
        refused.insert(0, ("--process", saved.diffusion.kind, args.process_kind))
    if args.data is not None and args.data != saved.train.data:
        refused.insert(0, ("DATA", saved.train.data, args.data))
    changes: dict[str, Any] = {}
    for name, value in train_values.items():
        old = getattr(saved.train, name)
        if f"train.{name}" not in explicit or value == old:
            continue
        if name in RESUME_CHANGEABLE:
            changes[name] = value
        else:
            refused.append((_flag(name), old, value))
    if refused:
        flag, old, new = refused[0]
        raise DifforgeError(
            f"{flag} cannot change when resuming (the run has {old!r}, asked {new!r}): it would be another "
            "run; start one with --init-from RUN --out NEW to fine-tune with other settings"
        )
    if "epochs" in changes and "steps" not in changes:
        changes["steps"] = None  # the new number of epochs sets the length
    notes = [
        f"changed: {_flag(name)} {getattr(saved.train, name)} -> {value}" for name, value in changes.items()
    ]
    return replace(saved.train, **changes).validate(), notes


def _process_config(kind: str | None, values: dict[str, Any]) -> Any:
    """The process config of ``--process KIND`` with the process flags given (None = not
    given: the kind's own default); a flag of another kind is a one-line error."""
    from dataclasses import fields

    from difforge.process import PROCESS_KINDS

    kind = kind or "gaussian"
    config_class = PROCESS_KINDS.get(kind)
    if config_class is None:
        raise DifforgeError(f"--process must be one of {', '.join(PROCESS_KINDS)}; got {kind!r}")
    own = {f.name for f in fields(config_class)}
    given = {name: value for name, value in values.items() if value is not None}
    foreign = [name for name in given if name not in own]
    if foreign:
        owners = [k for k, c in PROCESS_KINDS.items() if foreign[0] in {f.name for f in fields(c)}]
        raise DifforgeError(
            f"{_flag(foreign[0])} does not apply to --process {kind} (it is a setting of {', '.join(owners)})"
        )
    return config_class(**given)


def _model_flag(name: str) -> str:
    return _MODEL_FLAG_NAMES.get(name, "--" + name.replace("_", "-"))


def _in_flag_names(error: DifforgeError) -> DifforgeError:
    """``UNetConfig.channel_mult ...`` -> ``--channel-mult ...``: the flag the user typed."""
    text = str(error)
    for name in _MODEL_HELP:
        text = text.replace(f"UNetConfig.{name}", _model_flag(name))
    return DifforgeError(text)


def _check_model_flags(train: Any, model_values: dict[str, Any]) -> None:
    """The preset with the model flags, built before any data is read (at the asked size; with
    one class, so a recipe with cls_attn waits for the data to say whether it has classes)."""
    from difforge.nn import UNetConfig
    from difforge.runs.config import DEFAULT_IMAGE_SIZE

    if not model_values:
        return
    size = train.image_size or DEFAULT_IMAGE_SIZE
    try:
        UNetConfig.preset(train.preset, image_size=size, num_classes=1, **model_values)
    except DifforgeError as error:
        message = str(_in_flag_names(error))
        if "--attention-res" in message and "attention_resolutions" not in model_values:
            message += (
                f"; they are the {train.preset} preset's: give --attention-res with sides of these levels, "
                "or --attention-res none"
            )
        raise DifforgeError(message) from None


def _custom_schedule(path: str, diffusion_values: dict[str, Any]) -> dict[str, Any]:
    """``--betas FILE``: T numbers (text, separated by commas or white space, or a .npy
    array), the schedule ``custom`` with T timesteps; validated as any schedule."""
    import numpy as np

    from difforge.diffusion import CUSTOM_SCHEDULE
    from difforge.schedule import NoiseSchedule

    for name in ("schedule", "beta_start", "beta_end"):
        if diffusion_values.get(name) is not None:
            raise DifforgeError(f"--betas gives the whole schedule: drop {_flag(name)}")
    file = Path(path)
    if not file.is_file():
        raise DifforgeError(f"--betas {path}: no such file")
    try:
        if file.suffix == ".npy":
            values = np.load(file, allow_pickle=False)
        else:
            text = file.read_text(encoding="utf-8").replace(",", " ")
            values = np.array([float(v) for v in text.split()])
    except (OSError, ValueError, UnicodeDecodeError) as error:
        raise DifforgeError(f"--betas {path}: not a list of numbers ({error})") from None
    try:
        NoiseSchedule(values)
    except DifforgeError as error:
        raise DifforgeError(f"--betas {path}: {error}") from None
    steps = diffusion_values.get("num_timesteps")
    if steps is not None and steps != len(values):
        raise DifforgeError(f"--betas {path} holds {len(values)} betas, --timesteps says {steps}")
    return {
        "schedule": CUSTOM_SCHEDULE,
        "betas": [float(v) for v in values.ravel()],
        "num_timesteps": len(values),
    }


def _print_dry_run(run_config: Any, dataset: Any) -> None:
    print(
        f"dry run: {run_config.train.preset} {_model_name(run_config)} on {dataset.source} ({len(dataset)} "
        f"images, {dataset.num_classes} classes, {dataset.image_size}x{dataset.image_size}x"
        f"{dataset.channels}); "
        "nothing trained, nothing written"
    )
    for line in _architecture_lines(run_config.model):
        print(f"  {line}")


def _architecture_lines(model: Any) -> list[str]:
    """`difforge.nn.summary.describe_unet` of a U-Net, or of each expert of an ensemble."""
    from difforge.nn.summary import describe_unet

    networks = getattr(model, "experts", None)
    if networks is None:
        return describe_unet(model)
    lines = []
    for number, network in enumerate(networks):
        low, high = model.bounds[number], model.bounds[number + 1]
        lines.append(f"expert {number} (t in [{low}, {high})):")
        lines.extend(f"  {line}" for line in describe_unet(network))
    return lines


def _resume(trainer: Any, out: Path, is_main: bool) -> None:
    """Load the newest intact checkpoint, or start the saved plan from step 0 when the run
    was stopped before its first one."""
    from difforge.runs.storage import checkpoint_dirs

    if not checkpoint_dirs(out):
        if is_main:
            print(f"note: {out} has no checkpoint yet: starting its saved plan from step 0", file=sys.stderr)
        return
    step = trainer.resume()
    if step > trainer.total_steps:
        raise DifforgeError(
            f"--steps {trainer.total_steps}: the run is already at step {step}; give --steps {step} or more"
        )


def _run_train(args: argparse.Namespace) -> int:
    import torch

    from difforge.runs import RunConfig, TrainConfig, resolve_device
    from difforge.training import Trainer, prepare_run
    from difforge.training.trainer import TrainingInterrupted

    train_values = dataclass_values(args, "train.")
    diffusion_values = dataclass_values(args, "diffusion.")
    model_values = {k: v for k, v in dataclass_values(args, "model.").items() if v is not None}
    if args.betas is not None:
        diffusion_values.update(_custom_schedule(args.betas, diffusion_values))
    data = args.data if args.data is not None else field_default(TrainConfig, "data")
    train_values["data"] = data
    ctx = _distributed_context()
    out = Path(args.out) if args.out else Path("runs") / Path(str(data).rstrip("/")).name
    if model_values and (args.resume or train_values.get("init_from") is not None):
        how = "when resuming" if args.resume else "with --init-from"
        raise DifforgeError(f"{_model_flag(next(iter(model_values)))}: {how} the network is the run's own")
    if args.resume:
        saved = RunConfig.load(out)
        (train_config, changes), process_config = _resumed_plan(saved, args), saved.diffusion
        model_overrides = saved.model.to_dict()
    else:
        train_config = TrainConfig(**train_values).validate()
        if (out / "config.json").exists():
            raise DifforgeError(
                f"{out} already holds a run: pass --resume to continue it, or choose another --out"
            )
        if train_config.init_from is not None:
            explicit = getattr(args, "explicit", set())
            inherited = [f"train.{name}" for name in INHERITED_FROM_PARENT]
            given = [_flag(dest.split(".", 1)[1]) for dest in inherited if dest in explicit]
            given += [_flag(name) for name, value in diffusion_values.items() if value is not None]
            given += ["--process"] if args.process_kind is not None else []
            if given:
                raise DifforgeError(
                    f"{given[0]}: with --init-from the model, its size and the process are the parent run's"
                )
        process_config = _process_config(args.process_kind, diffusion_values)
        model_overrides = model_values
        changes = []
        _check_model_flags(train_config, model_values)
    device = resolve_device(args.device)
    if device.type == "cuda" and ctx.world_size > 1:
        device = torch.device("cuda", ctx.local_rank)
    try:
        model, process, dataset, run_config = prepare_run(train_config, process_config, model_overrides)
    except DifforgeError as error:
        raise _in_flag_names(error) from None
    if args.dry_run:
        _print_dry_run(run_config, dataset)
        return 0
    trainer = Trainer(
        model,
        process,
        dataset,
        run_config,
        out,
        device=device,
        ctx=ctx,
        progress=not args.no_progress,
    )
    if args.resume:
        _resume(trainer, out, ctx.is_main)
        for note in changes if ctx.is_main else ():
            print(note, file=sys.stderr)
    if ctx.is_main:
        params = sum(p.numel() for p in model.parameters())
        start = f" from step {trainer.step}" if trainer.step else ""
        print(
            f"difforge {__version__}: training {run_config.train.preset} {_model_name(run_config)} "
            f"({params / 1e6:.2f}M parameters) "
            f"on {dataset.source} ({len(dataset)} images, {dataset.num_classes} classes, "
            f"{dataset.image_size}x{dataset.image_size}x{dataset.channels}) "
            f"for {trainer.total_steps} steps{start} "
            f"on {device}{f' x {ctx.world_size}' if ctx.world_size > 1 else ''}; run folder: {out}",
            file=sys.stderr,
        )
        if dataset.skipped or dataset.excluded:
            print(dataset.summary(), file=sys.stderr)
        for note in dataset.notes:
            print(f"note: {note}", file=sys.stderr)
        if run_config.data.attribution:
            print(run_config.data.attribution, file=sys.stderr)
    try:
        trainer.train()
    except TrainingInterrupted as stop:
        if ctx.is_main:
            saved_at = f"saved {stop.checkpoint}" if stop.checkpoint else "its checkpoint is written"
            print(
                f"interrupted after step {stop.step}; {saved_at}. "
                f"Continue with: difforge train --resume --out {out}",
                file=sys.stderr,
            )
        return 130
    except KeyboardInterrupt:
        if ctx.is_main:
            print(
                f"\ninterrupted in the middle of step {trainer.step + 1}: it is lost, the checkpoints "
                f"are intact. Continue with: difforge train --resume --out {out}",
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
        "--labels",
        dest="label_sets",
        action="append",
        help='label set of a multi-label run, e.g. "smiling,glasses"; repeat for several sets, cycled '
        "(default: no labels)",
    )
    parser.add_argument(
        "--cond",
        help="condition image or folder of an image-conditioned run: -n samples per picture, written as "
        "a grid of condition | samples",
    )
    parser.add_argument(
        "--upsample",
        action="append",
        metavar="SR_RUN[:SETTINGS]",
        help="a super-resolution stage after RUN (repeat for more), with its own sampling settings, e.g. "
        "runs/sr:steps=50,sampler=ddim,cond_noise=0.1 (default: the sampling defaults)",
    )
    parser.add_argument(
        "--weights", choices=("ema", "raw"), default="ema", help="EMA or raw weights (default: ema)"
    )
    parser.add_argument("--out", help="output grid PNG (default: RUN/samples/sample_<seed>.png)")
    parser.add_argument("--no-grid", action="store_true", help="do not write the grid PNG")
    parser.add_argument("--images-dir", help="also write every image as its own PNG into this folder")
    parser.add_argument(
        "--prefix",
        default="",
        help="start of the --images-dir file names: PREFIX00000.png, ... (default: none)",
    )
    parser.add_argument("--gif", help="write a GIF of the denoising (x_t at every step, then the result)")
    parser.add_argument("--fps", type=float, default=8.0, help="GIF frames per second (default: 8)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default: auto)")
    parser.set_defaults(func=_run_sample)


MAX_FPS = 100.0
_SAFE_PREFIX = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")


def _check_sample_outputs(args: argparse.Namespace) -> None:
    """Every output of ``sample`` checked before the model is loaded: numbers in range, file
    types known by extension, folders writable."""
    from difforge.images import IMAGE_FORMATS, check_output_file, check_output_folder

    check_number("--num-images", args.num_images, low=1, integer=True)
    check_number("--fps", args.fps, low=0, low_open=True, high=MAX_FPS)
    if args.no_grid and not args.images_dir and not args.gif:
        raise DifforgeError("nothing to write: --no-grid needs --images-dir or --gif")
    if args.out and not args.no_grid:
        check_output_file(args.out, "--out", IMAGE_FORMATS)
    if args.gif:
        check_output_file(args.gif, "--gif", {".gif": "GIF"})
    if args.images_dir:
        if Path(args.images_dir).is_file():
            raise DifforgeError(f"--images-dir {args.images_dir}: is a file, not a folder")
        check_output_folder(args.images_dir, "--images-dir")
    if args.prefix:
        if not args.images_dir:
            raise DifforgeError("--prefix names the files of --images-dir: add --images-dir FOLDER")
        if not _SAFE_PREFIX.fullmatch(args.prefix):
            raise DifforgeError(
                f"--prefix {args.prefix!r}: use at most 64 letters, digits, '-', '_' or '.' "
                "(it starts file names)"
            )


def _check_sample_memory(args: argparse.Namespace, image_shape: tuple[int, int, int], steps: int) -> None:
    """Refuse, with the estimate, a ``sample`` whose results would not fit in half the memory:
    the images of a grid (and every step of a GIF) are held at once; ``--images-dir`` alone
    streams them batch by batch."""
    channels, height, width = image_shape
    per_image = channels * height * width
    held = 0 if args.no_grid else 2 * per_image  # the images and the grid
    if args.gif:
        held += (steps + 1) * 4 * per_image  # float32 x_t of every step, then the grid
    needed = args.num_images * (held + 8)  # + the (N,) int64 labels
    limit = _physical_memory() // 2
    if needed > limit:
        raise DifforgeError(
            f"sample -n {args.num_images}: holding the grid{' and GIF' if args.gif else ''} of "
            f"{args.num_images} images of {height}x{width}x{channels} needs about {needed / 2**30:.1f} GiB, "
            f"over half this machine's memory ({limit / 2**30:.1f} GiB): use fewer images, or --no-grid "
            "--images-dir DIR, which writes them batch by batch"
        )


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: assume 8 GiB
        return 8 * 2**30


def _run_sample(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from difforge.images import make_grid, save_gif, save_image, save_png, to_uint8
    from difforge.pipeline import Pipeline
    from difforge.sampling.config import sample_config_from_args

    _check_sample_outputs(args)
    sampling = sample_config_from_args(args)
    if args.upsample:
        return _run_cascade(args, sampling)
    pipe = Pipeline.from_run(args.run, device=args.device, weights=args.weights)
    if args.cond:
        return _run_conditioned(args, pipe, sampling)
    _check_sample_memory(args, pipe.image_shape, sampling.steps)
    classes = _class_list(args.classes)
    frames: dict[int, list[torch.Tensor]] = {}

    def keep(batch: int, info: Any) -> None:
        frames.setdefault(info.index, []).append(info.x.detach().cpu())

    columns = None
    if pipe.num_classes and classes:
        columns = len(classes) if len(classes) <= 16 else None
    batches = pipe.batches(
        args.num_images,
        classes=classes,
        labels=args.label_sets,
        config=sampling,
        callback=keep if args.gif else None,
    )
    kept: list[np.ndarray] = []
    written: list[Path] = []
    count = 0
    folder = Path(args.images_dir) if args.images_dir else None
    for batch in batches:
        if folder is not None:
            for image in batch:
                save_png(folder / f"{args.prefix}{count:05d}.png", image)
                count += 1
        else:
            count += len(batch)
        if not args.no_grid or args.gif:
            kept.append(batch)
    if folder is not None:
        written.append(folder)
    images = np.concatenate(kept) if kept else None
    if not args.no_grid and images is not None:
        out = Path(args.out) if args.out else pipe.run_dir / "samples" / f"sample_seed{sampling.seed}.png"
        written.append(save_image(out, make_grid(images, columns=columns)))
    if args.gif and images is not None:
        grids = [make_grid(to_uint8(torch.cat(frames[i])), columns=columns) for i in sorted(frames)]
        grids.append(make_grid(images, columns=columns))
        written.append(save_gif(args.gif, grids, fps=args.fps))
    print(f"wrote {count} images: " + ", ".join(str(p) for p in written), file=sys.stderr)
    return 0


def _class_list(items: list[str] | None) -> list[str] | None:
    """``--class`` values, repeatable or comma-separated, as one list (None when not given)."""
    if not items:
        return None
    return [part.strip() for item in items for part in item.split(",") if part.strip()]


def _write_images(folder: Path, names: list[str], images: Any) -> None:
    """``NAME.png`` per image into ``folder``; a name met twice gets ``_`` appended."""
    from difforge.images import save_png

    seen: set[str] = set()
    for name, image in zip(names, images, strict=True):
        while name in seen:
            name += "_"
        seen.add(name)
        save_png(folder / f"{name}.png", image)


def _read_pictures(paths: list[str], shape: tuple[int, int, int]) -> tuple[Any, list[Path], int]:
    """Pictures (files or folders) read at (C, S, S) as training images are; skipped ones
    reported on stderr. Returns ((N, C, S, S) in [-1, 1], the files, how many skipped)."""
    from difforge.data import load_image_files

    channels, size, _ = shape
    images, files, skipped = load_image_files(paths, size, channels)
    for name, reason in skipped:
        print(f"skipped {name}: {reason}", file=sys.stderr)
    return images, files, len(skipped)


def _run_conditioned(args: argparse.Namespace, pipe: Any, sampling: Any) -> int:
    """``sample RUN --cond PICTURES -n K``: K samples per condition picture."""
    import numpy as np

    from difforge.conditioning import ImageCondition, resize_images
    from difforge.images import make_grid, save_image, to_uint8

    if args.gif:
        raise DifforgeError("--gif does not apply with --cond")
    sampling.validate(pipe.process.kind)
    pictures, files, skipped = _read_pictures([args.cond], pipe.condition_shape)
    per_picture = args.num_images
    conditions = pictures.repeat_interleave(per_picture, dim=0)
    samples = pipe(
        conditions.shape[0],
        classes=_class_list(args.classes),
        labels=args.label_sets,
        cond={ImageCondition.key: conditions},
        config=sampling,
    )
    written: list[Path] = []
    if args.images_dir:
        folder = Path(args.images_dir)
        names = [f"{args.prefix}{file.stem}_{k:03d}" for file in files for k in range(per_picture)]
        _write_images(folder, names, samples)
        written.append(folder)
    if not args.no_grid:
        shown = resize_images(pictures, pipe.image_shape[1])
        if shown.shape[1] != pipe.image_shape[0]:  # a grey condition of colour images, or the reverse
            shown = shown.mean(1, keepdim=True).expand(-1, pipe.image_shape[0], -1, -1)
        grouped = samples.reshape(len(files), per_picture, *samples.shape[1:])
        rows = np.concatenate([to_uint8(shown)[:, None], grouped], axis=1).reshape(-1, *samples.shape[1:])
        out = Path(args.out) if args.out else pipe.run_dir / "samples" / f"cond_seed{sampling.seed}.png"
        written.append(save_image(out, make_grid(rows, columns=per_picture + 1)))
    print(
        f"wrote {len(samples)} images ({per_picture} per condition, {len(files)} conditions"
        f"{f', {skipped} skipped' if skipped else ''}): " + ", ".join(str(p) for p in written),
        file=sys.stderr,
    )
    return 0


def _run_cascade(args: argparse.Namespace, sampling: Any) -> int:
    """``sample BASE --upsample SR [--upsample SR2]``: the base run, then each stage."""
    import numpy as np

    from difforge.images import make_grid, save_image
    from difforge.pipeline import Pipeline
    from difforge.sampling.config import parse_stage

    if args.gif or args.cond:
        raise DifforgeError(f"{'--gif' if args.gif else '--cond'} does not apply with --upsample")
    stages = [parse_stage(spec, sampling) for spec in args.upsample]
    cascade = Pipeline.from_runs(
        args.run, *[run for run, _ in stages], device=args.device, weights=args.weights
    )
    configs = [sampling] + [config for _, config in stages]
    cascade.check(configs)
    _check_sample_memory(args, cascade.stages[-1].image_shape, sampling.steps)
    outputs = cascade(
        args.num_images, classes=_class_list(args.classes), labels=args.label_sets, configs=configs
    )
    final = outputs[-1]
    written: list[Path] = []
    if args.images_dir:
        folder = Path(args.images_dir)
        _write_images(folder, [f"{args.prefix}{i:05d}" for i in range(len(final))], final)
        written.append(folder)
    if not args.no_grid:
        default = cascade.base.run_dir / "samples" / f"cascade_seed{sampling.seed}.png"
        out = Path(args.out) if args.out else default
        written.append(save_image(out, make_grid(final)))
        size = final.shape[1]  # every stage enlarged to the final size (nearest: its own pixels)
        nearest = [np.arange(size) * o.shape[1] // size for o in outputs]
        enlarged = [o[:, index][:, :, index] for o, index in zip(outputs, nearest, strict=True)]
        rows = np.stack(enlarged, axis=1).reshape(-1, *final.shape[1:])
        stages_path = out.with_name(f"{out.stem}_stages{out.suffix}")
        written.append(save_image(stages_path, make_grid(rows, columns=len(outputs) * 2)))
    sizes = " -> ".join(f"{o.shape[1]}px" for o in outputs)
    print(f"wrote {len(final)} images ({sizes}): " + ", ".join(str(p) for p in written), file=sys.stderr)
    return 0


# ---- upscale --------------------------------------------------------------------------------


def _add_picture_flags(parser: argparse.ArgumentParser, class_help: str) -> None:
    """The flags of a command that runs a model over the user's pictures (upscale, restore)."""
    from difforge.sampling.config import add_sample_flags

    add_sample_flags(parser)
    parser.add_argument("--class", dest="classes", action="append", help=class_help)
    parser.add_argument(
        "--weights", choices=("ema", "raw"), default="ema", help="EMA or raw weights (default: ema)"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default: auto)")


def _open_for_pictures(args: argparse.Namespace) -> tuple[Path, Any, Any]:
    """(the --out folder, checked writable; the sampling settings; the run's `Pipeline`)."""
    from difforge.images import check_output_folder
    from difforge.pipeline import Pipeline
    from difforge.sampling.config import sample_config_from_args

    out = Path(args.out)
    if out.is_file():
        raise DifforgeError(f"--out {out}: is a file, not a folder")
    check_output_folder(out, "--out")
    sampling = sample_config_from_args(args)
    return out, sampling, Pipeline.from_run(args.run, device=args.device, weights=args.weights)


def _add_upscale(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "upscale",
        help="super-resolve your own low-resolution pictures with a super-resolution run",
        description="Each picture is area-averaged (or enlarged) to the run's input size and super-resolved "
        "to its image size; NAME.png per picture and comparison.png (input | upscaled) go to --out.",
    )
    parser.add_argument("run", help="a super-resolution run folder (difforge train --task superres)")
    parser.add_argument("images", nargs="+", help="image files or folders of images")
    parser.add_argument("--out", required=True, help="folder for the upscaled images and comparison.png")
    _add_picture_flags(
        parser,
        "class name or id of the pictures for a class-conditional stage, cycled (default: its null label)",
    )
    parser.set_defaults(func=_run_upscale)


def _run_upscale(args: argparse.Namespace) -> int:
    import numpy as np

    from difforge.conditioning import resize_images
    from difforge.images import make_grid, save_png, to_uint8

    out, sampling, pipe = _open_for_pictures(args)
    pipe.check_superres()
    sampling.validate(pipe.process.kind)
    pictures, files, skipped = _read_pictures(args.images, pipe.condition_shape)
    upscaled = pipe.upscale(pictures, classes=_class_list(args.classes), config=sampling)
    _write_images(out, [file.stem for file in files], upscaled)
    size = pipe.image_shape[1]
    enlarged = to_uint8(resize_images(pictures, size))
    pairs = np.stack([enlarged, upscaled], axis=1).reshape(-1, *upscaled.shape[1:])
    comparison = save_png(out / "comparison.png", make_grid(pairs, columns=2))
    low = pipe.condition_shape[1]
    print(
        f"upscaled {len(files)} pictures {low}px -> {size}px{f' ({skipped} skipped)' if skipped else ''}: "
        f"{out}/, {comparison} (input, enlarged bilinearly | upscaled)",
        file=sys.stderr,
    )
    return 0


# ---- restore --------------------------------------------------------------------------------


def _add_restore(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "restore",
        help="restore degraded pictures with a cold-diffusion run (deblur, unmask, de-pixelate)",
        description="Walk degraded pictures back to clean ones with a cold-diffusion run's restorer: "
        "the pictures are read as training images are (resized, centre-cropped) and taken to be at "
        "degradation level --from-t. With --degrade they are clean pictures, degraded here first.",
    )
    parser.add_argument("run", help="a cold-diffusion run folder written by difforge train --process cold")
    parser.add_argument("images", nargs="+", help="image files or folders of images")
    parser.add_argument(
        "--from-t", type=int, default=None, help="the degradation level K of the pictures, 1..T (default: T)"
    )
    parser.add_argument("--out", required=True, help="folder for the restored images and comparison.png")
    parser.add_argument(
        "--degrade", action="store_true", help="apply D(x, K) to the (clean) pictures first, to compare"
    )
    _add_picture_flags(
        parser,
        "class name or id of the pictures, cycled (default: the null label of a model trained with label "
        "dropout)",
    )
    parser.set_defaults(func=_run_restore)


def _run_restore(args: argparse.Namespace) -> int:
    import numpy as np

    from difforge.images import make_grid, save_png, to_uint8

    out, sampling, pipe = _open_for_pictures(args)
    process = pipe.restoring_process()
    level = process.num_timesteps if args.from_t is None else args.from_t
    check_number("--from-t", level, low=1, high=process.num_timesteps, integer=True)
    sampling.validate(process.kind)  # before any picture is read
    images, files, skipped = _read_pictures(args.images, pipe.image_shape)
    degraded = pipe.degrade(images, level, seed=sampling.seed) if args.degrade else images
    restored = pipe.restore(degraded, from_t=level, classes=_class_list(args.classes), config=sampling)
    _write_images(out, [file.stem for file in files], restored)
    columns = [to_uint8(images)] + ([to_uint8(degraded)] if args.degrade else []) + [restored]
    rows = np.stack(columns, axis=1).reshape(-1, *restored.shape[1:])
    comparison = save_png(out / "comparison.png", make_grid(rows, columns=len(columns)))
    shown = "clean | degraded | restored" if args.degrade else "input | restored"
    print(
        f"restored {len(files)} images from level {level} of {process.num_timesteps}"
        f"{f' ({skipped} skipped)' if skipped else ''}: {out}/, {comparison} ({shown})",
        file=sys.stderr,
    )
    return 0


# ---- noise ----------------------------------------------------------------------------------

NOISE_PICTURE_SIZE = 64
"""The side pictures are read at by ``difforge noise`` without a run."""


def _add_noise(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "noise",
        help="draw pictures under the forward process: x_t at chosen t, one row per picture",
        description="Show the forward process: each picture noised (or, for a cold-diffusion run, "
        "degraded) at the levels --t, under a run's process or a named Gaussian schedule.",
    )
    parser.add_argument("images", nargs="+", help="image files or folders of images")
    parser.add_argument("--out", required=True, help="the strip (PNG, JPEG, ...)")
    parser.add_argument("--run", help="use this run's process and image size (default: a Gaussian schedule)")
    parser.add_argument(
        "--t",
        dest="levels",
        help="comma-separated timesteps (default: 0, T/20, T/10, T/4, T/2, T-1; a cold run: 0, T/4, ..., T)",
    )
    parser.add_argument("--schedule", help="named beta schedule without --run (default: linear)")
    parser.add_argument("--timesteps", type=int, help="T of the schedule without --run (default: 1000)")
    parser.add_argument(
        "--image-size",
        type=int,
        help=f"side the pictures are read at (default: the run's, else {NOISE_PICTURE_SIZE})",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise (default: 0)")
    parser.set_defaults(func=_run_noise)


def _noise_levels(text: str | None, process: Any) -> list[int]:
    total = int(process.num_timesteps)
    cold = process.kind == "cold"
    if text is None:
        parts = [0, total // 4, total // 2, 3 * total // 4, total] if cold else [
            0, total // 20, total // 10, total // 4, total // 2, total - 1]  # fmt: skip
        return sorted(set(parts))
    try:
        levels = [int(v) for v in text.split(",")]
    except ValueError:
        raise DifforgeError(f"--t {text!r}: give whole numbers separated by commas, e.g. 0,100,500") from None
    high = total if cold else total - 1
    for level in levels:
        check_number("--t", level, low=0, high=high, integer=True)
    return levels


def _run_noise(args: argparse.Namespace) -> int:
    import torch

    from difforge.diffusion import DiffusionConfig
    from difforge.images import IMAGE_FORMATS, check_output_file, make_grid, save_image, to_uint8
    from difforge.runs import RunConfig

    check_output_file(args.out, "--out", IMAGE_FORMATS)
    if args.run is not None:
        if args.schedule is not None or args.timesteps is not None:
            raise DifforgeError("--schedule and --timesteps name a process: with --run the run's is used")
        config = RunConfig.load(args.run)
        process_config, size, channels = config.diffusion, config.model.image_size, config.model.in_channels
    else:
        process_config = DiffusionConfig(
            schedule=args.schedule or "linear", num_timesteps=args.timesteps or 1000
        )
        size, channels = NOISE_PICTURE_SIZE, 3
    size = args.image_size or size
    check_number("--image-size", size, low=4, high=2048, integer=True)
    process = process_config.build()
    levels = _noise_levels(args.levels, process)
    pictures, files, skipped = _read_pictures(args.images, (channels, size, size))
    generator = torch.Generator().manual_seed(args.seed)
    columns = []
    for level in levels:
        t = torch.full((pictures.shape[0],), level, dtype=torch.long)
        noise = torch.randn(pictures.shape, generator=generator)
        if process.kind == "cold":
            needs = process.degradation.needs_noise
            columns.append(process.degrade(pictures, t, noise if needs else None))
        else:
            columns.append(process.q_sample(pictures, t, noise))
    strip = torch.stack(columns, dim=1).reshape(-1, *pictures.shape[1:])
    written = save_image(args.out, make_grid(to_uint8(strip), columns=len(levels)))
    process_name = f"{process.kind} {getattr(process_config, 'schedule', '')}".strip()
    print(
        f"{written}: {len(files)} pictures{f' ({skipped} skipped)' if skipped else ''} under the "
        f"{process_name} process at t = {', '.join(map(str, levels))} of {process.num_timesteps}",
        file=sys.stderr,
    )
    return 0


# ---- plot -----------------------------------------------------------------------------------


def _add_plot(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "plot",
        help="plot a run's training curves: loss terms, learning rate, grad norm, images/s",
        description="Draw metrics.jsonl against the step, each curve smoothed over its raw values "
        "(needs matplotlib: pip install 'difforge[plot]').",
    )
    parser.add_argument("run", help="run folder")
    parser.add_argument("--out", help="the plot (PNG, SVG, PDF; default: RUN/samples/training.png)")
    parser.set_defaults(func=_run_plot)


def _metrics_records(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The JSON objects of ``metrics.jsonl`` and how many non-empty lines were not one (a line
    cut by a kill, or an integer too long to convert). OSError as it comes."""
    records, damaged = [], 0
    for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        elif line.strip():
            damaged += 1
    return records, damaged


def _run_plot(args: argparse.Namespace) -> int:
    from difforge.evaluation.plots import plot_training, require_matplotlib
    from difforge.runs import RunConfig

    require_matplotlib()  # before anything is read
    run = Path(args.run)
    RunConfig.load(run)
    out = Path(args.out) if args.out else run / "samples" / "training.png"
    if out.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise DifforgeError(f"--out {out}: give a .png, .svg or .pdf file")
    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        raise DifforgeError(f"{metrics} is missing: the run has logged nothing yet")
    records, damaged = _metrics_records(metrics)
    written = plot_training(records, out, f"{run} ({len(records)} logged steps)")
    skipped = f" ({damaged} damaged lines skipped)" if damaged else ""
    print(f"wrote {written}: {len(records)} logged steps{skipped}", file=sys.stderr)
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
    if metrics.is_file():  # the last line that parses: a killed run may have cut the last one
        try:
            records, _ = _metrics_records(metrics)
        except OSError:
            records = []
        last_metrics = records[-1] if records else {}
    model = config.model
    print(f"run:        {run}")
    print(f"version:    difforge {config.difforge_version}")
    data = config.data
    if data.source or not data.attribution:
        print(f"data:       {data.source} ({data.num_images} images, fingerprint {data.fingerprint})")
    else:
        print(f"data:       {data.attribution}")
    classes = ", ".join(config.data.class_names) if config.data.class_names else "none"
    print(f"classes:    {classes}")
    print(f"conditions: {', '.join(config.conditioning or []) or 'none'}")
    train = config.train
    if train.labels:
        print(f"labels:     multi-label table {train.labels} ({len(config.data.class_names)} labels)")
    if train.cond_dir:
        print(f"paired:     condition pictures from {config.data.cond_source or train.cond_dir}")
    if train.task == "superres":
        noise = train.condition_noise_max()
        augmented = f"noise augmentation s ~ U(0, {noise:g})" if noise else "no noise augmentation"
        blur = f", blur std up to {train.cond_blur:g} px" if train.cond_blur else ""
        sizes = f"{train.low_res_size()} px -> {model.image_size} px"
        print(f"task:       super-resolution {sizes}, {augmented}{blur}")
    if config.data.excluded:
        print(f"left out:   {config.data.excluded} pictures (no label entry or no condition picture)")
    print(
        f"model:      {config.train.preset} {_model_name(config)}, "
        f"{model.image_size}x{model.image_size}x{model.in_channels}"
    )
    for line in _architecture_lines(model):
        print(f"            {line}")
    bounds = getattr(model, "bounds", None)
    if bounds is not None:
        ranges = ", ".join(f"[{low}, {high})" for low, high in zip(bounds, bounds[1:], strict=False))
        origin = model.parent.get("run", "") if isinstance(model.parent, dict) else ""
        print(
            f"experts:    {len(bounds) - 1} over t in {ranges}"
            + (f", branched from {origin}" if origin else "")
        )
    describe = getattr(config.diffusion, "describe", None)
    settings = (
        describe() if describe else {k: v for k, v in config.diffusion.to_dict().items() if k != "kind"}
    )
    print(f"process:    {config.diffusion.kind}, " + ", ".join(f"{k} {v}" for k, v in settings.items()))
    if checkpoints:
        print(f"checkpoints: {', '.join(p.name for p in checkpoints)}")
    else:
        print("checkpoints: none")
    if last_metrics:
        loss = last_metrics.get("loss")
        shown = f"{loss:.4f}" if isinstance(loss, (int, float)) else repr(loss)
        print(f"last log:   step {last_metrics.get('step')}, loss {shown}")
    return 0


# ---- main -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="difforge", description="Train image diffusion models and sample from them.")
    parser.add_argument("--version", action="version", version=f"difforge {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    _add_train(subparsers)
    _add_sample(subparsers)
    _add_restore(subparsers)
    _add_upscale(subparsers)
    _add_noise(subparsers)
    _add_plot(subparsers)
    _add_info(subparsers)
    from difforge.evaluation.commands import add_eval_parser
    from difforge.interop.commands import add_interop_parsers

    add_eval_parser(subparsers)
    add_interop_parsers(subparsers)
    options: list[str] = []
    for sub in subparsers.choices.values():
        for action in sub._actions:
            options.extend(s for s in action.option_strings if s.startswith("--"))
    _Parser.known_options = sorted(set(options))
    return parser


def _explicit_dests(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """The dests of the flags given on ``argv`` (not left at their defaults): parsed again
    into a namespace pre-filled with a marker, which argparse overwrites only when a flag
    is actually given."""
    unset = object()
    dests = {a.dest for a in parser._actions if a.dest not in (argparse.SUPPRESS, "help")}
    namespace = argparse.Namespace(**dict.fromkeys(dests, unset))
    parser.parse_known_args(list(argv), namespace)
    return {dest for dest in dests if getattr(namespace, dest) is not unset}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if getattr(args, "command", None) == "train":
        train_parser = parser._subparsers._group_actions[0].choices["train"]  # type: ignore[union-attr]
        args.explicit = _explicit_dests(train_parser, argv[argv.index("train") + 1 :])
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
