"""The training loop: AdamW, warm-up, clipping, EMA, accumulation, mixed precision,
label dropout, importance-sampled timesteps, previews, crash-safe checkpoints, resume, DDP.

Determinism: every random draw comes from a source whose state is checkpointed — the data
order from (seed, epoch), each item's augmentation from (seed, epoch, position), noise,
timesteps and label dropout from the trainer's generator, dropout from torch's global RNG —
so on CPU a run that is interrupted and resumed ends with the same weights as one that
never stopped.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler

from difforge.diffusion import GaussianDiffusion
from difforge.errors import DifforgeError
from difforge.images import make_grid, save_png, to_uint8
from difforge.sampling import StepInfo, generate
from difforge.timestep_sampling import UniformTimestepSampler, make_timestep_sampler
from difforge.training.allocator import keep_freed_memory
from difforge.training.checkpoint import (
    checkpoint_dirs,
    encode_json,
    flatten_optimizer_state,
    load_metadata,
    load_tensors,
    unflatten_optimizer_state,
    write_bytes_atomic,
    write_checkpoint,
)
from difforge.training.config import CONFIG_FILE, RunConfig, TrainConfig


@dataclass
class DistributedContext:
    """Rank and world size; world 1 when not launched by torchrun."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# ---- data order ----------------------------------------------------------------------------


