"""Runs that cannot be lost: resume keeps the plan, non-finite steps never reach a checkpoint,
Ctrl-C resumes bit-exactly, the trainer state is validated, and bad flags are one-line errors
before any work starts."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from tiny_settings import TINY

from difforge.cli import main
from difforge.diffusion import DiffusionConfig
from difforge.errors import DifforgeError
from difforge.runs import RunConfig
from difforge.runs.storage import checkpoint_dirs, load_tensors
from difforge.training import TrainConfig, Trainer, prepare_run
from difforge.training.state import restore_trainer_state
from difforge.training.trainer import TrainingInterrupted

pytest.importorskip("sklearn", reason="the digits dataset comes with the [datasets] extra")

SHORT_PROCESS = DiffusionConfig(num_timesteps=50)
CLI_TINY = [
    "--preset", "tiny", "--image-size", "16", "--batch-size", "8", "--timesteps", "50",
    "--no-tensorboard", "--no-progress", "--sample-every", "0", "--preview-images", "4",
    "--preview-steps", "3", "--warmup-steps", "2", "--log-every", "1",
    "--threads", "2",  # bit-exact resume needs one thread count (docs/reliability.md)
]  # fmt: skip


def _trainer(run_dir: Path, **overrides: object) -> Trainer:
    config = TrainConfig(**{**TINY, **overrides})  # type: ignore[arg-type]
    model, process, dataset, run_config = prepare_run(config, SHORT_PROCESS)
    return Trainer(model, process, dataset, run_config, run_dir, device=torch.device("cpu"), progress=False)


def _run_cli(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return code, err


def _one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    code, err = _run_cli(capsys, argv)
    lines = [line for line in err.strip().splitlines() if line and not line.startswith("note:")]
    assert code == 2 and len(lines) == 1, err
    return lines[0]


def _same_weights(a: Trainer, b: Trainer) -> bool:
    pairs = zip(a.ema.model.state_dict().values(), b.ema.model.state_dict().values(), strict=True)
    return all(torch.equal(x, y) for x, y in pairs) and all(
        torch.equal(x, y)
        for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values(), strict=True)
    )


# ---- resume keeps the plan ------------------------------------------------------------------


def test_plain_resume_finishes_the_saved_plan(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    first = _trainer(run, steps=6, checkpoint_every=2)
    first.train(stop_after=4)  # "killed" after the checkpoint at step 4
    assert [p.name for p in checkpoint_dirs(run)][-1] == "step_00000004"
    code, err = _run_cli(capsys, ["train", "--resume", "--out", str(run), "--no-progress"])
    assert code == 0, err
    assert "for 6 steps from step 4" in err
    assert RunConfig.load(run).train.steps == 6 and checkpoint_dirs(run)[-1].name == "step_00000006"
    straight = _trainer(tmp_path / "straight", steps=6, checkpoint_every=2)
    straight.train()
    resumed = _trainer(run, steps=6, checkpoint_every=2)
    resumed.resume()
    assert _same_weights(straight, resumed)


def test_a_decaying_lr_schedule_resumes_bit_exactly(tmp_path: Path) -> None:
    plan = {"lr_schedule": "step", "lr_decay_every": 2, "lr_decay_factor": 0.3, "lr_min": 1e-5}
    first = _trainer(tmp_path / "run", steps=6, checkpoint_every=3, warmup_steps=1, **plan)
    first.train(stop_after=3)
    resumed = _trainer(tmp_path / "run", steps=6, checkpoint_every=3, warmup_steps=1, **plan)
    resumed.resume()
    resumed.train()
    straight = _trainer(tmp_path / "straight", steps=6, checkpoint_every=3, warmup_steps=1, **plan)
    straight.train()
    assert _same_weights(straight, resumed)
    assert [resumed.lr_at(s) for s in range(6)] == [straight.lr_at(s) for s in range(6)]
    assert resumed.optimizer.param_groups[0]["lr"] == straight.optimizer.param_groups[0]["lr"] < 1e-3


def test_flags_on_resume_apply_or_are_refused(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    _trainer(run, steps=3).train()
    code, err = _run_cli(capsys, ["train", "--resume", "--out", str(run), "--steps", "5", "--lr", "0.0005"])
    assert code == 0, err
    assert "changed: --steps 3 -> 5" in err and "changed: --lr 0.001 -> 0.0005" in err
    saved = RunConfig.load(run).train
    assert saved.steps == 5 and saved.lr == 0.0005
    for flags, named in [
        (["--preset", "small"], "--preset"),
        (["--batch-size", "4"], "--batch-size"),
        (["--schedule", "cosine"], "--schedule"),
        (["--image-size", "8"], "--image-size"),
    ]:
        line = _one_line_error(capsys, ["train", "--resume", "--out", str(run), *flags])
        assert line.startswith(f"difforge: error: {named} cannot change when resuming"), line
    line = _one_line_error(capsys, ["train", "mnist", "--resume", "--out", str(run)])
    assert "DATA cannot change when resuming" in line
    assert "already at step 5" in _one_line_error(
        capsys, ["train", "--resume", "--out", str(run), "--steps", "4"]
    )
    assert RunConfig.load(run).train.steps == 5  # refused flags changed nothing


def test_resume_before_the_first_checkpoint_starts_the_saved_plan(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    _trainer(run, steps=3, checkpoint_every=0).write_config()  # killed before any checkpoint
    code, err = _run_cli(capsys, ["train", "--resume", "--out", str(run), "--no-progress"])
    assert code == 0, err
    assert "no checkpoint yet" in err and checkpoint_dirs(run)[-1].name == "step_00000003"


# ---- non-finite steps ---------------------------------------------------------------------


def test_non_finite_steps_are_skipped_and_counted(tmp_path: Path, monkeypatch) -> None:
    trainer = _trainer(tmp_path / "run", steps=5)
    real = trainer.process.training_losses
    calls = {"n": 0}

    def sometimes_nan(*args, **kwargs):  # noqa: ANN002, ANN003 - a wrapper of the process's
        calls["n"] += 1
        terms = real(*args, **kwargs)
        if calls["n"] in (2, 3):
            terms["loss"] = terms["loss"] * float("nan")
        return terms

    monkeypatch.setattr(trainer.process, "training_losses", sometimes_nan)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train(stop_after=1)
    after_one = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    assert any(not torch.equal(before[k], after_one[k]) for k in before)
    trainer.train(stop_after=2)  # two NaN steps: not applied
    assert all(torch.equal(after_one[k], v) for k, v in trainer.model.state_dict().items())
    trainer.train()
    assert trainer.step == 5 and trainer.nonfinite_steps == 2
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["nonfinite_steps"] == 2
    for folder in checkpoint_dirs(tmp_path / "run"):
        for tensor in load_tensors(folder / "model.safetensors").values():
            assert torch.isfinite(tensor).all()


def test_divergence_stops_with_one_line_and_keeps_good_checkpoints(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    code, err = _run_cli(
        capsys, ["train", "digits", "--out", str(run), "--steps", "40", "--checkpoint-every", "1", *CLI_TINY,
                 "--lr", "1e30", "--warmup-steps", "0"]
    )  # fmt: skip
    assert code == 2 and "training diverged" in err and "--resume" in err, err
    for folder in checkpoint_dirs(run):
        for name in ("model.safetensors", "ema.safetensors"):
            for tensor in load_tensors(folder / name).values():
                assert torch.isfinite(tensor).all(), folder


# ---- Ctrl-C ---------------------------------------------------------------------------------


def test_ctrl_c_finishes_the_step_and_resumes_bit_exactly(tmp_path: Path, monkeypatch) -> None:
    straight = _trainer(tmp_path / "a", steps=6, hflip=True, timestep_sampler="importance")
    straight.train()

    first = _trainer(tmp_path / "b", steps=6, hflip=True, timestep_sampler="importance")
    real_step = first.train_step

    def interrupted_step(batches):  # noqa: ANN001, ANN202 - wraps Trainer.train_step
        if first.step == 2:
            signal.raise_signal(signal.SIGINT)  # Ctrl-C in the middle of step 3
        return real_step(batches)

    monkeypatch.setattr(first, "train_step", interrupted_step)
    with pytest.raises(TrainingInterrupted) as stop:
        first.train()
    assert stop.value.step == 3 and checkpoint_dirs(tmp_path / "b")[-1].name == "step_00000003"
    second = _trainer(tmp_path / "b", steps=6, hflip=True, timestep_sampler="importance")
    assert second.resume() == 3
    second.train()
    assert _same_weights(straight, second)


# ---- the trainer state is validated ---------------------------------------------------------


def _damage_trainer_state(run: Path, edit_meta=None, edit_tensors=None) -> Path:  # noqa: ANN001
    """Rewrite the newest checkpoint's trainer.safetensors with edited metadata or tensors."""
    folder = checkpoint_dirs(run)[-1]
    path = folder / "trainer.safetensors"
    tensors = load_tensors(path)
    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata())
    if edit_meta is not None:
        meta = json.loads(metadata["trainer"])
        edit_meta(meta)
        metadata["trainer"] = json.dumps(meta)
    if edit_tensors is not None:
        edit_tensors(tensors)
    save_file(tensors, str(path), metadata=metadata)
    return folder


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("step", -5),
        ("step", 10**18),
        ("step", 40.7),
        ("epoch", 7),
        ("batch_in_epoch", 10**6),
        ("ema_updates", 99),
    ],
)
def test_nonsense_trainer_state_is_refused(tmp_path: Path, field: str, value: object) -> None:
    run = tmp_path / "run"
    _trainer(run, steps=2).train()
    folder = _damage_trainer_state(run, edit_meta=lambda meta: meta.__setitem__(field, value))
    with pytest.raises(DifforgeError, match=str(folder)):
        restore_trainer_state(_trainer(run, steps=2), folder)


