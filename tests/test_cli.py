"""The command line: the main job end to end on tiny settings, and every user mistake as a
one-line error with exit status 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import one_line_error
from PIL import Image

from difforge.cli import main

pytest.importorskip("sklearn", reason="the digits dataset comes with the [datasets] extra")

TINY_TRAIN = [
    "--preset", "tiny", "--image-size", "16", "--batch-size", "8", "--timesteps", "50",
    "--no-tensorboard", "--no-progress", "--sample-every", "0", "--preview-images", "4",
    "--preview-steps", "3",
]  # fmt: skip


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("cli") / "digits"
    assert main(["train", "digits", "--out", str(run), "--steps", "3", *TINY_TRAIN]) == 0
    return run


_error = one_line_error


def test_sample_writes_grid_pngs_and_gif(trained_run: Path, tmp_path: Path) -> None:
    grid, gif, folder = tmp_path / "grid.png", tmp_path / "steps.gif", tmp_path / "each"
    argv = ["sample", str(trained_run), "-n", "6", "--steps", "4", "--out", str(grid),
            "--images-dir", str(folder), "--gif", str(gif), "--class", "3,7", "--guidance", "2",
            "--batch-size", "4"]  # fmt: skip
    assert main(argv) == 0
    assert Image.open(grid).size == (2 + 2 * 18, 2 + 3 * 18)  # 2 columns (classes) x 3 rows of 16 + 2 padding
    files = sorted(folder.glob("*.png"))
    assert len(files) == 6 and all(Image.open(f).size == (16, 16) for f in files)
    with Image.open(gif) as animation:
        # one frame per step plus the result; Pillow merges frames that are pixel-identical
        assert 2 <= animation.n_frames <= 5
        assert animation.size == Image.open(grid).size


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "euler", "heun", "dpmpp_2m"])
def test_every_sampler_runs_from_the_cli(trained_run: Path, tmp_path: Path, sampler: str) -> None:
    out = tmp_path / f"{sampler}.png"
    assert (
        main(["sample", str(trained_run), "-n", "2", "--steps", "3", "--sampler", sampler, "--out", str(out)])
        == 0
    )
    assert out.is_file()


def test_info_and_resume(trained_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", str(trained_run)]) == 0
    assert "step_00000003" in capsys.readouterr().out
    assert main(["train", "digits", "--out", str(trained_run), "--resume", "--steps", "4", *TINY_TRAIN]) == 0
    assert main(["info", str(trained_run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["train"]["steps"] == 4


def test_user_mistakes_are_one_line_errors(trained_run: Path, tmp_path: Path, capsys) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no image" in _error(capsys, ["train", str(empty), *TINY_TRAIN]).lower()
    assert "does not exist" in _error(capsys, ["train", str(tmp_path / "missing"), *TINY_TRAIN])
    assert "built-in" in _error(capsys, ["train", "cifar1000", *TINY_TRAIN])
    assert "did you mean --steps" in _error(capsys, ["train", "--stepz", "3"])
    assert "invalid int value" in _error(capsys, ["train", "--steps", "many"])
    assert "already holds a run" in _error(
        capsys, ["train", "digits", "--out", str(trained_run), *TINY_TRAIN]
    )
    out = ["--out", str(tmp_path / "never")]
    assert "--batch-size" in _error(capsys, ["train", "digits", *out, *TINY_TRAIN, "--batch-size", "0"])
    assert "--ema-decay" in _error(capsys, ["train", "digits", *out, *TINY_TRAIN, "--ema-decay", "2"])
    assert "--lr-schedule" in _error(capsys, ["train", "digits", *out, *TINY_TRAIN, "--lr-schedule", "step"])
    for threads in ("0", "two", "-1"):
        assert "--threads" in _error(capsys, ["train", "digits", *out, *TINY_TRAIN, "--threads", threads])
    assert not (tmp_path / "never").exists()
    assert "unknown class" in _error(capsys, ["sample", str(trained_run), "--class", "cat", "-n", "1"])
    assert "does not exist" in _error(capsys, ["sample", str(tmp_path / "nope")])
    assert "steps" in _error(capsys, ["sample", str(trained_run), "--steps", "0", "-n", "1"])


def _copy_run(run: Path, target: Path) -> Path:
    target.mkdir()
    for name in ("config.json", "model.safetensors", "ema.safetensors"):
        (target / name).write_bytes((run / name).read_bytes())
    return target


def test_damaged_runs_are_one_line_errors(trained_run: Path, tmp_path: Path, capsys) -> None:
    damaged = _copy_run(trained_run, tmp_path / "damaged_weights")
    (damaged / "ema.safetensors").write_bytes(b"\x00" * 100)
    assert "ema.safetensors" in _error(capsys, ["sample", str(damaged), "-n", "1"])

    broken = _copy_run(trained_run, tmp_path / "damaged_config")
    (broken / "config.json").write_text("{ not json")
    assert "config.json is damaged" in _error(capsys, ["sample", str(broken), "-n", "1"])

    future = _copy_run(trained_run, tmp_path / "future")
    config = json.loads((future / "config.json").read_text())
    config["train"]["hyperdrive"] = True
    (future / "config.json").write_text(json.dumps(config))
    assert "hyperdrive" in _error(capsys, ["sample", str(future), "-n", "1"])


def test_help_lists_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for flag in ["--out", "--preset", "--steps", "--epochs", "--batch-size", "--image-size", "--channels",
                 "--schedule", "--timesteps", "--prediction", "--variance", "--loss", "--lr", "--ema-decay",
                 "--grad-accum", "--p-uncond", "--class-folders", "--seed", "--sample-every",
                 "--checkpoint-every", "--resume", "--no-tensorboard", "--device"]:  # fmt: skip
        assert flag in text, flag
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    text = capsys.readouterr().out
    for flag in ["--num-images", "--sampler", "--steps", "--eta", "--guidance", "--class", "--seed",
                 "--batch-size", "--weights", "--images-dir", "--gif", "--fps"]:  # fmt: skip
        assert flag in text, flag


def test_torchrun_two_processes_on_cpu(tmp_path: Path) -> None:
    run = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
               "--master_port=29517", "-m", "difforge", "train", "digits", "--out", str(run),
               "--steps", "2", *TINY_TRAIN]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_00000002"]
    assert "x 2" in result.stderr  # the banner names the world size, printed once (rank 0)
    assert result.stderr.count("training tiny U-Net") == 1


def test_sampler_options_from_the_command_line(
    trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "edm.png"
    argv = ["sample", str(trained_run), "-n", "2", "--steps", "3", "--sampler", "edm", "--s-churn", "5",
            "--s-tmin", "0.05", "--s-tmax", "50", "--s-noise", "1.003", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0 and out.is_file()
    for sampler, option in [
        ("ddim", "--eta=0.5"),
        ("dpmpp_2m_sde", "--eta=0"),
        ("euler_ancestral", "--s-noise=1"),
    ]:
        assert main(["sample", str(trained_run), "-n", "1", "--steps", "2", "--sampler", sampler, option,
                     "--out", str(tmp_path / f"{sampler}.png")]) == 0  # fmt: skip
    capsys.readouterr()
    base = ["sample", str(trained_run), "-n", "1", "--steps", "2", "--out", str(tmp_path / "x.png")]
    assert "--eta does not apply to sampler 'dpmpp_2m'" in _error(
        capsys, [*base, "--sampler", "dpmpp_2m", "--eta", "1"]
    )
    assert "--s-churn does not apply to sampler 'ddpm'" in _error(
        capsys, [*base, "--sampler", "ddpm", "--s-churn", "1"]
    )
    assert "--s-churn must be" in _error(capsys, [*base, "--sampler", "edm", "--s-churn", "-1"])
    assert "--s-tmax must be >= --s-tmin" in _error(
        capsys, [*base, "--sampler", "edm", "--s-tmin", "2", "--s-tmax", "1"]
    )
