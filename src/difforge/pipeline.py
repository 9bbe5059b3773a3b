"""`Pipeline`: a trained run, ready to sample.

pipe = Pipeline.from_run("runs/mnist")
images = pipe(num_images=16, sampler="dpmpp_2m", steps=20, guidance=2.0, classes=["3", "7"])
# (16, 32, 32, 1) uint8

Sampling settings default to `difforge.sampling.SampleConfig`'s. A multi-label run takes
``labels="smiling,glasses"``; an image-conditioned run takes its condition images in
``cond={"image_cond": images}`` ((N, C, h, w) in [-1, 1], one row per image);
`Pipeline.upscale` runs a super-resolution stage on low-resolution pictures and
`Pipeline.from_runs(base, sr, ...)` chains a base run and super-resolution stages into a
`Cascade`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from difforge.conditioning import (
    ClassLabel,
    ImageCondition,
    MultiHotLabels,
    build_conditions,
    null_conditions,
    prepare_conditions,
)
from difforge.errors import DifforgeError, check_number
from difforge.images import to_uint8
from difforge.process import Process
from difforge.runs.config import RunConfig, condition_context
from difforge.runs.device import resolve_device
from difforge.runs.models import load_model
from difforge.runs.storage import resolve_run_path
from difforge.sampling import SampleConfig, StepInfo, generate

ClassSpec = str | int | Sequence[str | int] | None
LabelSpec = str | Sequence[str] | Sequence[Sequence[str]] | None
"""Multi-label sets: "a,b" (one set for every image), or a list of sets (each "a,b" or a
list of names), cycled over the images; None = no labels (the null vector)."""


class Pipeline:
    """A model, its process and the run's settings, on one device."""

    def __init__(
        self,
        model: torch.nn.Module,
        process: Process,
        run_config: RunConfig,
        device: torch.device,
        run_dir: str | Path | None = None,
    ):
        self.model = model.to(device).eval()
        self.run_dir = Path(run_dir) if run_dir is not None else Path(".")
        self.process = process
        self.run_config = run_config
        self.device = device
        self.conditions = build_conditions(run_config.conditioning or [], condition_context(run_config))

    @classmethod
    def from_run(cls, run_dir: str | Path, *, device: str = "auto", weights: str = "ema") -> Pipeline:
        """Load ``RUN/config.json`` and ``RUN/ema.safetensors`` (or ``model.safetensors`` with
        ``weights="raw"``); ``run_dir`` may also be one of its checkpoints, ``RUN/checkpoints/
        step_N``. Missing or damaged files are a DifforgeError naming the file (see
        `difforge.runs.models.load_model` for the fallback to an intact checkpoint)."""
        run, _ = resolve_run_path(run_dir)
        config = RunConfig.load(run)
        model = load_model(run_dir, config, weights)
        return cls(model, config.diffusion.build(), config, resolve_device(device), run_dir=run)

    @property
    def diffusion(self) -> Process:
        """The process (the name of 0.1; `process` is the same object)."""
        return self.process

    @property
    def class_names(self) -> list[str]:
        return list(self.run_config.data.class_names)

    @property
    def num_classes(self) -> int:
        return int(getattr(self.run_config.model, "num_classes", 0))

    @property
    def multi_label(self) -> bool:
        return isinstance(self.conditions.get(ClassLabel.key), MultiHotLabels)

    @property
    def augmented(self) -> bool:
        """Whether the image condition was trained with noise-conditioning augmentation."""
        condition = self.conditions.get(ImageCondition.key)
        return getattr(condition, "augmentation", None) is not None

    @property
    def is_superres(self) -> bool:
        return self.run_config.train.task == "superres"

    @property
    def guidable(self) -> bool:
        """Whether the model was trained with condition dropout, so it has a null to guide against."""
        return bool(self.conditions) and self.run_config.train.p_uncond > 0

    def class_labels(self, classes: ClassSpec, count: int, generator: torch.Generator) -> torch.Tensor | None:
        """(count,) int64 labels from names, ids, ``"random"`` or None (random for a
        class-conditional model); a list shorter than count is repeated."""
        if ClassLabel.key not in self.conditions or self.multi_label:
            if classes not in (None, "random"):
                hint = "; it has labels: use --labels" if self.multi_label else ""
                raise DifforgeError(f"--class: this model was trained without classes{hint}")
            return None
        if classes is None or classes == "random":
            return torch.randint(0, self.num_classes, (count,), generator=generator)
        items = [classes] if isinstance(classes, (str, int)) else list(classes)
        ids = [self._class_id(item) for item in items]
        if not ids:
            raise DifforgeError("--class: give at least one class")
        return torch.tensor([ids[i % len(ids)] for i in range(count)], dtype=torch.long)

    def multi_hot(self, labels: LabelSpec, count: int) -> torch.Tensor | None:
        """(count, L) float multi-hot rows from label sets (`LabelSpec`), cycled; None for a
        model without multi-label conditioning (then ``labels`` must be None)."""
        if not self.multi_label:
            if labels is not None:
                raise DifforgeError("--labels: this model was trained without a label table")
            return None
        names = self.class_names
        rows = torch.zeros((count, len(names)))
        if labels is None:
            return rows
        sets = [labels] if isinstance(labels, str) else list(labels)
        if not sets:
            raise DifforgeError("--labels: give at least one label set")
        columns = []
        for item in sets:
            parts = [p.strip() for p in item.split(",")] if isinstance(item, str) else list(item)
            unknown = [p for p in parts if p and p not in names]
            if unknown:
                shown = ", ".join(names[:30]) + (" ..." if len(names) > 30 else "")
                raise DifforgeError(f"--labels: unknown label {unknown[0]!r}; labels: {shown}")
            columns.append([names.index(p) for p in parts if p])
        for row in range(count):
            rows[row, columns[row % len(columns)]] = 1.0
        return rows

    def _class_id(self, item: str | int) -> int:
        names = self.class_names
        if isinstance(item, str) and item in names:
            return names.index(item)
        try:
            value = int(item)
        except (TypeError, ValueError):
            shown = ", ".join(names[:20]) + (" ..." if len(names) > 20 else "")
            raise DifforgeError(f"--class: unknown class {item!r}; classes: {shown}") from None
        if not 0 <= value < self.num_classes:
            raise DifforgeError(f"--class: class id {value} is out of range 0..{self.num_classes - 1}")
        return value

    def _conditions(
        self,
        num_images: int,
        classes: ClassSpec,
        cond: Mapping[str, torch.Tensor] | None,
        generator: torch.Generator,
        config: SampleConfig,
        labels: LabelSpec = None,
    ) -> dict[str, torch.Tensor]:
        """The cond dict of all ``num_images`` (CPU): class labels from ``classes``, multi-hot
        ones from ``labels``, an augmented image condition noised at ``config``'s level."""
        given = dict(cond or {})
        unknown = sorted(set(given) - set(self.conditions))
        if unknown:
            known = ", ".join(self.conditions) or "none"
            raise DifforgeError(f"this model takes no {', '.join(unknown)} condition (it takes: {known})")
        multi_hot = self.multi_hot(labels, num_images)
        if multi_hot is not None and classes not in (None, "random"):
            raise DifforgeError("--class: this model was trained with a label table: use --labels")
        if ClassLabel.key not in given:
            chosen = multi_hot if multi_hot is not None else self.class_labels(classes, num_images, generator)
            if chosen is not None:
                given[ClassLabel.key] = chosen
        missing = [key for key in self.conditions if key not in given]
        if missing:
            how = " (condition images: --cond)" if ImageCondition.key in missing else ""
            raise DifforgeError(
                f"this model needs the {', '.join(missing)} condition{how}: pass cond={{{missing[0]!r}: ...}}"
            )
        for key, value in given.items():
            if value.shape[0] != num_images:
                raise DifforgeError(f"cond[{key!r}] has {value.shape[0]} rows for {num_images} images")
        level = config.cond_noise_for(self.augmented)
        return prepare_conditions(given, self.conditions, cond_noise=level, generator=generator)

    def __call__(
        self,
        num_images: int = 16,
        *,
        classes: ClassSpec = None,
        labels: LabelSpec = None,
        cond: Mapping[str, torch.Tensor] | None = None,
        config: SampleConfig | None = None,
        callback: Callable[[int, StepInfo], None] | None = None,
        **settings: Any,
    ) -> np.ndarray:
        """Sample ``num_images`` images: (N, H, W, C) uint8.

        ``config`` (default `SampleConfig()`) with ``settings`` (its field names: ``sampler``,
        ``steps``, ``eta``, ``guidance``, ``cond_noise``, ``spacing``, ``clip``,
        ``dynamic_threshold``, ``seed``, ``batch_size``) applied on top. ``classes``: class
        names or ids, cycled (default random); ``labels``: the label sets of a multi-label
        run (`LabelSpec`); ``cond``: other conditions, one row per image.
        ``callback(batch_index, step_info)`` sees every step of every batch. The same seed
        and batch size give the same images."""
        batches = self.batches(
            num_images,
            classes=classes,
            labels=labels,
            cond=cond,
            config=config,
            callback=callback,
            **settings,
        )
        return np.concatenate(list(batches))

    def batches(
        self,
        num_images: int = 16,
        *,
        classes: ClassSpec = None,
        labels: LabelSpec = None,
        cond: Mapping[str, torch.Tensor] | None = None,
        config: SampleConfig | None = None,
        callback: Callable[[int, StepInfo], None] | None = None,
        **settings: Any,
    ) -> Iterator[np.ndarray]:
        """The images of `__call__`, one (B, H, W, C) uint8 batch at a time, so a large
        ``num_images`` is written out with memory bounded by the batch size (plus the
        (N,) labels). Every setting is checked before the first batch is sampled."""
        config = (config or SampleConfig()).updated(**settings).validate(self.process.kind)
        if num_images < 1:
            raise DifforgeError("the number of images must be >= 1")
        if config.guidance not in (None, 1.0) and not self.guidable:
            raise DifforgeError("--guidance needs a model trained with condition dropout; this one has none")
        config = config.for_superres(self.is_superres)
        no_labels = labels is None and ClassLabel.key not in (cond or {})
        if self.multi_label and no_labels and set(self.conditions) == {ClassLabel.key}:
            config = config.updated(guidance=1.0)  # no labels: the null on both sides, one branch is enough
        generator = torch.Generator().manual_seed(config.seed)
        conditions = self._conditions(num_images, classes, cond, generator, config, labels)
        return self._sample_batches(self.process, num_images, conditions, config, generator, callback)

    def upscale(
        self,
        images: torch.Tensor,
        *,
        classes: ClassSpec = None,
        config: SampleConfig | None = None,
        **settings: Any,
    ) -> np.ndarray:
        """Super-resolve (N, C, h, w) pictures in [-1, 1] with a super-resolution run:
        (N, S, S, C) uint8 at the run's image size. They are first area-averaged (or
        bilinearly enlarged) to the run's input size ``low_res`` and rounded to 8 bits, as
        in training. A class-conditional stage takes ``classes`` (default: its null label
        when it was trained with label dropout, else random); settings as `__call__`."""
        self.check_superres()
        self._check_condition_images(images)
        inputs = self.conditions[ImageCondition.key].prepare(images.float())
        inputs = torch.round((inputs.clamp(-1, 1) + 1) * 127.5) / 127.5 - 1
        given = {ImageCondition.key: inputs}
        if ClassLabel.key in self.conditions and not self.multi_label and classes is None:
            if not self.guidable:
                raise DifforgeError(
                    "--class: this class-conditional stage was trained without label dropout, so it needs "
                    "the classes of the pictures"
                )
            given[ClassLabel.key] = torch.full((images.shape[0],), -1, dtype=torch.long)  # the null label
        return self(images.shape[0], classes=classes, cond=given, config=config, **settings)

    def check_superres(self) -> None:
        """A one-line DifforgeError unless this is a super-resolution run."""
        if not self.is_superres:
            raise DifforgeError(
                f"{self.run_dir} is not a super-resolution run (train one with --task superres)"
            )

    def _check_condition_images(self, images: torch.Tensor) -> None:
        channels = self.condition_shape[0]
        if images.ndim != 4 or images.shape[1] != channels:
            raise DifforgeError(f"condition images must be (N, {channels}, h, w), got {tuple(images.shape)}")

    @property
    def condition_shape(self) -> tuple[int, int, int]:
        """(C', h, w) of the image condition (h = w = low_res for super-resolution)."""
        condition = self.conditions.get(ImageCondition.key)
        if condition is None:
            raise DifforgeError("this model takes no condition image")
        size = getattr(condition, "size", 0) or self.image_shape[1]
        return (int(getattr(self.run_config.model, "image_cond_channels", 0)), size, size)

    @classmethod
    def from_runs(
        cls, base: str | Path, *stages: str | Path, device: str = "auto", weights: str = "ema"
    ) -> Cascade:
        """A base run followed by super-resolution runs (`Cascade`)."""
        return Cascade(
            cls.from_run(base, device=device, weights=weights),
            [cls.from_run(stage, device=device, weights=weights) for stage in stages],
        )

    def _sample_batches(
        self,
        process: Process,
        num_images: int,
        conditions: Mapping[str, torch.Tensor],
        config: SampleConfig,
        generator: torch.Generator,
        callback: Callable[[int, StepInfo], None] | None,
        starts: torch.Tensor | None = None,
    ) -> Iterator[np.ndarray]:
        """Batches of `generate` from the prior, or from the rows of ``starts`` (restoration)."""
        null = null_conditions(self.conditions) if self.guidable else None
        for batch_index, start in enumerate(range(0, num_images, config.batch_size)):
            count = min(config.batch_size, num_images - start)
            step_callback = None if callback is None else (lambda info, b=batch_index: callback(b, info))
            with torch.no_grad():
                samples = generate(
                    self.model,
                    process,
                    (count, *self.image_shape),
                    config,
                    cond={key: value[start : start + count] for key, value in conditions.items()},
                    null_cond=null,
                    generator=generator,
                    device=self.device,
                    callback=step_callback,
                    start=None if starts is None else starts[start : start + count],
                )
            yield to_uint8(samples)

    # ---- restoration (cold processes) ----------------------------------------------------------

    def restoring_process(self) -> Any:
        """The process, when it can restore (a cold process: ``degrade`` and ``up_to``)."""
        if not hasattr(self.process, "up_to") or not hasattr(self.process, "degrade"):
            raise DifforgeError(
                f"restore needs a cold-diffusion run (train with --process cold); this run's process is "
                f"{self.process.kind!r}"
            )
        return self.process

    def degrade(self, images: torch.Tensor, level: int, *, seed: int = 0) -> torch.Tensor:
        """D(images, level): (N, C, H, W) in [-1, 1] -> the same shape and device (``seed``
        draws the noise of the ``noise`` degradation)."""
        process = self.restoring_process()
        check_number("--from-t", level, low=0, high=process.num_timesteps, integer=True)
        self._check_images(images)
        levels = torch.full((images.shape[0],), level, dtype=torch.long)
        noise = None
        if process.degradation.needs_noise:
            noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))
        return process.degrade(images.float(), levels, noise)

    def restore(
        self,
        degraded: torch.Tensor,
        *,
        from_t: int | None = None,
        classes: ClassSpec = None,
        config: SampleConfig | None = None,
        callback: Callable[[int, StepInfo], None] | None = None,
        **settings: Any,
    ) -> np.ndarray:
        """Walk (N, C, H, W) images at degradation level ``from_t`` (default T, fully
        degraded) back to level 0 with the sampler: (N, H, W, C) uint8. Steps above
        ``from_t`` are capped at it. A class-conditional model restores with the classes
        given, else with its null label (no guidance); settings as `__call__`."""
        process = self.restoring_process()
        top = process.num_timesteps if from_t is None else from_t
        view = process.up_to(top)
        config = (config or SampleConfig()).updated(**settings)
        config = config.updated(steps=min(config.steps, top)).validate(view.kind)
        if config.guidance not in (None, 1.0) and not self.guidable:
            raise DifforgeError("--guidance needs a model trained with condition dropout; this one has none")
        self._check_images(degraded)
        count = degraded.shape[0]
        generator = torch.Generator().manual_seed(config.seed)
        given: dict[str, torch.Tensor] = {}
        if ClassLabel.key in self.conditions and classes in (None, "random"):
            if not self.guidable:
                raise DifforgeError(
                    "--class: this class-conditional model was trained without label dropout, so it needs "
                    "the classes of the images to restore"
                )
            given[ClassLabel.key] = torch.full((count,), -1, dtype=torch.long)  # the null label
            config = config.updated(guidance=1.0)
        conditions = self._conditions(count, classes, given, generator, config)
        return np.concatenate(
            list(self._sample_batches(view, count, conditions, config, generator, callback, starts=degraded))
        )

    def _check_images(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or tuple(images.shape[1:]) != self.image_shape:
            raise DifforgeError(
                f"images must be (N, {', '.join(map(str, self.image_shape))}) for this model, "
                f"got {tuple(images.shape)}"
            )

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images the model makes."""
        model = self.run_config.model
        return (model.in_channels, model.image_size, model.image_size)


def images_to_condition(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, C) uint8 -> (N, C, H, W) float32 in [-1, 1]: a stage's output as the next
    stage's input."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


class Cascade:
    """A base `Pipeline` followed by super-resolution stages (Ho et al. 2021, "Cascaded
    Diffusion Models"): each stage's 8-bit output is the next stage's low-resolution input.

    Each stage must be a super-resolution run whose input size and channels are the
    previous stage's output (checked here). A class-conditional stage gets the base's class
    labels when its classes are the base's, else its null label (it must have been trained
    with label dropout)."""

    def __init__(self, base: Pipeline, stages: Sequence[Pipeline]) -> None:
        previous = base.image_shape
        for number, stage in enumerate(stages, start=1):
            if not stage.is_superres:
                raise DifforgeError(
                    f"--upsample {stage.run_dir}: not a super-resolution run (train it with --task superres)"
                )
            wanted = stage.condition_shape
            if wanted != previous:
                raise DifforgeError(
                    f"--upsample {stage.run_dir}: stage {number} takes {wanted[1]}x{wanted[2]}x{wanted[0]} "
                    f"inputs, but the stage before makes {previous[1]}x{previous[2]}x{previous[0]} images"
                )
            if (
                ClassLabel.key in stage.conditions
                and not stage.guidable
                and (stage.class_names != base.class_names or stage.multi_label)
            ):
                raise DifforgeError(
                    f"--upsample {stage.run_dir}: it is class-conditional without label dropout, and its "
                    "classes are not the base run's"
                )
            previous = stage.image_shape
        self.base = base
        self.stages = list(stages)

    def check(self, configs: Sequence[SampleConfig | None] = ()) -> list[SampleConfig]:
        """One validated `SampleConfig` per stage, base first (missing or None = the
        defaults); a one-line DifforgeError for too many or a bad one."""
        pipes = [self.base, *self.stages]
        if len(configs) > len(pipes):
            raise DifforgeError(f"{len(configs)} sampling configs for {len(pipes)} stages")
        settings = list(configs) + [None] * (len(pipes) - len(configs))
        checked = []
        for pipe, config in zip(pipes, settings, strict=True):
            config = (config or SampleConfig()).validate(pipe.process.kind)
            config.cond_noise_for(pipe.augmented)
            checked.append(config)
        return checked

    def __call__(
        self,
        num_images: int = 16,
        *,
        classes: ClassSpec = None,
        labels: LabelSpec = None,
        configs: Sequence[SampleConfig | None] = (),
    ) -> list[np.ndarray]:
        """The images of every stage, base first: a list of (N, H_i, W_i, C) uint8.
        ``configs``: one `SampleConfig` per stage, base first (missing or None = the
        defaults), checked before the first image is sampled."""
        settings = self.check(configs)
        base_config = settings[0]
        generator = torch.Generator().manual_seed(base_config.seed)
        class_labels = self.base.class_labels(classes, num_images, generator)
        given = {} if class_labels is None else {ClassLabel.key: class_labels}
        outputs = [self.base(num_images, labels=labels, cond=given, config=base_config)]
        for stage, config in zip(self.stages, settings[1:], strict=True):
            cond = {ImageCondition.key: images_to_condition(outputs[-1])}
            if ClassLabel.key in stage.conditions and not stage.multi_label:
                same = class_labels is not None and stage.class_names == self.base.class_names
                cond[ClassLabel.key] = (
                    class_labels if same else torch.full((num_images,), -1, dtype=torch.long)
                )
            outputs.append(stage(num_images, cond=cond, config=config))
        return outputs
