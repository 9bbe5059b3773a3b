"""FID across checkpoints (`eval fid RUN REF --checkpoints`), `difforge plot`, and the plots
without matplotlib."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from cli_helpers import one_line_error
from PIL import Image

from difforge.cli import main
from difforge.evaluation.inception import packaged_weights_path
from difforge.evaluation.plots import smoothed

pytest.importorskip("sklearn", reason="the digits dataset comes with the [datasets] extra")
pytest.importorskip("matplotlib", reason="the plots come with the [plot] extra")

TINY = [
    "--preset", "tiny", "--image-size", "16", "--batch-size", "8", "--timesteps", "50", "--no-tensorboard",
    "--no-progress", "--preview-images", "2", "--preview-steps", "2", "--warmup-steps", "0",
    "--log-every", "1",
]  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("plots") / "run"
    argv = ["train", "digits", *TINY, "--steps", "4", "--checkpoint-every", "2", "--no-previews"]
    assert main([*argv, "--out", str(folder)]) == 0
    return folder


@pytest.mark.skipif(
    packaged_weights_path() is None, reason='needs the FID Inception weights: "difforge[fid]"'
)
def test_fid_across_checkpoints_gives_one_row_per_checkpoint(run: Path, tmp_path: Path, capsys) -> None:
    plot = tmp_path / "fid.png"
    argv = ["eval", "fid", str(run), "digits", "--checkpoints", "all", "-n", "8", "--steps", "2", "--json"]
    assert main([*argv, "--plot", str(plot), "--quiet"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["checkpoint"], r["step"]) for r in rows] == [("step_00000002", 2), ("step_00000004", 4)]
    assert all(r["fid"] > 0 and r["count_a"] == 8 for r in rows)
    assert Image.open(plot).format == "PNG"
    # one checkpoint by name, the same seeds: the same FID as in the sweep
    assert main([*argv[:-1], "--checkpoints", "step_4", "--json", "--quiet", "--plot", str(plot)]) == 0
    assert json.loads(capsys.readouterr().out)[0]["fid"] == pytest.approx(rows[1]["fid"], rel=1e-6)


def test_checkpoint_flags_are_checked_before_sampling(run: Path, tmp_path: Path, capsys) -> None:
    base = ["eval", "fid", str(run), "digits", "-n", "8"]
    assert "has no checkpoint 'step_3' (it has step_2, step_4)" in one_line_error(
        capsys, [*base, "--checkpoints", "step_3"]
    )
    assert "--plot draws FID by training step" in one_line_error(
        capsys, [*base, "--plot", str(tmp_path / "a.png")]
    )
    assert "--plot" in one_line_error(
        capsys, [*base, "--checkpoints", "all", "--plot", str(tmp_path / "a.xyz")]
    )


def test_plot_draws_the_training_curves(run: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "curves.png"
    with (run / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 5, "loss": 0.5\n')  # a line cut by a kill
    assert main(["plot", str(run), "--out", str(out)]) == 0
    assert "1 damaged lines skipped" in capsys.readouterr().err
    assert Image.open(out).format == "PNG"
    assert "give a .png, .svg or .pdf" in one_line_error(
        capsys, ["plot", str(run), "--out", str(tmp_path / "a.gif")]
    )
    assert "config.json is missing" in one_line_error(capsys, ["plot", str(tmp_path)])


def test_without_matplotlib_the_commands_name_the_extra(
    run: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    line = one_line_error(capsys, ["plot", str(run)])
    assert "plots need matplotlib" in line and "pip install 'difforge[plot]'" in line


def test_smoothing_is_a_bias_corrected_moving_average() -> None:
    assert smoothed([2.0, 2.0, 2.0], 0.9) == pytest.approx([2.0, 2.0, 2.0])  # no pull towards 0
    assert smoothed([1.0, float("nan"), 3.0], 0.5) == pytest.approx([1.0, 1.0, (0.5 * 0.5 + 1.5) / 0.75])
