"""A run's ``config.json``: typed dataclasses, one source of defaults.

`RunConfig` is the whole file: the model (by kind, `difforge.runs.models`), the process (by
kind, `difforge.process`), the conditioning kinds (`difforge.conditioning`), the training
settings (`TrainConfig`) and what the data was (`DataInfo`). The CLI builds its train flags
and their defaults from `TrainConfig`, so a default lives here and nowhere else.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from difforge import __version__
from difforge.conditioning import ClassLabel, ConditionContext, ImageCondition
from difforge.errors import DifforgeError, check_number, dataclass_from_mapping
from difforge.process import ProcessConfig, process_config_from_dict
from difforge.runs.models import model_config_from_dict, model_config_to_dict
from difforge.runs.storage import read_json_object
from difforge.runs.threads import parse_threads
from difforge.sampling import SampleConfig, sampler_names
from difforge.sampling.config import MAX_SEED
from difforge.timestep_sampling import TIMESTEP_SAMPLERS

CONFIG_FILE = "config.json"
DEFAULT_IMAGE_SIZE = 32
"""The training resolution when none is given."""
TASKS = ("generate", "superres")
SUPERRES_COND_NOISE_MAX = 0.5
"""The default training range of a super-resolution stage's noise augmentation, s ~ U(0, 0.5)."""
MAX_COND_BLUR = 4.0
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
LR_SCHEDULES = ("constant", "cosine", "linear", "step")
LR_DECAY_FACTOR = 0.5
"""The step schedule's default factor per decay."""
MAX_IMAGE_SIZE = 2048
"""The largest training resolution accepted (a 2048^2 batch of 64 is already ~3 GB of input)."""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass
class TrainConfig:
    """Everything about how a model is trained (the model and process have their own configs).

    Attributes:
        data: a folder of images or a built-in dataset name (mnist, digits, emoji).
        image_size: training resolution S (images are resized and cropped to S x S);
            None = 32.
        channels: 1 (grey) or 3 (RGB); None = the data's own.
        class_folders: label folder images by their first-level sub-folder.
        conditional: train class-conditionally when the data has labels.
        random_crop / hflip: augmentations.
        preset: the U-Net preset (see ``difforge.nn.UNetConfig.preset``).
        steps: optimizer steps; None = from ``epochs``, or the preset's default.
        epochs: passes over the data (used when ``steps`` is None).
        batch_size: images per optimizer step per device, before accumulation.
        grad_accum: micro-batches accumulated per optimizer step.
        lr / warmup_steps / weight_decay / grad_clip: AdamW with a linear warm-up;
            gradient norm clipping (0 = off).
        lr_schedule: the learning rate after the warm-up: ``constant``; ``cosine`` (lr_min +
            (lr - lr_min) (1 + cos(pi p)) / 2 at progress p from the end of the warm-up to the
            last step; Loshchilov & Hutter 2017 without restarts); ``linear`` (from lr down to
            lr_min); ``step`` (times lr_decay_factor every lr_decay_every steps, not below
            lr_min). `difforge.training.trainer.learning_rate` has the closed forms.
        lr_min: the floor of the cosine, linear and step schedules.
        lr_decay_every / lr_decay_factor: the step schedule's interval and factor.
        ema_decay: EMA of the weights; the decay warms up as min(decay, (1 + n) / (10 + n)).
        p_uncond: probability of replacing each condition by its null, each kind on its own
            draw (classifier-free guidance).
        timestep_sampler: ``uniform``, ``importance`` (IDDPM loss-second-moment) or
            ``lognormal`` (EDM's ln sigma ~ N(-1.2, 1.2^2), unweighted).
        mixed_precision: auto (bf16/fp16 on CUDA, off on CPU), no, bf16, fp16.
        seed: seeds the model initialisation, data order, noise and timesteps.
        sample_every / checkpoint_every / log_every: intervals in optimizer steps (0 = only
            at the end for samples and checkpoints).
        sample_every_epoch: preview at the end of every epoch instead of every ``sample_every``.
        previews: False writes no preview at all (not even at the end).
        keep_checkpoints: how many checkpoint folders to keep.
        num_workers: DataLoader worker processes.
        tensorboard: write TensorBoard events (needs the ``tensorboard`` package).
        preview_images / preview_sampler / preview_steps: the sample grid made during training
            (the sampler and steps default to `SampleConfig`'s; the other sampling settings
            are `SampleConfig`'s defaults).
        max_nonfinite_steps: stop (one-line error, checkpoints intact) after this many
            optimizer steps in a row with a non-finite loss or gradient; such steps are
            skipped and counted (``nonfinite_steps`` in metrics.jsonl).
        init_from: a run (or one of its checkpoints) whose EMA weights, model and process a
            new run starts from (fine-tuning); None = a fresh initialisation.
        threads: torch's CPU threads: ``auto`` (all cores, fewer while other processes keep
            cores busy: `difforge.runs.threads.ThreadGovernor`) or a fixed count ("4").
            Bit-exact resume needs a fixed count: another count rounds some gradient
            reductions differently.
        labels: a label table (CSV or JSON, file -> label names,
            `difforge.data.pairing.read_label_table`): multi-label conditioning on a folder.
        cond_dir: a folder of condition images paired with the data's files by name
            (image-to-image); the condition is concatenated to the model input.
        task: ``generate``, or ``superres``: a super-resolution stage whose condition is
            each image area-downsampled to ``low_res``.
        low_res: the side of the super-resolution input; None = image_size / 2. The ratio
            image_size / low_res must be in [2, 8].
        cond_noise_max: noise-conditioning augmentation of the image condition (CDM): in
            training it is noised at a level s ~ U(0, cond_noise_max), s in [0, 1], and s
            is given to the model; None = 0.5 for superres, 0 (off) otherwise.
        cond_blur: also blur half of the image conditions in training by a Gaussian of std
            ~ U(0, cond_blur) pixels (0 = off).
        experts: branch the ``init_from`` run into this many timestep experts (eDiff-I), cut
            at equal probability mass of the training timestep distribution; they train one
            after another, each on its own range, for an equal share of ``steps``.
        expert_bounds: the same with explicit bounds, "0,300,700,1000" (0 to T, increasing).
        expert_channels: the base width of each expert, "64,128" (one per expert; None = the
            parent's): an expert of another width starts from the parent's tensors whose
            shapes match and fresh ones elsewhere (reported when training starts).
    """

    data: str = "mnist"
    image_size: int | None = None
    channels: int | None = None
    class_folders: bool = False
    conditional: bool = True
    random_crop: bool = False
    hflip: bool = False
    preset: str = "mnist"
    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 64
    grad_accum: int = 1
    lr: float = 1e-3
    warmup_steps: int = 100
    lr_schedule: str = "constant"
    lr_min: float = 0.0
    lr_decay_every: int = 0
    lr_decay_factor: float = LR_DECAY_FACTOR
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    p_uncond: float = 0.1
    timestep_sampler: str = "uniform"
    mixed_precision: str = "auto"
    seed: int = 0
    sample_every: int = 500
    sample_every_epoch: bool = False
    previews: bool = True
    checkpoint_every: int = 500
    log_every: int = 10
    keep_checkpoints: int = 3
    num_workers: int = 0
    tensorboard: bool = True
    preview_images: int = 40
    preview_sampler: str | None = SampleConfig.sampler
    preview_steps: int = SampleConfig.steps
    max_nonfinite_steps: int = 5
    init_from: str | None = None
    threads: str = "auto"
    labels: str | None = None
    cond_dir: str | None = None
    task: str = "generate"
    low_res: int | None = None
    cond_noise_max: float | None = None
    cond_blur: float = 0.0
    experts: int | None = None
    expert_bounds: str | None = None
    expert_channels: str | None = None

    def validate(self) -> TrainConfig:
        """Raise a one-line DifforgeError naming the flag of a bad setting; returns self.

        Every number must be finite and in range (a NaN or an absurd size is refused here,
        before any data is read)."""
        whole = {
            "batch_size": (1, 65536),
            "grad_accum": (1, 4096),
            "log_every": (1, None),
            "preview_images": (1, 1024),
            "preview_steps": (1, 100_000),
            "sample_every": (0, None),
            "checkpoint_every": (0, None),
            "warmup_steps": (0, None),
            "num_workers": (0, 256),
            "keep_checkpoints": (0, None),
            "max_nonfinite_steps": (1, None),
            "seed": (0, MAX_SEED),
        }
        for name, (low, high) in whole.items():
            check_number(_flag(name), getattr(self, name), low=low, high=high, integer=True)
        if self.steps is not None:
            check_number("--steps", self.steps, low=1, high=10**9, integer=True)
        if self.epochs is not None:
            check_number("--epochs", self.epochs, low=0, high=1e6, low_open=True)
        check_number("--lr", self.lr, low=0, low_open=True)
        check_number("--weight-decay", self.weight_decay, low=0)
        check_number("--grad-clip", self.grad_clip, low=0)
        if not (isinstance(self.ema_decay, (int, float)) and 0.0 <= self.ema_decay < 1.0):
            raise DifforgeError(f"--ema-decay must be in [0, 1), got {self.ema_decay}")
        if not (isinstance(self.p_uncond, (int, float)) and 0.0 <= self.p_uncond < 1.0):
            raise DifforgeError(f"--p-uncond must be in [0, 1), got {self.p_uncond}")
        parse_threads(self.threads)
        if self.timestep_sampler not in TIMESTEP_SAMPLERS:
            known = ", ".join(TIMESTEP_SAMPLERS)
            raise DifforgeError(f"--timestep-sampler must be one of {known}, got {self.timestep_sampler!r}")
        self._validate_lr_plan()
        if self.sample_every_epoch and not self.previews:
            raise DifforgeError("--sample-every-epoch with --no-previews: choose one")
        if self.mixed_precision not in MIXED_PRECISION:
            raise DifforgeError(
                f"--mixed-precision must be one of {', '.join(MIXED_PRECISION)}, got {self.mixed_precision!r}"
            )
        if self.image_size is not None:
            check_number("--image-size", self.image_size, low=4, high=MAX_IMAGE_SIZE, integer=True)
        if self.channels not in (None, 1, 3):
            raise DifforgeError(f"--channels must be 1 or 3, got {self.channels}")
        self._validate_conditions()
        if self.experts is not None or self.expert_bounds is not None:
            flag = "--experts" if self.experts is not None else "--expert-bounds"
            if self.experts is not None and self.expert_bounds is not None:
                raise DifforgeError("--experts and --expert-bounds both split the chain: give one")
            if self.experts is not None:
                check_number("--experts", self.experts, low=2, high=64, integer=True)
            if self.init_from is None:
                raise DifforgeError(f"{flag} branches a trained run into experts: add --init-from PARENT_RUN")
        if self.expert_channels is not None:
            if self.experts is None and self.expert_bounds is None:
                raise DifforgeError("--expert-channels sizes experts: add --experts K or --expert-bounds")
            self.expert_widths()
        if self.preview_sampler is not None and self.preview_sampler not in sampler_names():
            raise DifforgeError(
                f"--preview-sampler must be one of {', '.join(sampler_names())}; got {self.preview_sampler!r}"
            )
        return self

    def _validate_lr_plan(self) -> None:
        if self.lr_schedule not in LR_SCHEDULES:
            raise DifforgeError(
                f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}"
            )
        check_number("--lr-min", self.lr_min, low=0, high=self.lr)
        check_number("--lr-decay-every", self.lr_decay_every, low=0, integer=True)
        check_number("--lr-decay-factor", self.lr_decay_factor, low=0, high=1, low_open=True)
        if self.lr_schedule == "step" and self.lr_decay_every == 0:
            raise DifforgeError("--lr-schedule step needs --lr-decay-every N (steps between decays)")
        if self.lr_schedule != "step" and (self.lr_decay_every or self.lr_decay_factor != LR_DECAY_FACTOR):
            flag = "--lr-decay-every" if self.lr_decay_every else "--lr-decay-factor"
            raise DifforgeError(f"{flag} applies to --lr-schedule step (the run has {self.lr_schedule})")
        if self.lr_schedule == "constant" and self.lr_min:
            raise DifforgeError(
                "--lr-min is the floor of a decaying schedule: add --lr-schedule cosine, linear or step"
            )

    def _validate_conditions(self) -> None:
        if self.task not in TASKS:
            raise DifforgeError(f"--task must be one of {', '.join(TASKS)}, got {self.task!r}")
        superres = self.task == "superres"
        if self.low_res is not None and not superres:
            raise DifforgeError("--low-res is the input of a super-resolution stage: add --task superres")
        if superres and self.cond_dir is not None:
            raise DifforgeError(
                "--cond-dir does not apply to --task superres (it makes its input from each image)"
            )
        if self.labels is not None and self.class_folders:
            raise DifforgeError("--labels and --class-folders both give labels: choose one")
        if self.labels is not None and not self.conditional:
            raise DifforgeError("--labels with --no-conditional: the labels would not be used")
        if self.cond_noise_max is not None:
            check_number("--cond-noise-max", self.cond_noise_max, low=0, high=1)
        check_number("--cond-blur", self.cond_blur, low=0, high=MAX_COND_BLUR)
        if not self.has_image_condition and (self.cond_noise_max or self.cond_blur):
            flag = "--cond-noise-max" if self.cond_noise_max else "--cond-blur"
            raise DifforgeError(f"{flag} augments an image condition: it needs --task superres or --cond-dir")
        size = self.image_size or DEFAULT_IMAGE_SIZE
        if superres:
            low = self.low_res_size()
            check_number("--low-res", low, low=2, high=MAX_IMAGE_SIZE, integer=True)
            if not 2 <= size / low <= 8:
                raise DifforgeError(
                    f"--low-res {low} with --image-size {size}: the factor {size / low:g} must be in [2, 8]"
                )
        side = self.low_res_size() if superres else size
        if self.cond_blur and math.ceil(3 * self.cond_blur) >= side:
            raise DifforgeError(
                f"--cond-blur {self.cond_blur:g}: a blur of 3 std must fit in the {side} px condition; "
                f"use at most {(side - 1) / 3:.2f}"
            )

    def expert_widths(self) -> list[int] | None:
        """``expert_channels`` as whole numbers (None when not given)."""
        if self.expert_channels is None:
            return None
        try:
            widths = [int(part) for part in self.expert_channels.split(",")]
        except ValueError:
            raise DifforgeError(
                f"--expert-channels {self.expert_channels!r}: give whole numbers, e.g. 64,128"
            ) from None
        for width in widths:
            check_number("--expert-channels", width, low=1, high=4096, integer=True)
        return widths

    @property
    def has_image_condition(self) -> bool:
        """Whether the model takes an image condition (super-resolution or paired images)."""
        return self.task == "superres" or self.cond_dir is not None

    def low_res_size(self) -> int:
        """The super-resolution input side: ``low_res``, or half the image size."""
        return self.low_res if self.low_res is not None else (self.image_size or DEFAULT_IMAGE_SIZE) // 2

    def condition_noise_max(self) -> float:
        """``cond_noise_max``, or its default: 0.5 for superres, else 0."""
        if self.cond_noise_max is not None:
            return float(self.cond_noise_max)
        return SUPERRES_COND_NOISE_MAX if self.task == "superres" else 0.0

    def preview_sampling(self) -> SampleConfig:
        """The sampling settings of the previews: the preview sampler and steps, the run's seed."""
        return SampleConfig().updated(sampler=self.preview_sampler, steps=self.preview_steps, seed=self.seed)


