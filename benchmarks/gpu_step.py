"""The CUDA paths of the sparse TopK kernels, checked and timed in one command on a GPU machine.

The kernels in ``saeforge/kernels/sparse_topk.py`` are written to run on CUDA (``embedding_bag``, ``sampled_addmm``
on a CSR pattern, ``torch.topk``; the CPU-only workspace, two-level and compiled selections are skipped there), but
no GPU has been available to run them. This script, on the device it is given:

1. checks the fast kernels against the plain-PyTorch reference (``impl="reference"``) on the benchmark's shape:
   the same latents, and loss and gradients within the float32 tolerances of ``tests/kernels`` (bfloat16 encoder:
   the same latents, gradients within the bfloat16 ones);
2. times the TopK training step (forward, backward, fused Adam, decoder-norm handling, dead-latent tracker) in
   float32 and with the bfloat16 encoder GEMM, against the bare encoder GEMM of each dtype written into a reused
   buffer (the bound, as ``benchmarks/train_step.py`` measures it), with ``torch.cuda.synchronize`` around each
   step, median of ``--steps``.

    .venv/bin/python benchmarks/gpu_step.py                          # on a GPU machine: cuda, writes the JSON
    .venv/bin/python benchmarks/gpu_step.py --device cpu --dry-run   # anywhere: tiny shapes, checks the script

Random activations are used (the figures are kernel speed, not quality); writes
``benchmarks/results/gpu_step.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import statistics
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, steps: int, warmup: int, device: torch.device) -> list[float]:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def _equivalence(x: torch.Tensor, d_sae: int, k: int, matmul_dtype: torch.dtype | None) -> dict:
    """Fast against reference kernels on one batch: same latents, relative gradient differences."""
    from saeforge.kernels import decode_sparse, encode_topk

    g = torch.Generator(device="cpu").manual_seed(0)
    d_in = x.shape[1]
    W_enc = (torch.randn(d_in, d_sae, generator=g) / d_in**0.5).to(x.device)
    b_enc = (0.1 * torch.randn(d_sae, generator=g)).to(x.device)
    W_dec = W_enc.t().contiguous()
    b_dec = (0.1 * torch.randn(d_in, generator=g)).to(x.device)
    mask = (torch.rand(d_sae, generator=g) < 0.2).to(x.device)
    out = {}
    for impl in ("fast", "reference"):
        params = [t.clone().requires_grad_() for t in (W_enc, b_enc, W_dec, b_dec)]
        We, be, Wd, bd = params
        lat, aux = encode_topk(x, We, be, k=k, aux_k=64, aux_mask=mask, matmul_dtype=matmul_dtype, impl=impl,
                               b_pre=bd)
        x_hat = decode_sparse(lat, Wd, impl=impl) + bd
        err = x - x_hat
        loss = err.pow(2).sum(1).mean() + (decode_sparse(aux, Wd, impl=impl) - err.detach()).pow(2).sum(1).mean() / 32
        loss.backward()
        out[impl] = (lat, float(loss.detach()), {n: p.grad for n, p in zip(("W_enc", "b_enc", "W_dec", "b_dec"), params)})
    (lf, Lf, gf), (lr, Lr, gr) = out["fast"], out["reference"]
    same = (torch.equal(lf.rows, lr.rows) and torch.equal(lf.cols, lr.cols))
    rel = {n: float((gf[n] - gr[n]).norm() / gr[n].norm().clamp_min(1e-30)) for n in gr}
    # tests/kernels' norm tolerances: float32 2e-6 (decoder always float32), bfloat16 encoder 2 * 2^-9
    tol = {n: (2e-6 if matmul_dtype is None or n in ("W_dec",) else 2 * 2.0**-9) for n in gr}
    ok = same and abs(Lf - Lr) <= 1e-5 * abs(Lr) + 1e-6 and all(rel[n] <= tol[n] for n in rel)
    return {"same_latents": same, "loss_fast": Lf, "loss_reference": Lr, "grad_rel_norm_diff": rel,
            "tolerance": tol, "ok": ok}


def _step_times(x_batches, d_sae, k, matmul_dtype, steps, warmup, device) -> list[float]:
    from common import saeforge_train_step
    from saeforge.saes import DeadLatentTracker, TopKConfig, make_sae

    d_in = x_batches[0].shape[1]
    sae = make_sae(TopKConfig(d_in=d_in, d_sae=d_sae, k=k,
                              matmul_dtype=None if matmul_dtype is None else "bfloat16")).to(device)
    sae.init_from_data(x_batches[0])
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3, fused=True)
    tracker = DeadLatentTracker(d_sae, sae.cfg.dead_after_tokens, device=device)
    sae_step = saeforge_train_step(sae, opt, tracker)
    state = {"i": 0}

    def step():
        sae_step(x_batches[state["i"] % len(x_batches)])
        state["i"] += 1

    return _timed(step, steps, warmup, device)


def _gemm_times(x_batches, d_sae, dtype, steps, warmup, device) -> list[float]:
    d_in = x_batches[0].shape[1]
    W = (torch.randn(d_in, d_sae, device=device) / d_in**0.5).to(dtype)
    b = torch.zeros(d_sae, device=device, dtype=dtype)
    out = torch.empty(x_batches[0].shape[0], d_sae, device=device, dtype=dtype)
    state = {"i": 0}

    def step():
        torch.addmm(b, x_batches[state["i"] % len(x_batches)].to(dtype), W, out=out)
        state["i"] += 1

    return _timed(step, steps, warmup, device)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes and 2 steps: checks the script, not speed")
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--d-in", type=int, default=576)
    ap.add_argument("--d-sae", type=int, default=4608)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--out", default=str(HERE / "results" / "gpu_step.json"))
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run it on a GPU machine, or check the script with --device cpu --dry-run")
    if args.dry_run:
        args.batch, args.d_in, args.d_sae, args.k, args.steps, args.warmup = 256, 64, 1024, 8, 2, 1
    torch.manual_seed(0)
    batches = [torch.randn(args.batch, args.d_in, device=device) for _ in range(4)]

    report = {"benchmark": "sparse TopK kernels on a device: fast vs reference, train step vs encoder GEMM",
              "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
              "device": str(device), "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                                                     else "cpu"),
              "config": {"batch": args.batch, "d_in": args.d_in, "d_sae": args.d_sae, "k": args.k,
                         "steps": args.steps, "warmup": args.warmup, "dry_run": args.dry_run},
              "equivalence": {}, "step_ms": {}, "gemm_bound_pct": {}}
    all_ok = True
    for name, md in (("float32", None), ("bfloat16", torch.bfloat16)):
        eq = _equivalence(batches[0], args.d_sae, args.k, md)
        report["equivalence"][name] = eq
        all_ok &= eq["ok"]
        print(f"{name:9s} fast vs reference: same latents {eq['same_latents']}, "
              f"grad rel diffs {', '.join(f'{n} {v:.1e}' for n, v in eq['grad_rel_norm_diff'].items())} "
              f"-> {'ok' if eq['ok'] else 'MISMATCH'}", flush=True)
        step = statistics.median(_step_times(batches, args.d_sae, args.k, md, args.steps, args.warmup, device))
        gemm = statistics.median(_gemm_times(batches, args.d_sae, md or torch.float32, args.steps, args.warmup,
                                             device))
        report["step_ms"][name] = {"step": 1e3 * step, "encoder_gemm": 1e3 * gemm,
                                   "step_tokens_per_s": args.batch / step, "gemm_tokens_per_s": args.batch / gemm}
        report["gemm_bound_pct"][name] = 100 * gemm / step
        print(f"{name:9s} step {1e3 * step:8.2f} ms   encoder GEMM {1e3 * gemm:8.2f} ms   "
              f"{100 * gemm / step:5.1f}% of the bound   {args.batch / step:,.0f} tokens/s", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0 if all_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
