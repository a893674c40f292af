import subprocess
import sys
import textwrap

import pytest

from saeforge.errors import SaeforgeError
from saeforge.utils.locking import LOCK_FILE, exclusive_lock


def test_a_second_holder_is_refused_and_the_lock_is_released_after(tmp_path):
    with exclusive_lock(tmp_path, "saeforge cache"):
        with pytest.raises(SaeforgeError, match="in use by pid"):
            with exclusive_lock(tmp_path, "saeforge cache"):
                pass
    with exclusive_lock(tmp_path, "saeforge cache"):  # free again
        pass
    assert (tmp_path / LOCK_FILE).is_file()


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    code = textwrap.dedent(f"""
        import os, sys, time
        from saeforge.utils.locking import exclusive_lock
        with exclusive_lock({str(tmp_path)!r}, "test"):
            print("held", flush=True)
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(SaeforgeError, match=f"pid {proc.pid}"):
            with exclusive_lock(tmp_path, "test"):
                pass
    finally:
        proc.kill()
        proc.wait()
    with exclusive_lock(tmp_path, "test"):
        pass
