"""The model factory: which denoiser a run holds, built from its config and loaded from its
weights.

``config.json`` stores ``{"kind": ..., **settings}`` under ``"model"``; `MODEL_KINDS`
maps the kind to its config class (with ``from_dict``/``to_dict`` and a class-level
``kind``) and to the constructor that turns that config into a ``torch.nn.Module`` called
as ``model(x_t, t, **cond)``. `prepare_run`, `Pipeline.from_run` and evaluation build
models only through `build_model` and `load_model`, so adding a model kind (the expert
ensemble, say) is one module plus one `register_model` call.

`load_model` reads a run folder's top-level weights, checked against ``weights.json``, and
falls back to the newest intact checkpoint when they are missing or damaged; or a checkpoint
folder ``RUN/checkpoints/step_N``, checked against its manifest (`find_weights`).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from difforge.errors import DifforgeError
from difforge.nn import UNet, UNetConfig
from difforge.nn.experts import ExpertRouter, ExpertsConfig
from difforge.runs.storage import (
    CHECKPOINT_DIR,
    check_checkpoint,
    checkpoint_dirs,
    load_tensors,
    resolve_run_path,
    verify_weights_file,
)

if TYPE_CHECKING:
    from difforge.runs.config import RunConfig

WEIGHT_FILES = {"ema": "ema.safetensors", "raw": "model.safetensors"}
"""Which file of a run holds which weights."""


@dataclass(frozen=True)
class ModelKind:
    """A registered model kind: its config class and its constructor."""

    config_class: Any
    build: Callable[[Any], torch.nn.Module]


MODEL_KINDS: dict[str, ModelKind] = {
    UNetConfig.kind: ModelKind(UNetConfig, UNet),
    ExpertsConfig.kind: ModelKind(ExpertsConfig, ExpertRouter),
}


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


@dataclass(frozen=True)
class WeightsChoice:
    """Which weight file `find_weights` chose.

    ``path``: the file to load. ``requested``: the file asked for (``RUN/ema.safetensors``,
    or the checkpoint's own file). ``note``: None when ``path`` is ``requested``; otherwise a
    one-line message saying what was wrong with ``requested`` and which file is used instead.
    ``state``: the tensors, already read from ``path`` (so the file is read once).
    """

    path: Path
    requested: Path
    note: str | None
    state: dict[str, torch.Tensor]


_STEP_FOLDER = re.compile(r"^step_\d+$")


def _weights_folder(path: str | Path) -> tuple[Path, Path]:
    """(run folder, folder of the weight files): ``RUN`` or ``RUN/checkpoints/step_N``."""
    given = Path(path)
    if not given.is_dir():
        problem = "is not a folder" if given.exists() else "does not exist"
        raise DifforgeError(
            f"run folder {str(path)!r} {problem}: name a run folder (RUN) or one of its checkpoints "
            f"(RUN/{CHECKPOINT_DIR}/step_N)"
        )
    if _STEP_FOLDER.match(given.name) and given.parent.name == CHECKPOINT_DIR:
        return given.parent.parent, given
    if given.parent.name == CHECKPOINT_DIR:
        resolve_run_path(given)  # a staging folder or another stray: its one-line error
    return given, given


def find_weights(path: str | Path, weights: str = "ema") -> WeightsChoice:
    """Read the ``ema`` or ``raw`` weights of a run folder or of one of its checkpoint folders.

    - ``RUN/checkpoints/step_N``: its own file, verified against its ``manifest.json``
      (a checkpoint without one, from an older difforge, only has to open cleanly); a
      missing or damaged file is a one-line DifforgeError (no other checkpoint is
      substituted for one asked for by name).
    - ``RUN``: ``RUN/ema.safetensors`` (or ``model.safetensors``), checked against
      ``weights.json`` / the newest checkpoint's manifest (`verify_weights_file`: a
      bit-flipped or truncated copy does not load). When it is missing or damaged, the
      newest checkpoint whose file verifies is used instead and ``note`` says so; when
      none does, a one-line DifforgeError names the file and what was wrong with each
      checkpoint.
    """
    if weights not in WEIGHT_FILES:
        raise DifforgeError(f"weights must be one of {', '.join(WEIGHT_FILES)}, got {weights!r}")
    name = WEIGHT_FILES[weights]
    run_dir, folder = _weights_folder(path)
    requested = folder / name
    if folder != run_dir:
        check_checkpoint(folder, (name,))
        return WeightsChoice(requested, requested, None, load_tensors(requested))
    try:
        verify_weights_file(run_dir, name)
        return WeightsChoice(requested, requested, None, load_tensors(requested))
    except DifforgeError as error:
        problem = str(error)
    tried = []
    for checkpoint in reversed(checkpoint_dirs(run_dir)):
        try:
            unverified = check_checkpoint(checkpoint, (name,))
            state = load_tensors(checkpoint / name)
        except DifforgeError as error:
            tried.append(f"{checkpoint.name}: {error}")
            continue
        how = " (unverified: it has no manifest)" if unverified else ""
        note = f"{problem}; using {checkpoint / name}{how} instead"
        return WeightsChoice(checkpoint / name, requested, note, state)
    others = (
        f"no checkpoint has an intact {name} either ({'; '.join(tried)})"
        if tried
        else "the run has no checkpoint to fall back to"
    )
    raise DifforgeError(f"{problem}, and {others}")


def _print_note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


def load_model(
    run_dir: str | Path,
    run_config: RunConfig,
    weights: str = "ema",
    *,
    report: Callable[[str], None] | None = None,
) -> torch.nn.Module:
    """The run's model with its ``ema`` or ``raw`` weights.

    ``run_dir`` is a run folder or one of its checkpoint folders (``RUN/checkpoints/step_N``);
    the file is chosen and checked by `find_weights`. When the run's top-level file is
    missing or damaged and a checkpoint's file is used instead, ``report`` is called with a
    one-line message saying so (default: printed to stderr as ``note: ...``). A file that
    cannot be used, or weights that do not fit the model of ``run_config``, are a one-line
    DifforgeError naming the file."""
    choice = find_weights(run_dir, weights)
    if choice.note is not None:
        (report or _print_note)(choice.note)
    model = build_model(run_config)
    try:
        model.load_state_dict(choice.state)
    except RuntimeError as error:
        first = str(error).splitlines()[0]
        raise DifforgeError(f"{choice.path} does not fit the model in config.json ({first})") from None
    return model
