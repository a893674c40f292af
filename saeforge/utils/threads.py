"""How many CPU threads PyTorch uses: one policy for every command that computes (``--threads``, 0 = automatic).

Eager PyTorch on CPU runs each parallel op on all its threads and waits for the slowest, so a thread that has to
share its core with another process stalls every op: on a 2-core machine under load a TopK run went from 2,500 to
13,600 tokens/s with one thread instead of two. The automatic choice is therefore the cores that are actually
free, not the cores that exist:

    threads = clamp(round(cpus - load), 1, cpus)

with ``cpus`` the CPUs this process may run on (its affinity set, which also honours container CPU pinning) and
``load`` the cores other work keeps busy *now*: the busy share of those CPUs over a short window (``/proc/stat``,
sampled while this process waits, so it does not count itself). Not the 1-minute load average: it lags, so a
command started right after another (a benchmark's rounds, a script's steps) saw the finished one's load and ran on
half the cores of a quiet 2-core machine (cache at 53 % of the bare read instead of 95 %). The load average is the
fallback where ``/proc/stat`` is missing. On a quiet machine that is every CPU; each core's worth of other work takes
one thread away.
``OMP_NUM_THREADS``, when set, is the user's explicit choice and wins over the automatic one.

``benchmarks/train_step.py --threads 1,2`` measures the effect on a given machine.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

from saeforge.errors import SaeforgeError

__all__ = ["auto_threads", "available_cpus", "busy_cpus", "thread_policy"]


def available_cpus() -> int:
    """CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


BUSY_WINDOW_S = 0.2
"""How long :func:`busy_cpus` watches the CPUs: long enough to smooth a scheduler tick, short against any command."""


def _cpu_times(cpus: set[int]) -> tuple[float, float] | None:
    """(idle, total) jiffies summed over ``cpus``, from /proc/stat; None where it cannot be read."""
    try:
        with open("/proc/stat") as f:
            lines = f.readlines()
    except OSError:
        return None
    idle = total = 0.0
    for line in lines:
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
            continue
        values = [float(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
        idle += values[3] + values[4]
        total += sum(values)
    return (idle, total) if total > 0 else None


def busy_cpus(window: float = BUSY_WINDOW_S) -> float:
    """How many of this process's CPUs other work keeps busy, measured over ``window`` seconds (this process sleeps
    meanwhile); the 1-minute load average where /proc/stat is missing."""
    import time

    try:
        cpus = os.sched_getaffinity(0)
    except (AttributeError, OSError):
        cpus = set(range(os.cpu_count() or 1))
    before = _cpu_times(cpus)
    if before is not None:
        time.sleep(window)
        after = _cpu_times(cpus)
        if after is not None and after[1] > before[1]:
            return len(cpus) * (1.0 - (after[0] - before[0]) / (after[1] - before[1]))
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # no load average on this platform: assume a quiet machine
        return 0.0


def auto_threads(cpus: int | None = None, load: float | None = None) -> int:
    """The automatic thread count (module docstring); ``cpus`` / ``load`` default to this machine's."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    cpus = available_cpus() if cpus is None else cpus
    if load is None:
        load = busy_cpus()
    return max(1, min(cpus, int(cpus - load + 0.5)))


@contextlib.contextmanager
def thread_policy(threads: int) -> Iterator[int]:
    """Run the block with ``threads`` PyTorch threads (0: :func:`auto_threads`), restoring the previous count after,
    so an API caller's process keeps its own setting. Yields the count in use."""
    import torch

    if threads < 0:
        raise SaeforgeError(f"--threads must be 0 (automatic) or positive, got {threads}", "pass --threads 0")
    n = threads or auto_threads()
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)
