"""Fuzzing with a small budget (bench/reliability.py runs the full one, with the same
generators and checks): malformed image folders, damaged run folders and random command
lines never give a traceback, a wrong exit status, a multi-line error or constant/non-finite
outputs; and a tiny run killed twice with SIGKILL (once while a checkpoint is written)
resumes to the weights of an uninterrupted run, bit for bit, with nothing left behind."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("hypothesis")
pytest.importorskip("sklearn", reason="the digits dataset comes with the [datasets] extra")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import reliability as rel  # noqa: E402 - bench/reliability.py holds the generators
from hypothesis import example, given  # noqa: E402

# Examples per target: the whole file takes about 30 s on a 2-core CPU, most of it the
# SIGKILL test's subprocesses. derandomize: CI runs the same cases every time.
IMAGE_FOLDERS, DAMAGED_RUNS, COMMAND_LINES = 8, 12, 40


def _no_failures(tally: rel.Tally) -> None:
    assert tally.failed() == 0, tally.report()


@pytest.fixture(scope="module")
def base_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return rel.make_base_run(tmp_path_factory.mktemp("fuzz") / "base")


TRUNCATED_TIFF = rel.ImageCase("cut.tif", b"II*\x00\x08\x00\x00\x00\x0a\x00", "TIFF cut at 10 bytes", "bad")
VALID_PNG = rel.ImageCase("ok.png", rel.encode_image("RGB", "PNG", 12, 12, 0, "noise")[0], "valid", "good")


def test_malformed_image_folders_train_or_fail_in_one_line(tmp_path: Path) -> None:
    tally = rel.Tally("image folders")

    @rel.fuzz_settings(IMAGE_FOLDERS, derandomize=True)
    @given(rel.image_folders(max_files=6))
    @example([TRUNCATED_TIFF])  # Pillow's warnings about it must not reach stderr
    @example([VALID_PNG, rel.ImageCase("empty.jpg", b"", "zero-size", "bad")])
    def check(files: list[rel.ImageCase]) -> None:
        rel.check_data_folder(files, tmp_path, tally)

    check()
    _no_failures(tally)
    assert tally.counts["cases"] >= IMAGE_FOLDERS


def test_damaged_runs_sample_info_and_resume_in_one_line(base_run: Path, tmp_path: Path) -> None:
    tally = rel.Tally("damaged runs")

    @rel.fuzz_settings(DAMAGED_RUNS, derandomize=True)
    @given(rel.run_damages(base_run))
    @example([("append", "metrics.jsonl", b'{"loss": ' + b"9" * 5000 + b"}\n")])  # info reads the last line
    @example([("bitflip", "ema.safetensors", [0.9], 3)])  # falls back to an intact checkpoint
    @example([("delete", "checkpoints/step_00000002"), ("truncate", "model.safetensors", 0.5)])
    def check(operations: list[tuple]) -> None:
        rel.check_damaged_run(base_run, operations, tmp_path, tally)

    check()
    _no_failures(tally)
    assert tally.counts["commands"] == 3 * tally.counts["cases"]


def test_random_command_lines_exit_0_or_2_in_one_line(base_run: Path, tmp_path: Path) -> None:
    tally = rel.Tally("command lines")
    flags = {command: rel.cli_flags(command) for command in ("train", "sample", "info")}
    assert any(flag.option == "--steps" for flag in flags["train"]) and flags["sample"]

    @rel.fuzz_settings(COMMAND_LINES, derandomize=True)
    @given(rel.command_lines(flags))
    @example(["train", "digits", "--out", "t", *rel.CLI_TINY, "--steps", "1", "--lr", "nan"])
    @example(["sample", "@RUN", "-n", "2", "--steps", "2", "--seed", str(10**23)])
    def check(argv: list[str]) -> None:
        rel.check_command_line(argv, base_run, tmp_path, tally)

    check()
    _no_failures(tally)


@pytest.mark.slow
def test_two_sigkills_resume_bit_exactly(tmp_path: Path) -> None:
    tally = rel.sigkill_campaign(2, tmp_path, steps=4, everies=(1,), max_delay=10.0, say=lambda line: None)
    counts = {
        key: tally.counts[key] for key in ("kills", "kills during a checkpoint write", "resumes", "runs")
    }
    assert tally.failed(rel.SIGKILL_FAILURES) == 0, f"{counts}\n{tally.report()}"
    assert tally.counts["kills"] == 2, counts
