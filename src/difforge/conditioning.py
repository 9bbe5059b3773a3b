"""Conditioning as a dict of tensors, from the dataset to the model.

A dataset item is ``(image, cond)`` with ``cond`` a dict keyed by condition kind; the
trainer moves it to the device, `prepare_conditions` turns raw values into what the model
takes and applies classifier-free dropout per kind, and the model receives the dict as
keyword arguments (``model(x_t, t, **cond)``). `Pipeline` and `difforge.sampling.generate`
take the same keys, and classifier-free guidance replaces every condition by its null in
the unconditional branch.

The kinds (``CONDITION_KINDS``), each a `Condition` with a ``key`` (the dict key and the
model's keyword), ``prepare`` and ``null_like``:

==============  =================================  ======================================
kind / key      value per batch                    null
==============  =================================  ======================================
class_labels    (B,) int64 in 0..K-1, -1 unknown   K (the model's extra "no class" row)
image_cond      (B, C', h, w) float in [-1, 1]     zeros (mid-grey)
==============  =================================  ======================================

Adding a condition is one `Condition` class plus one line in `CONDITION_KINDS`; the model
must accept its key as a keyword.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch

from difforge.errors import DifforgeError


class Condition(Protocol):
    """One kind of condition: ``key`` names it in the cond dict and as the model keyword."""

    key: ClassVar[str]

    def prepare(self, value: torch.Tensor) -> torch.Tensor:
        """A dataset's raw batch (B, ...) -> what the model takes (B, ...)."""
        ...

    def null_like(self, value: torch.Tensor) -> torch.Tensor:
        """The null condition for a prepared batch, of value's shape, dtype and device."""
        ...


@dataclass(frozen=True)
class ClassLabel:
    """A single class label per image; ``num_classes`` (K) is also the null label."""

    num_classes: int
    key: ClassVar[str] = "class_labels"

    def prepare(self, value: torch.Tensor) -> torch.Tensor:
        labels = value.long()
        return torch.where(labels < 0, self.null_like(labels), labels)

    def null_like(self, value: torch.Tensor) -> torch.Tensor:
        return torch.full_like(value, self.num_classes)


@dataclass(frozen=True)
class ImageCondition:
    """An image concatenated to the model input as channels (the model resizes it)."""

    key: ClassVar[str] = "image_cond"

    def prepare(self, value: torch.Tensor) -> torch.Tensor:
        return value.float() if not value.is_floating_point() else value

    def null_like(self, value: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(value)


@dataclass(frozen=True)
class ConditionContext:
    """What a condition kind may need to know about the run it belongs to."""

    num_classes: int = 0


CONDITION_KINDS: dict[str, Callable[[ConditionContext], Condition]] = {
    ClassLabel.key: lambda context: ClassLabel(context.num_classes),
    ImageCondition.key: lambda context: ImageCondition(),
}
"""kind -> factory of its `Condition` for one run; the one registry of condition kinds."""


def build_conditions(kinds: Sequence[str], context: ConditionContext) -> dict[str, Condition]:
    """The run's conditions, keyed by kind, in the order given."""
    conditions: dict[str, Condition] = {}
    for kind in kinds:
        factory = CONDITION_KINDS.get(kind)
        if factory is None:
            raise DifforgeError(
                f"unknown condition kind {kind!r}; known: {', '.join(sorted(CONDITION_KINDS))}"
            )
        conditions[kind] = factory(context)
    return conditions


def prepare_conditions(
    cond: Mapping[str, torch.Tensor],
    conditions: Mapping[str, Condition],
    *,
    p_uncond: float = 0.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """A batch's cond dict as the model takes it, with classifier-free dropout.

    Keys not in ``conditions`` are dropped (a dataset may carry labels an unconditional run
    does not use); a key in ``conditions`` missing from ``cond`` is an error. With
    ``p_uncond`` > 0 each kind is replaced by its null independently, per example, with
    probability ``p_uncond`` (one ``torch.rand((B,), generator)`` draw per kind, in the
    order of ``conditions``).
    """
    prepared: dict[str, torch.Tensor] = {}
    for key, condition in conditions.items():
        if key not in cond:
            raise DifforgeError(f"the data gives no {key!r} condition, which this model needs")
        value = cond[key]
        if device is not None:
            value = value.to(device, non_blocking=True)
        value = condition.prepare(value)
        if p_uncond > 0:
            drop = torch.rand((value.shape[0],), generator=generator, device=value.device) < p_uncond
            drop = drop.reshape(-1, *([1] * (value.ndim - 1)))
            value = torch.where(drop, condition.null_like(value), value)
        prepared[key] = value
    return prepared


def null_conditions(conditions: Mapping[str, Condition]) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """key -> null maker, the form `difforge.sampling.classifier_free_guidance` takes."""
    return {key: condition.null_like for key, condition in conditions.items()}
