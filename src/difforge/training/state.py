"""The trainer's checkpoint state without pickle: optimizer moments, every RNG state, the
importance-sampling history and the loss scaler as safetensors tensors, and the counters
(step, epoch, position in the epoch, images seen, EMA updates) as JSON in the file's
metadata. `pack_trainer_state` writes what `restore_trainer_state` reads back exactly."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from difforge.errors import DifforgeError
from difforge.runs.storage import load_metadata, load_tensors

if TYPE_CHECKING:
    from difforge.training.trainer import Trainer

TRAINER_FORMAT = "difforge-trainer-1"


def flatten_optimizer_state(state: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """torch optimizer ``state_dict()`` -> (tensors named ``optim/<param>/<key>``, JSON part)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for param_id, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim/{param_id}/{key}"] = value
            else:
                scalars.setdefault(str(param_id), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer_state(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, tensor in tensors.items():
        if name.startswith("optim/"):
            _, param_id, key = name.split("/", 2)
            state.setdefault(int(param_id), {})[key] = tensor
    for param_id, values in meta.get("scalars", {}).items():
        state.setdefault(int(param_id), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def encode_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def pack_trainer_state(trainer: Trainer) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of ``trainer.safetensors``."""
    optim_tensors, optim_meta = flatten_optimizer_state(trainer.optimizer.state_dict())
    tensors = dict(optim_tensors)
    tensors["rng/torch_cpu"] = torch.get_rng_state()
    tensors["rng/generator"] = trainer.generator.get_state()
    if torch.cuda.is_available():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda_{index}"] = state
    for key, value in trainer.timestep_sampler.state_dict().items():
        tensors[f"timesteps/{key}"] = value
    scaler_state = trainer.scaler.state_dict() if trainer.scaler.is_enabled() else {}
    meta = {
        "step": trainer.step,
        "epoch": trainer.epoch,
        "batch_in_epoch": trainer.batch_in_epoch,
        "images_seen": trainer.images_seen,
        "ema_updates": trainer.ema.updates,
        "nonfinite_steps": trainer.nonfinite_steps,
        "optimizer": optim_meta,
        "scaler": {k: v for k, v in scaler_state.items() if not isinstance(v, torch.Tensor)},
    }
    for key, value in scaler_state.items():
        if isinstance(value, torch.Tensor):
            tensors[f"scaler/{key}"] = value
    return tensors, {"trainer": encode_json(meta), "format": TRAINER_FORMAT}


def restore_trainer_state(trainer: Trainer, folder: Path) -> int:
    """Load checkpoint ``folder`` (weights, EMA, trainer state) into ``trainer``; its step.

    Everything is checked before the trainer is touched where it can be: the counters must be
    integers in range and consistent with each other (``epoch * batches_per_epoch +
    batch_in_epoch == step * grad_accum``: every optimizer step consumed ``grad_accum``
    batches), the RNG states must be valid. A damaged or inconsistent state is a one-line
    DifforgeError naming the folder."""
    model_state = load_tensors(folder / "model.safetensors")
    ema_state = load_tensors(folder / "ema.safetensors")
    trainer_path = folder / "trainer.safetensors"
    tensors = load_tensors(trainer_path)
    try:
        meta = json.loads(load_metadata(trainer_path)["trainer"])
        counters = _checked_counters(meta, trainer)
        generator_state = tensors["rng/generator"]
        cpu_state = tensors["rng/torch_cpu"]
        trainer.model.load_state_dict(model_state)
        trainer.ema.model.load_state_dict(ema_state)
        trainer.optimizer.load_state_dict(unflatten_optimizer_state(tensors, meta["optimizer"]))
        trainer.generator.set_state(generator_state)
        torch.set_rng_state(cpu_state)
        trainer.timestep_sampler.load_state_dict(_prefixed(tensors, "timesteps/"))
    except DifforgeError as error:
        raise DifforgeError(f"{folder}: {error}") from None
    except (KeyError, ValueError, RuntimeError, TypeError, IndexError, json.JSONDecodeError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise DifforgeError(
            f"{folder} does not match this model or is damaged ({first}); if config.json was edited, "
            "restore it"
        ) from None
    if torch.cuda.is_available():
        cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("rng/cuda_")]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
    if trainer.scaler.is_enabled() and meta.get("scaler"):
        trainer.scaler.load_state_dict({**meta["scaler"], **_prefixed(tensors, "scaler/")})
    trainer.step, trainer.epoch, trainer.batch_in_epoch = (
        counters["step"],
        counters["epoch"],
        counters["batch"],
    )
    trainer.images_seen = counters["images_seen"]
    trainer.ema.updates = counters["ema_updates"]
    trainer.nonfinite_steps = counters["nonfinite_steps"]
    return trainer.step


def _checked_counters(meta: Mapping[str, Any], trainer: Trainer) -> dict[str, int]:
    """The trainer state's counters, each a non-negative integer, consistent with the run."""
    names = {"step": "step", "epoch": "epoch", "batch": "batch_in_epoch", "images_seen": "images_seen"}
    counters: dict[str, int] = {}
    for key, name in {**names, "ema_updates": "ema_updates"}.items():
        value = meta[name]
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**62:
            raise DifforgeError(f"trainer state {name} = {value!r} is not a step count")
        counters[key] = value
    nonfinite = meta.get("nonfinite_steps", 0)  # absent before difforge 0.2
    if not isinstance(nonfinite, int) or not 0 <= nonfinite <= counters["step"]:
        raise DifforgeError(f"trainer state nonfinite_steps = {nonfinite!r} is out of range")
    counters["nonfinite_steps"] = nonfinite
    per_epoch = trainer.batches_per_epoch
    consumed = counters["epoch"] * per_epoch + counters["batch"]
    if counters["batch"] > per_epoch or consumed != counters["step"] * trainer.config.grad_accum:
        raise DifforgeError(
            f"trainer state step {counters['step']}, epoch {counters['epoch']}, batch {counters['batch']} "
            f"does not fit {per_epoch} batches per epoch and grad_accum {trainer.config.grad_accum} "
            "(written with another batch size, dataset or number of processes?)"
        )
    if counters["ema_updates"] > counters["step"]:
        raise DifforgeError(
            f"trainer state: {counters['ema_updates']} EMA updates in {counters['step']} steps is impossible"
        )
    return counters


def _prefixed(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
