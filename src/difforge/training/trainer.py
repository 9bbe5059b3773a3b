"""The training loop: AdamW, warm-up, clipping, EMA, accumulation, mixed precision,
classifier-free condition dropout, importance-sampled timesteps, previews, crash-safe
checkpoints, resume, DDP — over any `difforge.process.Process` and any model kind.

Determinism: every random draw comes from a source whose state is checkpointed — the data
order from (seed, epoch), each item's augmentation from (seed, epoch, position), noise,
timesteps and condition dropout from the trainer's generator, dropout from torch's global
RNG — so on CPU a run that is interrupted and resumed ends with the same weights as one
that never stopped.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from difforge.conditioning import build_conditions, prepare_conditions
from difforge.errors import DifforgeError
from difforge.process import Process
from difforge.runs.config import CONFIG_FILE, RunConfig, TrainConfig, condition_context
from difforge.runs.storage import (
    checkpoint_dirs,
    intact_checkpoints,
    remove_stale_temporaries,
    write_bytes_atomic,
    write_checkpoint,
)
from difforge.runs.threads import ThreadGovernor, parse_threads
from difforge.sampling import get_sampler
from difforge.timestep_sampling import UniformTimestepSampler
from difforge.training.allocator import keep_freed_memory
from difforge.training.batches import DistributedContext, EpochBatchSampler, SeededItems
from difforge.training.ema import EMA
from difforge.training.previews import write_preview
from difforge.training.state import pack_trainer_state, restore_trainer_state

Batch = tuple[torch.Tensor, Mapping[str, torch.Tensor]]
"""What the data loader yields: images (B, C, H, W) in [-1, 1] and the cond dict."""
PreviewCallback = Callable[["Trainer"], "Path | None"]


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training: the step in progress was finished and ``checkpoint`` written,
    so ``--resume`` continues bit-exactly from ``step``."""

    def __init__(self, step: int, checkpoint: Path | None) -> None:
        super().__init__(f"interrupted at step {step}")
        self.step = step
        self.checkpoint = checkpoint


class TrainingDiverged(DifforgeError):
    """Too many optimizer steps in a row with a non-finite loss or gradient."""


@contextmanager
def deferred_interrupt() -> Iterator[dict[str, bool]]:
    """Turn the first Ctrl-C (SIGINT) into a request, ``state["asked"]``, that the training
    loop honours between steps, so no step, checkpoint or preview is cut in half; a second
    Ctrl-C raises KeyboardInterrupt at once. Only in the main thread (elsewhere a no-op)."""
    state = {"asked": False}
    if threading.current_thread() is not threading.main_thread():
        yield state
        return

    def ask(signum: int, frame: Any) -> None:
        if state["asked"]:
            raise KeyboardInterrupt
        state["asked"] = True
        print("\nstopping after this step (Ctrl-C again to stop at once, losing it)", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, ask)
    try:
        yield state
    finally:
        signal.signal(signal.SIGINT, previous)


