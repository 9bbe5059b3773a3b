"""CPU threads on a shared machine: give a busy core back instead of spinning for it.

PyTorch's CPU kernels run on one OpenMP thread per core. When another process is busy on one
of those cores, each parallel region waits for its slowest thread, the thread that has to
share a core, while the others spin; a training step then slows far more than the 2x a fair
share would cost (4-6x on 2 cores, ``bench/contention.py``). `ThreadGovernor` watches how
much CPU the *other* processes use and runs torch on the cores they leave free:

    busy_others = (d busy jiffies of the whole machine) / HZ - (d CPU seconds of this process)
    threads     = min(start, clamp(cores - round_down(busy_others + 1 - THRESHOLD), 1, cores))

with ``cores`` this process's CPU affinity and ``start`` torch's thread count when the
governor was made (never more: torch's default may leave hyper-threads out on purpose),
measured over at least ``interval_s`` of wall time (``/proc/stat`` and ``os.times``; about
20 microseconds per look). On an idle machine nothing changes, so the idle speed is untouched;
without ``/proc/stat`` (not Linux) the governor does nothing.
"""

from __future__ import annotations

import math
import os
import time

import torch

from difforge.errors import DifforgeError

THRESHOLD = 0.5
"""A core counts as taken by others once they use more than this share of it."""


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def machine_busy_seconds() -> float | None:
    """CPU seconds all cores have spent busy since boot (``/proc/stat``'s first line, minus
    idle and iowait), or None where ``/proc/stat`` cannot be read."""
    try:
        with open("/proc/stat", encoding="ascii") as stat:
            fields = stat.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    jiffies = [int(value) for value in fields[1:9]]  # user nice system idle iowait irq softirq steal
    busy = sum(jiffies) - jiffies[3] - jiffies[4]
    return busy / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU seconds of this process, all its threads (user + system)."""
    times = os.times()
    return times.user + times.system


def threads_for(cores: int, busy_others: float) -> int:
    """Threads to run when other processes keep ``busy_others`` cores busy (see the module)."""
    taken = max(0, math.floor(busy_others + 1.0 - THRESHOLD))
    return min(cores, max(1, cores - taken))


class ThreadGovernor:
    """Adapts ``torch.set_num_threads`` to the cores other processes leave free.

    Call `tick` once per training step; it looks at the machine at most every
    ``interval_s`` seconds. ``enabled=False`` (a fixed ``--threads N``, a GPU run, several
    processes of one run on one machine) makes it do nothing."""

    def __init__(self, enabled: bool = True, interval_s: float = 2.0, cores: int | None = None) -> None:
        self.cores = cores or available_cores()
        self.interval_s = interval_s
        self.enabled = enabled and self.cores > 1 and machine_busy_seconds() is not None
        self.threads = self.start = torch.get_num_threads()
        self.changes = 0
        self._mark = self._look(time.monotonic())

    @staticmethod
    def _look(now: float) -> tuple[float, float, float]:
        return now, machine_busy_seconds() or 0.0, own_cpu_seconds()

    def tick(self) -> int:
        """Re-decide the thread count when ``interval_s`` has passed; returns the count.
        Between decisions it reads only the clock."""
        wall_now = time.monotonic()
        if not self.enabled or wall_now - self._mark[0] < self.interval_s:
            return self.threads
        now = self._look(wall_now)
        wall = now[0] - self._mark[0]
        busy_others = max(0.0, (now[1] - self._mark[1]) - (now[2] - self._mark[2])) / wall
        self._mark = now
        wanted = min(self.start, threads_for(self.cores, busy_others))
        if wanted != self.threads:
            torch.set_num_threads(wanted)
            self.threads = wanted
            self.changes += 1
        return self.threads


def parse_threads(value: object) -> int | None:
    """``--threads``: ``auto`` (None: adapt to a busy machine) or a fixed count N >= 1."""
    if value == "auto":
        return None
    try:
        count = int(str(value))
    except ValueError:
        count = 0
    if count < 1 or count > 4096:
        raise DifforgeError(f"--threads must be auto or a thread count from 1 to 4096, got {value!r}")
    return count
