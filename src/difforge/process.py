"""The process interface: what the trainer, the samplers, `Pipeline` and evaluation need of
a forward/reverse process, and the registry that builds one from a run's config.

A process is anything with the members of `Process`; `difforge.diffusion.GaussianDiffusion`
is the built-in one (kind ``gaussian``). Its settings are a `ProcessConfig`: a dataclass
with a class-level ``kind``, ``build()``, ``model_settings()`` and ``to_dict``/``from_dict``.
A run's ``config.json`` stores ``{"kind": ..., **settings}`` under ``"diffusion"``, and
`process_config_from_dict` picks the config class by that kind (a file without a kind is
Gaussian, as every run of difforge 0.1 was).

Adding a process is one module (the process and its config) plus one registration
(`register_process`, or a line in `PROCESS_KINDS` for a built-in); the samplers it can use
name its kind in `difforge.sampling.registry`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch

from difforge.cold import ColdConfig
from difforge.diffusion import DiffusionConfig
from difforge.errors import DifforgeError
from difforge.timestep_sampling import UniformTimestepSampler


@runtime_checkable
class Process(Protocol):
    """A diffusion-like process of ``num_timesteps`` discrete steps.

    - ``kind``: its registry name (``gaussian``, ...), written in config.json;
    - ``default_sampler``: the sampler used when none is named (see `difforge.sampling`);
    - ``training_losses(model, x0, t, noise, model_kwargs)``: per-example (B,) tensors with
      at least ``"loss"`` (what the trainer minimises, before the timestep weights); every
      other entry is a scalar term the trainer logs as it is;
    - ``timestep_sampler(name)``: the sampler of training timesteps (uniform, importance).

    Optional: ``prior_sample(shape, generator)``, the x_T that generation starts from (see
    `draw_prior`; without it, unit Gaussian noise).

    ``x0`` and ``noise`` are (B, C, H, W) in [-1, 1] and unit variance; ``t`` is (B,) int64
    in 0..num_timesteps-1.
    """

    kind: ClassVar[str]
    default_sampler: ClassVar[str]
    num_timesteps: int

    def training_losses(
        self,
        model: Callable[..., torch.Tensor],
        x0: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor | None = None,
        model_kwargs: Mapping[str, Any] | None = None,
    ) -> dict[str, torch.Tensor]: ...

    def timestep_sampler(self, name: str) -> UniformTimestepSampler: ...


class ProcessConfig(Protocol):
    """The JSON-serialisable settings of one process kind."""

    kind: ClassVar[str]

    def build(self) -> Process: ...

    def model_settings(self) -> dict[str, Any]:
        """UNetConfig fields this process needs (e.g. ``learn_sigma``)."""
        ...

    def to_dict(self) -> dict[str, Any]: ...

    # Optional: ``fit_to_data(images, count) -> ProcessConfig``, settings learned from the
    # training images before training starts (the cold prior); ``images(i)`` is image i.
    # Optional: ``flag_help`` (field -> ``difforge train`` help text of the fields with a flag).


PROCESS_KINDS: dict[str, Any] = {DiffusionConfig.kind: DiffusionConfig, ColdConfig.kind: ColdConfig}
"""kind -> its config class (with ``from_dict``); the one registry of processes."""


def register_process(config_class: Any) -> Any:
    """Register a process config class under its ``kind`` (usable as a class decorator)."""
    kind = getattr(config_class, "kind", None)
    if not isinstance(kind, str) or not kind:
        raise DifforgeError(f"{config_class!r} has no string 'kind' to register it under")
    PROCESS_KINDS[kind] = config_class
    return config_class


def process_config_from_dict(data: Mapping[str, Any], source: str = "diffusion settings") -> Any:
    """The config of a run's ``"diffusion"`` section, by its ``kind`` (default gaussian)."""
    if not isinstance(data, Mapping):
        raise DifforgeError(f"{source} must be a JSON object, got {type(data).__name__}")
    kind = data.get("kind", DiffusionConfig.kind)
    config_class = PROCESS_KINDS.get(kind)
    if config_class is None:
        raise DifforgeError(
            f"{source}: unknown process kind {kind!r}; known: {', '.join(sorted(PROCESS_KINDS))}"
        )
    return config_class.from_dict(data)


def draw_prior(
    process: Any,
    shape: tuple[int, ...],
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """The (B, C, H, W) x_T generation starts from, on ``device``: the process's
    ``prior_sample`` when it has one, else z ~ N(0, I) drawn on the generator's device."""
    prior_sample = getattr(process, "prior_sample", None)
    if prior_sample is not None:
        return prior_sample(shape, generator=generator).to(device)
    gen_device = generator.device if generator is not None else torch.device(device)
    return torch.randn(shape, generator=generator, device=gen_device).to(device)
