"""Training-step worker for SAELens (``sae-lens``), run in its own venv by benchmarks/train_step.py.

It runs SAELens's own training loop, ``SAETrainer(...).fit()`` with a ``TopKTrainingSAE`` (SAELens defaults:
``rescale_acts_by_decoder_norm=True`` is its decoder-norm handling, AuxK on dead latents, grad-norm clipping at
1.0, Adam, LR scheduler, firing statistics), fed by a data provider that hands out the cached batches. A step is
timed from the moment the provider hands a batch to the trainer to the moment the trainer asks for the next one,
so it covers everything ``fit()`` does per step; between rounds the provider blocks on the coordinator (not timed).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from _protocol import commands, environment, load_batches, send  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--acts", required=True)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--d-in", type=int, default=576)
    ap.add_argument("--d-sae", type=int, default=4608)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from importlib.metadata import version

    from sae_lens import LoggingConfig, SAETrainer, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig

    torch.manual_seed(args.seed)
    batches = load_batches(args.acts, args.batch, args.d_in)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=args.d_in, d_sae=args.d_sae, k=args.k, device="cpu",
                                                dtype="float32"))
    lr = 2e-4 / (args.d_sae / (2**14)) ** 0.5  # the same lr as the other tools (speed does not depend on it)
    cfg = SAETrainerConfig(total_training_samples=args.batch * 10**9, train_batch_size_samples=args.batch, lr=lr,
                           lr_end=lr, device="cpu", logger=LoggingConfig(log_to_wandb=False))

    losses: list[float] = []

    def provider():
        i = 0
        for _ in range(args.warmup):
            yield batches[i % len(batches)]
            i += 1
        send({"ready": True, "env": environment({"tool": "saelens", "version": version("sae-lens"), "lr": lr,
                                                 "loss": "mse_loss (sum over d, mean over batch) + aux",
                                                 "optimizer": "SAETrainer's Adam"}),
              "warmup_losses": [float(v) for v in losses]})
        losses.clear()
        for n, skip in commands():
            times = []
            for j in range(skip + n):
                x = batches[i % len(batches)]
                i += 1
                t0 = time.perf_counter()
                yield x  # the trainer runs one full step, then asks for the next batch
                if j >= skip:
                    times.append(time.perf_counter() - t0)
            send({"times": times, "losses": [float(v) for v in losses[-n:]], "steps_done": i})
            losses.clear()
        sys.stdout.flush()
        os._exit(0)

    trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=provider())
    train_step = trainer._train_step

    def recording_train_step(*a, **kw):  # keep the loss for the sanity report (no sync inside the step)
        out = train_step(*a, **kw)
        losses.append(out.loss.detach())
        return out

    trainer._train_step = recording_train_step
    trainer.fit()


if __name__ == "__main__":
    main()
