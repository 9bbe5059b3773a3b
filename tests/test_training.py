"""The trainer: it trains, checkpoints crash-safely and resumes bit-exactly on CPU."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_settings import TINY

import difforge.runs.storage as checkpoint_module
from difforge.diffusion import DiffusionConfig
from difforge.errors import DifforgeError
from difforge.pipeline import Pipeline
from difforge.runs.storage import checkpoint_dirs, load_tensors
from difforge.training import RunConfig, TrainConfig, Trainer, prepare_run

pytest.importorskip("sklearn", reason="the digits dataset comes with the [datasets] extra")

SHORT_PROCESS = DiffusionConfig(num_timesteps=50)


def _trainer(run_dir: Path, **overrides: object) -> Trainer:
    config = TrainConfig(**{**TINY, **overrides})  # type: ignore[arg-type]
    model, diffusion, dataset, run_config = prepare_run(config, SHORT_PROCESS)
    return Trainer(model, diffusion, dataset, run_config, run_dir, device=torch.device("cpu"), progress=False)


def _weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def test_train_writes_a_complete_run(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path / "run", steps=4, checkpoint_every=2, sample_every=4)
    trainer.train()
    run = tmp_path / "run"
    config = json.loads((run / "config.json").read_text())
    assert config["data"]["class_names"] == [str(i) for i in range(10)]
    assert config["data"]["fingerprint"] and config["difforge_version"]
    assert [p.name for p in checkpoint_dirs(run)] == ["step_00000002", "step_00000004"]
    assert (run / "samples" / "step_00000004.png").is_file()
    assert (run / "samples" / "strip_00000004.png").is_file()
    lines = (run / "metrics.jsonl").read_text().strip().splitlines()
    assert len(lines) == 4 and {"loss", "lr", "grad_norm", "images_per_s"} <= set(json.loads(lines[-1]))
    RunConfig.load(run)  # round-trips
    images = Pipeline.from_run(run, device="cpu")(num_images=3, steps=2, classes=["1", 2])
    assert images.shape == (3, 16, 16, 1) and images.dtype == np.uint8


@pytest.mark.parametrize(
    "overrides", [{}, {"hflip": True, "grad_accum": 2, "timestep_sampler": "importance"}]
)
def test_resume_equals_uninterrupted(tmp_path: Path, overrides: dict[str, object]) -> None:
    straight = _trainer(tmp_path / "a", steps=6, **overrides)
    straight.train()

    first = _trainer(tmp_path / "b", steps=6, **overrides)
    first.train(stop_after=3)
    assert first.step == 3
    torch.manual_seed(12345)  # disturb the global RNG: resume must restore it
    second = _trainer(tmp_path / "b", steps=6, **overrides)
    assert second.resume() == 3
    second.train()
    assert second.step == 6
    for name, tensor in _weights(straight).items():
        assert torch.equal(tensor, second.model.state_dict()[name]), name
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            straight.ema.model.state_dict().values(), second.ema.model.state_dict().values(), strict=True
        )
    )


def test_kill_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path: Path, monkeypatch) -> None:
    run = tmp_path / "run"
    trainer = _trainer(run, steps=4)
    trainer.train(stop_after=2)
    saved = load_tensors(checkpoint_dirs(run)[-1] / "model.safetensors")

    real_save = checkpoint_module.save_file
    calls = {"n": 0}

    def dying_save(tensors, path, metadata=None):  # noqa: ANN001 - mirrors safetensors' signature
        calls["n"] += 1
        if calls["n"] == 2:  # half-way through the next checkpoint
            Path(path).write_bytes(b"partial")
            raise KeyboardInterrupt
        return real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(checkpoint_module, "save_file", dying_save)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(stop_after=2)
    monkeypatch.setattr(checkpoint_module, "save_file", real_save)

    assert [p.name for p in checkpoint_dirs(run)] == ["step_00000002"]
    for name, tensor in load_tensors(run / "model.safetensors").items():
        assert torch.equal(tensor, saved[name])
    resumed = _trainer(run, steps=4)
    assert resumed.resume() == 2
    Pipeline.from_run(run, device="cpu")


def _write_bad_and_good_images(folder: Path) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(folder / f"rgb{i}.png")
    Image.fromarray(rng.integers(0, 255, (20, 20, 4), dtype=np.uint8), "RGBA").save(folder / "rgba.png")
    Image.fromarray(rng.integers(0, 65535, (18, 18), dtype=np.uint16)).save(folder / "deep.png")
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).convert("CMYK").save(
        folder / "cmyk.jpg"
    )
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.png").write_text("not an image")
    jpeg = folder / "whole.jpg"
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(jpeg, quality=90)
    (folder / "truncated.jpg").write_bytes(jpeg.read_bytes()[:300])


def test_trains_on_a_folder_with_damaged_files(tmp_path: Path) -> None:
    data = tmp_path / "pictures"
    _write_bad_and_good_images(data)
    trainer = _trainer(tmp_path / "run", data=str(data), steps=2, batch_size=4)
    assert len(trainer.dataset.skipped) == 3
    assert len(trainer.dataset) == 10
    trainer.train()
    config = RunConfig.load(tmp_path / "run")
    assert config.data.skipped == 3 and config.model.num_classes == 0


def test_resume_without_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path / "run", steps=2)
    with pytest.raises(DifforgeError, match="no checkpoint"):
        trainer.resume()


def test_bad_train_settings_are_clear_errors() -> None:
    for field, value, flag in [
        ("batch_size", 0, "--batch-size"),
        ("lr", -1.0, "--lr"),
        ("ema_decay", 1.5, "--ema-decay"),
        ("p_uncond", 1.0, "--p-uncond"),
        ("mixed_precision", "fp8", "--mixed-precision"),
        ("lr_schedule", "exponential", "--lr-schedule"),
    ]:
        with pytest.raises(DifforgeError, match=flag):
            replace(TrainConfig(), **{field: value}).validate()


def test_tensorboard_events_and_epochs(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard", reason="TensorBoard comes with the [tensorboard] extra")
    trainer = _trainer(tmp_path / "run", steps=None, epochs=0.01, tensorboard=True, sample_every=1)
    assert trainer.total_steps == 3  # ceil(0.01 * 224 batches of 8)
    trainer.train()
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
