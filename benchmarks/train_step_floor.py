"""What a TopK training step cannot go below on this machine, beside its encoder GEMM: each part of the step timed
alone at ``benchmarks/train_step.py``'s shape (d_in 576, d_sae 4608, k 32, batch 4096), and the memory traffic
the non-GEMM parts need at the least, against the machine's measured bandwidths.

Parts (each the median of ``--repeats`` runs in one process, ``torch.get_num_threads()`` threads):

- the bound: ``torch.addmm(b, x, W, out=reused)`` in float32, and in bfloat16 with x cast each step (as
  ``train_step.py``'s gemm_f32 / gemm_bf16);
- the selection: the compiled per-row top-k right after that GEMM (the [4096, 4608] result read once), as the
  step's time with it minus the GEMM's;
- the sparse backward: one pass over the N*k selected (row, latent) pairs per side (``native.decode_backward``:
  sampled dot products + dW_dec; ``native.encode_backward``: dW_enc + db), and their column order;
- the decoder forward (``embedding_bag``, N*k decoder rows gathered);
- Adam (``torch.optim.Adam(fused=True)``) over the SAE's 5.3M parameters: it reads parameter, gradient and two
  moments and writes three of them, 7 x 4 bytes a parameter;
- the reconstruction loss and its gradient (a few passes over [N, d_in]), as the step computes them (into buffers
  reused from call to call; fresh tensors page-fault, ~10 ms here against ~1-2 ms).

The traffic floors divide the bytes a part must move by a bandwidth measured here: a streaming read (the sum of a
256 MB tensor) for Adam and the selection's read of the GEMM result, and the decoder forward's own rate of
gathering N*k whole rows of a table that fits the L3 cache for the passes over the selected pairs (each reads a
row of g or x per pair).

    .venv/bin/python benchmarks/train_step_floor.py --acts benchmarks/.work/acts_smollm2_l5.npy

Writes ``benchmarks/results/train_step_floor.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def _time(fn, repeats: int) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--acts", required=True, help="float32 .npy [N, d_in] of cached activations (make_acts.py)")
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--d-sae", type=int, default=4608)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", default=str(HERE / "results" / "train_step_floor.json"))
    args = ap.parse_args(argv)

    from common import machine
    from saeforge.kernels import native
    from saeforge.saes import TopKConfig, make_sae

    if not native.available():
        raise SystemExit("the compiled kernels are not available (no C compiler, or SAEFORGE_NATIVE_KERNELS=0)")
    load_before = os.getloadavg()
    arr = np.load(args.acts, mmap_mode="r")
    x = torch.from_numpy(np.array(arr[: args.batch], dtype=np.float32))
    n, d = x.shape
    m, k, r = args.d_sae, args.k, args.repeats
    sae = make_sae(TopKConfig(d_in=d, d_sae=m, k=k))
    sae.init_from_data(x)
    W, b, W_dec = sae.W_enc.detach(), sae.b_enc.detach(), sae.W_dec.detach()
    ms: dict[str, float] = {}

    pre = torch.empty(n, m)
    ms["gemm_f32 (the bound)"] = _time(lambda: torch.addmm(b, x, W, out=pre), r)
    Wb, bb, preb = W.bfloat16(), b.bfloat16(), torch.empty(n, m, dtype=torch.bfloat16)
    ms["gemm_bf16 (the bound)"] = _time(lambda: torch.addmm(bb, x.bfloat16(), Wb, out=preb), r)
    ms["top-k after the f32 GEMM"] = _time(lambda: (torch.addmm(b, x, W, out=pre), native.topk_rows(pre, k)), r) \
        - ms["gemm_f32 (the bound)"]
    ms["top-k after the bf16 GEMM"] = _time(lambda: (torch.addmm(bb, x.bfloat16(), Wb, out=preb),
                                                     native.topk_rows(preb, k)), r) - ms["gemm_bf16 (the bound)"]

    vals, idx = native.topk_rows(pre, k)
    rows = torch.arange(n).repeat_interleave(k)
    cols, values = idx.reshape(-1), vals.reshape(-1).relu()
    g = torch.randn(n, d)
    ms["column order (counting sort)"] = _time(lambda: native.csc_order(cols, m), r)
    order = native.csc_order(cols, m)
    ms["pass over the pairs: decoder (dv, dW_dec)"] = _time(
        lambda: native.decode_backward(g, W_dec, values, rows, order, dv=True, dW=True), r)
    ms["pass over the pairs: encoder (dW_enc, db)"] = _time(
        lambda: native.encode_backward(x, values, rows, order, m, db=True), r)
    offsets = torch.arange(0, n * k, k)
    ms["decoder forward (embedding_bag)"] = _time(
        lambda: torch.nn.functional.embedding_bag(cols, W_dec, offsets, mode="sum", per_sample_weights=values), r)
    from saeforge.kernels.buffers import StepBuffers
    from saeforge.saes.topk import _SquaredErrorFn

    x_hat = torch.randn(n, d, requires_grad=True)
    loss_buffers = StepBuffers()

    def loss_and_gradient():  # as the step computes them: into buffers reused from call to call
        x_hat.grad = None  # frees the last gradient's buffer, as the trainer's zero_grad(set_to_none=True) does
        _SquaredErrorFn.apply(x_hat, x, loss_buffers).backward()

    ms["loss + its gradient (the step's, reused buffers)"] = _time(loss_and_gradient, r)

    params = [p for p in sae.parameters()]
    n_params = sum(p.numel() for p in params)
    for p in params:
        p.grad = torch.randn_like(p)
    opt = torch.optim.Adam(params, lr=1e-6, fused=True)
    ms["Adam (fused) over the parameters"] = _time(opt.step, r)

    # bandwidths: reading a 256 MB tensor (a reduction: no write traffic), and reading N*k whole rows of a table
    # that fits the L3 cache (embedding_bag sums them into N rows: little write traffic) — the decoder forward
    # itself, so the pair passes are held to the rate the best existing gather reaches here
    big = torch.randn(256 * 2**20 // 4)
    stream_gbs = big.numel() * 4 / _time(big.sum, r) / 1e9
    gather_gbs = n * k * d * 4 / ms["decoder forward (embedding_bag)"] / 1e9
    floors_ms = {
        "Adam: 7 x 4 bytes a parameter at the streaming bandwidth": 1e3 * 28 * n_params / (stream_gbs * 1e9),
        "top-k: one read of the f32 GEMM result at the streaming bandwidth": 1e3 * n * m * 4 / (stream_gbs * 1e9),
        "pairs: two row reads per pair (g and x) at the row-gather bandwidth":
            1e3 * 2 * n * k * d * 4 / (gather_gbs * 1e9),
    }
    times_ms = {name: 1e3 * v for name, v in ms.items()}
    non_gemm = [name for name in times_ms if "GEMM" not in name and "bound" not in name]
    f32_parts = sum(times_ms[p] for p in non_gemm if "bf16" not in p)
    bf16_parts = sum(times_ms[p] for p in non_gemm if "f32" not in p)
    sum_f32 = times_ms["gemm_f32 (the bound)"] + f32_parts
    sum_bf16 = times_ms["gemm_bf16 (the bound)"] + bf16_parts
    report = {
        "benchmark": "the parts of a TopK training step timed alone, and their memory-traffic floors",
        "machine": machine(), "load_average_before_after": [list(load_before), list(os.getloadavg())],
        "config": {"batch": n, "d_in": d, "d_sae": m, "k": k, "repeats": r, "parameters": n_params},
        "bandwidth_GBps": {"streaming read": stream_gbs, "row gather (table in L3)": gather_gbs},
        "parts_ms": times_ms,
        "traffic_floors_ms": floors_ms,
        "sum_of_parts_ms": {"float32": sum_f32, "bfloat16 encoder": sum_bf16},
        "best_pct_of_bound_from_the_parts": {"float32": 100 * times_ms["gemm_f32 (the bound)"] / sum_f32,
                                             "bfloat16": 100 * times_ms["gemm_bf16 (the bound)"] / sum_bf16},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    for name, v in times_ms.items():
        print(f"{name:50s} {v:7.2f} ms")
    print(f"\nstreaming {stream_gbs:.1f} GB/s, row gather {gather_gbs:.1f} GB/s")
    for name, v in floors_ms.items():
        print(f"floor  {name:72s} {v:6.2f} ms")
    print(f"\nsum of the parts: float32 {sum_f32:.1f} ms = the bound's "
          f"{report['best_pct_of_bound_from_the_parts']['float32']:.0f} %; bfloat16 {sum_bf16:.1f} ms = "
          f"{report['best_pct_of_bound_from_the_parts']['bfloat16']:.0f} %")
    print(f"load average before/after: {load_before[0]:.2f} / {os.getloadavg()[0]:.2f}   wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
