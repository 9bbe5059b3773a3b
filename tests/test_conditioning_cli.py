"""Multi-label, paired image-to-image and cascaded super-resolution runs end to end on the
CLI and in `Pipeline`; bad input is one line, exit status 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import one_line_error
from PIL import Image

from difforge.cli import main
from difforge.pipeline import Cascade, Pipeline
from difforge.runs.config import RunConfig

pytest.importorskip("sklearn", reason="the digits dataset comes with the [datasets] extra")

TINY = [
    "--preset", "tiny", "--batch-size", "8", "--steps", "2", "--timesteps", "30", "--no-tensorboard",
    "--no-progress", "--preview-images", "4", "--preview-steps", "2", "--threads", "2", "--sample-every", "0",
]  # fmt: skip
FAST = ["--steps", "2"]
CHILD = [a for a in TINY if a not in ("--preset", "tiny", "--timesteps", "30")]  # the parent's own

_error = one_line_error


def _train(run: Path, *argv: str) -> Path:
    assert main(["train", *argv, "--out", str(run), *TINY]) == 0
    return run


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Twelve 8 px digits in class folders ("zero", "one"), their edge maps in a second
    folder (by the same names, other extension), and a label table."""
    from difforge.data import load_builtin

    root = tmp_path_factory.mktemp("conditioning")
    data = load_builtin("digits")
    rows = ["file,labels"]
    for i in range(12):
        digit = int(data.labels[i]) % 2
        name = f"{['zero', 'one'][digit]}/img{i:02d}"
        pixels = data.images[i][..., 0]
        (root / "targets" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(root / "targets" / f"{name}.png")
        (root / "edges" / name).parent.mkdir(parents=True, exist_ok=True)
        edges = np.abs(np.diff(pixels.astype(np.int16), axis=1, prepend=0)).clip(0, 255).astype(np.uint8)
        Image.fromarray(edges).save(root / "edges" / f"{name}.bmp")
        labels = ["round" if digit == 0 else "straight"] + (["thick"] if pixels.mean() > 40 else [])
        rows.append(f'{name}.png,"{";".join(labels)}"')
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, folder: Path) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("runs")
    targets = str(folder / "targets")
    return {
        "labels": _train(
            out / "labels", targets, "--labels", str(folder / "labels.csv"), "--image-size", "8"
        ),
        "paired": _train(
            out / "paired",
            targets,
            "--cond-dir",
            str(folder / "edges"),
            "--class-folders",
            "--image-size",
            "8",
        ),
        "base": _train(out / "base", "digits", "--image-size", "8", "--no-conditional"),
        "sr": _train(out / "sr", "digits", "--task", "superres", "--low-res", "8", "--image-size", "16"),
        "sr2": _train(
            out / "sr2",
            "digits",
            "--task",
            "superres",
            "--image-size",
            "32",
            "--no-conditional",
            "--cond-noise-max",
            "0.3",
            "--cond-blur",
            "0.6",
        ),  # fmt: skip
    }


# ---- multi-label ----------------------------------------------------------------------------