def test_a_damaged_rng_state_is_one_line(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _trainer(run, steps=2).train()
    damage = lambda tensors: tensors.__setitem__("rng/generator", torch.zeros(7, dtype=torch.uint8))  # noqa: E731
    folder = _damage_trainer_state(run, edit_tensors=damage)
    with pytest.raises(DifforgeError, match="does not match this model or is damaged"):
        restore_trainer_state(_trainer(run, steps=2), folder)


# ---- fine-tuning: --init-from ------------------------------------------------------------


def test_init_from_starts_from_the_parents_ema_weights(tmp_path: Path, capsys) -> None:
    parent = tmp_path / "parent"
    _trainer(parent, steps=3).train()
    child_config = TrainConfig(**{**TINY, "steps": 2, "init_from": str(parent), "preset": "mnist"})
    model, process, _, run_config = prepare_run(
        child_config, DiffusionConfig()
    )  # both replaced by the parent's
    ema = load_tensors(parent / "ema.safetensors")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ema.items())
    assert run_config.train.preset == "tiny" and process.num_timesteps == 50
    assert run_config.train.init_from == str(parent)
    child = ["train", "digits", "--init-from", str(parent), "--no-progress", "--no-tensorboard"]
    code, err = _run_cli(
        capsys, [*child, "--out", str(tmp_path / "c"), "--steps", "2", "--sample-every", "0"]
    )
    assert code == 0, err
    assert RunConfig.load(tmp_path / "c").diffusion.num_timesteps == 50
    line = _one_line_error(capsys, [*child, "--out", str(tmp_path / "d"), "--preset", "small"])
    assert "--preset: with --init-from" in line
    line = _one_line_error(capsys, [*child, "--out", str(tmp_path / "d"), "--schedule", "cosine"])
    assert "--schedule: with --init-from" in line
    assert "does not exist" in _one_line_error(
        capsys, ["train", "digits", "--init-from", str(tmp_path / "nope"), "--out", str(tmp_path / "e")]
    )