@dataclass
class DataInfo:
    """What the model was trained on (for sampling by class name and for provenance).

    ``class_names``: the classes, or the labels of a multi-label run; ``excluded``: readable
    images left out (not in the label table, or without a paired condition);
    ``cond_source``: the folder of paired condition images."""

    source: str = ""
    class_names: list[str] = field(default_factory=list)
    fingerprint: str = ""
    num_images: int = 0
    skipped: int = 0
    attribution: str = ""
    excluded: int = 0
    cond_source: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.class_names, list) or not all(isinstance(n, str) for n in self.class_names):
            raise DifforgeError("'data' class_names must be a list of strings")
        for name in ("source", "fingerprint", "attribution", "cond_source"):
            if not isinstance(getattr(self, name), str):
                raise DifforgeError(f"'data' {name} must be a string")
        for name in ("num_images", "skipped", "excluded"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise DifforgeError(f"'data' {name} must be a count, got {value!r}")


def conditioning_of(model: Any) -> list[str]:
    """The condition kinds a model config takes (for config files that do not list them)."""
    kinds = []
    if getattr(model, "num_classes", 0):
        kinds.append(ClassLabel.key)
    if getattr(model, "image_cond_channels", 0):
        kinds.append(ImageCondition.key)
    return kinds


@dataclass
class RunConfig:
    """The whole of ``config.json``: model, process, conditioning, training and data settings.

    ``model`` is a model config of a registered kind (`UNetConfig` for ``unet``);
    ``diffusion`` a process config of a registered kind (`DiffusionConfig` for
    ``gaussian``); ``conditioning`` the condition kinds the model is trained with, in the
    order the trainer drops them (``[]`` = unconditional).
    """

    model: Any
    diffusion: ProcessConfig
    train: TrainConfig
    data: DataInfo
    conditioning: list[str] | None = None
    difforge_version: str = __version__

    def __post_init__(self) -> None:
        if self.conditioning is None:
            self.conditioning = conditioning_of(self.model)
        bounds = getattr(self.model, "bounds", None)
        steps = getattr(self.diffusion, "num_timesteps", None)
        if bounds is not None and steps is not None and bounds[-1] != steps:
            raise DifforgeError(f"the expert bounds end at {bounds[-1]}; the process has {steps} timesteps")

    def to_dict(self) -> dict[str, Any]:
        return {
            "difforge_version": self.difforge_version,
            "model": model_config_to_dict(self.model),
            "diffusion": self.diffusion.to_dict(),
            "conditioning": list(self.conditioning or []),
            "train": asdict(self.train),
            "data": asdict(self.data),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = CONFIG_FILE) -> RunConfig:
        expected = {"difforge_version", "model", "diffusion", "conditioning", "train", "data"}
        unknown = sorted(set(data) - expected)
        missing = sorted(expected - set(data) - {"difforge_version", "conditioning"})
        if unknown or missing:
            problem = f"unknown field(s) {', '.join(unknown)}" if unknown else f"missing {', '.join(missing)}"
            raise DifforgeError(f"{source}: {problem} (written by another difforge version?)")
        try:
            conditioning = data.get("conditioning")
            if conditioning is not None and (
                not isinstance(conditioning, list) or not all(isinstance(k, str) for k in conditioning)
            ):
                raise DifforgeError("'conditioning' must be a list of condition kinds")
            return cls(
                model=model_config_from_dict(data["model"]),
                diffusion=process_config_from_dict(data["diffusion"]),
                train=dataclass_from_mapping(TrainConfig, data["train"], "'train' field(s)"),
                data=dataclass_from_mapping(DataInfo, data["data"], "'data' field(s)"),
                conditioning=conditioning,
                difforge_version=str(data.get("difforge_version", "")),
            )
        except DifforgeError as error:
            raise DifforgeError(f"{source}: {error}") from None
        except (TypeError, AttributeError) as error:
            raise DifforgeError(f"{source}: malformed settings ({error})") from None

    @classmethod
    def load(cls, run_dir: str | Path) -> RunConfig:
        """Read ``RUN/config.json``; a missing, unreadable or malformed file is a DifforgeError."""
        path = Path(run_dir) / CONFIG_FILE
        if not Path(run_dir).is_dir():
            problem = "is not a folder" if Path(run_dir).exists() else "does not exist"
            raise DifforgeError(f"run folder {str(run_dir)!r} {problem}")
        if not path.is_file():
            raise DifforgeError(f"{path} is missing: is {str(run_dir)!r} a difforge run folder?")
        return cls.from_dict(read_json_object(path), str(path))


def condition_context(run: RunConfig) -> ConditionContext:
    """What the run's condition kinds need to know (`difforge.conditioning.build_conditions`):
    the classes or labels, the image condition's size and channels, its augmentation."""
    model, train = run.model, run.train
    size = train.low_res_size() if train.task == "superres" else 0  # 0: the model resizes it
    return ConditionContext(
        num_classes=int(getattr(model, "num_classes", 0)),
        multi_label=bool(getattr(model, "multi_label", False)),
        image_size=size,
        image_channels=int(getattr(model, "image_cond_channels", 0)),
        cond_noise_max=train.condition_noise_max(),
        cond_blur=float(train.cond_blur),
    )
