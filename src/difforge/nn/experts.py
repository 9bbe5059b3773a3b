"""Timestep-expert ensembles (eDiff-I, Balaji et al. 2022, arXiv 2211.01324, section 4.1).

The denoising chain t = 0..T-1 is cut at ``bounds`` ``[0, b_1, ..., b_{K-1}, T]`` into K
ranges; expert k is a network of its own that denoises every t in ``[b_k, b_{k+1})``. An
`ExpertRouter` is called like any denoiser, ``router(x, t, **cond)``, and sends each example
to the expert whose range holds its t:

- integer t (ddpm, ddim, the training loss): expert k for b_k <= t <= b_{k+1} - 1;
- fractional t (the ODE samplers' continuous timesteps): the same half-open intervals on the
  real line, so a t in (b_k - 1, b_k) still belongs to expert k - 1 and t = b_k exactly to
  expert k: each expert sees only noise levels between those of its integer range and the
  next one's first.

A batch whose examples fall in several ranges (a training batch, or a sampler with per-example
t) is split into one call per expert; a batch in one range makes exactly one call.

`ExpertsConfig` is the model kind ``experts`` of a run's config.json: the bounds, every
expert's own config (`UNetConfig`), and the run it was branched from. Training an ensemble
trains the experts one after another (`ExpertsConfig.phase`): during expert k's share of the
steps the training timesteps are drawn only from its range, so only expert k gets gradients.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from difforge.errors import DifforgeError
from difforge.nn.config import UNetConfig
from difforge.nn.unet import UNet

MAX_EXPERTS = 64


def check_bounds(bounds: Sequence[int], num_timesteps: int, flag: str = "--expert-bounds") -> tuple[int, ...]:
    """Validated bounds: whole numbers from 0 to T, strictly increasing (no empty range)."""
    values = tuple(bounds)
    if len(values) < 3:
        raise DifforgeError(
            f"{flag}: give at least 0, one cut and T ({num_timesteps}), e.g. 0,500,{num_timesteps}"
        )
    if any(isinstance(b, bool) or not isinstance(b, (int, np.integer)) for b in values):
        raise DifforgeError(f"{flag}: bounds must be whole numbers, got {list(values)}")
    if values[0] != 0 or values[-1] != num_timesteps:
        raise DifforgeError(
            f"{flag}: the bounds must run from 0 to T = {num_timesteps} (the run's timesteps), got "
            f"{values[0]}..{values[-1]}"
        )
    if any(high <= low for low, high in zip(values, values[1:], strict=False)):
        raise DifforgeError(f"{flag}: the bounds must increase strictly (no empty range), got {list(values)}")
    if len(values) - 1 > MAX_EXPERTS:
        raise DifforgeError(f"{flag}: at most {MAX_EXPERTS} experts, got {len(values) - 1}")
    return tuple(int(b) for b in values)


def parse_bounds(text: str, num_timesteps: int) -> tuple[int, ...]:
    """``"0,300,700,1000"`` -> validated bounds; a malformed list is a one-line DifforgeError."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise DifforgeError(
            f"--expert-bounds: {text!r} is not a comma-separated list of whole numbers"
        ) from None
    return check_bounds(values, num_timesteps)


def equal_mass_bounds(probabilities: Tensor | np.ndarray, experts: int) -> tuple[int, ...]:
    """K ranges of (as nearly as whole timesteps allow) equal probability mass under p(t),
    (T,): cut k is the first t whose cumulative mass before it reaches k / K, kept strictly
    increasing so that no range is empty. Uniform p gives ranges of equal length."""
    p = np.asarray(probabilities, dtype=np.float64)
    total = len(p)
    if not 2 <= experts <= min(MAX_EXPERTS, total):
        raise DifforgeError(f"--experts must be in 2..{min(MAX_EXPERTS, total)}, got {experts}")
    before = np.concatenate([[0.0], np.cumsum(p / p.sum())])  # mass of t < i, i = 0..T
    cuts = [0]
    for k in range(1, experts):
        cut = int(np.searchsorted(before, k / experts - 1e-12, side="left"))
        cuts.append(min(max(cut, cuts[-1] + 1), total - (experts - k)))
    return check_bounds([*cuts, total], total)