# ---- every flag checked before work starts --------------------------------------------------


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("rel") / "digits"
    assert main(["train", "digits", "--out", str(run), "--steps", "2", *CLI_TINY]) == 0
    return run


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--lr", "inf"], "--lr"),
        (["--lr", "nan"], "--lr"),
        (["--weight-decay", "inf"], "--weight-decay"),
        (["--weight-decay", "-1"], "--weight-decay"),
        (["--grad-clip", "nan"], "--grad-clip"),
        (["--seed", str(10**23)], "--seed"),
        (["--image-size", "100000"], "--image-size"),
        (["--timesteps", str(10**12)], "--timesteps"),
        (["--epochs", "nan"], "--epochs"),
        (["--preview-sampler", "plms"], "--preview-sampler"),
        (["--min-snr-gamma", "inf"], "--min-snr-gamma"),
    ],
)
def test_bad_train_numbers_are_refused_before_any_work(
    tmp_path: Path, capsys, argv: list[str], named: str
) -> None:
    out = tmp_path / "never"
    line = _one_line_error(capsys, ["train", "digits", "--out", str(out), *CLI_TINY, *argv])
    assert named in line, line
    assert not out.exists()


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--guidance", "nan"], "--guidance"),
        (["--eta", "nan"], "--eta"),
        (["--fps", "nan", "--gif", "x.gif"], "--fps"),
        (["--seed", str(10**23)], "--seed"),
        (["-n", "0"], "--num-images"),
        (["--dynamic-threshold", "2"], "--dynamic-threshold"),
        (["--sampler", "plms"], "sampler"),
        (["--out", "grid.xyz"], "unknown image type"),
        (["--gif", "anim.png"], "unknown image type"),
        (["-n", str(10**9)], "GiB"),
    ],
)
def test_bad_sample_flags_are_refused_before_sampling(
    small_run: Path, capsys, argv: list[str], named: str
) -> None:
    assert named in _one_line_error(capsys, ["sample", str(small_run), *argv])


def test_sample_output_paths(small_run: Path, tmp_path: Path, capsys) -> None:
    line = _one_line_error(capsys, ["sample", str(small_run), "-n", "2", "--out", str(tmp_path)])
    assert "is a folder" in line
    assert not list(tmp_path.parent.glob(f".{tmp_path.name}.tmp-*"))  # no stray temporary file
    jpeg = tmp_path / "grid.jpg"
    assert main(["sample", str(small_run), "-n", "2", "--steps", "2", "--out", str(jpeg)]) == 0
    with Image.open(jpeg) as picture:
        assert picture.format == "JPEG"
    each = tmp_path / "each"
    assert main(["sample", str(small_run), "-n", "5", "--steps", "2", "--batch-size", "2", "--no-grid",
                 "--images-dir", str(each)]) == 0  # fmt: skip
    assert sorted(p.name for p in each.iterdir()) == [f"{i:05d}.png" for i in range(5)]
    assert np.asarray(Image.open(each / "00004.png")).shape == (16, 16)


def test_sample_and_info_accept_a_checkpoint_folder(small_run: Path, tmp_path: Path) -> None:
    step = checkpoint_dirs(small_run)[-1]
    out = tmp_path / "from_step.png"
    assert main(["sample", str(step), "-n", "2", "--steps", "2", "--out", str(out)]) == 0
    assert out.is_file()
