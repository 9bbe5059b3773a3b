"""The seams of the architecture (docs/architecture.md): a new process, a new sampler and a
conditioning dict with two kinds run through the trainer and `Pipeline` without touching
their code."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from tiny_settings import TINY

from difforge.conditioning import CONDITION_KINDS, ClassLabel, ImageCondition, prepare_conditions
from difforge.errors import DifforgeError
from difforge.nn import UNet, UNetConfig
from difforge.pipeline import Pipeline
from difforge.process import PROCESS_KINDS, process_config_from_dict
from difforge.runs.config import DataInfo, RunConfig, TrainConfig
from difforge.runs.models import MODEL_KINDS, register_model
from difforge.sampling import SAMPLERS, SampleConfig, get_sampler, register_sampler, sample, sampler_names
from difforge.timestep_sampling import make_timestep_sampler
from difforge.training import Trainer, prepare_run

# ---- a toy process: x_t = (1 - t/T) x0 + (t/T) noise, the model predicts x0 ------------------


class ToyProcess:
    kind: ClassVar[str] = "toy"
    default_sampler: ClassVar[str] = "toy_walk"

    def __init__(self, num_timesteps: int) -> None:
        self.num_timesteps = num_timesteps

    def mix(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        w = (t.float() / self.num_timesteps).reshape(-1, 1, 1, 1)
        return (1 - w) * x0 + w * noise

    def training_losses(
        self,
        model: Any,
        x0: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor | None = None,
        model_kwargs: Mapping[str, Any] | None = None,
    ) -> dict[str, torch.Tensor]:
        noise = torch.randn_like(x0) if noise is None else noise
        x0_hat = model(self.mix(x0, t, noise), t, **dict(model_kwargs or {}))
        l1 = (x0_hat - x0).abs().mean(dim=(1, 2, 3))
        return {"loss": l1, "toy_l1": l1, "toy_t": t.float()}

    def timestep_sampler(self, name: str) -> Any:
        return make_timestep_sampler(name, self.num_timesteps)


@dataclass(frozen=True)
class ToyConfig:
    kind: ClassVar[str] = "toy"
    num_timesteps: int = 8

    def build(self) -> ToyProcess:
        return ToyProcess(self.num_timesteps)

    def model_settings(self) -> dict[str, Any]:
        return {}

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **asdict(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ToyConfig:
        return cls(**{k: v for k, v in data.items() if k != "kind"})


@torch.no_grad()
def toy_walk(
    model: Any, process: ToyProcess, noise: torch.Tensor, steps: int, **model_kwargs: Any
) -> torch.Tensor:
    """Restore from full noise, then re-mix towards the estimate at each lower t."""
    x = noise
    x0_hat = noise
    levels = np.linspace(process.num_timesteps, 0, steps + 1).round().astype(int)
    for t_now, t_next in zip(levels[:-1], levels[1:], strict=True):
        t = torch.full((x.shape[0],), int(t_now), dtype=torch.long)
        x0_hat = model(x, t, **model_kwargs).clamp(-1, 1)
        x = process.mix(x0_hat, torch.full_like(t, int(t_next)), noise)
    return x0_hat


def run_toy_walk(model: Any, process: Any, noise: torch.Tensor, config: SampleConfig, **runtime: Any) -> Any:
    return toy_walk(model, process, noise, config.steps, **dict(runtime.get("model_kwargs") or {}))


@pytest.fixture
def toy_registered(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The toy process and its sampler, registered for one test and removed after it."""
    monkeypatch.setitem(PROCESS_KINDS, ToyConfig.kind, ToyConfig)
    register_sampler("toy_walk", toy_walk, run_toy_walk, processes=("toy",), summary="the toy walk")
    yield
    del SAMPLERS["toy_walk"]


def test_a_new_process_trains_and_samples_without_touching_the_trainer(
    tmp_path: Path, toy_registered
) -> None:
    pytest.importorskip("sklearn", reason="the digits dataset comes with the [datasets] extra")
    model, process, dataset, run_config = prepare_run(
        TrainConfig(**{**TINY, "steps": 3, "sample_every": 3}), ToyConfig()
    )
    assert isinstance(process, ToyProcess)
    trainer = Trainer(
        model, process, dataset, run_config, tmp_path / "run", device=torch.device("cpu"), progress=False
    )
    trainer.train()
    run = tmp_path / "run"
    saved = json.loads((run / "config.json").read_text())
    assert saved["diffusion"] == {"kind": "toy", "num_timesteps": 8}
    assert saved["model"]["kind"] == "unet" and saved["conditioning"] == ["class_labels"]
    logged = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"loss", "toy_l1", "toy_t", "grad_norm", "lr"} <= set(logged)  # whatever the process returns
    assert (run / "samples" / "step_00000003.png").is_file()  # previews use the process's own sampler

    pipe = Pipeline.from_run(run, device="cpu")
    assert isinstance(pipe.process, ToyProcess)
    images = pipe(num_images=3, steps=4, classes=[1, 2, 3])
    assert images.shape == (3, 16, 16, 1) and images.dtype == np.uint8
    with pytest.raises(DifforgeError, match="does not apply to a 'toy' process"):
        pipe(num_images=1, sampler="ddim")
    assert "toy_walk" in sampler_names("toy") and "toy_walk" not in sampler_names("gaussian")


