"""Cold diffusion end to end on the CLI: a tiny cold-blur run on digits trains, resumes,
samples a grid and a GIF and restores a blurred picture; bad input is one line, exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import one_line_error
from PIL import Image

from difforge.cli import main
from difforge.pipeline import Pipeline

pytest.importorskip("sklearn", reason="the digits dataset comes with the [datasets] extra")

TINY_COLD = [
    "--process", "cold", "--preset", "tiny", "--image-size", "16", "--batch-size", "8",
    "--timesteps", "10", "--no-tensorboard", "--no-progress", "--preview-images", "4",
    "--preview-steps", "4", "--threads", "2",
]  # fmt: skip


_error = one_line_error


@pytest.fixture(scope="module")
def cold_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("cold") / "blur"
    argv = ["train", "digits", "--out", str(run), "--steps", "4", "--sample-every", "2", *TINY_COLD]
    assert main(argv) == 0
    return run


@pytest.fixture(scope="module")
def pictures(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from difforge.data import load_builtin

    folder = tmp_path_factory.mktemp("pictures")
    digits = load_builtin("digits").images
    for i in range(3):
        Image.fromarray(digits[i][..., 0]).resize((40, 40)).save(folder / f"digit{i}.png")
    (folder / "broken.png").write_bytes(b"not a png")
    return folder


def test_a_cold_run_trains_with_its_settings_and_prior_in_config_json(cold_run: Path) -> None:
    saved = json.loads((cold_run / "config.json").read_text())
    diffusion = saved["diffusion"]
    assert diffusion["kind"] == "cold" and diffusion["degradation"] == "blur"
    assert diffusion["num_timesteps"] == 10 and diffusion["loss"] == "l1" and diffusion["discrete"] is True
    assert len(diffusion["prior"]["weights"]) == 10 and saved["model"]["learn_sigma"] is False
    logged = json.loads((cold_run / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"loss", "l1"} <= set(logged)
    samples = cold_run / "samples"
    assert (samples / "step_00000004.png").is_file() and (samples / "strip_00000004.png").is_file()


def test_resume_continues_the_cold_run_and_keeps_its_process(cold_run: Path, tmp_path: Path, capsys) -> None:
    import shutil

    run = tmp_path / "resumed"
    shutil.copytree(cold_run, run)
    assert main(["train", "--resume", "--out", str(run), "--steps", "6", "--no-progress"]) == 0
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 6
    resumed = json.loads((run / "config.json").read_text())["diffusion"]
    assert resumed == json.loads((cold_run / "config.json").read_text())["diffusion"]  # the prior too
    capsys.readouterr()
    line = _error(capsys, ["train", "--resume", "--out", str(run), "--steps", "8", "--blur-std", "0.5"])
    assert "--blur-std cannot change when resuming" in line
    line = _error(capsys, ["train", "--resume", "--out", str(run), "--steps", "8", "--process", "gaussian"])
    assert "--process cannot change when resuming" in line


def test_sample_draws_from_the_prior_with_both_samplers_and_a_gif(cold_run: Path, tmp_path: Path) -> None:
    grid, gif = tmp_path / "grid.png", tmp_path / "walk.gif"
    assert main(["sample", str(cold_run), "-n", "6", "--out", str(grid), "--gif", str(gif)]) == 0
    assert Image.open(grid).size[0] > 16 and Image.open(gif).n_frames > 1  # (equal frames are merged)
    pipe = Pipeline.from_run(cold_run, device="cpu")
    a = pipe(num_images=4, seed=3)
    assert np.array_equal(a, pipe(num_images=4, seed=3))  # seeded
    assert not np.array_equal(a, pipe(num_images=4, seed=4))
    assert pipe(num_images=2, sampler="cold_naive", steps=10).shape == (2, 16, 16, 1)
    batches = []
    model = pipe.model
    pipe.model = lambda x, t, **cond: (batches.append(cond["class_labels"].tolist()), model(x, t, **cond))[1]
    assert pipe(num_images=2, classes=[1, 2], guidance=3.0, seed=3).shape == (2, 16, 16, 1)
    assert batches and all(labels == [1, 2, pipe.num_classes, pipe.num_classes] for labels in batches)


def test_restore_degrades_and_restores_pictures_side_by_side(
    cold_run: Path, pictures: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "restored"
    argv = ["restore", str(cold_run), str(pictures), "--from-t", "6", "--degrade", "--out", str(out)]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "skipped" in err and "broken.png" in err and "restored 3 images from level 6 of 10" in err
    written = sorted(p.name for p in out.iterdir())
    assert written == ["comparison.png", "digit0.png", "digit1.png", "digit2.png"]
    assert Image.open(out / "digit0.png").size == (16, 16)
    comparison = Image.open(out / "comparison.png")
    assert comparison.size[0] > comparison.size[1] / 3 * 2  # three columns: clean | degraded | restored
    pipe = Pipeline.from_run(cold_run, device="cpu")
    from difforge.data import load_image_files

    clean, _, _ = load_image_files([pictures / "digit0.png"], 16, 1)
    blurred = pipe.degrade(clean, 6)
    assert float((blurred - clean).abs().mean()) > 0.01
    restored = pipe.restore(blurred, from_t=6, steps=3)
    assert restored.shape == (1, 16, 16, 1)


def test_bad_cold_input_is_one_line_exit_2(cold_run: Path, pictures: Path, tmp_path: Path, capsys) -> None:
    out = str(tmp_path / "x")
    train = ["train", "digits", "--out", out]
    cold = [*train, "--process", "cold"]
    restore = ["restore", str(cold_run)]
    cases = [
        ([*cold, "--degradation", "smear"], "--degradation must be"),
        ([*cold, "--prediction", "v"], "--prediction does not apply"),
        ([*train, "--blur-std", "0.2"], "--blur-std does not apply to --process gaussian"),
        ([*cold, "--loss", "vlb"], "--loss of a cold process"),
        ([*cold, "--timestep-sampler", "lognormal"], "lognormal"),
        ([*cold, "--degradation", "decolorize", "--channels", "1"], "decolorize needs RGB"),
        ([*train, "--process", "hot"], "--process must be one of gaussian, cold"),
        (["sample", str(cold_run), "--sampler", "ddim"], "sampler 'ddim' does not apply to a 'cold' process"),
        ([*restore, str(pictures), "--from-t", "11", "--out", out], "--from-t must be"),
        ([*restore, str(pictures), "--from-t", "0", "--out", out], "--from-t must be"),
        ([*restore, str(tmp_path / "missing.png"), "--out", out], "no such file or folder"),
        ([*restore, str(pictures / "broken.png"), "--out", out], "no readable image"),
        ([*restore, str(pictures), "--sampler", "heun", "--out", out], "does not apply"),
        (["eval", "nll", str(cold_run)], "nll needs a likelihood: a Gaussian run"),
    ]  # fmt: skip
    for argv, message in cases:
        assert message in _error(capsys, argv), argv
    assert not (tmp_path / "x").exists()  # validated before anything was written


def test_a_restoration_only_run_previews_restorations_and_cannot_sample(tmp_path: Path, capsys) -> None:
    run = tmp_path / "sharp"
    argv = ["train", "digits", "--out", str(run), "--steps", "2", "--no-discrete", *TINY_COLD]
    assert main(argv) == 0
    assert "prior" not in json.loads((run / "config.json").read_text())["diffusion"] or (
        json.loads((run / "config.json").read_text())["diffusion"]["prior"] is None
    )
    assert (run / "samples" / "step_00000002.png").is_file()  # previews restore dataset images
    capsys.readouterr()
    assert "cannot generate from nothing" in _error(capsys, ["sample", str(run), "-n", "2"])


def test_restore_needs_a_cold_run(tmp_path: Path, pictures: Path, capsys) -> None:
    run = tmp_path / "gaussian"
    tiny = [a for a in TINY_COLD if a not in ("--process", "cold")] + ["--schedule", "cosine"]
    assert main(["train", "digits", "--out", str(run), "--steps", "1", "--sample-every", "0", *tiny]) == 0
    capsys.readouterr()
    line = _error(capsys, ["restore", str(run), str(pictures), "--out", str(tmp_path / "o")])
    assert "restore needs a cold-diffusion run" in line


def test_a_class_conditional_cold_run_restores_with_the_null_label(cold_run: Path) -> None:
    pipe = Pipeline.from_run(cold_run, device="cpu")
    assert pipe.guidable  # digits has classes; the default p_uncond drops them
    x = torch.zeros((2, 1, 16, 16))
    seen = []
    model = pipe.model
    pipe.model = lambda x, t, **cond: (seen.append(cond["class_labels"].tolist()), model(x, t, **cond))[1]
    pipe.restore(x, from_t=3, steps=3)
    assert seen and all(labels == [pipe.num_classes] * 2 for labels in seen)  # the null label, no guidance
    seen.clear()
    pipe.restore(x, from_t=3, steps=3, classes=[1, 2], guidance=1.0)
    assert seen[0] == [1, 2]


def test_noise_draws_the_degradation_of_a_cold_run(cold_run: Path, pictures: Path, tmp_path: Path) -> None:
    from difforge.data import load_image_files
    from difforge.images import make_grid, to_uint8

    strip = tmp_path / "strip.png"
    assert main(["noise", str(pictures), "--run", str(cold_run), "--t", "0,5,10", "--out", str(strip)]) == 0
    process = Pipeline.from_run(cold_run, device="cpu").process
    images, _, _ = load_image_files([str(pictures)], 16, 1)
    expected = [process.degrade(images, torch.full((len(images),), k)) for k in (0, 5, 10)]
    rows = torch.stack(expected, dim=1).reshape(-1, *images.shape[1:])
    drawn = np.asarray(Image.open(strip))
    np.testing.assert_array_equal(drawn, make_grid(to_uint8(rows), columns=3)[..., 0])
