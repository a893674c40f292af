"""`saeforge harvest` under torchrun (gloo, 2 CPU processes) fills the store one process fills."""

from __future__ import annotations

import os
import random
import shutil
import sqlite3
import subprocess
import sys

import pytest

from saeforge.features.harvest import HarvestConfig, harvest
from tests.conftest import TEXT

OPTIONS = dict(tokens=64 * 20, batch_size=3, top_examples=5, quantile_bins=4, examples_per_bin=2, random_examples=3,
               n_logits=5, n_neighbors=4, device="cpu")
TIMING = ("stream_tokens_per_s", "harvest_seconds", "created")


def _tables(store) -> dict[str, list]:
    con = sqlite3.connect(store)
    try:
        names = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        out = {n: sorted(map(repr, con.execute(f"SELECT * FROM {n}"))) for n in names if n not in ("meta", "saes")}
        out["meta"] = sorted(r for r in con.execute("SELECT key, value FROM meta") if r[0] not in TIMING)
        out["saes"] = sorted(con.execute("SELECT name, site, d_sae, architecture FROM saes"))
        return out
    finally:
        con.close()


@pytest.mark.slow  # a model on each rank, about 20 s
def test_two_ranks_fill_the_store_one_process_fills(tiny_run, tmp_path):
    text = tmp_path / "heldout.txt"
    rng = random.Random(2)
    text.write_text(" ".join(rng.choice(TEXT.split()) for _ in range(3000)))
    one, two = tmp_path / "one", tmp_path / "two"
    shutil.copytree(tiny_run, one)
    shutil.copytree(tiny_run, two)
    store = harvest(HarvestConfig(path=str(one), corpus=str(text), progress=False, **OPTIONS))
    args = [str(two), "--corpus", str(text), "--progress", "false"]
    for key, value in OPTIONS.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "-m", "saeforge", "harvest", *args], capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    a, b = _tables(store), _tables(two / store.name)
    assert a.keys() == b.keys() and len(a["examples"]) > 100 and len(a["contexts"]) == 20
    for table in a:
        assert a[table] == b[table], table