class _SeededItems(Dataset):
    """Wraps a dataset so that item (index, seed) is made under torch.manual_seed(seed):
    random crops and flips then depend on the position in the run, not on the worker or
    on what came before, which makes resumed runs identical."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]


class EpochBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of (index, item seed) for one epoch of one rank, from batch ``start`` on.

    The epoch's permutation comes from (seed, epoch); rank r takes every world-th index
    (the permutation is padded by wrapping so that every rank gets as many)."""

    def __init__(
        self, size: int, batch_size: int, seed: int, epoch: int, start: int, ctx: DistributedContext
    ):
        self.size, self.batch_size, self.seed, self.epoch, self.start = size, batch_size, seed, epoch, start
        self.ctx = ctx

    @staticmethod
    def batches_per_epoch(size: int, batch_size: int, world_size: int) -> int:
        per_rank = math.ceil(size / world_size)
        return max(1, per_rank // batch_size)

    def _indices(self) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        per_rank = math.ceil(self.size / self.ctx.world_size)
        order = (order * (1 + (per_rank * self.ctx.world_size) // max(1, self.size)))[
            : per_rank * self.ctx.world_size
        ]
        return order[self.ctx.rank :: self.ctx.world_size]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        indices = self._indices()
        batch = min(self.batch_size, len(indices))
        count = self.batches_per_epoch(self.size, self.batch_size, self.ctx.world_size)
        base = (self.seed * 1_000_003 + self.epoch) * 10_000_019
        for b in range(self.start, count):
            chunk = indices[b * batch : (b + 1) * batch]
            yield [(i, (base + b * batch + k) % (2**63 - 1)) for k, i in enumerate(chunk)]

    def __len__(self) -> int:
        return self.batches_per_epoch(self.size, self.batch_size, self.ctx.world_size) - self.start


# ---- EMA -------------------------------------------------------------------------------------


class EMA:
    """Exponential moving average of a model's weights (a full copy used for sampling).

    theta_ema <- d theta_ema + (1 - d) theta, with d = min(decay, (1 + n) / (10 + n)) after
    n updates (warm-up, so early averages are not dominated by the random initialisation)."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        ema_params = list(self.model.parameters())
        params = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        for ema_buffer, buffer in zip(self.model.buffers(), model.buffers(), strict=True):
            ema_buffer.copy_(buffer)
        self.updates += 1


# ---- the trainer -----------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DifforgeError(f"--device must be auto, cpu or cuda[:N], got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DifforgeError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise DifforgeError(f"--device must be auto, cpu or cuda[:N], got {name!r}")
    return device


class Trainer:
    """Trains ``model`` on ``dataset`` under ``diffusion`` and writes the run to ``run_dir``.

    The dataset yields (image (C, H, W) in [-1, 1], label) with label -1 when unlabelled.
    ``run_config`` is written as config.json; on ``resume`` the newest checkpoint is loaded.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        diffusion: GaussianDiffusion,
        dataset: Dataset,
        run_config: RunConfig,
        run_dir: str | Path,
        *,
        device: torch.device,
        ctx: DistributedContext | None = None,
        progress: bool = True,
    ) -> None:
        self.config: TrainConfig = run_config.train
        self.config.validate()
        self.run_config = run_config
        self.run_dir = Path(run_dir)
        self.ctx = ctx or DistributedContext()
        self.device = device
        self.progress = progress and self.ctx.is_main
        self.diffusion = diffusion
        self.dataset = dataset
        self.num_classes = run_config.model.num_classes if self.config.conditional else 0
        self.model = model.to(device)
        self.ema = EMA(self.model, self.config.ema_decay)
        # foreach AdamW, not fused: with fused=True on CPU a resumed run no longer matches an
        # uninterrupted one bit for bit (tests/test_training.py::test_resume_equals_uninterrupted).
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=self.config.lr, weight_decay=self.config.weight_decay
        )
        self.amp_dtype = self._amp_dtype()
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        self.timestep_sampler: UniformTimestepSampler = make_timestep_sampler(
            self.config.timestep_sampler, diffusion.num_timesteps
        )
        self.generator = torch.Generator(device=device).manual_seed(self.config.seed + 7919 * self.ctx.rank)
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.images_seen = 0
        self.batches_per_epoch = EpochBatchSampler.batches_per_epoch(
            len(dataset),
            self.config.batch_size,
            self.ctx.world_size,  # type: ignore[arg-type]
        )
        self.total_steps = self._total_steps()
        self.ddp_model: torch.nn.Module = self.model
        if self.ctx.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [device.index] if device.type == "cuda" else None
            self.ddp_model = DistributedDataParallel(self.model, device_ids=ids)
        self._writer: Any = None

    # ---- setup helpers -------------------------------------------------------------------

    def _amp_dtype(self) -> torch.dtype | None:
        choice = self.config.mixed_precision
        if choice == "no" or (choice == "auto" and self.device.type != "cuda"):
            return None
        if choice == "auto":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if choice == "bf16" else torch.float16

    def _total_steps(self) -> int:
        if self.config.steps is not None:
            return self.config.steps
        if self.config.epochs is not None:
            return max(1, math.ceil(self.config.epochs * self.batches_per_epoch / self.config.grad_accum))
        return default_steps(self.config.preset)

    def lr_at(self, step: int) -> float:
        """Linear warm-up over ``warmup_steps``, then constant."""
        warmup = self.config.warmup_steps
        return self.config.lr * min(1.0, (step + 1) / warmup) if warmup > 0 else self.config.lr

    # ---- data ----------------------------------------------------------------------------

    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Endless stream of batches from the current (epoch, batch) position on."""
        items = _SeededItems(self.dataset)
        while True:
            sampler = EpochBatchSampler(
                len(self.dataset),  # type: ignore[arg-type]
                self.config.batch_size,
                self.config.seed,
                self.epoch,
                self.batch_in_epoch,
                self.ctx,
            )
            loader = DataLoader(
                items,
                batch_sampler=sampler,
                num_workers=self.config.num_workers,
                pin_memory=self.device.type == "cuda",
                persistent_workers=False,
            )
            for images, labels in loader:
                self.batch_in_epoch += 1
                yield images, labels
            self.epoch += 1
            self.batch_in_epoch = 0

    # ---- one optimizer step --------------------------------------------------------------

    def _model_kwargs(self, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.num_classes == 0:
            return {}
        labels = labels.to(self.device, non_blocking=True).long()
        null = torch.full_like(labels, self.num_classes)
        labels = torch.where(labels < 0, null, labels)
        if self.config.p_uncond > 0:
            drop = (
                torch.rand(labels.shape, generator=self.generator, device=self.device) < self.config.p_uncond
            )
            labels = torch.where(drop, null, labels)
        return {"class_labels": labels}

    def train_step(self, batches: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """One optimizer step over ``grad_accum`` micro-batches; returns the step's scalars as
        0-d tensors on the device (read them only when logging: reading forces a GPU sync)."""
        self.ddp_model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step)
        totals = {key: torch.zeros((), device=self.device) for key in ("loss", "mse", "vb")}
        images_in_step = 0
        accum = self.config.grad_accum
        for micro in range(accum):
            images, labels = next(batches)
            x0 = images.to(self.device, non_blocking=True)
            batch = x0.shape[0]
            t, weights = self.timestep_sampler.sample(batch, self.device, self.generator)
            noise = torch.randn(x0.shape, generator=self.generator, device=self.device, dtype=x0.dtype)
            kwargs = self._model_kwargs(labels)
            sync = micro == accum - 1 or self.ctx.world_size == 1
            no_sync = getattr(self.ddp_model, "no_sync", None)
            with nullcontext() if sync or no_sync is None else no_sync(), self._autocast():
                terms = self.diffusion.training_losses(self.ddp_model, x0, t, noise, kwargs)
                loss = (terms["loss"].float() * weights).mean() / accum
            self.scaler.scale(loss).backward()
            self._update_timestep_sampler(t, terms["loss"].detach())
            for key in totals:
                totals[key] += terms[key].detach().float().mean() / accum
            images_in_step += batch
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), self.config.grad_clip if self.config.grad_clip > 0 else float("inf")
        )
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.update(self.model)
        self.step += 1
        self.images_seen += images_in_step * self.ctx.world_size
        lr = torch.tensor(self.optimizer.param_groups[0]["lr"])
        return {**totals, "grad_norm": grad_norm.detach(), "lr": lr}

    def _autocast(self) -> Any:
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _update_timestep_sampler(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        if type(self.timestep_sampler) is UniformTimestepSampler:
            return
        if self.ctx.world_size > 1:
            gathered_t = [torch.zeros_like(t) for _ in range(self.ctx.world_size)]
            gathered_l = [torch.zeros_like(losses) for _ in range(self.ctx.world_size)]
            dist.all_gather(gathered_t, t)
            dist.all_gather(gathered_l, losses)
            t, losses = torch.cat(gathered_t), torch.cat(gathered_l)
        self.timestep_sampler.update(t.cpu(), losses.float().cpu())

    # ---- the loop ------------------------------------------------------------------------

    def train(self, stop_after: int | None = None) -> None:
        """Train until ``total_steps`` (or ``stop_after`` more steps, for tests)."""
        config = self.config
        if self.device.type == "cpu":
            keep_freed_memory()  # reuse freed activations instead of page-faulting them in again
        self.write_config()
        batches = self._batches()
        last_step = self.total_steps if stop_after is None else min(self.total_steps, self.step + stop_after)
        bar = self._progress_bar(last_step)
        window_start, window_images = time.perf_counter(), 0
        metrics_path = self.run_dir / "metrics.jsonl"
        while self.step < last_step:
            step_scalars = self.train_step(batches)
            window_images += config.batch_size * config.grad_accum * self.ctx.world_size
            if bar is not None:
                bar.update(1)
            if self.step % config.log_every == 0 or self.step == last_step:
                logged = {key: float(value) for key, value in step_scalars.items()}
                elapsed = time.perf_counter() - window_start
                logged["images_per_s"] = window_images / max(elapsed, 1e-9)
                window_start, window_images = time.perf_counter(), 0
                self._log(logged, metrics_path, bar)
            at_end = self.step == self.total_steps
            if self._due(config.sample_every, at_end):
                self.preview()
            if self._due(config.checkpoint_every, at_end) or self.step == last_step:
                self.save_checkpoint()
        if bar is not None:
            bar.close()
        if self._writer is not None:
            self._writer.close()

    def _due(self, every: int, at_end: bool) -> bool:
        return at_end or (every > 0 and self.step % every == 0)

    def _progress_bar(self, last_step: int) -> Any:
        if not self.progress:
            return None
        from tqdm.auto import tqdm

        return tqdm(
            total=last_step,
            initial=self.step,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            file=sys.stderr,
            disable=None,
        )

    def _log(self, logged: dict[str, float], metrics_path: Path, bar: Any) -> None:
        if not self.ctx.is_main:
            return
        record = {"step": self.step, "epoch": self.epoch, "images_seen": self.images_seen, **logged}
        with open(metrics_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        if bar is not None:
            bar.set_postfix(loss=f"{logged['loss']:.4f}", img_s=f"{logged['images_per_s']:.0f}")
        writer = self._tensorboard()
        if writer is not None:
            for key, value in logged.items():
                writer.add_scalar(f"train/{key}", value, self.step)

    def _tensorboard(self) -> Any:
        if not self.config.tensorboard or not self.ctx.is_main:
            return None
        if self._writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                print(
                    "note: TensorBoard logging is off: the 'tensorboard' package is not installed "
                    '(pip install "difforge[tensorboard]", or pass --no-tensorboard)',
                    file=sys.stderr,
                )
                self.config.tensorboard = False
                return None
            self._writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
        return self._writer

    # ---- previews ------------------------------------------------------------------------

    @torch.no_grad()
    def preview(self) -> Path | None:
        """Sample a grid (one column per class for labelled data) with the EMA weights, and a
        denoising strip (x_t above predicted x0, across the steps) of its first images."""
        if not self.ctx.is_main:
            return None
        config = self.config
        count = config.preview_images
        labels = None
        if self.num_classes > 0:
            columns = min(self.num_classes, count)
            labels = torch.arange(count, device=self.device) % self.num_classes
        else:
            columns = None
        frames: list[tuple[torch.Tensor, torch.Tensor]] = []
        total_steps = config.preview_steps

        def keep(info: StepInfo) -> None:
            if info.index % max(1, info.total // 8) == 0 or info.index == info.total - 1:
                frames.append((info.x[:4].clone(), info.pred_x0[:4].clone()))

        model = self.ema.model
        channels = self.run_config.model.in_channels
        size = self.run_config.model.image_size
        samples = generate(
            model,
            self.diffusion,
            (count, channels, size, size),
            class_labels=labels,
            null_label=self.num_classes if self.num_classes else None,
            guidance=1.0,
            sampler=config.preview_sampler,
            steps=min(total_steps, self.diffusion.num_timesteps),
            generator=torch.Generator(device=self.device).manual_seed(config.seed),
            callback=keep,
            device=self.device,
        )
        grid = make_grid(to_uint8(samples), columns=columns)
        path = save_png(self.run_dir / "samples" / f"step_{self.step:08d}.png", grid)
        save_png(self.run_dir / "samples" / "latest.png", grid)
        strip_rows = [torch.cat([x for x, _ in frames], dim=3), torch.cat([p for _, p in frames], dim=3)]
        strip = make_grid(to_uint8(torch.cat(strip_rows, dim=0)), columns=1)
        save_png(self.run_dir / "samples" / f"strip_{self.step:08d}.png", strip)
        writer = self._tensorboard()
        if writer is not None:
            writer.add_image("samples", grid, self.step, dataformats="HWC")
            writer.add_image("denoising", strip, self.step, dataformats="HWC")
        return path

    # ---- checkpoints ---------------------------------------------------------------------

    def _trainer_state(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        optim_tensors, optim_meta = flatten_optimizer_state(self.optimizer.state_dict())
        tensors = dict(optim_tensors)
        tensors["rng/torch_cpu"] = torch.get_rng_state()
        tensors["rng/generator"] = self.generator.get_state()
        if torch.cuda.is_available():
            for index, state in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"rng/cuda_{index}"] = state
        for key, value in self.timestep_sampler.state_dict().items():
            tensors[f"timesteps/{key}"] = value
        scaler_state = self.scaler.state_dict() if self.scaler.is_enabled() else {}
        meta = {
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "images_seen": self.images_seen,
            "ema_updates": self.ema.updates,
            "optimizer": optim_meta,
            "scaler": {k: v for k, v in scaler_state.items() if not isinstance(v, torch.Tensor)},
        }
        for key, value in scaler_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"scaler/{key}"] = value
        return tensors, {"trainer": encode_json(meta), "format": "difforge-trainer-1"}

    def write_config(self) -> None:
        """Write the run's config.json (rank 0)."""
        if self.ctx.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_bytes_atomic(self.run_dir / CONFIG_FILE, self.run_config.to_json().encode())

    def save_checkpoint(self) -> Path | None:
        if not self.ctx.is_main:
            return None
        if not (self.run_dir / CONFIG_FILE).is_file():
            self.write_config()
        weights_meta = {"format": "pt", "library": "difforge", "step": str(self.step)}
        files = {
            "model.safetensors": (self.model.state_dict(), weights_meta),
            "ema.safetensors": (self.ema.model.state_dict(), weights_meta),
            "trainer.safetensors": self._trainer_state(),
        }
        return write_checkpoint(self.run_dir, self.step, files, self.config.keep_checkpoints)

    def resume(self) -> int:
        """Load the newest checkpoint of the run; returns its step (0 if there is none)."""
        found = checkpoint_dirs(self.run_dir)
        if not found:
            raise DifforgeError(f"--resume: {self.run_dir} has no checkpoint to resume from")
        folder = found[-1]
        model_state = load_tensors(folder / "model.safetensors")
        ema_state = load_tensors(folder / "ema.safetensors")
        trainer_path = folder / "trainer.safetensors"
        tensors = load_tensors(trainer_path)
        try:
            meta = json.loads(load_metadata(trainer_path)["trainer"])
            self.model.load_state_dict(model_state)
            self.ema.model.load_state_dict(ema_state)
            self.optimizer.load_state_dict(unflatten_optimizer_state(tensors, meta["optimizer"]))
        except (KeyError, ValueError, RuntimeError) as error:
            raise DifforgeError(f"{folder} does not match this model or is damaged ({error})") from None
        torch.set_rng_state(tensors["rng/torch_cpu"])
        self.generator.set_state(tensors["rng/generator"])
        if torch.cuda.is_available():
            cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("rng/cuda_")]
            if len(cuda_states) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(cuda_states)
        self.timestep_sampler.load_state_dict(
            {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("timesteps/")}
        )
        if self.scaler.is_enabled() and meta.get("scaler"):
            scaler_state = dict(meta["scaler"])
            scaler_state.update(
                {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("scaler/")}
            )
            self.scaler.load_state_dict(scaler_state)
        self.step = int(meta["step"])
        self.epoch = int(meta["epoch"])
        self.batch_in_epoch = int(meta["batch_in_epoch"])
        self.images_seen = int(meta["images_seen"])
        self.ema.updates = int(meta["ema_updates"])
        return self.step


DEFAULT_STEPS = {"tiny": 200, "mnist": 1500}


def default_steps(preset: str) -> int:
    """Optimizer steps when neither --steps nor --epochs is given."""
    return DEFAULT_STEPS.get(preset, 10_000)
