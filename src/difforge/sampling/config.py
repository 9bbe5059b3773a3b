"""`SampleConfig`: every sampling setting and its one default.

The ``difforge sample`` flags are generated from its fields, and `Pipeline.__call__`, the
trainer's previews, ``difforge eval`` and `difforge.sampling.sample` take their defaults
from it, so a default lives here and nowhere else.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from difforge.errors import DifforgeError, check_number, dataclass_from_mapping
from difforge.flags import add_dataclass_flags, dataclass_values
from difforge.sampling.registry import SAMPLERS, SPACINGS, SamplerEntry, get_sampler, sampler_names

MAX_SEED = 2**32 - 1
"""The largest seed accepted (seeds are combined with counters into 64-bit generator seeds)."""

GUIDED_DEFAULT = 2.0
"""The guidance scale used when none is given, for a model trained with condition dropout.

Measured with the default sampler (``python bench/quality.py``, docs/benchmarks.md "Time to
quality": 1,000 class-balanced samples of the default MNIST run, DPM-Solver++(2M) SDE 20
steps, FID against MNIST-5k / digits recognised): 18.8 / 98.9% at w = 1.5, 19.9 / 99.7% at 2,
24.6 / 99.7% at 3, 29.6 / 99.8% at 4. 2 gives up 1.1 FID against 1.5 for a quarter of the
wrong digits (0.3% against 1.1%), so 2 it is. (With 0.1's deterministic sampler FID kept
improving up to 3: the stochastic sampler needs less guidance.)"""


SUPERRES_GUIDANCE_DEFAULT = 1.0
"""The guidance scale of a super-resolution stage when none is given, dropout or not:
``bench/cascade.py`` (docs/benchmarks.md "Cascaded super-resolution") measured the cascade's
FID at 26.9 with w = 1 against 31.4 with w = 2 for the augmented stage, and 31.3 against
33.0 for the one trained without augmentation."""

COND_NOISE_DEFAULT = 0.1
"""The noise-augmentation level s of a super-resolution stage's input when none is given
(`difforge.conditioning.NoiseAugmentation`); measured by ``bench/cascade.py``
(docs/benchmarks.md "Cascaded super-resolution")."""


@dataclass(frozen=True)
class SampleConfig:
    """How images are drawn from a trained model.

    Attributes:
        sampler: a registered sampler (`difforge.sampling.registry`); None = the process's
            ``default_sampler`` (dpmpp_2m_sde for Gaussian diffusion).
        steps: sampler steps K (NFE: K, or 2K - 1 for heun and edm); the default is cut to
            the process's T when T is shorter (a cold run of 10 levels takes 10).
        eta: the share of fresh noise per step, for ddim (0 = deterministic, 1 = DDPM's
            variance on the kept steps), euler_ancestral and dpmpp_2m_sde (0 = their ODE
            solver, 1 = the ancestral/SDE amount).
        s_churn, s_tmin, s_tmax: EDM's stochastic churn (sampler edm): the noise is raised
            by gamma = min(s_churn / K, sqrt(2) - 1) at the levels in [s_tmin, s_tmax].
        s_noise: scale of the fresh noise (EDM's S_noise; edm, euler_ancestral,
            dpmpp_2m_sde).
            For these five sampler options None = the sampler's own default
            (`SamplerEntry.options`); setting one the sampler does not take is an error.
        guidance: classifier-free guidance scale w (1 = off, 0 = unconditional); None =
            `GUIDED_DEFAULT` for a model trained with condition dropout, 1 otherwise (and
            `SUPERRES_GUIDANCE_DEFAULT` for a super-resolution stage).
        cond_noise: the noise-augmentation level s in [0, 1] at which the image condition of
            a model trained with noise-conditioning augmentation (a super-resolution stage)
            is noised and embedded; None = `COND_NOISE_DEFAULT`. Other models refuse it.
        spacing: noise levels of the ODE samplers: uniform (in t), logsnr or karras.
        clip: clamp each predicted x0 to [-1, 1].
        dynamic_threshold: Imagen's dynamic thresholding percentile in (0, 1] (replaces the
            clamp); None = off.
        seed: seeds the starting noise and every stochastic step.
        batch_size: images per forward pass.
    """

    sampler: str | None = None
    steps: int = 20
    eta: float | None = None
    s_churn: float | None = None
    s_tmin: float | None = None
    s_tmax: float | None = None
    s_noise: float | None = None
    guidance: float | None = None
    cond_noise: float | None = None
    spacing: str = "karras"
    clip: bool = True
    dynamic_threshold: float | None = None
    seed: int = 0
    batch_size: int = 64

    def validate(self, process_kind: str | None = None) -> SampleConfig:
        """Raise a one-line DifforgeError for a bad setting; returns self."""
        if self.sampler is not None:
            get_sampler(self.sampler, process_kind)
        check_number("--steps", self.steps, low=1, integer=True)
        for name in SAMPLER_OPTIONS:
            if getattr(self, name) is not None:
                check_number(_flag(name), getattr(self, name), low=0)
        if self.s_tmin is not None and self.s_tmax is not None and self.s_tmax < self.s_tmin:
            raise DifforgeError(f"--s-tmax must be >= --s-tmin, got {self.s_tmax} < {self.s_tmin}")
        if self.sampler is not None:
            self.sampler_options(SAMPLERS[self.sampler])
        if self.guidance is not None:
            check_number("--guidance", self.guidance, low=0)
        if self.cond_noise is not None:
            check_number("--cond-noise", self.cond_noise, low=0, high=1)
        check_number("--seed", self.seed, low=0, high=MAX_SEED, integer=True)
        if self.spacing not in SPACINGS:
            raise DifforgeError(f"--spacing must be one of {', '.join(SPACINGS)}; got {self.spacing!r}")
        if self.dynamic_threshold is not None and not (
            isinstance(self.dynamic_threshold, (int, float)) and 0.0 < self.dynamic_threshold <= 1.0
        ):
            raise DifforgeError(
                f"--dynamic-threshold must be a percentile in (0, 1], got {self.dynamic_threshold!r}"
            )
        check_number("--batch-size", self.batch_size, low=1, high=65536, integer=True)
        return self

    def sampler_for(self, default_sampler: str) -> str:
        """The sampler to run: this config's, or the process's default."""
        return self.sampler if self.sampler is not None else default_sampler

    def sampler_options(self, entry: SamplerEntry) -> dict[str, float]:
        """The options ``entry``'s sampler takes, each this config's value or else the
        sampler's default; a one-line DifforgeError for an option set that it does not take."""
        given = {name: getattr(self, name) for name in SAMPLER_OPTIONS if getattr(self, name) is not None}
        foreign = [name for name in given if name not in entry.options]
        if foreign:
            takes = ", ".join(_flag(name) for name in entry.options) or "none"
            raise DifforgeError(
                f"{', '.join(_flag(name) for name in foreign)} does not apply to sampler "
                f"{entry.name!r} (its options: {takes})"
            )
        return {**entry.options, **given}

    def guidance_for(self, guidable: bool) -> float:
        """The scale to use: this config's, or `GUIDED_DEFAULT` when the model has a null
        condition to guide against (``guidable``), else 1."""
        if self.guidance is not None:
            return self.guidance
        return GUIDED_DEFAULT if guidable else 1.0

    def cond_noise_for(self, augmented: bool) -> float | None:
        """The condition's noise level: this config's or `COND_NOISE_DEFAULT` for a model
        trained with noise-conditioning augmentation (``augmented``); None for another
        model, which a given ``cond_noise`` does not apply to (a one-line error)."""
        if not augmented:
            if self.cond_noise is not None:
                raise DifforgeError(
                    "--cond-noise applies only to a model trained with noise-conditioning "
                    "augmentation (a super-resolution stage)"
                )
            return None
        return COND_NOISE_DEFAULT if self.cond_noise is None else float(self.cond_noise)

    def for_superres(self, superres: bool) -> SampleConfig:
        """This config, with guidance `SUPERRES_GUIDANCE_DEFAULT` when none is given and the
        model is a super-resolution stage (``superres``)."""
        if superres and self.guidance is None:
            return replace(self, guidance=SUPERRES_GUIDANCE_DEFAULT)
        return self

    def updated(self, **changes: Any) -> SampleConfig:
        """A copy with the given fields changed; ``None`` values are left as they are."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise DifforgeError(
                f"unknown sampling setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def changes(self) -> dict[str, Any]:
        """The fields that differ from the defaults (what a user chose)."""
        default = SampleConfig()
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if getattr(self, f.name) != getattr(default, f.name)
        }

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SampleConfig:
        return dataclass_from_mapping(cls, data, "sampling setting(s)")


SAMPLER_OPTIONS: tuple[str, ...] = ("eta", "s_churn", "s_tmin", "s_tmax", "s_noise")
"""The settings that belong to particular samplers (their defaults: `SamplerEntry.options`)."""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _option_defaults(name: str) -> str:
    """ "ddim 0, dpmpp_2m_sde 1": the samplers that take option ``name`` and their defaults."""
    return ", ".join(
        f"{entry.name} {entry.options[name]:g}" for entry in SAMPLERS.values() if name in entry.options
    )


FLAG_HELP = {
    "sampler": "sampler: {choices} (default: the process's own, dpmpp_2m_sde for Gaussian diffusion)",
    "steps": "sampler steps",
    "eta": "share of fresh noise per step, 0 = deterministic (default: {eta})",
    "s_churn": "EDM churn of sampler edm: noise raised by min(S/steps, 0.414) per step (default: {s_churn})",
    "s_tmin": "edm churns only at noise levels >= this (default: {s_tmin})",
    "s_tmax": "edm churns only at noise levels <= this (default: {s_tmax})",
    "s_noise": "scale of the fresh noise (default: {s_noise})",
    "guidance": "classifier-free guidance scale w; 1 = off (default: {guided} for a model trained "
    "with label dropout, else 1; 1 for a super-resolution stage)",
    "cond_noise": "noise level s in [0, 1] of a super-resolution stage's input, as in its training "
    "augmentation (default: {cond_noise})",
    "spacing": "noise levels of the ODE samplers: uniform, logsnr or karras",
    "clip": "clamp each predicted x0 to [-1, 1]",
    "dynamic_threshold": "Imagen's dynamic thresholding at this percentile, e.g. 0.995 (default: off)",
    "seed": "random seed",
    "batch_size": "images per forward pass",
}
"""Help of the flag of every `SampleConfig` field."""

_DEST = "sampling."


def add_sample_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup, only: Sequence[str] | None = None
) -> None:
    """``--sampler``, ``--steps``, ... (or the fields in ``only``) with `SampleConfig`'s defaults."""
    helps = {k: v for k, v in FLAG_HELP.items() if only is None or k in only}
    if "sampler" in helps:
        helps["sampler"] = helps["sampler"].format(choices=", ".join(sampler_names()))
    if "guidance" in helps:
        helps["guidance"] = helps["guidance"].format(guided=f"{GUIDED_DEFAULT:g}")
    if "cond_noise" in helps:
        helps["cond_noise"] = helps["cond_noise"].format(cond_noise=f"{COND_NOISE_DEFAULT:g}")
    for name in SAMPLER_OPTIONS:
        if name in helps:
            helps[name] = helps[name].format(**{name: _option_defaults(name)})
    add_dataclass_flags(parser, SampleConfig, helps, _DEST)


