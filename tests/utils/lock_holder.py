"""A separate process holding a folder's lock, for the tests of commands that must refuse a second writer."""

import contextlib
import subprocess
import sys
import textwrap


@contextlib.contextmanager
def lock_held_elsewhere(folder, what):
    """Yield the pid of a child process holding ``exclusive_lock(folder, what)``; the child is killed after."""
    code = textwrap.dedent(f"""
        import time
        from saeforge.utils.locking import exclusive_lock
        with exclusive_lock({str(folder)!r}, {what!r}):
            print("held", flush=True)
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()
