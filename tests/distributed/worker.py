"""One rank of a test launch: ``torchrun ... -m tests.distributed.worker SPEC_JSON``.

SPEC: ``cfg`` (TrainConfig fields), ``rank_cfg`` ({rank: fields laid over cfg on that rank}), ``nan`` ([rank, step]:
that rank's batch, or its share of it, at that step becomes NaN), ``report`` (a folder). Writes ``report/rank{R}.json``:
``{"final": metrics}``, or ``{"error": message}`` for a SaeforgeError, which exits 2 as the CLI does (files, not
stdout: the ranks' lines may interleave).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from saeforge.distributed.process_group import exit_rank
from saeforge.errors import SaeforgeError
from saeforge.training import TrainConfig, train
from saeforge.training.config import non_default_fields


def main() -> None:
    spec = json.loads(sys.argv[1])
    rank = int(os.environ["RANK"])
    cfg = TrainConfig.from_dict({**spec["cfg"], **spec.get("rank_cfg", {}).get(str(rank), {})})
    if spec.get("nan"):
        from saeforge.distributed.training import _trainer_class

        trainer_class = _trainer_class(cfg.parallel)
        nan_rank, nan_step = spec["nan"]
        plain = trainer_class._batches

        def poisoned(self):
            for batch in plain(self):
                if rank == nan_rank and self.step == nan_step:
                    batch = {s: x.float() * float("nan") for s, x in batch.items()}
                yield batch

        trainer_class._batches = poisoned
    report = Path(spec["report"]) / f"rank{rank}.json"
    try:
        final = train(cfg, non_default_fields(cfg))
    except SaeforgeError as err:
        report.write_text(json.dumps({"error": str(err)}))
        exit_rank(2)
    report.write_text(json.dumps({"final": final}))
    exit_rank(0)  # as the CLI's entry point does under torchrun


if __name__ == "__main__":
    main()
