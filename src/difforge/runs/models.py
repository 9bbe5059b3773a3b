"""The model factory: which denoiser a run holds, built from its config and loaded from its
weights.

``config.json`` stores ``{"kind": ..., **settings}`` under ``"model"``; `MODEL_KINDS`
maps the kind to its config class (with ``from_dict``/``to_dict`` and a class-level
``kind``) and to the constructor that turns that config into a ``torch.nn.Module`` called
as ``model(x_t, t, **cond)``. `prepare_run`, `Pipeline.from_run` and evaluation build
models only through `build_model` and `load_model`, so adding a model kind (the expert
ensemble, say) is one module plus one `register_model` call.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from difforge.errors import DifforgeError
from difforge.nn import UNet, UNetConfig
from difforge.runs.storage import load_tensors

if TYPE_CHECKING:
    from difforge.runs.config import RunConfig

WEIGHT_FILES = {"ema": "ema.safetensors", "raw": "model.safetensors"}
"""Which file of a run holds which weights."""


@dataclass(frozen=True)
class ModelKind:
    """A registered model kind: its config class and its constructor."""

    config_class: Any
    build: Callable[[Any], torch.nn.Module]


MODEL_KINDS: dict[str, ModelKind] = {UNetConfig.kind: ModelKind(UNetConfig, UNet)}


def register_model(config_class: Any, build: Callable[[Any], torch.nn.Module]) -> ModelKind:
    """Register a model kind under ``config_class.kind``."""
    kind = getattr(config_class, "kind", None)
    if not isinstance(kind, str) or not kind:
        raise DifforgeError(f"{config_class!r} has no string 'kind' to register it under")
    MODEL_KINDS[kind] = ModelKind(config_class, build)
    return MODEL_KINDS[kind]


def model_config_from_dict(data: Mapping[str, Any]) -> Any:
    """A run's ``"model"`` section -> its config, by ``kind`` (default unet)."""
    if not isinstance(data, Mapping):
        raise DifforgeError(f"the model settings must be a JSON object, got {type(data).__name__}")
    settings = dict(data)
    kind = settings.pop("kind", UNetConfig.kind)
    entry = MODEL_KINDS.get(kind)
    if entry is None:
        raise DifforgeError(f"unknown model kind {kind!r}; known: {', '.join(sorted(MODEL_KINDS))}")
    return entry.config_class.from_dict(settings)


def model_config_to_dict(config: Any) -> dict[str, Any]:
    """``{"kind": ..., **config.to_dict()}`` for config.json."""
    return {"kind": config.kind, **config.to_dict()}


def build_model(run_config: RunConfig) -> torch.nn.Module:
    """A freshly initialised model of the run's kind (seed torch first for reproducibility)."""
    kind = run_config.model.kind
    entry = MODEL_KINDS.get(kind)
    if entry is None:
        raise DifforgeError(f"unknown model kind {kind!r}; known: {', '.join(sorted(MODEL_KINDS))}")
    return entry.build(run_config.model)


def load_model(run_dir: str | Path, run_config: RunConfig, weights: str = "ema") -> torch.nn.Module:
    """The run's model with its ``ema`` or ``raw`` weights; a missing, damaged or mismatched
    file is a one-line DifforgeError naming it."""
    if weights not in WEIGHT_FILES:
        raise DifforgeError(f"weights must be one of {', '.join(WEIGHT_FILES)}, got {weights!r}")
    model = build_model(run_config)
    path = Path(run_dir) / WEIGHT_FILES[weights]
    state = load_tensors(path)
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        first = str(error).splitlines()[0]
        raise DifforgeError(f"{path} does not fit the model in config.json ({first})") from None
    return model
