"""`Pipeline`: a trained run, ready to sample.

pipe = Pipeline.from_run("runs/mnist")
images = pipe(num_images=16, sampler="dpmpp_2m", steps=20, guidance=2.0, classes=["3", "7"])
# (16, 32, 32, 1) uint8
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from difforge.diffusion import GaussianDiffusion
from difforge.errors import DifforgeError
from difforge.images import to_uint8
from difforge.nn import UNet
from difforge.sampling import SAMPLER_NAMES, StepInfo, generate
from difforge.training.checkpoint import load_tensors
from difforge.training.config import RunConfig
from difforge.training.trainer import resolve_device

ClassSpec = str | int | Sequence[str | int] | None


class Pipeline:
    """A U-Net, its diffusion process and the run's settings, on one device."""

    def __init__(
        self, model: UNet, diffusion: GaussianDiffusion, run_config: RunConfig, device: torch.device
    ):
        self.model = model.to(device).eval()
        self.diffusion = diffusion
        self.run_config = run_config
        self.device = device

    @classmethod
    def from_run(cls, run_dir: str | Path, *, device: str = "auto", weights: str = "ema") -> Pipeline:
        """Load ``RUN/config.json`` and ``RUN/ema.safetensors`` (or ``model.safetensors`` with
        ``weights="raw"``). Missing or damaged files are a DifforgeError naming the file."""
        if weights not in ("ema", "raw"):
            raise DifforgeError(f"weights must be 'ema' or 'raw', got {weights!r}")
        run_dir = Path(run_dir)
        config = RunConfig.load(run_dir)
        model = UNet(config.model)
        path = run_dir / ("ema.safetensors" if weights == "ema" else "model.safetensors")
        state = load_tensors(path)
        try:
            model.load_state_dict(state)
        except RuntimeError as error:
            first = str(error).splitlines()[0]
            raise DifforgeError(f"{path} does not fit the model in config.json ({first})") from None
        return cls(model, config.diffusion.build(), config, resolve_device(device))

    @property
    def class_names(self) -> list[str]:
        return list(self.run_config.data.class_names)

    @property
    def num_classes(self) -> int:
        return self.run_config.model.num_classes

    def class_labels(self, classes: ClassSpec, count: int, generator: torch.Generator) -> torch.Tensor | None:
        """(count,) int64 labels from names, ids, ``"random"`` or None (random for a
        class-conditional model); a list shorter than count is repeated."""
        if self.num_classes == 0:
            if classes not in (None, "random"):
                raise DifforgeError("--class: this model was trained without classes")
            return None
        if classes is None or classes == "random":
            return torch.randint(0, self.num_classes, (count,), generator=generator)
        items = [classes] if isinstance(classes, (str, int)) else list(classes)
        ids = [self._class_id(item) for item in items]
        if not ids:
            raise DifforgeError("--class: give at least one class")
        return torch.tensor([ids[i % len(ids)] for i in range(count)], dtype=torch.long)

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

    @torch.no_grad()
    def __call__(
        self,
        num_images: int = 16,
        *,
        sampler: str = "dpmpp_2m",
        steps: int = 20,
        eta: float = 0.0,
        guidance: float = 1.0,
        classes: ClassSpec = None,
        seed: int = 0,
        batch_size: int = 64,
        spacing: str = "karras",
        callback: Callable[[int, StepInfo], None] | None = None,
    ) -> np.ndarray:
        """Sample ``num_images`` images: (N, H, W, C) uint8.

        ``callback(batch_index, step_info)`` sees every step of every batch. The same seed
        and batch size give the same images."""
        if num_images < 1 or batch_size < 1:
            raise DifforgeError("the number of images and the batch size must be >= 1")
        if sampler not in SAMPLER_NAMES:
            raise DifforgeError(f"--sampler must be one of {', '.join(SAMPLER_NAMES)}; got {sampler!r}")
        if guidance != 1.0 and self.num_classes == 0:
            raise DifforgeError("--guidance needs a class-conditional model; this one has no classes")
        generator = torch.Generator().manual_seed(seed)
        labels = self.class_labels(classes, num_images, generator)
        config = self.run_config.model
        outputs = []
        for batch_index, start in enumerate(range(0, num_images, batch_size)):
            count = min(batch_size, num_images - start)
            step_callback = None if callback is None else (lambda info, b=batch_index: callback(b, info))
            samples = generate(
                self.model,
                self.diffusion,
                (count, config.in_channels, config.image_size, config.image_size),
                class_labels=None if labels is None else labels[start : start + count],
                null_label=self.model.null_label if self.num_classes else None,
                guidance=guidance,
                generator=generator,
                device=self.device,
                sampler=sampler,
                steps=steps,
                eta=eta,
                spacing=spacing,
                callback=step_callback,
            )
            outputs.append(to_uint8(samples))
        return np.concatenate(outputs)
