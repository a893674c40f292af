"""The transcoder side of ``benchmarks/interop.py``, run in a peer's own virtual environment (SAELens or sparsify;
imports only that tool, torch and numpy). Each command prints one ``@@INTEROP <json>`` line at the end and writes
the peer's own encodings (dense [E, d_sae]) and outputs ([E, d_out], skip term included) of the last E rows of X.

    sparsify-make --x X.npy --y Y.npy --eval-rows E --out DIR   sparsify trains a skip transcoder (transcode=True,
                                                                skip_connection=True) from X to Y and saves it
    sparsify-load --x X.npy --eval-rows E --sae DIR --out P     SparseCoder.load_from_disk(DIR): P.enc.npy, P.out.npy
    saelens-make  --x X.npy --eval-rows E --out DIR             a SAELens JumpReLUSkipTranscoder with random weights
                                                                and thresholds, saved with save_model
    saelens-load  --x X.npy --eval-rows E --sae DIR --out P     SAE.load_from_disk(DIR): P.enc.npy, P.out.npy
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _protocol import eval_rows, reply_interop  # noqa: E402


def _sparsify_outputs(sae, x):
    with torch.no_grad():
        enc = sae.encode(x)
        dense = torch.zeros(x.shape[0], sae.num_latents).scatter_(1, enc.top_indices, enc.top_acts.float())
        out = sae(x).sae_out.float()
    return dense.numpy(), out.numpy()


def sparsify_make(args) -> None:
    from importlib.metadata import version

    from sparsify import SparseCoder, SparseCoderConfig

    torch.manual_seed(args.seed)
    x_all, y_all = np.load(args.x, mmap_mode="r"), np.load(args.y, mmap_mode="r")
    n_train = x_all.shape[0] - args.eval_rows
    d_in = x_all.shape[1]
    sae = SparseCoder(d_in, SparseCoderConfig(num_latents=args.d_sae, k=args.k, transcode=True, skip_connection=True),
                      device="cpu")
    opt = torch.optim.Adam(sae.parameters(), lr=args.lr)
    t0 = time.perf_counter()
    n_batches = max(1, n_train // args.batch)
    for step in range(args.steps):
        j = step % n_batches
        x = torch.from_numpy(np.array(x_all[j * args.batch:(j + 1) * args.batch], dtype=np.float32))
        y = torch.from_numpy(np.array(y_all[j * args.batch:(j + 1) * args.batch], dtype=np.float32))
        out = sae(x, y)
        out.fvu.backward()
        opt.step()
        opt.zero_grad()
    sae.save_to_disk(args.out)
    enc, out = _sparsify_outputs(sae, eval_rows(args.x, args.eval_rows))
    np.save(os.path.join(args.out, "enc.npy"), enc)
    np.save(os.path.join(args.out, "out.npy"), out)
    reply_interop({"tool": "sparsify", "version": version("eai-sparsify"), "steps": args.steps,
                   "train_seconds": round(time.perf_counter() - t0, 1), "d_sae": args.d_sae, "k": args.k})


def sparsify_load(args) -> None:
    from sparsify import SparseCoder

    sae = SparseCoder.load_from_disk(args.sae, device="cpu")
    enc, out = _sparsify_outputs(sae, eval_rows(args.x, args.eval_rows))
    np.save(args.out + ".enc.npy", enc)
    np.save(args.out + ".out.npy", out)
    reply_interop({"tool": "sparsify", "loaded": args.sae, "transcode": bool(sae.cfg.transcode),
                   "skip_connection": bool(sae.cfg.skip_connection)})


def _saelens_outputs(sae, x):
    with torch.no_grad():
        return sae.encode(x).float().numpy(), sae(x).float().numpy()


def saelens_make(args) -> None:
    from importlib.metadata import version

    from sae_lens import JumpReLUSkipTranscoder, JumpReLUSkipTranscoderConfig

    torch.manual_seed(args.seed)
    x = eval_rows(args.x, args.eval_rows)
    d_in = x.shape[1]
    sae = JumpReLUSkipTranscoder(JumpReLUSkipTranscoderConfig(d_in=d_in, d_sae=args.d_sae, d_out=d_in,
                                                              apply_b_dec_to_input=False, device="cpu",
                                                              dtype="float32"))
    with torch.no_grad():  # random weights at the scale of the data, thresholds that keep a few dozen latents
        scale = float(x.norm(dim=1).mean())
        sae.W_enc.copy_(torch.randn(d_in, args.d_sae) / scale)
        sae.b_enc.copy_(0.1 * torch.randn(args.d_sae))
        sae.threshold.copy_(2.0 + 0.5 * torch.rand(args.d_sae))
        sae.W_dec.copy_(torch.randn(args.d_sae, d_in) / d_in**0.5)
        sae.b_dec.copy_(0.1 * torch.randn(d_in))
        sae.W_skip.copy_(0.1 * torch.randn(d_in, d_in) / d_in**0.5)
    sae.eval()
    sae.save_model(args.out)
    enc, out = _saelens_outputs(sae, x)
    np.save(os.path.join(args.out, "enc.npy"), enc)
    np.save(os.path.join(args.out, "out.npy"), out)
    reply_interop({"tool": "saelens", "version": version("sae-lens"), "d_sae": args.d_sae,
                   "eval_l0": float((enc > 0).sum(1).mean())})


def saelens_load(args) -> None:
    from sae_lens import SAE

    sae = SAE.load_from_disk(args.sae, device="cpu")
    sae.eval()
    enc, out = _saelens_outputs(sae, eval_rows(args.x, args.eval_rows))
    np.save(args.out + ".enc.npy", enc)
    np.save(args.out + ".out.npy", out)
    reply_interop({"tool": "saelens", "loaded": args.sae, "class": type(sae).__name__})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", choices=["sparsify-make", "sparsify-load", "saelens-make", "saelens-load"])
    ap.add_argument("--x", required=True)
    ap.add_argument("--y", default="")
    ap.add_argument("--eval-rows", type=int, default=1024)
    ap.add_argument("--out", required=True)
    ap.add_argument("--sae", default="")
    ap.add_argument("--d-sae", type=int, default=2304)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("INTEROP_THREADS", "2")))
    {"sparsify-make": sparsify_make, "sparsify-load": sparsify_load, "saelens-make": saelens_make,
     "saelens-load": saelens_load}[args.cmd](args)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
