"""How many CPU threads PyTorch uses: one policy for every command that computes (``--threads``, 0 = automatic).

Eager PyTorch on CPU runs each parallel op on all its threads and waits for the slowest, so a thread that has to
share its core with another process stalls every op: on a 2-core machine under load a TopK run went from 2,500 to
13,600 tokens/s with one thread instead of two. The automatic choice is therefore the cores that are actually
free, not the cores that exist:

    threads = clamp(round(cpus - load), 1, cpus)

with ``cpus`` the CPUs this process may run on (its affinity set, which also honours container CPU pinning) and
``load`` the machine's 1-minute load average (runnable processes, ours not yet among them since this runs before
the work starts). On a quiet machine that is every CPU; each core's worth of other work takes one thread away.
``OMP_NUM_THREADS``, when set, is the user's explicit choice and wins over the automatic one.

``benchmarks/train_step.py --threads 1,2`` measures the effect on a given machine.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

from saeforge.errors import SaeforgeError

__all__ = ["auto_threads", "available_cpus", "thread_policy"]


def available_cpus() -> int:
    """CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def auto_threads(cpus: int | None = None, load: float | None = None) -> int:
    """The automatic thread count (module docstring); ``cpus`` / ``load`` default to this machine's."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    cpus = available_cpus() if cpus is None else cpus
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):  # no load average on this platform: assume a quiet machine
            load = 0.0
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
