"""``torchrun ... -m tests.distributed.kill_worker SHARD saeforge-cli-args...``: the CLI, except that the rank that
comes to build shard SHARD dies on the spot (a kill: no error, no clean-up)."""

from __future__ import annotations

import os
import sys

from saeforge.cli import main
from saeforge.distributed import caching

if __name__ == "__main__":
    doomed = int(sys.argv[1])
    plain = caching._read_shard

    def dying(lm, token_stream, sites, plan, batch_size):
        if plan.index == doomed:
            os._exit(9)
        return plain(lm, token_stream, sites, plan, batch_size)

    caching._read_shard = dying
    sys.exit(main(sys.argv[2:]))
