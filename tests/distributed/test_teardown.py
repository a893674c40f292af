"""A rank that calls ``train()`` from a plain script under torchrun ends through the interpreter's own teardown:
the process group it started is gone (no gloo thread left) and the rank exits 0."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TRAIN_SITES as SITES

TIMEOUT_S = 240

# What a user writes: no saeforge exit helper, the interpreter exits as it always does. Each rank reports the
# threads its process still runs once train() has returned (Linux: one /proc/self/task entry per thread).
SCRIPT = '''
import json, os, sys
from pathlib import Path

from saeforge.training import TrainConfig, train

final = train(TrainConfig.from_dict(json.loads(sys.argv[1])))
names = []
for comm in sorted(Path("/proc/self/task").glob("*/comm")):
    try:
        names.append(comm.read_text().strip())
    except OSError:  # the thread ended meanwhile
        pass
Path(sys.argv[2], f"rank{os.environ['RANK']}.json").write_text(json.dumps({"threads": names, "final": final}))
'''


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="lists a process's threads through /proc")
def test_train_from_a_plain_script_leaves_no_gloo_thread_and_exits_cleanly(tiny_cache, tmp_path):
    """The optimiser built in fit() imports torch.distributed.nn.functional, whose functions take the default group
    as a default argument; imported while the group exists they held it, so gloo's threads outlived
    destroy_process_group and their teardown at exit aborted a rank now and then."""
    script, reports = tmp_path / "user_script.py", tmp_path / "reports"
    script.write_text(SCRIPT)
    reports.mkdir()
    cfg = dict(out=str(tmp_path / "run"), cache=str(tiny_cache.folder), sites=[SITES[0]], tokens=256 * 8,
               batch_size=256, d_sae=128, k=8, checkpoint_every=4, log_every=4, progress=False, device="cpu",
               lr_warmup_steps=2, threads=1)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(script), json.dumps(cfg), str(reports)],
                          capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
    ranks = [json.loads(p.read_text()) for p in sorted(reports.glob("rank*.json"))]
    assert len(ranks) == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    for rank, report in enumerate(ranks):
        assert not [name for name in report["threads"] if "gloo" in name], (rank, report["threads"])
    assert ranks[0]["final"] == ranks[1]["final"] and ranks[0]["final"][SITES[0]]["fvu"] < 1
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