def test_a_multi_label_run_saves_its_vocabulary_and_samples_label_sets(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    config = json.loads((runs["labels"] / "config.json").read_text())
    assert config["data"]["class_names"] == ["round", "straight", "thick"]
    assert config["model"]["multi_label"] and config["model"]["num_classes"] == 3
    assert config["conditioning"] == ["class_labels"] and config["train"]["labels"].endswith("labels.csv")
    out = tmp_path / "grid.png"
    assert (
        main(
            [
                "sample",
                str(runs["labels"]),
                "--labels",
                "round,thick",
                "-n",
                "4",
                "--steps",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert out.is_file()
    pipe = Pipeline.from_run(runs["labels"])
    rows = pipe.multi_hot(["round", "straight,thick"], 3)
    assert rows.tolist() == [[1, 0, 0], [0, 1, 1], [1, 0, 0]]
    assert pipe(2, labels="round", steps=2).shape == (2, 8, 8, 1)


def test_multi_label_mistakes_are_one_line(runs: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    run = str(runs["labels"])
    assert "unknown label 'curly'" in _error(capsys, ["sample", run, "--labels", "round,curly", "-n", "2"])
    assert "use --labels" in _error(capsys, ["sample", run, "--class", "round", "-n", "2"])
    base = str(runs["base"])
    assert "without a label table" in _error(capsys, ["sample", base, "--labels", "round", "-n", "2"])


# ---- paired image-to-image ------------------------------------------------------------------


def test_a_paired_run_takes_classes_and_conditions_and_samples_k_per_picture(
    runs: dict[str, Path], folder: Path, tmp_path: Path
) -> None:
    config = RunConfig.load(runs["paired"])
    assert config.conditioning == ["class_labels", "image_cond"] and config.model.image_cond_channels == 1
    assert config.data.cond_source.endswith("edges") and config.data.class_names == ["one", "zero"]
    grid, images = tmp_path / "grid.png", tmp_path / "each"
    argv = ["sample", str(runs["paired"]), "--cond", str(folder / "edges" / "one"), "-n", "3", "--steps", "2",
            "--class", "one", "--out", str(grid), "--images-dir", str(images)]  # fmt: skip
    assert main(argv) == 0
    pictures = len(list((folder / "edges" / "one").iterdir()))
    assert len(list(images.iterdir())) == 3 * pictures
    width, height = Image.open(grid).size
    assert (width, height) == (4 * 10 + 2, pictures * 10 + 2)  # condition | 3 samples, a row per picture


def test_a_paired_run_needs_its_condition(runs: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    run = str(runs["paired"])
    assert "condition images: --cond" in _error(capsys, ["sample", run, "-n", "2", "--steps", "2"])
    assert "no such file" in _error(capsys, ["sample", run, "--cond", "/nowhere.png", "-n", "2"])


# ---- super-resolution and the cascade -------------------------------------------------------


def test_upscale_makes_pictures_of_the_stage_size(runs: dict[str, Path], tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    Image.fromarray(np.tile(np.arange(0, 256, 32, dtype=np.uint8), (8, 1))).save(small / "ramp.png")
    Image.fromarray(np.zeros((20, 20), dtype=np.uint8)).save(small / "big.png")  # area-averaged to 8 first
    (small / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "up"
    assert main(["upscale", str(runs["sr"]), str(small), "--out", str(out), "--steps", "2"]) == 0
    assert Image.open(out / "ramp.png").size == (16, 16) and Image.open(out / "big.png").size == (16, 16)
    assert (out / "comparison.png").is_file() and not (out / "broken.png").exists()
    Image.fromarray(np.zeros((16, 16), dtype=np.uint8)).save(small / "sixteen.png")
    assert (
        main(["upscale", str(runs["sr2"]), str(small / "sixteen.png"), "--out", str(out), "--steps", "1"])
        == 0
    )
    assert Image.open(out / "sixteen.png").size == (32, 32)  # the 16 -> 32 stage


def test_a_cascade_of_two_runs_makes_images_of_the_final_size(runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "cascade.png"
    stage = f"{runs['sr']}:steps=2,guidance=1,cond_noise=0.2"
    argv = ["sample", str(runs["base"]), "--upsample", stage, "-n", "3", "--steps", "2", "--out", str(out),
            "--images-dir", str(tmp_path / "final")]  # fmt: skip
    assert main(argv) == 0
    assert all(Image.open(p).size == (16, 16) for p in (tmp_path / "final").iterdir())
    assert Image.open(out.with_name("cascade_stages.png")).size == (
        4 * 18 + 2,  # three (base | final) pairs, two a row
        2 * 18 + 2,
    )  # 3 pairs, 4 a row
    cascade = Pipeline.from_runs(runs["base"], runs["sr"], runs["sr2"])
    assert isinstance(cascade, Cascade)
    stages = cascade(2, configs=[None, None, None])
    assert [images.shape for images in stages] == [(2, 8, 8, 1), (2, 16, 16, 1), (2, 32, 32, 1)]


def test_the_sampling_level_reaches_the_model(runs: dict[str, Path]) -> None:
    pipe = Pipeline.from_run(runs["sr2"])
    seen: list[torch.Tensor] = []
    forward = pipe.model.forward

    def spy(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        seen.append(kwargs["cond_noise_level"])
        return forward(*args, **kwargs)

    pipe.model.forward = spy  # type: ignore[method-assign]
    pipe.upscale(torch.zeros(2, 1, 16, 16), steps=1, cond_noise=0.25, guidance=1.0)
    assert torch.equal(seen[0], torch.full((2,), 0.25))
    config = RunConfig.load(runs["sr2"])
    assert config.train.condition_noise_max() == 0.3 and config.model.cond_noise_embed


def test_cascade_and_upscale_mistakes_are_one_line(
    runs: dict[str, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    base, sr, sr2 = str(runs["base"]), str(runs["sr"]), str(runs["sr2"])
    assert "not a super-resolution run" in _error(capsys, ["sample", base, "--upsample", base, "-n", "2"])
    assert "takes 16x16x1 inputs" in _error(capsys, ["sample", base, "--upsample", sr2, "-n", "2"])
    assert "is not NAME=VALUE" in _error(capsys, ["sample", base, "--upsample", f"{sr}:stepz=3", "-n", "2"])
    assert "not a valid value" in _error(
        capsys, ["sample", base, "--upsample", f"{sr}:steps=many", "-n", "2"]
    )
    assert "--cond-noise applies only" in _error(capsys, ["sample", base, "--cond-noise", "0.1", "-n", "2"])
    assert "--cond-noise must be" in _error(
        capsys, ["upscale", sr, base, "--out", str(tmp_path), "--cond-noise", "2"]
    )
    assert "not a super-resolution run" in _error(capsys, ["upscale", base, sr, "--out", str(tmp_path / "x")])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["digits", "--low-res", "8"], "add --task superres"),
        (
            ["digits", "--task", "superres", "--low-res", "2", "--image-size", "32"],
            "factor 16 must be in [2, 8]",
        ),
        (["digits", "--task", "sharpen"], "--task must be one of generate, superres"),
        (["digits", "--cond-noise-max", "0.2"], "needs --task superres or --cond-dir"),
        (["digits", "--task", "superres", "--cond-noise-max", "1.5"], "--cond-noise-max must be"),
        (["digits", "--task", "superres", "--cond-dir", "x"], "does not apply to --task superres"),
        (["digits", "--labels", "t.csv", "--class-folders"], "choose one"),
        (["digits", "--labels", "t.csv"], "must be a folder"),
        (
            ["digits", "--task", "superres", "--low-res", "8", "--image-size", "16", "--cond-blur", "3"],
            "use at most 2.33",
        ),
    ],
)
def test_bad_conditioning_flags_are_one_line_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (tmp_path / "t.csv").write_text("file,labels\na.png,x\n")
    argv = [tmp_path / "t.csv" if a == "t.csv" else a for a in argv]
    assert message in _error(capsys, ["train", *map(str, argv), "--out", str(tmp_path / "run"), *TINY])
    assert not (tmp_path / "run").exists()


def test_fine_tuning_needs_the_parents_conditions(
    runs: dict[str, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    line = _error(
        capsys,
        [
            "train",
            "digits",
            "--init-from",
            str(runs["sr"]),
            "--no-conditional",
            "--out",
            str(tmp_path / "x"),
            *FAST,
        ],
    )
    assert "the parent model has 10 classes or labels" in line
    assert (
        main(["train", "digits", "--init-from", str(runs["sr"]), "--out", str(tmp_path / "y"), *CHILD]) == 0
    )
    assert RunConfig.load(tmp_path / "y").train.task == "superres"  # inherited with the model


def test_resume_keeps_the_conditioning(
    runs: dict[str, Path], folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    line = _error(
        capsys, ["train", "--resume", "--out", str(runs["labels"]), "--labels", str(folder / "x.csv")]
    )
    assert "--labels cannot change when resuming" in line


def test_eval_fid_of_a_cascade_scores_every_stage_at_its_resolution(
    runs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["eval", "fid", str(runs["base"]), "digits[:12]", "--upsample", f"{runs['sr']}:steps=1",
            "-n", "4", "--steps", "1", "--json", "--quiet", "--no-cache"]  # fmt: skip
    assert main(argv) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(row["stage"], row["resolution"], row["count_a"], row["count_b"]) for row in rows] == [
        (0, 8, 4, 12),
        (1, 16, 4, 12),
    ]
    assert all(row["fid"] > 0 for row in rows) and rows[1]["source_b"].endswith("at 16x16")
    line = _error(capsys, ["eval", "fid", str(runs["base"]), "digits", "--upsample", str(runs["sr"])])
    assert "needs -n" in line
