"""Helpers of the CLI tests."""

from __future__ import annotations

import pytest

from difforge.cli import main


def one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run ``difforge ARGV``; assert exit status 2 with exactly one line on stderr, no
    traceback; return that line."""
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse errors
        code = exit_.code
    captured = capsys.readouterr()
    assert code == 2, captured
    assert "Traceback" not in captured.err
    lines = [line for line in captured.err.strip().splitlines() if line]
    assert len(lines) == 1, captured.err
    return lines[0]
