"""The ``difforge export`` and ``difforge import`` commands (`difforge.interop.diffusers`)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from difforge.runs.models import WEIGHT_FILES

FORMATS = ("diffusers",)


def add_interop_parsers(subparsers: Any) -> None:
    """Register ``export`` and ``import`` on the ``difforge`` command's subparsers."""
    export = subparsers.add_parser(
        "export",
        help="write a run as a diffusers pipeline folder (DDPMPipeline.from_pretrained loads it)",
        description="Write the run's U-Net and noise schedule as a diffusers DDPMPipeline folder: "
        "model_index.json, unet/ (config.json, diffusion_pytorch_model.safetensors), scheduler/. "
        "Runs diffusers cannot hold (ConvNeXt or linear/class/channel attention blocks, image or "
        "multi-label conditioning, cold or expert runs) are refused before anything is written.",
    )
    export.add_argument("run", help="run folder, or one of its checkpoints (RUN/checkpoints/step_N)")
    export.add_argument(
        "--format", choices=FORMATS, default="diffusers", help="the format (default: diffusers)"
    )
    export.add_argument("--out", required=True, help="a new (or empty) folder for the export")
    export.add_argument(
        "--weights", choices=tuple(WEIGHT_FILES), default="ema", help="EMA or raw weights (default: ema)"
    )
    export.set_defaults(func=_run_export)

    imported = subparsers.add_parser(
        "import",
        help="write a diffusers UNet2DModel folder as a difforge run",
        description="Read a diffusers pipeline folder (or its unet/ folder) with its scheduler config, in "
        "safetensors, and write a run folder that sample, eval and train --init-from take.",
    )
    imported.add_argument("folder", help="a diffusers pipeline folder (model_index.json) or a unet/ folder")
    imported.add_argument("--out", required=True, help="a new (or empty) folder for the run")
    imported.set_defaults(func=_run_import)


def _run_export(args: argparse.Namespace) -> int:
    from difforge.interop.diffusers import export_diffusers

    report = export_diffusers(args.run, args.out, weights=args.weights)
    print(
        f"exported {report.weights} ({report.tensors} tensors) to {report.out}/: "
        f"diffusers.DDPMPipeline.from_pretrained({str(report.out)!r}) loads it",
        file=sys.stderr,
    )
    return 0


def _run_import(args: argparse.Namespace) -> int:
    from difforge.interop.diffusers import import_diffusers

    report = import_diffusers(args.folder, args.out)
    for note in report.notes:
        print(f"note: {note}", file=sys.stderr)
    model = report.config.model
    print(
        f"imported {args.folder} as the run {report.out}/ ({model.image_size}x{model.image_size}x"
        f"{model.in_channels}, {report.config.diffusion.num_timesteps} timesteps): "
        f"difforge sample {report.out} -n 16",
        file=sys.stderr,
    )
    return 0
