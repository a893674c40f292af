"""Training-step worker for EleutherAI sparsify (``eai-sparsify``), run in its own venv by benchmarks/train_step.py.

It replays, on cached activations, exactly what ``sparsify.Trainer`` does per step with ``loss_fn="fvu"``,
``optimizer="adam"`` and default settings (``sparsify/trainer.py``): renormalise the decoder rows, forward
``SparseCoder(x, y=x, dead_mask=None, total_variance=...)`` (``auxk_alpha`` defaults to 0, so no AuxK), mark the
fired latents, ``float(fvu)`` for the running average, backward of ``fvu + auxk_alpha*auxk + multi_topk_fvu/8``,
remove the gradient parallel to the decoder rows, ``Adam.step()`` + ``zero_grad()`` (torch Adam with sparsify's
default lr rule; bitsandbytes is not installed on CPU), and the dead-latent counters. Not included: the LR
scheduler's ``step()`` (negligible) and the model forward (this benchmark starts from cached activations).
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from _protocol import load_batches, serve  # noqa: E402


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

    import sparsify
    from sparsify import SparseCoder, SparseCoderConfig

    torch.manual_seed(args.seed)
    batches = load_batches(args.acts, args.batch, args.d_in)
    sae = SparseCoder(args.d_in, SparseCoderConfig(num_latents=args.d_sae, k=args.k), device="cpu",
                      dtype=torch.float32)
    lr = 2e-4 / (sae.num_latents / (2**14)) ** 0.5  # sparsify's default for Adam
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    with torch.no_grad():  # the trainer's first-step init: b_dec = mean of the batch
        sae.b_dec.data = batches[0].mean(0)
    did_fire = torch.zeros(sae.num_latents, dtype=torch.bool)
    tokens_since_fired = torch.zeros(sae.num_latents, dtype=torch.long)

    def step(x: torch.Tensor) -> float:
        sae.set_decoder_norm_to_unit_norm()
        total_variance = (x - x.mean(0)).pow(2).sum()
        out = sae(x=x, y=x, dead_mask=None, total_variance=total_variance)
        did_fire[out.latent_indices.flatten()] = True
        fvu = float(out.fvu.detach())
        loss = out.fvu + 0.0 * out.auxk_loss + out.multi_topk_fvu / 8
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            tokens_since_fired.add_(x.shape[0])
            tokens_since_fired[did_fire] = 0
            did_fire.zero_()
        return fvu

    version = getattr(sparsify, "__version__", None)
    if version is None:
        from importlib.metadata import version as _v
        version = _v("eai-sparsify")
    serve(step, batches, args.warmup, {"tool": "sparsify", "version": version, "loss": "fvu", "lr": lr,
                                       "optimizer": "torch.optim.Adam (defaults)"})


if __name__ == "__main__":
    main()