def test_sampler_registry_is_the_one_list(toy_registered) -> None:
    from difforge.cli import build_parser
    from difforge.evaluation.reports import parse_sampler_list

    assert get_sampler("toy_walk").evaluations(5) == 5
    assert parse_sampler_list("toy_walk:4,ddim:10") == [("toy_walk", 4), ("ddim", 10)]
    help_text = build_parser()._subparsers._group_actions[0].choices["sample"].format_help()  # type: ignore[union-attr]
    assert "toy_walk" in help_text
    with pytest.raises(DifforgeError, match="sampler must be one of ddpm, ddim, .*, cold_naive, toy_walk"):
        SampleConfig(sampler="plms").validate()


def test_unknown_kinds_in_a_run_config_are_one_line_errors() -> None:
    with pytest.raises(DifforgeError, match="unknown process kind 'lukewarm'"):
        process_config_from_dict({"kind": "lukewarm"})
    config = RunConfig(
        UNetConfig.preset("tiny", image_size=8, in_channels=1),
        process_config_from_dict({}),
        TrainConfig(),
        DataInfo(),
    )
    data = config.to_dict()
    data["model"]["kind"] = "transformer"
    with pytest.raises(DifforgeError, match="unknown model kind 'transformer'"):
        RunConfig.from_dict(data)
    data["model"]["kind"] = "unet"
    data["conditioning"] = ["class_labels", "pose"]
    with pytest.raises(DifforgeError, match="unknown condition kind 'pose'"):
        Pipeline(UNet(config.model), config.diffusion.build(), RunConfig.from_dict(data), torch.device("cpu"))


def test_old_config_files_without_kinds_still_load() -> None:
    config = RunConfig(
        UNetConfig.preset("tiny", image_size=8, in_channels=1, num_classes=3),
        process_config_from_dict({}),
        TrainConfig(),
        DataInfo(),
    )
    data = config.to_dict()
    del data["conditioning"], data["model"]["kind"], data["diffusion"]["kind"]
    loaded = RunConfig.from_dict(data)
    assert loaded.conditioning == ["class_labels"] and loaded.diffusion.kind == "gaussian"
    assert loaded.to_dict() == config.to_dict()


# ---- two condition kinds through the trainer and the pipeline -------------------------------


