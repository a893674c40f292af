import pytest
import torch

from saeforge.errors import SaeforgeError
from saeforge.utils.threads import auto_threads, available_cpus, thread_policy


@pytest.mark.parametrize("cpus, load, threads", [
    (2, 0.1, 2),     # quiet: every CPU
    (2, 0.6, 1),     # more than half a core taken: one thread
    (2, 3.0, 1),     # overloaded: never below one
    (16, 4.2, 12),   # four cores busy elsewhere
    (16, 0.0, 16),
    (4, 1.5, 3),     # rounds half up: 2.5 -> 3
])
def test_auto_threads_uses_the_idle_cores(cpus, load, threads, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert auto_threads(cpus, load) == threads


def test_omp_num_threads_wins(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert auto_threads(16, 0.0) == 3


def test_thread_policy_sets_and_restores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    with thread_policy(1) as n:
        assert n == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with thread_policy(0) as n:
        assert 1 <= n <= available_cpus() and torch.get_num_threads() == n
    with pytest.raises(SaeforgeError, match="--threads"):
        with thread_policy(-1):
            pass


def test_busy_cpus_sees_work_that_runs_now_and_not_work_that_ended():
    """The 1-minute load average would still count a process that just ended; the measured busy share does not."""
    import subprocess
    import sys
    import time

    from saeforge.utils.threads import busy_cpus

    if busy_cpus(0.5) > available_cpus() - 1:  # a spinning process can only show where a CPU is free to take it
        pytest.skip("no CPU is idle now: the added work cannot show in the busy share")
    spin = "import time\nt = time.time()\nwhile time.time() - t < 3: pass"
    hog = subprocess.Popen([sys.executable, "-c", spin])
    try:
        time.sleep(0.5)  # the interpreter has started and spins
        during = busy_cpus(0.5)
    finally:
        hog.wait()
    after = busy_cpus(0.5)
    # one spinning process keeps about one CPU busy; once it ended, about one CPU less (other tests may run beside)
    assert during - after > 0.6, (during, after)
    assert 0.0 <= after <= available_cpus()
