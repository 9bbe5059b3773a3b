"""Keep the memory a CPU training step frees for the next step (glibc malloc settings).

PyTorch's CPU tensors come from the C library's ``malloc``. glibc serves large blocks with
fresh ``mmap`` calls and returns freed memory at the top of its heap to the operating system,
so each training step, which frees almost all of its activations at its end, maps the same
hundreds of megabytes again in the next step and takes a page fault (and a page of zeroing)
for every 4 KiB of it. On the reference 2-core VM that is about 100 ms of system time per step
of the default `mnist` job: 509 ms per step instead of 442 (`bench/allocator.py`,
`docs/benchmarks.md`).

`keep_freed_memory` raises glibc's mmap and trim thresholds (``mallopt``) so that freed blocks
stay in the heap and are reused. The cost: the process keeps its peak heap until it exits
instead of shrinking between steps. It changes nothing but speed and resident memory, and only
on Linux with glibc; ``DIFFORGE_MALLOC_TUNING=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import os
import sys

ENV_SWITCH = "DIFFORGE_MALLOC_TUNING"

# mallopt parameter numbers from glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

# Blocks up to this size come from the heap. The glibc 2.36 of the reference machine accepts
# it; a glibc that refuses gets 32 MiB, the largest value glibc has always accepted on 64-bit.
MMAP_THRESHOLD = 1 << 30
MMAP_THRESHOLD_FALLBACK = 32 << 20
TRIM_THRESHOLD = (1 << 31) - 1  # mallopt takes an int: never trim below 2 GiB of free top

_applied: bool | None = None


def _glibc() -> ctypes.CDLL | None:
    if sys.platform != "linux":
        return None
    try:
        libc = ctypes.CDLL(None)  # the C library already loaded into this process
        libc.gnu_get_libc_version  # noqa: B018 (only glibc has it; musl's mallopt is a no-op)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return libc


def keep_freed_memory() -> bool:
    """Set glibc's malloc to keep and reuse freed blocks (see the module docstring).

    Idempotent; returns True if the settings are in effect, False where they do not apply
    (not Linux/glibc, ``DIFFORGE_MALLOC_TUNING=0``, or glibc refused them).
    """
    global _applied
    if _applied is not None:
        return _applied
    libc = None if os.environ.get(ENV_SWITCH, "1") == "0" else _glibc()
    if libc is None:
        _applied = False
        return False
    mmap_ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    if not mmap_ok:
        mmap_ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_FALLBACK) == 1
    _applied = mmap_ok and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    return _applied
