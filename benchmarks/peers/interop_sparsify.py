"""sparsify side of ``benchmarks/interop.py``, run in the sparsify virtual environment (imports only sparsify,
torch, numpy). Two commands; each prints one ``@@INTEROP <json>`` line at the end.

    train  --acts A.npy --eval-rows E --out DIR ...   a SparseCoder trained on the first rows of A (batches in file
                                                      order) with the per-step work of sparsify's Trainer (as in
                                                      sparsify_worker.py: b_dec initialised to the first batch's
                                                      mean, unit-norm decoder, FVU loss, gradient projection, Adam),
                                                      saved with save_to_disk(DIR/layers.5) beside a run-root
                                                      config.json; its own encode of the last E rows (top-k values
                                                      scattered to dense) -> DIR/encodings.npy.
    encode --acts A.npy --eval-rows E --sae DIR=OUT.npy [...]
                                                      SparseCoder.load_from_disk(DIR).encode(last E rows) -> OUT.npy
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _protocol import eval_rows, interop_main, reply_interop  # noqa: E402


def dense(sae, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        out = sae.encode(x)
        f = torch.zeros(x.shape[0], sae.num_latents, dtype=out.top_acts.dtype)
        f.scatter_(1, out.top_indices, out.top_acts)
    return f.numpy()


def train(args) -> None:
    from importlib.metadata import version

    from sparsify import SparseCoder, SparseCoderConfig

    torch.manual_seed(args.seed)
    arr = np.load(args.acts, mmap_mode="r")
    n_train = arr.shape[0] - args.eval_rows
    n_batches = n_train // args.batch
    if n_batches < 1:
        raise SystemExit(f"{args.acts}: too few rows for batch {args.batch} after holding out {args.eval_rows}")
    d_in = arr.shape[1]
    sae = SparseCoder(d_in, SparseCoderConfig(num_latents=args.d_sae, k=args.k), device="cpu", dtype=torch.float32)
    lr = args.lr if args.lr > 0 else 2e-4 / (sae.num_latents / (2**14)) ** 0.5  # sparsify's default for Adam
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    t0 = time.perf_counter()
    for step in range(args.steps):
        j = step % n_batches
        x = torch.from_numpy(np.array(arr[j * args.batch:(j + 1) * args.batch], dtype=np.float32))
        if step == 0:
            with torch.no_grad():
                sae.b_dec.data = x.mean(0)
        sae.set_decoder_norm_to_unit_norm()
        out = sae(x=x, y=x, dead_mask=None, total_variance=(x - x.mean(0)).pow(2).sum())
        (out.fvu + out.multi_topk_fvu / 8).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
    sae.set_decoder_norm_to_unit_norm()
    seconds = time.perf_counter() - t0
    folder = os.path.join(args.out, "layers.5")
    sae.save_to_disk(folder)
    with open(os.path.join(args.out, "config.json"), "w") as fh:  # the run-root file sparsify's Trainer writes
        json.dump({"model": "HuggingFaceTB/SmolLM2-135M-Instruct", "hookpoints": ["layers.5"], "ctx_len": 128}, fh)
    x = eval_rows(args.acts, args.eval_rows)
    enc = dense(sae, x)
    np.save(os.path.join(args.out, "encodings.npy"), enc)
    with torch.no_grad():
        fvu = float(sae(x=x).fvu)
    reply_interop({"tool": "sparsify", "version": version("eai-sparsify"), "torch": torch.__version__,
                   "steps": args.steps, "batch": args.batch, "d_in": d_in, "d_sae": args.d_sae, "k": args.k, "lr": lr,
                   "train_seconds": seconds, "eval_fvu": fvu, "eval_l0": float((enc > 0).sum(1).mean()),
                   "folder": folder})


def encode(args) -> None:
    from sparsify import SparseCoder

    x = eval_rows(args.acts, args.eval_rows)
    out = []
    for spec in args.sae:
        folder, target = spec.split("=", 1)
        sae = SparseCoder.load_from_disk(folder, device="cpu")
        np.save(target, dense(sae, x))
        out.append({"folder": folder, "k": sae.cfg.k, "transcode": sae.cfg.transcode, "num_latents": sae.num_latents})
    reply_interop({"tool": "sparsify", "loaded": out})


def main() -> None:
    interop_main(train, encode, lr_help="0: sparsify's default rule for Adam")


if __name__ == "__main__":
    main()
