"""Training-step throughput of a TopK SAE: saeforge against EleutherAI sparsify and SAELens, on identical cached
activations (SmolLM2-135M-Instruct, residual stream after decoder layer index 5 = saeforge site
``layers.5.resid_post``; d_in 576, d_sae 4608, k 32, batch 4096 tokens, float32, Adam).

A step is what each tool does per batch when training from activations: forward, backward, the optimizer step and
the tool's own decoder-norm handling and bookkeeping —

- saeforge: ``TopKSAE.training_loss`` (sparse kernels) -> ``backward`` -> ``before_optimizer_step`` (project
  the gradient off the unit-norm decoder rows) -> ``Adam.step`` -> ``after_optimizer_step`` (renormalise) ->
  ``zero_grad`` -> dead-latent tracker update. Measured with ``torch.optim.Adam(fused=True)`` (the CPU fused
  kernel) and, for reference, with the plain ``torch.optim.Adam`` defaults the peers use; also with the encoder
  GEMM in bfloat16 (``matmul_dtype="bfloat16"``).
- sparsify: ``benchmarks/peers/sparsify_worker.py`` (its Trainer's per-step work, eager CPU path).
- SAELens: ``benchmarks/peers/saelens_worker.py`` (``SAETrainer.fit()`` with ``TopKTrainingSAE``).
- the bound: a bare float32 ``torch.addmm(b, x, W, out=buf)`` of the encoder's shape (and the bfloat16 one, x
  cast each step as the step casts it), timed the same way — no SAE step can be faster than its encoder GEMM. The
  result goes into one reused buffer as the step's does (until 2026-11-29 it was a fresh tensor each step, whose
  page faults made the bound ~15 ms slower than the GEMM inside the step, i.e. a looser bound).

Every tool runs in its own process (the peers in their own virtual environments, see ``setup_peers.sh``); only one
runs at a time while the others wait. The coordinator interleaves them — round r runs every tool once, in an order
rotated each round (A B C, B C A, …) — each round starting with ``--skip`` untimed steps, then ``--steps`` timed
ones; each worker also runs ``--warmup`` steps before the first round. Figures are medians over all timed steps.

The machine is shared, and eager PyTorch on 2 cores slows down several-fold when another process takes a core
(OpenMP threads wait on each other at every parallel op). So the coordinator reads /proc around every round and
redoes a round in which other processes used more than ``--max-foreign-cpu`` (5%) of the CPU time, up to
``--max-retries`` times in all; the JSON records how many rounds were redone and whether the retries ran out
(then some kept rounds were disturbed and the figures are not clean).

    .venv/bin/python benchmarks/make_acts.py                       # once: the cached activations
    SAEFORGE_PEERS=/work/peers .venv/bin/python benchmarks/train_step.py --acts benchmarks/.work/acts_smollm2_l5.npy

Writes ``benchmarks/results/train_step.json``.

The thread policy (``saeforge.utils.threads``, ``--threads`` of train and cache) is checked with ``--threads``: each
saeforge tool runs once per thread count, 0 being the automatic choice, e.g. on a quiet machine::

    .venv/bin/python benchmarks/train_step.py --acts benchmarks/.work/acts_smollm2_l5.npy \
        --tools saeforge,gemm_f32 --threads 1,2,0 --out benchmarks/results/train_step_threads.json

The compiled kernels (``saeforge.kernels.native``) against the plain-PyTorch path, in the same run::

    .venv/bin/python benchmarks/train_step.py --acts benchmarks/.work/acts_smollm2_l5.npy \
        --tools saeforge,saeforge_bf16,gemm_f32,gemm_bf16 --native 1,0 --out benchmarks/results/train_step_native.json
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE / "peers"))

MARK = "@@BENCH "
SAEFORGE_TOOLS = ("saeforge", "saeforge_adam_default", "saeforge_bf16", "gemm_f32", "gemm_bf16")
PEER_TOOLS = ("sparsify", "saelens")
DEFAULT_TOOLS = ("saeforge", "saeforge_bf16", "sparsify", "saelens", "gemm_f32", "gemm_bf16", "saeforge_adam_default")


# ----------------------------------------------------------------------------------------------------------------
# workers that run in saeforge's own environment (this file, re-invoked with --worker)

def _saeforge_worker(args) -> None:
    import torch
    from _protocol import load_batches, serve

    args.worker, _, native = args.worker.partition("@native=")  # --native: the coordinator set the environment
    args.worker, _, threads = args.worker.partition("@threads=")
    if threads:  # --threads: this worker runs with a fixed thread count (0: saeforge's automatic choice)
        from saeforge.utils.threads import auto_threads

        torch.set_num_threads(int(threads) or auto_threads())
    torch.manual_seed(args.seed)
    batches = load_batches(args.acts, args.batch, args.d_in)

    if args.worker.startswith("gemm"):
        dtype = torch.bfloat16 if args.worker == "gemm_bf16" else torch.float32
        W = (torch.randn(args.d_in, args.d_sae) / args.d_in**0.5).to(dtype)
        b = torch.zeros(args.d_sae, dtype=dtype)
        # Written into one reused buffer, as the saeforge step writes its pre-activations (a per-thread
        # workspace): a fresh [batch, d_sae] result each step would add ~15 ms of page faults to the bound that
        # the step does not pay, and make the bound looser than the step's own GEMM.
        out = torch.empty(args.batch, args.d_sae, dtype=dtype)

        def step(x):
            torch.addmm(b, x.to(dtype), W, out=out)
            return None

        serve(step, batches, args.warmup, {"tool": args.worker,
                                            "what": f"torch.addmm(b, x.to({dtype}), W, out=reused) in {dtype}",
                                            "torch_threads": torch.get_num_threads()})
        return

    from saeforge import __version__
    from common import saeforge_train_step
    from saeforge.saes import DeadLatentTracker, TopKConfig, make_sae

    matmul_dtype = "bfloat16" if args.worker == "saeforge_bf16" else None
    sae = make_sae(TopKConfig(d_in=args.d_in, d_sae=args.d_sae, k=args.k, matmul_dtype=matmul_dtype))
    sae.init_from_data(batches[0])
    lr = 2e-4 / (args.d_sae / (2**14)) ** 0.5
    fused = args.worker != "saeforge_adam_default"
    opt = torch.optim.Adam(sae.parameters(), lr=lr, fused=True) if fused else torch.optim.Adam(sae.parameters(), lr=lr)
    tracker = DeadLatentTracker(args.d_sae, sae.cfg.dead_after_tokens)
    sae_step = saeforge_train_step(sae, opt, tracker)

    def step(x):
        return float(sae_step(x).terms["mse"].detach())

    serve(step, batches, args.warmup, {
        "tool": args.worker, "version": __version__, "kernel": sae.cfg.kernel, "matmul_dtype": matmul_dtype,
        "optimizer": "torch.optim.Adam(fused=True)" if fused else "torch.optim.Adam (defaults)", "lr": lr,
        "loss": "mse (sum over d, mean over batch)", "torch_threads": torch.get_num_threads(),
        "native_kernels": native_kernels_in_use()})


def native_kernels_in_use() -> bool:
    from saeforge.kernels import native

    return native.available()


# ----------------------------------------------------------------------------------------------------------------
# coordinator

class Worker:
    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log_dir: Path):
        self.name = name
        self.cmd = cmd
        self.stderr = open(log_dir / f"{name}.stderr.log", "w")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                     text=True, bufsize=1, env=env, cwd=str(REPO))
        self.info: dict = {}

    def read(self) -> dict:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK):])
        raise RuntimeError(f"worker {self.name} exited (rc={self.proc.wait()}); see {self.stderr.name}")

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        try:
            self.send("quit")
            self.proc.wait(timeout=30)
        except Exception:  # noqa: BLE001 - best effort
            self.proc.kill()
        self.stderr.close()


def _peer_python(peers: Path, tool: str) -> Path:
    py = peers / tool / "bin" / "python"
    if not py.is_file():
        raise SystemExit(f"no virtual environment for {tool} at {peers / tool}: run benchmarks/setup_peers.sh "
                         f"(or set SAEFORGE_PEERS to where the peer venvs live)")
    return py


def _machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
        isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in flags]
    except OSError:
        isa = []
    return {"hostname": socket.gethostname(), "cpu": cpu, "cpus": os.cpu_count(), "isa": isa,
            "platform": platform.platform(), "python": platform.python_version()}


class _CpuProbe:
    """How much of the machine's CPU time, between creation and ``foreign_share()``, went to processes other than
    the measured worker (and its threads): (busy jiffies of all CPUs − the worker's user+system jiffies) divided
    by (elapsed jiffies × CPUs). None where /proc is not readable."""

    def __init__(self, pid: int):
        self.pid = pid
        self.t0 = time.monotonic()
        self.busy0 = self._busy()
        self.own0 = self._own()

    @staticmethod
    def _busy() -> int | None:
        try:
            f = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        except (OSError, ValueError, IndexError):
            return None
        idle = f[3] + (f[4] if len(f) > 4 else 0)  # idle + iowait
        return sum(f[:8]) - idle

    def _own(self) -> int | None:
        try:
            fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return int(fields[11]) + int(fields[12])  # utime + stime (all threads)
        except (OSError, ValueError, IndexError):
            return None

    def foreign_share(self) -> float | None:
        busy1, own1 = self._busy(), self._own()
        if None in (self.busy0, self.own0, busy1, own1):
            return None
        hz = os.sysconf("SC_CLK_TCK")
        capacity = (time.monotonic() - self.t0) * hz * (os.cpu_count() or 1)
        if capacity <= 0:
            return None
        return max(0.0, ((busy1 - self.busy0) - (own1 - self.own0)) / capacity)


def _fmt(x: float) -> str:
    return f"{x:,.0f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--acts", help="float32 .npy [N, d_in] of cached activations (benchmarks/make_acts.py)")
    ap.add_argument("--tools", default=",".join(DEFAULT_TOOLS),
                    help=f"comma-separated subset of {', '.join(SAEFORGE_TOOLS + PEER_TOOLS)}")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per tool per round")
    ap.add_argument("--skip", type=int, default=1, help="untimed steps at the start of each round")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per worker before the first round")
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--d-in", type=int, default=576)
    ap.add_argument("--d-sae", type=int, default=4608)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--peers", default=os.environ.get("SAEFORGE_PEERS", str(HERE / ".work" / "peers")),
                    help="folder holding the peer venvs <peers>/saelens and <peers>/sparsify "
                         "(env SAEFORGE_PEERS; default benchmarks/.work/peers)")
    ap.add_argument("--omp-wait-policy", choices=("default", "passive", "active"), default="default",
                    help="OMP_WAIT_POLICY for every worker (all tools alike). 'passive' stops idle OpenMP threads "
                         "from spinning, which makes eager PyTorch far less sensitive to other processes on the "
                         "same cores; 'default' leaves the environment as it is")
    ap.add_argument("--threads", default="",
                    help="comma-separated PyTorch thread counts for the saeforge tools, e.g. 1,2,0 (0: saeforge's "
                         "automatic choice, saeforge.utils.threads); each tool then runs once per count, named "
                         "TOOL@threads=N. Empty: PyTorch's default. Run it on a quiet machine to check the rule")
    ap.add_argument("--native", default="",
                    help="comma-separated 1/0: each saeforge step tool runs once with the compiled kernels "
                         "(saeforge.kernels.native) and once without (SAEFORGE_NATIVE_KERNELS=0, the plain-PyTorch "
                         "path), named TOOL@native=N, in the same run: the A/B of the kernels. Empty: as the "
                         "environment says")
    ap.add_argument("--max-foreign-cpu", type=float, default=0.05,
                    help="redo a tool's round when other processes used more than this share of the machine's CPU "
                         "time during it (read from /proc; the machine is shared)")
    ap.add_argument("--max-retries", type=int, default=40, help="total redone rounds allowed in one run")
    ap.add_argument("--retry-wait", type=float, default=3.0, help="seconds to wait before redoing a round")
    ap.add_argument("--out", default=str(HERE / "results" / "train_step.json"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        _saeforge_worker(args)
        return 0
    if not args.acts:
        ap.error("--acts is required")
    acts = Path(args.acts).resolve()
    if not acts.is_file():
        raise SystemExit(f"{acts}: not found (make it with benchmarks/make_acts.py)")
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    unknown = [t for t in tools if t not in SAEFORGE_TOOLS + PEER_TOOLS]
    if unknown:
        ap.error(f"unknown tools {unknown}")
    if args.threads:
        counts = [c.strip() for c in args.threads.split(",") if c.strip()]
        if not all(c.isdigit() for c in counts):
            ap.error("--threads takes comma-separated non-negative integers, e.g. 1,2,0")
        tools = [name for t in tools
                 for name in ([f"{t}@threads={c}" for c in counts] if t in SAEFORGE_TOOLS else [t])]

    if args.native:
        flags = [c.strip() for c in args.native.split(",") if c.strip()]
        if not all(c in ("0", "1") for c in flags):
            ap.error("--native takes 1 and/or 0, e.g. 1,0")
        tools = [name for t in tools
                 for name in ([f"{t}@native={c}" for c in flags]
                              if t.split("@")[0] in SAEFORGE_TOOLS and not t.startswith("gemm") else [t])]

    peers = Path(args.peers).resolve()
    common = ["--acts", str(acts), "--batch", str(args.batch), "--d-in", str(args.d_in), "--d-sae", str(args.d_sae),
              "--k", str(args.k), "--warmup", str(args.warmup), "--seed", str(args.seed)]
    env = dict(os.environ, WANDB_MODE="disabled", HF_HUB_OFFLINE="1", TQDM_DISABLE="1", PYTHONUNBUFFERED="1")
    if args.omp_wait_policy != "default":
        env["OMP_WAIT_POLICY"] = args.omp_wait_policy.upper()
    log_dir = HERE / ".work" / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)

    load_before = os.getloadavg()
    workers: dict[str, Worker] = {}
    try:
        # start workers one after another (each warms up alone)
        for t in tools:
            if t in PEER_TOOLS:
                cmd = [str(_peer_python(peers, t)), str(HERE / "peers" / f"{t}_worker.py"), *common]
            else:
                cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", t, *common]
            wenv = dict(env, SAEFORGE_NATIVE_KERNELS=t.partition("@native=")[2]) if "@native=" in t else env
            w = Worker(t, cmd, wenv, log_dir)
            msg = w.read()
            w.info = msg.get("env", {})
            w.info["warmup_losses"] = msg.get("warmup_losses", [])
            workers[t] = w
            print(f"ready: {t:24s} {w.info.get('version', '')}", flush=True)

        times: dict[str, list[float]] = {t: [] for t in tools}
        losses: dict[str, list[float]] = {t: [] for t in tools}
        t_start = time.time()
        discarded: dict[str, int] = {t: 0 for t in tools}
        foreign: dict[str, list[float]] = {t: [] for t in tools}
        retries_left = args.max_retries
        for r in range(args.rounds):
            order = tools[r % len(tools):] + tools[: r % len(tools)]
            for t in order:
                while True:
                    probe = _CpuProbe(workers[t].proc.pid)
                    workers[t].send(f"run {args.steps} {args.skip}")
                    msg = workers[t].read()
                    share = probe.foreign_share()
                    if share is not None and share > args.max_foreign_cpu and retries_left > 0:
                        # another process used the CPUs during this round: its times are not this tool's
                        retries_left -= 1
                        discarded[t] += 1
                        print(f"  {t}: round disturbed ({100 * share:.0f}% of the CPUs used by other "
                              f"processes), redoing it", flush=True)
                        time.sleep(args.retry_wait)
                        continue
                    break
                if share is not None:
                    foreign[t].append(share)
                times[t].extend(msg["times"])
                losses[t].extend(msg.get("losses", []))
            line = "  ".join(f"{t}={args.batch / statistics.median(times[t]):,.0f}" for t in tools)
            print(f"round {r + 1}/{args.rounds} tokens/s so far: {line}", flush=True)
        wall = time.time() - t_start
    finally:
        for w in workers.values():
            w.close()
    load_after = os.getloadavg()

    res = {}
    for t in tools:
        med = statistics.median(times[t])
        res[t] = {"median_step_s": med, "tokens_per_s": args.batch / med, "min_step_s": min(times[t]),
                  "best_tokens_per_s": args.batch / min(times[t]),
                  "max_step_s": max(times[t]), "n_timed_steps": len(times[t]),
                  "step_s": [round(v, 5) for v in times[t]], "env": workers[t].info,
                  "disturbed_rounds_redone": discarded[t],
                  "max_foreign_cpu_share_kept": max(foreign[t]) if foreign[t] else None,
                  "loss_first_last": [losses[t][0], losses[t][-1]] if losses[t] else None}

    def ratio(a: str, b: str) -> float | None:
        return res[a]["tokens_per_s"] / res[b]["tokens_per_s"] if a in res and b in res else None

    ratios = {
        "saeforge/sparsify": ratio("saeforge", "sparsify"),
        "saeforge/saelens": ratio("saeforge", "saelens"),
        "saeforge_bf16/sparsify": ratio("saeforge_bf16", "sparsify"),
        "saeforge_bf16/saelens": ratio("saeforge_bf16", "saelens"),
        "saeforge_adam_default/sparsify": ratio("saeforge_adam_default", "sparsify"),
        "saeforge_adam_default/saelens": ratio("saeforge_adam_default", "saelens"),
    }
    ratios = {k: v for k, v in ratios.items() if v is not None}
    # the same ratios from each tool's fastest step: less sensitive to interference from other processes
    ratios_best = {k: res[k.split("/")[0]]["best_tokens_per_s"] / res[k.split("/")[1]]["best_tokens_per_s"]
                   for k in ratios}
    bound = {}
    if "gemm_f32" in res:
        for t in res:
            if not t.startswith("gemm"):
                bound[f"{t} as % of the float32 encoder-GEMM bound"] = 100 * ratio(t, "gemm_f32")
    if "gemm_bf16" in res:
        for t in res:
            if t.startswith("saeforge_bf16"):
                bound[f"{t} as % of the bfloat16 encoder-GEMM bound"] = 100 * ratio(t, "gemm_bf16")

    import torch

    report = {
        "benchmark": "TopK SAE training step (forward + backward + Adam + decoder-norm handling) on cached activations",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": _machine(),
        "torch": torch.__version__,
        "command": " ".join([Path(sys.executable).name, *sys.argv]) if argv is None else " ".join(argv),
        "disturbance_control": {"max_foreign_cpu_share": args.max_foreign_cpu,
                                 "rounds_redone": sum(discarded.values()),
                                 "retries_exhausted": retries_left == 0},
        "config": {"d_in": args.d_in, "d_sae": args.d_sae, "k": args.k, "batch_tokens": args.batch,
                   "dtype": "float32", "rounds": args.rounds, "timed_steps_per_round": args.steps,
                   "untimed_steps_per_round": args.skip, "warmup_steps": args.warmup, "order": "rotated per round",
                   "OMP_WAIT_POLICY": env.get("OMP_WAIT_POLICY", "(unset)")},
        "activations": {"path": str(acts), "rows": None, "meta": None},
        "load_average_before_after": [list(load_before), list(load_after)],
        "wall_s": round(wall, 1),
        "results": res,
        "ratios": ratios,
        "ratios_from_fastest_steps": ratios_best,
        "gemm_bound_pct": bound,
    }
    try:
        import numpy as np

        report["activations"]["rows"] = int(np.load(acts, mmap_mode="r").shape[0])
        meta = acts.with_suffix(".json")
        if meta.is_file():
            report["activations"]["meta"] = json.loads(meta.read_text())
    except Exception:  # noqa: BLE001 - informational only
        pass
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")

    print()
    print(f"{'tool':24s} {'tokens/s':>10s} {'median ms':>10s} {'min ms':>8s} {'max ms':>8s}  n")
    for t in tools:
        r = res[t]
        print(f"{t:24s} {_fmt(r['tokens_per_s']):>10s} {1e3 * r['median_step_s']:10.1f} "
              f"{1e3 * r['min_step_s']:8.1f} {1e3 * r['max_step_s']:8.1f}  {r['n_timed_steps']}")
    print()
    for k, v in ratios.items():
        print(f"{k:34s} {v:6.2f}x   (from the fastest steps: {ratios_best[k]:.2f}x)")
    for k, v in bound.items():
        print(f"{k:58s} {v:5.1f}%")
    print(f"\nrounds redone because other processes used the CPUs: {sum(discarded.values())}"
          + ("  (retries exhausted: figures disturbed)" if retries_left == 0 else ""))
    print(f"load average before/after: {load_before[0]:.2f} / {load_after[0]:.2f}   wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