def learning_rate(
    lr: float,
    step: int,
    warmup_steps: int,
    total_steps: int,
    schedule: str,
    *,
    lr_min: float = 0.0,
    decay_every: int = 0,
    decay_factor: float = 0.5,
) -> float:
    """lr of 0-based step ``step``: lr min(1, (step + 1) / warmup_steps) during the warm-up;
    after it, with p = (step - warmup_steps) / (total_steps - warmup_steps) in [0, 1) (no step
    is wasted at the floor) and k = (step - warmup_steps) // decay_every:

    - ``constant``: lr;
    - ``cosine``: lr_min + (lr - lr_min) (1 + cos(pi p)) / 2 (Loshchilov & Hutter 2017);
    - ``linear``: lr - (lr - lr_min) p;
    - ``step``: max(lr_min, lr decay_factor^k).

    A pure function of the step, so a resumed run continues it exactly. The decay spans
    ``total_steps`` of the run's plan (a resume with more --steps stretches what is left of
    it); past the plan, the floor."""
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    after = step - warmup_steps
    if schedule == "step":
        return max(lr_min, lr * decay_factor ** (after // decay_every))
    if schedule == "constant" or total_steps <= warmup_steps:
        return lr
    progress = min(1.0, after / (total_steps - warmup_steps))
    if schedule == "linear":
        return lr - (lr - lr_min) * progress
    return lr_min + (lr - lr_min) * 0.5 * (1.0 + math.cos(math.pi * progress))


class Trainer:
    """Trains ``model`` on ``dataset`` under ``process`` and writes the run to ``run_dir``.

    The dataset yields ``(image (C, H, W) in [-1, 1], cond)`` with ``cond`` a dict of
    tensors keyed by condition kind (`difforge.conditioning`); the run's
    ``run_config.conditioning`` says which of them the model takes. ``run_config`` is
    written as config.json; on ``resume`` the newest checkpoint is loaded. ``preview`` is
    the callback that makes the sample grid (`difforge.training.previews.write_preview`).
    ``TrainConfig.threads`` ``auto`` lets `difforge.runs.threads.ThreadGovernor` lower torch's
    CPU thread count while other processes keep cores busy; a count fixes it.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        process: Process,
        dataset: Dataset,
        run_config: RunConfig,
        run_dir: str | Path,
        *,
        device: torch.device,
        ctx: DistributedContext | None = None,
        progress: bool = True,
        preview: PreviewCallback = write_preview,
    ) -> None:
        self.config: TrainConfig = run_config.train
        self.config.validate()
        self.run_config = run_config
        self.run_dir = Path(run_dir)
        self.ctx = ctx or DistributedContext()
        self.device = device
        threads = parse_threads(self.config.threads)
        if threads is not None and device.type == "cpu":
            torch.set_num_threads(threads)
        # Several ranks on one machine would count each other as competitors: no governor.
        self.governor = ThreadGovernor(
            enabled=threads is None and device.type == "cpu" and self.ctx.world_size == 1
        )
        self.progress = progress and self.ctx.is_main
        self.process = process
        self.dataset = dataset
        self.conditions = build_conditions(
            run_config.conditioning or [],
            condition_context(run_config),
        )
        self.image_shape = (
            run_config.model.in_channels,
            run_config.model.image_size,
            run_config.model.image_size,
        )
        self.preview_callback = preview
        if self.config.preview_sampler is not None:
            get_sampler(self.config.preview_sampler, process.kind)
        self.model = model.to(device)
        self.ema = EMA(self.model, self.config.ema_decay)
        # foreach AdamW, not fused: with fused=True on CPU a resumed run no longer matches an
        # uninterrupted one bit for bit (tests/test_training.py::test_resume_equals_uninterrupted).
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=self.config.lr, weight_decay=self.config.weight_decay
        )
        self.amp_dtype = self._amp_dtype()
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        self.timestep_sampler: UniformTimestepSampler = process.timestep_sampler(self.config.timestep_sampler)
        self.generator = torch.Generator(device=device).manual_seed(self.config.seed + 7919 * self.ctx.rank)
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.images_seen = 0
        self.nonfinite_steps = 0  # optimizer steps skipped for a non-finite loss or gradient
        self.nonfinite_in_a_row = 0
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
            # An expert ensemble trains one expert at a time: the others get no gradient.
            ensemble = getattr(run_config.model, "phase", None) is not None
            self.ddp_model = DistributedDataParallel(
                self.model, device_ids=ids, find_unused_parameters=ensemble
            )
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
        """The learning rate of 0-based optimizer step ``step`` under this run's plan
        (`learning_rate` with ``warmup_steps``, ``total_steps`` and ``lr_schedule``). An
        expert ensemble runs the plan once per expert, over that expert's share of the steps."""
        config = self.config
        start, length = 0, self.total_steps
        phase = self.expert_phase(step)
        if phase is not None:
            _, start, length = phase
        return learning_rate(
            config.lr,
            step - start,
            config.warmup_steps,
            length,
            config.lr_schedule,
            lr_min=config.lr_min,
            decay_every=config.lr_decay_every,
            decay_factor=config.lr_decay_factor,
        )

    def expert_phase(self, step: int) -> tuple[int, int, int] | None:
        """(expert, its first step, its number of steps) at ``step`` for an expert ensemble
        (`difforge.nn.experts.ExpertsConfig.phase`), else None."""
        phase = getattr(self.run_config.model, "phase", None)
        return None if phase is None else phase(step, self.total_steps)

    def timestep_range(self) -> tuple[int, int] | None:
        """The training timesteps of this step: the range of the expert that trains now."""
        phase = self.expert_phase(self.step)
        return None if phase is None else self.run_config.model.expert_range(phase[0])

    # ---- data ----------------------------------------------------------------------------

    def _batches(self) -> Iterator[Batch]:
        """Endless stream of batches from the current (epoch, batch) position on."""
        items = SeededItems(self.dataset)
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
            for images, cond in loader:
                self.batch_in_epoch += 1
                yield images, cond
            self.epoch += 1
            self.batch_in_epoch = 0

    # ---- one optimizer step --------------------------------------------------------------

    def train_step(self, batches: Iterator[Batch]) -> dict[str, torch.Tensor]:
        """One optimizer step over ``grad_accum`` micro-batches; returns the step's scalars as
        0-d tensors on the device (read them only when logging: reading forces a GPU sync):
        ``loss`` and every other term the process returns, averaged, then ``grad_norm``, ``lr``."""
        self.ddp_model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step)
        totals: dict[str, torch.Tensor] = {"loss": torch.zeros((), device=self.device)}
        images_in_step = 0
        accum = self.config.grad_accum
        timestep_range = self.timestep_range()
        for micro in range(accum):
            images, cond = next(batches)
            x0 = images.to(self.device, non_blocking=True)
            batch = x0.shape[0]
            t, weights = self.timestep_sampler.sample(batch, self.device, self.generator, timestep_range)
            noise = torch.randn(x0.shape, generator=self.generator, device=self.device, dtype=x0.dtype)
            kwargs = prepare_conditions(
                cond,
                self.conditions,
                p_uncond=self.config.p_uncond,
                generator=self.generator,
                device=self.device,
            )
            sync = micro == accum - 1 or self.ctx.world_size == 1
            no_sync = getattr(self.ddp_model, "no_sync", None)
            with nullcontext() if sync or no_sync is None else no_sync(), self._autocast():
                terms = self.process.training_losses(self.ddp_model, x0, t, noise, kwargs)
                loss = (terms["loss"].float() * weights).mean() / accum
            self.scaler.scale(loss).backward()
            self._update_timestep_sampler(t, terms["loss"].detach())
            for key, value in terms.items():
                mean = value.detach().float().mean() / accum
                totals[key] = totals[key] + mean if key in totals else mean
            images_in_step += batch
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), self.config.grad_clip if self.config.grad_clip > 0 else float("inf")
        )
        # One scalar read per step: a step with a non-finite loss (or, without fp16 loss
        # scaling, which skips overflowing steps itself, a non-finite gradient) is not applied.
        finite = torch.isfinite(totals["loss"])
        if not self.scaler.is_enabled():
            finite = finite & torch.isfinite(grad_norm)
        if bool(finite):
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.ema.update(self.model)
            self.nonfinite_in_a_row = 0
        else:
            if self.scaler.is_enabled():
                self.scaler.update()
            self.nonfinite_steps += 1
            self.nonfinite_in_a_row += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.images_seen += images_in_step * self.ctx.world_size
        lr = torch.tensor(self.optimizer.param_groups[0]["lr"])
        skipped = torch.tensor(float(self.nonfinite_steps))
        return {**totals, "grad_norm": grad_norm.detach(), "lr": lr, "nonfinite_steps": skipped}

    def _autocast(self) -> Any:
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _update_timestep_sampler(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        if not self.timestep_sampler.learns:
            return
        if self.ctx.world_size > 1:
            gathered_t = [torch.zeros_like(t) for _ in range(self.ctx.world_size)]
            gathered_l = [torch.zeros_like(losses) for _ in range(self.ctx.world_size)]
            dist.all_gather(gathered_t, t)
            dist.all_gather(gathered_l, losses)
            t, losses = torch.cat(gathered_t), torch.cat(gathered_l)
        losses = losses.float().cpu()
        if bool(torch.isfinite(losses).all()):  # a diverged step must not poison the history
            self.timestep_sampler.update(t.cpu(), losses)

    # ---- the loop ------------------------------------------------------------------------

    def train(self, stop_after: int | None = None) -> None:
        """Train until ``total_steps`` (or ``stop_after`` more steps, for tests)."""
        if self.device.type == "cpu":
            keep_freed_memory()  # reuse freed activations instead of page-faulting them in again
        if self.ctx.is_main:
            remove_stale_temporaries(self.run_dir)
        self.write_config()
        batches = self._batches()
        last_step = self.total_steps if stop_after is None else min(self.total_steps, self.step + stop_after)
        bar = self._progress_bar(last_step)
        metrics_path = self.run_dir / "metrics.jsonl"
        with deferred_interrupt() as interrupt:
            try:
                self._loop(batches, last_step, bar, metrics_path, interrupt)
            finally:
                if bar is not None:
                    bar.close()
                if self._writer is not None:
                    self._writer.close()
                    self._writer = None

    def _loop(
        self,
        batches: Iterator[Batch],
        last_step: int,
        bar: Any,
        metrics_path: Path,
        interrupt: dict[str, bool],
    ) -> None:
        config = self.config
        window_start, window_images = time.perf_counter(), 0
        while self.step < last_step:
            step_scalars = self.train_step(batches)
            self.governor.tick()
            window_images += config.batch_size * config.grad_accum * self.ctx.world_size
            if bar is not None:
                bar.update(1)
            if self.step % config.log_every == 0 or self.step == last_step:
                logged = {key: float(value) for key, value in step_scalars.items()}
                elapsed = time.perf_counter() - window_start
                logged["images_per_s"] = window_images / max(elapsed, 1e-9)
                if self.device.type == "cpu":
                    logged["threads"] = float(self.governor.threads)
                window_start, window_images = time.perf_counter(), 0
                self._log(logged, metrics_path, bar)
            if self.nonfinite_in_a_row >= config.max_nonfinite_steps:
                raise self._diverged()
            at_end = self.step == self.total_steps
            if config.previews and self._due(self.preview_interval, at_end):
                self.preview()
            saved = self._due(config.checkpoint_every, at_end) or self.step == last_step
            if saved:
                self.save_checkpoint()
            if self._interrupt_asked(interrupt):
                raise TrainingInterrupted(self.step, self.save_checkpoint() if not saved else None)

    def _interrupt_asked(self, interrupt: dict[str, bool]) -> bool:
        """Whether Ctrl-C was pressed on any rank (all ranks stop after the same step)."""
        if self.ctx.world_size == 1:
            return interrupt["asked"]
        flag = torch.tensor(float(interrupt["asked"]), device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag)

    def _diverged(self) -> TrainingDiverged:
        found = checkpoint_dirs(self.run_dir)
        kept = f"its newest checkpoint {found[-1].name} is intact" if found else "no checkpoint was written"
        lr = self.optimizer.param_groups[0]["lr"]
        return TrainingDiverged(
            f"training diverged: {self.nonfinite_in_a_row} steps in a row had a non-finite loss or gradient "
            f"(last at step {self.step}, learning rate {lr:g}); they were not applied and {kept}. "
            "Continue with a lower learning rate: "
            f"difforge train --resume --out {self.run_dir} --lr {lr / 10:g}"
        )

    @property
    def preview_interval(self) -> int:
        """Optimizer steps between previews: ``sample_every``, or one epoch's steps."""
        if self.config.sample_every_epoch:
            return max(1, math.ceil(self.batches_per_epoch / self.config.grad_accum))
        return self.config.sample_every

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
        writer = self.tensorboard()
        if writer is not None:
            for key, value in logged.items():
                writer.add_scalar(f"train/{key}", value, self.step)

    def tensorboard(self) -> Any:
        """The TensorBoard writer (rank 0, when enabled and installed), else None."""
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

    def preview(self) -> Path | None:
        """Make the preview grid now (see `difforge.training.previews`)."""
        return self.preview_callback(self)

    def write_config(self) -> None:
        """Write the run's config.json (rank 0)."""
        if self.ctx.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_bytes_atomic(self.run_dir / CONFIG_FILE, self.run_config.to_json().encode())

    def save_checkpoint(self) -> Path | None:
        """Write checkpoint ``step`` (rank 0); weights that are not all finite are never written."""
        if not self.ctx.is_main:
            return None
        for name, module in (("weights", self.model), ("EMA weights", self.ema.model)):
            if not all(bool(torch.isfinite(p).all()) for p in module.parameters()):
                raise TrainingDiverged(
                    f"the {name} at step {self.step} are not all finite: checkpoint not written "
                    f"(the previous ones are intact); lower --lr and resume"
                )
        if not (self.run_dir / CONFIG_FILE).is_file():
            self.write_config()
        weights_meta = {"format": "pt", "library": "difforge", "step": str(self.step)}
        files = {
            "model.safetensors": (self.model.state_dict(), weights_meta),
            "ema.safetensors": (self.ema.model.state_dict(), weights_meta),
            "trainer.safetensors": pack_trainer_state(self),
        }
        return write_checkpoint(self.run_dir, self.step, files, self.config.keep_checkpoints)

    def resume(self) -> int:
        """Load the newest intact checkpoint of the run; returns its step.

        A checkpoint whose manifest, files or trainer state do not check out is skipped with
        a note on stderr naming it and why, and the next older one is tried; none at all is a
        one-line DifforgeError."""
        intact, skipped = intact_checkpoints(self.run_dir)
        for folder in reversed(intact):
            try:
                step = restore_trainer_state(self, folder)
            except DifforgeError as error:
                skipped.append((folder, str(error)))
                continue
            self._report_skipped(skipped, folder)
            return step
        self._report_skipped(skipped, None)
        raise DifforgeError(f"--resume: {self.run_dir} has no checkpoint to resume from")

    def _report_skipped(self, skipped: list[tuple[Path, str]], used: Path | None) -> None:
        if not self.ctx.is_main:
            return
        for folder, reason in skipped:
            print(f"note: skipped checkpoint {folder.name}: {reason}", file=sys.stderr)
        if skipped and used is not None:
            print(f"note: resuming from {used.name}", file=sys.stderr)


DEFAULT_STEPS = {"tiny": 200, "mnist": 1500}


def default_steps(preset: str) -> int:
    """Optimizer steps when neither --steps nor --epochs is given."""
    return DEFAULT_STEPS.get(preset, 10_000)
