"""sparsify side of ``benchmarks/quality_cached.py``, run in the sparsify virtual environment (imports only
sparsify, torch, numpy).

It trains a TopK ``SparseCoder`` with the per-step work of sparsify's ``Trainer`` under its *default* settings
(sparsify 1.3 ``trainer.py``): ``b_dec`` set to the first batch's mean, decoder rows renormalised before every
forward, FVU loss, no AuxK (``auxk_alpha`` 0), the gradient parallel to the decoder rows removed, and the default
optimizer: ``ScheduleFreeWrapper(SignSGD, momentum=0.95)`` at lr 5e-3 / sqrt(num_latents / 2^14), switched to its
averaged weights (``eval()``) before saving, as the Trainer does. Batches are read in file order (the coordinator
writes the file shuffled). Prints one ``@@QUALITY <json>`` line.
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("WANDB_MODE", "disabled")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from _protocol import batch_at, quality_run, reply_quality  # noqa: E402


def main() -> None:
    args, arr = quality_run()

    from importlib.metadata import version

    from schedulefree import ScheduleFreeWrapper
    from sparsify import SparseCoder, SparseCoderConfig
    from sparsify.sign_sgd import SignSGD

    sae = SparseCoder(arr.shape[1], SparseCoderConfig(num_latents=args.d_sae, k=args.k), device="cpu",
                      dtype=torch.float32)
    lr = 5e-3 / (sae.num_latents / 2**14) ** 0.5  # sparsify's default for its default optimizer, signum
    opt = ScheduleFreeWrapper(SignSGD([{"params": sae.parameters(), "lr": lr}]), momentum=0.95)
    opt.train()
    t0 = time.perf_counter()
    for step in range(args.steps):
        x = batch_at(arr, step, args.batch)
        if step == 0:
            sae.b_dec.data = x.mean(0)
        sae.set_decoder_norm_to_unit_norm()
        out = sae(x=x, y=x, dead_mask=None, total_variance=(x - x.mean(0)).pow(2).sum())
        out.fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
    opt.eval()  # the averaged weights, which is what sparsify's Trainer saves
    seconds = time.perf_counter() - t0
    folder = os.path.join(args.out, "layers.5")
    sae.save_to_disk(folder)
    reply_quality({
        "tool": "sparsify", "version": version("eai-sparsify"), "steps": args.steps, "batch": args.batch,
        "tokens": args.steps * args.batch, "lr": lr, "optimizer": "ScheduleFree(SignSGD), momentum 0.95",
        "train_seconds": seconds, "sae_dir": folder})


if __name__ == "__main__":
    main()