@dataclass
class ExpertsConfig:
    """The ``experts`` model kind: ``bounds`` [0, b_1, ..., T] and one `UNetConfig` per range.

    ``parent``: the run the experts were branched from and the SHA-256 of its EMA weights
    (provenance; empty for an ensemble built in Python). The shared facts of the experts
    (image size, channels, conditioning) must agree, and are read through this config like
    a U-Net's."""

    bounds: tuple[int, ...]
    experts: list[UNetConfig]
    parent: dict[str, str] = field(default_factory=dict)
    kind: ClassVar[str] = "experts"
    SHARED: ClassVar[tuple[str, ...]] = (
        "image_size", "in_channels", "out_channels", "learn_sigma", "num_classes", "multi_label",
        "image_cond_channels", "cond_noise_embed",
    )  # fmt: skip

    def __post_init__(self) -> None:
        self.bounds = check_bounds(self.bounds, self.bounds[-1] if self.bounds else 0, "expert bounds")
        if len(self.experts) != len(self.bounds) - 1:
            raise DifforgeError(
                f"{len(self.bounds) - 1} expert ranges but {len(self.experts)} expert configs"
            )
        first = self.experts[0]
        for number, expert in enumerate(self.experts[1:], start=1):
            for name in self.SHARED:
                if getattr(expert, name) != getattr(first, name):
                    raise DifforgeError(
                        f"expert {number} has {name} {getattr(expert, name)!r} but expert 0 has "
                        f"{getattr(first, name)!r}: they may differ in size, not in what they take or make"
                    )

    def __getattr__(self, name: str) -> Any:
        if name in ExpertsConfig.SHARED:
            return getattr(self.experts[0], name)
        raise AttributeError(name)

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def expert_range(self, index: int) -> tuple[int, int]:
        """[low, high) of expert ``index``'s timesteps."""
        return self.bounds[index], self.bounds[index + 1]

    def phase(self, step: int, total_steps: int) -> tuple[int, int, int]:
        """Which expert trains at 0-based optimizer step ``step`` of ``total_steps``, and its
        share: (expert, first step, number of steps). The steps are split as evenly as whole
        numbers allow, earlier experts taking the remainder."""
        share, extra = divmod(total_steps, self.num_experts)
        start = 0
        for index in range(self.num_experts):
            length = share + (1 if index < extra else 0)
            if step < start + length or index == self.num_experts - 1:
                return index, start, length
            start += length
        raise AssertionError("unreachable")

    def to_dict(self) -> dict[str, Any]:
        return {
            "bounds": list(self.bounds),
            "experts": [expert.to_dict() for expert in self.experts],
            "parent": dict(self.parent),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExpertsConfig:
        if not isinstance(data, dict) or set(data) - {"bounds", "experts", "parent"} or "experts" not in data:
            raise DifforgeError("an experts model needs 'bounds', 'experts' (and optionally 'parent')")
        experts = data["experts"]
        if not isinstance(experts, list) or not experts:
            raise DifforgeError("'experts' must be a non-empty list of U-Net configs")
        bounds = data.get("bounds")
        if not isinstance(bounds, list):
            raise DifforgeError("'bounds' must be a list of whole numbers")
        parent = data.get("parent", {})
        if not isinstance(parent, dict) or not all(isinstance(v, str) for v in parent.values()):
            raise DifforgeError("'parent' must map names to strings")
        return cls(tuple(bounds), [UNetConfig.from_dict(dict(e)) for e in experts], dict(parent))

    def replaced(self, **changes: Any) -> ExpertsConfig:
        return dataclasses.replace(self, **changes)


class ExpertRouter(nn.Module):
    """K denoisers, each for its range of t (`ExpertsConfig`); called as one denoiser."""

    def __init__(self, config: ExpertsConfig, experts: Sequence[nn.Module] | None = None) -> None:
        super().__init__()
        self.config = config
        built = list(experts) if experts is not None else [UNet(c) for c in config.experts]
        if len(built) != config.num_experts:
            raise DifforgeError(f"{len(built)} networks for {config.num_experts} expert ranges")
        self.experts = nn.ModuleList(built)
        self.register_buffer(
            "inner_bounds", torch.tensor(config.bounds[1:-1], dtype=torch.float64), persistent=False
        )

    def expert_index(self, t: Tensor) -> Tensor:
        """(B,) int64: the expert of each t, integer or fractional (see the module docstring)."""
        bounds = self.inner_bounds.to(t.device)
        return torch.searchsorted(bounds, t.to(torch.float64).contiguous(), right=True)

    def forward(self, x: Tensor, t: Tensor, **kwargs: Any) -> Tensor:
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        index = self.expert_index(t)
        first = int(index[0])
        if bool((index == first).all()):  # the usual case when sampling: one call
            return self.experts[first](x, t, **kwargs)
        output: Tensor | None = None
        for expert in torch.unique(index).tolist():
            rows = (index == expert).nonzero().squeeze(1)
            part = {k: v[rows] if isinstance(v, Tensor) and v.ndim > 0 and v.shape[0] == x.shape[0] else v
                    for k, v in kwargs.items()}  # fmt: skip
            result = self.experts[expert](x[rows], t[rows], **part)
            if output is None:
                output = result.new_empty((x.shape[0], *result.shape[1:]))
            output[rows] = result
        assert output is not None
        return output


def branch(
    parent_config: UNetConfig, parent_state: dict[str, Tensor], bounds: Sequence[int], parent: dict[str, str]
) -> ExpertRouter:
    """An ensemble of copies of one trained network: every expert starts from ``parent_state``."""
    config = ExpertsConfig(tuple(bounds), [parent_config] * (len(bounds) - 1), dict(parent))
    router = ExpertRouter(config)
    for expert in router.experts:
        expert.load_state_dict(parent_state)
    return router
