"""`difforge.training.allocator`: freed training memory is reused instead of faulted in again.

Each check runs in a fresh interpreter (the malloc settings are process-wide) and counts
minor page faults, which, unlike timings, do not depend on the machine's load.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from difforge.training import allocator

PROBE = """
import json, resource, sys
import torch
from difforge.training.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "tune" else None
torch.empty(16 << 20).fill_(1.0)  # 64 MiB blocks: above glibc's largest automatic mmap threshold
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(15):  # once tuned, the heap settles after a few blocks (1-4 seen), then reuses one
    torch.empty(16 << 20).fill_(1.0)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"applied": applied, "faults": faults}))
"""


def _probe(mode: str, **env: str) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(allocator._glibc() is None, reason="needs Linux with glibc")
def test_freed_blocks_are_reused_instead_of_faulted_in() -> None:
    default = _probe("default")
    tuned = _probe("tune")
    assert tuned["applied"] is True
    pages = 15 * (64 << 20) // 4096  # what 15 fresh 64 MiB blocks cost in 4 KiB pages
    assert int(default["faults"]) > pages * 0.9  # glibc maps every block afresh
    assert int(tuned["faults"]) < pages * 0.5  # blocks are reused from the heap


def test_switch_off_by_environment() -> None:
    off = _probe("tune", DIFFORGE_MALLOC_TUNING="0")
    assert off["applied"] is False


def test_not_applied_off_linux(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(allocator, "_applied", None)
    monkeypatch.setattr(allocator.sys, "platform", "darwin")
    assert allocator.keep_freed_memory() is False