def parse_stage(spec: str, base: SampleConfig) -> tuple[str, SampleConfig]:
    """A cascade stage ``RUN[:NAME=VALUE,...]`` -> (RUN, its sampling settings): the defaults
    with ``base``'s seed and batch size, then the settings given (`parse_settings`). A RUN
    folder whose name holds a colon is taken whole."""
    from pathlib import Path

    run, text = spec, ""
    if ":" in spec and not Path(spec).is_dir():
        run, _, text = spec.rpartition(":")
    start = SampleConfig(seed=base.seed, batch_size=base.batch_size)
    return run, parse_settings(text, f"--upsample {spec}", start)


def parse_settings(text: str, where: str, start: SampleConfig | None = None) -> SampleConfig:
    """``"steps=50,sampler=ddim,guidance=1"`` -> ``start`` (default `SampleConfig()`) with
    those fields set (``clip=false`` for booleans); an unknown name or a bad value is a
    one-line DifforgeError naming ``where``."""
    types = {f.name: f.type for f in fields(SampleConfig)}
    values: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, equals, raw = item.partition("=")
        name = name.strip().replace("-", "_")
        if not equals or name not in types:
            known = ", ".join(types)
            raise DifforgeError(f"{where}: {item!r} is not NAME=VALUE with NAME one of {known}")
        kind = str(types[name])
        raw = raw.strip()
        try:
            if "bool" in kind:
                if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(raw)
                values[name] = raw.lower() in ("true", "1", "yes")
            elif "int" in kind:
                values[name] = int(raw)
            elif "float" in kind:
                values[name] = float(raw)
            else:
                values[name] = raw
        except ValueError:
            raise DifforgeError(f"{where}: {name}={raw!r} is not a valid value") from None
    return replace(start or SampleConfig(), **values).validate()


def sample_config_from_args(args: argparse.Namespace) -> SampleConfig:
    """The validated `SampleConfig` of the flags `add_sample_flags` added."""
    return SampleConfig(**dataclass_values(args, _DEST)).validate()