class Spy(torch.nn.Module):
    """A U-Net that records the keyword arguments of every call."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.unet = UNet(config)
        self.calls: list[dict[str, torch.Tensor]] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor, **cond: torch.Tensor) -> torch.Tensor:
        self.calls.append({k: v.detach().clone() for k, v in cond.items()})
        return self.unet(x, t, **cond)


class PairedDigits(torch.utils.data.Dataset):
    """16x16 grey images with a class label and an image condition (never all zero)."""

    def __len__(self) -> int:
        return 32

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        generator = torch.Generator().manual_seed(index)
        image = torch.rand((1, 16, 16), generator=generator) * 2 - 1
        cond = {"class_labels": torch.tensor(index % 3), "image_cond": image[:, ::2, ::2].abs() + 0.5}
        return image, cond


def _two_condition_run(p_uncond: float) -> RunConfig:
    model = UNetConfig.preset("tiny", image_size=16, in_channels=1, num_classes=3, image_cond_channels=1)
    train = TrainConfig(**{**TINY, "data": "paired", "p_uncond": p_uncond, "batch_size": 16})
    return RunConfig(
        model, process_config_from_dict({"num_timesteps": 30}), train, DataInfo(class_names=list("abc"))
    )


def test_two_conditions_reach_the_model_through_the_trainer_with_dropout(tmp_path: Path) -> None:
    run_config = _two_condition_run(p_uncond=0.5)
    assert run_config.conditioning == ["class_labels", "image_cond"]
    torch.manual_seed(0)
    spy = Spy(run_config.model)
    trainer = Trainer(
        spy, run_config.diffusion.build(), PairedDigits(), run_config, tmp_path, device=torch.device("cpu"),
        progress=False,
    )  # fmt: skip
    trainer.train(stop_after=4)
    labels = torch.cat([call["class_labels"] for call in spy.calls])
    images = torch.cat([call["image_cond"] for call in spy.calls])
    dropped_label = labels == 3  # the null label is num_classes
    dropped_image = (images == 0).flatten(1).all(dim=1)
    assert set(spy.calls[0]) == {"class_labels", "image_cond"}
    assert 0.25 < dropped_label.float().mean() < 0.75 and 0.25 < dropped_image.float().mean() < 0.75
    assert not torch.equal(dropped_label, dropped_image)  # each kind drops independently
    assert ((images > 0) | dropped_image.reshape(-1, 1, 1, 1)).all()  # kept rows are the data's


def test_two_conditions_reach_the_model_through_the_pipeline_and_guidance_nulls_both() -> None:
    run_config = _two_condition_run(p_uncond=0.1)
    spy = Spy(run_config.model)
    pipe = Pipeline(spy, run_config.diffusion.build(), run_config, torch.device("cpu"))
    cond_images = torch.rand((3, 1, 8, 8)) + 0.5
    pipe(num_images=3, classes=["b", "c", "a"], cond={"image_cond": cond_images}, steps=2, guidance=3.0)
    call = spy.calls[0]
    assert call["class_labels"].tolist() == [1, 2, 0, 3, 3, 3]  # conditional half, then the null
    assert torch.equal(call["image_cond"][:3], cond_images) and (call["image_cond"][3:] == 0).all()
    spy.calls.clear()
    pipe(num_images=2, classes="a", cond={"image_cond": cond_images[:2]}, steps=2, guidance=1.0)
    assert spy.calls[0]["class_labels"].tolist() == [0, 0]  # w = 1: one branch, no null
    with pytest.raises(DifforgeError, match="needs the image_cond condition"):
        pipe(num_images=2, steps=2)
    with pytest.raises(DifforgeError, match="takes no pose condition"):
        pipe(num_images=2, steps=2, cond={"image_cond": cond_images[:2], "pose": cond_images[:2]})


def test_prepare_conditions_maps_unknown_labels_and_nulls_per_kind() -> None:
    conditions = {"class_labels": ClassLabel(5), "image_cond": ImageCondition()}
    raw = {
        "class_labels": torch.tensor([0, -1, 4]),
        "image_cond": torch.ones(3, 1, 2, 2),
        "extra": torch.ones(3),
    }
    prepared = prepare_conditions(raw, conditions)
    assert prepared["class_labels"].tolist() == [0, 5, 4] and set(prepared) == set(conditions)
    everything_dropped = prepare_conditions(raw, conditions, p_uncond=0.999999, generator=torch.Generator())
    assert everything_dropped["class_labels"].tolist() == [5, 5, 5]
    assert (everything_dropped["image_cond"] == 0).all()
    with pytest.raises(DifforgeError, match="gives no 'image_cond'"):
        prepare_conditions({"class_labels": raw["class_labels"]}, conditions)
    assert set(CONDITION_KINDS) >= {"class_labels", "image_cond"}


def test_a_new_model_kind_is_one_registration(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from difforge.runs.models import build_model

    @dataclass(frozen=True)
    class LinearConfig:
        kind: ClassVar[str] = "linear"
        image_size: int = 8
        in_channels: int = 1

        def to_dict(self) -> dict[str, Any]:
            return asdict(self)

        @classmethod
        def from_dict(cls, data: Mapping[str, Any]) -> LinearConfig:
            return cls(**data)

    class PixelLinear(torch.nn.Module):
        def __init__(self, config: LinearConfig) -> None:
            super().__init__()
            self.scale = torch.nn.Parameter(torch.full((1,), 0.5))

        def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return x * self.scale

    monkeypatch.setitem(MODEL_KINDS, "linear", MODEL_KINDS["unet"])  # replaced just below
    register_model(LinearConfig, PixelLinear)
    run_config = RunConfig(
        LinearConfig(), process_config_from_dict({"num_timesteps": 30}), TrainConfig(), DataInfo()
    )
    model = build_model(run_config)
    assert isinstance(model, PixelLinear)
    assert RunConfig.from_dict(run_config.to_dict()).model == LinearConfig()
    out = sample(model, run_config.diffusion.build(), torch.randn(2, 1, 8, 8), sampler="ddim", steps=3)
    assert out.shape == (2, 1, 8, 8)
