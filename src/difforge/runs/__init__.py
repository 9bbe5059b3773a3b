"""Runs: what a run folder holds and how it is read, shared by training, `Pipeline` and
evaluation (none of which needs the others to open a run).

- `difforge.runs.config`: `RunConfig` (config.json), `TrainConfig`, `DataInfo`;
- `difforge.runs.models`: the model-kind registry, `build_model`, `load_model`;
- `difforge.runs.storage`: crash-safe safetensors files and checkpoint folders;
- `difforge.runs.device`: `resolve_device`.
"""

from difforge.runs.config import CONFIG_FILE, DataInfo, RunConfig, TrainConfig
from difforge.runs.device import resolve_device
from difforge.runs.models import MODEL_KINDS, build_model, load_model, register_model

__all__ = [
    "CONFIG_FILE",
    "MODEL_KINDS",
    "DataInfo",
    "RunConfig",
    "TrainConfig",
    "build_model",
    "load_model",
    "register_model",
    "resolve_device",
]
