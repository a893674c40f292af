"""Choose the default learning rate and sparsity coefficient of the L1/L0 architectures (docs/defaults.md).

Every run goes through the public API a user has (``saeforge.training.train`` from an activation cache, the
default ``expected_norm`` normalisation, default batch size, schedules and warm-ups), with only the swept values
set; a value left out of a grid row is the architecture's current default. Two data sets:

``synthetic``  superposition with a known dictionary (saeforge.evals.synthetic): d 256, 1,024 true features,
               true L0 12, d_sae 2,048, batch 1,024, 2^18 cached samples. Scored on 16,384 fresh samples with the
               saved SAE (normalisation folded in): mean max cosine (MMCS), the fraction of true features some
               decoder row matches at cosine >= 0.9, L0, FVU, never-firing latents.
``real``       SmolLM2-135M-Instruct (the embedded model), layers.15.resid_post (the demo's site), d_sae 4,608
               (8 x 576), batch 4,096 (or a row's own), trained from a 250k-token `saeforge cache` of
               embedded:train; scored on a 16,384-token cache of embedded:validation: FVU (pooled, dataset mean),
               L0, latents that never fire.
``table``      `saeforge eval RUN --tokens 4096` (CE recovered, KL, FVU, L0, dead) on the real-data runs of every
               architecture at its defaults.

    python benchmarks/defaults_sweep.py synthetic --grid lr        # grids: see GRIDS
    python benchmarks/defaults_sweep.py real --grid b1024 --cache acts/ --validation-cache val/
    python benchmarks/defaults_sweep.py table       # saeforge eval on the runs at today's defaults
    python benchmarks/defaults_sweep.py report      # the Markdown tables of docs/defaults.md

Several processes may run one grid side by side (each run is claimed by one).

Results are appended to benchmarks/results/defaults_<data>.json one run at a time; a row already there (same
key) is not run again, so an interrupted sweep continues where it stopped. Wall times are rough: the machine
was shared.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS, machine  # noqa: E402
from saeforge.evals.synthetic import SparseFeatureModel  # noqa: E402
from saeforge.saes import load_sae  # noqa: E402
from saeforge.training import TrainConfig, train  # noqa: E402
from saeforge.saes.registry import get_config_class  # noqa: E402
from tests.training.test_defaults import SITE, score, write_array_cache  # noqa: E402

REAL_SITE = "layers.15.resid_post"
SYNTHETIC = dict(d=256, n_features=1024, true_l0=12, d_sae=2048, batch=1024, cache_samples=2**18, eval_samples=16384)
REAL = dict(site=REAL_SITE, d_sae=4608, batch=4096, k=32)

# name -> (architecture, sae_options the variant needs)
ARCHS = {
    "relu": ("relu", {}),
    "relu_classic": ("relu", {"variant": "classic"}),
    "gated": ("gated", {}),
    "jumprelu": ("jumprelu", {}),
    "topk": ("topk", {}),
    "batchtopk": ("batchtopk", {}),
    "matryoshka": ("matryoshka", {}),
}


def matryoshka_groups(d_sae: int) -> list[int]:
    """The group sizes of the earlier grids (1/8, 1/4, 5/8 of d_sae), from before Matryoshka had a default; the
    `defaults` grid leaves them out (saeforge.saes.matryoshka.default_group_sizes)."""
    a, b = d_sae // 8, d_sae // 4
    return [a, b, d_sae - a - b]


def row(arch: str, steps: int, *, lr: float = 0.0, coef: float = -1.0, seed: int = 0, batch: int | None = None,
        **options) -> dict:
    """One run. lr 0 / coef < 0: the architecture default; options: extra SAE options (bandwidth, ...); batch:
    None for the data set's batch size."""
    out = {"arch": arch, "steps": steps, "lr": lr, "coef": coef, "seed": seed, "options": options}
    if batch is not None:
        out["batch"] = batch
    return out


def key(r: dict) -> str:
    return json.dumps({k: r[k] for k in ("arch", "steps", "lr", "coef", "seed", "options", "batch") if k in r},
                      sort_keys=True)


# Each grid is a list of rows, in the order they were run. The machine was shared by many jobs (load 15-30 on
# 2 cores), so several grids were stopped part-way (marked); a stopped row left no result.
GRIDS: dict[str, dict[str, list[dict]]] = {"synthetic": {}, "real": {}}
# 1. The old defaults (stopped after relu; the lead's measurement covers the others).
GRIDS["synthetic"]["old"] = [row(a, 256) for a in ("relu", "relu_classic", "gated", "jumprelu")]
# 2. The learning rate at the default coefficients; JumpReLU's initial threshold and bandwidth: the paper's 0.001
# (unit mean squared inputs) times sqrt(d) = 16 for expected_norm inputs, against a threshold at the scale of the
# features (sqrt(lambda), see docs/defaults.md).
JUMPRELU_SCALES = [dict(threshold_init=0.016, bandwidth=0.016), dict(threshold_init=1.0, bandwidth=0.1)]
GRIDS["synthetic"]["lr"] = (
    [row(a, 256, lr=lr) for lr in (3e-3, 1e-3, 1e-2) for a in ("relu", "relu_classic", "gated")]
    + [row("jumprelu", 256, lr=lr, coef=1.0, **o) for o in JUMPRELU_SCALES for lr in (3e-3, 1e-2)])
# 3. TopK on real data: its smallest active latent (0.55 in expected_norm units) calibrates the coefficients.
GRIDS["real"]["topk"] = [row("topk", 256)]
# 4. The L1 soft threshold is lambda/2 and the JumpReLU threshold settles near sqrt(lambda): lambda near 1 (L1)
# and 0.3 (L0). Stopped after relu (L0 156: a short L1 run is far denser than the threshold estimate).
GRIDS["real"]["first"] = [row(a, 256, lr=3e-3, coef=1.0) for a in ("relu", "relu_classic", "gated")] + [
    row("jumprelu", 256, lr=3e-3, coef=0.3, threshold_init=0.5, bandwidth=0.1)]
# 5. The same coefficients on the synthetic problem, TopK as the reference (stopped before gated and jumprelu).
GRIDS["synthetic"]["coef"] = (
    [row("topk", 256)] + [row(a, 256, lr=3e-3, coef=1.0) for a in ("relu", "relu_classic", "gated")]
    + [row("jumprelu", 256, lr=3e-3, coef=0.3, threshold_init=0.5, bandwidth=0.1)])
# 6. BatchTopK / Matryoshka at batch 4,096 (BatchTopK finished; Matryoshka stopped).
GRIDS["real"]["topk_family"] = [row("batchtopk", 256), row("matryoshka", 256)]
# 7. Larger coefficients at batch 4,096 (stopped: a dense step got a few percent of a core), replaced by 8.
GRIDS["real"]["second"] = [row("relu", 256, lr=3e-3, coef=5.0),
                           row("jumprelu", 256, lr=3e-3, coef=1.0, threshold_init=1.0, bandwidth=0.1),
                           row("relu_classic", 256, lr=3e-3, coef=2.0), row("gated", 256, lr=3e-3, coef=3.0)]
# 8. The candidates at batch 1,024 (256 steps = 262k tokens, about one pass over the cache), every architecture
# alike. Classic at lambda 5 was stopped at step 80 with every latent off (its log is kept).
GRIDS["real"]["b1024"] = [row("relu", 256, lr=3e-3, coef=5.0, batch=1024),
                          row("jumprelu", 256, lr=3e-3, coef=1.0, threshold_init=1.0, bandwidth=0.1, batch=1024),
                          row("gated", 256, lr=3e-3, coef=3.0, batch=1024),
                          row("relu_classic", 256, lr=3e-3, coef=5.0, batch=1024)]
GRIDS["real"]["b1024_topk"] = [row(a, 256, batch=1024) for a in ("topk", "batchtopk", "matryoshka")]
# 9. JumpReLU's bandwidth alone: the paper-scaled 0.016 with the threshold started at 1.
GRIDS["synthetic"]["bandwidth"] = [row("jumprelu", 256, lr=3e-3, coef=1.0, threshold_init=1.0, bandwidth=0.016)]
# 10. Classic at a lower lambda; JumpReLU at theta_0 1 had half its latents silent by step 80 (a latent below its
# threshold gets no gradient from the paper's estimator), so also the threshold TopK's smallest latent suggests.
GRIDS["real"]["classic2"] = [row("relu_classic", 256, lr=3e-3, coef=2.0, batch=1024)]
GRIDS["real"]["jumprelu_low"] = [row("jumprelu", 256, lr=3e-3, coef=0.3, threshold_init=0.5, bandwidth=0.05,
                                     batch=1024)]
# 11. The architectures whose default runs were cut short by machine load before, at today's defaults (nothing
# set: classic's own lambda 2, Matryoshka's default groups d_sae/16, /8, /4, /2, d_sae).
GRIDS["real"]["defaults"] = [row(a, 256, batch=1024, default_groups=True) for a in ("matryoshka", "gated",
                                                                                 "relu_classic")]


# ---------------------------------------------------------------------------------------------------- runs
def _sae_options(arch: str, options: dict, d_sae: int) -> str:
    base, extra = ARCHS[arch]
    opts = {**extra, **options}
    if not opts.pop("default_groups", False) and base == "matryoshka":
        opts.setdefault("group_sizes", matryoshka_groups(d_sae))
    return json.dumps(opts) if opts else ""


def train_one(r: dict, cache: Path, site: str, out: Path, *, d_sae: int, batch: int, k: int) -> float:
    base, _ = ARCHS[r["arch"]]
    cfg = TrainConfig(out=str(out), cache=str(cache), sites=(site,), tokens=batch * r["steps"], batch_size=batch,
                      d_sae=d_sae, architecture=base, k=k, lr=r["lr"], sparsity_coefficient=r["coef"],
                      sae_options=_sae_options(r["arch"], r["options"], d_sae), seed=r["seed"], progress=False,
                      device="cpu", checkpoint_every=10_000)
    start = time.time()
    train(cfg)
    return time.time() - start


def resolved(sae_folder: Path) -> dict:
    """The lr and SAE config the run actually used (defaults resolved)."""
    run = json.loads((sae_folder.parent.parent / "run.json").read_text())
    cfg = json.loads((sae_folder / "cfg.json").read_text())["saeforge"]["config"]
    keep = KEPT_FIELDS
    lr = run["config"]["lr"] or default_lr(run["config"]["architecture"], cfg["d_sae"])
    return {"sae": {k: cfg[k] for k in keep if k in cfg}, "lr_used": lr,
            "normalize_activations": run["config"]["normalize_activations"]}


def load_results(data: str) -> dict:
    path = RESULTS / f"defaults_{data}.json"
    if path.is_file():
        return json.loads(path.read_text())
    return {"data": data, "problem": SYNTHETIC if data == "synthetic" else REAL, "machine": machine(), "runs": []}


def append_result(data: str, entry: dict) -> None:
    """Add one run to the result file, re-reading it first: several sweep processes may share it."""
    import fcntl

    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"defaults_{data}.json"
    import tempfile

    with open(Path(tempfile.gettempdir()) / f"saeforge-defaults-{data}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = load_results(data)
        results["runs"].append(entry)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1) + "\n")
        tmp.replace(path)


def claim(work: Path, r: dict) -> bool:
    """True for the one process that gets to run ``r`` (a sweep may run as several processes side by side)."""
    import hashlib
    import os

    folder = work / "claims"
    folder.mkdir(parents=True, exist_ok=True)
    name = hashlib.sha1(key(r).encode()).hexdigest()
    try:
        os.close(os.open(folder / name, os.O_CREAT | os.O_EXCL))
        return True
    except FileExistsError:
        return False


def synthetic_problem(work: Path) -> tuple[SparseFeatureModel, Path, torch.Tensor]:
    p = SYNTHETIC
    model = SparseFeatureModel.create(p["d"], p["n_features"], mean_active=p["true_l0"], seed=0)
    cache = work / "synthetic_cache"
    if not (cache / "manifest.json").is_file():
        x, _ = model.sample(p["cache_samples"], seed=1)
        write_array_cache(cache, x.numpy())
    x_eval, _ = model.sample(p["eval_samples"], seed=2)
    return model, cache, x_eval


@torch.no_grad()
def score_real(sae_folder: Path, x_val: torch.Tensor) -> dict:
    """Held-out FVU (pooled, dataset mean), L0, never-firing latents, and the activation scale in training units.

    ``smallest_active_median``: per token, the smallest nonzero latent times its decoder-row norm (its share of
    the reconstruction), in the units the SAE was trained in (expected_norm); the median over tokens. It is the
    effective firing threshold, which the sparsity coefficients are calibrated against (docs/defaults.md).
    """
    sae = load_sae(sae_folder)
    meta = json.loads((sae_folder / "cfg.json").read_text())["metadata"]
    scale = float(meta["normalization"]["scale_out"])
    dec_norm = sae.W_dec.norm(dim=1)
    sq_err, fired, l0_sum, smallest = 0.0, torch.zeros(sae.cfg.d_sae, dtype=torch.bool), 0.0, []
    for chunk in x_val.split(4096):
        f = sae.encode(chunk)
        sq_err += float((sae.decode(f) - chunk).double().pow(2).sum())
        fired |= (f > 0).any(0)
        l0_sum += float((f > 0).sum())
        contrib = torch.where(f > 0, f * dec_norm * scale, torch.full_like(f, float("inf")))
        smallest.append(contrib.min(1).values)
    total = float((x_val.double() - x_val.double().mean(0)).pow(2).sum())
    small = torch.cat(smallest)
    return {"fvu": sq_err / total, "l0": l0_sum / x_val.shape[0], "dead": float((~fired).float().mean()),
            "smallest_active_median": float(small[torch.isfinite(small)].median())}


def sweep(data: str, grid: str, work: Path, cache: Path | None, validation_cache: Path | None, keep_runs: bool) -> None:
    from saeforge.data.activation_cache import ActivationCache

    if data == "synthetic":
        model, cache, x_eval = synthetic_problem(work)
        site, dims = SITE, dict(d_sae=SYNTHETIC["d_sae"], batch=SYNTHETIC["batch"], k=SYNTHETIC["true_l0"])
    else:
        if cache is None or validation_cache is None:
            raise SystemExit("real data needs --cache and --validation-cache (saeforge cache folders)")
        x_val = ActivationCache(validation_cache).load(REAL_SITE).float()
        site, dims = REAL_SITE, dict(d_sae=REAL["d_sae"], batch=REAL["batch"], k=REAL["k"])
    for r in GRIDS[data][grid]:
        if key(r) in {key(done) for done in load_results(data)["runs"]} or not claim(work / data, r):
            continue
        out = work / "runs" / data / f"{time.strftime('%m%d-%H%M%S')}-{r['arch']}"
        seconds = train_one(r, cache, site, out, **{**dims, "batch": r.get("batch", dims["batch"])})
        folder = out / "saes" / site
        metrics = vars(score(folder, model, x_eval)) if data == "synthetic" else score_real(folder, x_val)
        entry = {**r, "grid": grid, **resolved(folder), "metrics": metrics, "train_wall_s": round(seconds)}
        if data == "real":
            entry["run_dir"] = str(out)
        append_result(data, entry)
        print(json.dumps({k: entry[k] for k in ("arch", "steps", "lr", "coef", "options", "metrics")}), flush=True)
        if data == "synthetic" and not keep_runs:
            import shutil

            shutil.rmtree(out)


def default_lr(architecture: str, d_sae: int) -> float:
    """The learning rate a run of ``architecture`` gets when none is given."""
    return get_config_class(architecture).default_lr(d_sae)


KEPT_FIELDS = ("l1_coefficient", "l0_coefficient", "bandwidth", "threshold_init", "variant", "k", "group_sizes")


def current_defaults(arch: str, d_in: int, d_sae: int, k: int) -> dict:
    """What a run of ``arch`` with nothing set gets today: its lr and the swept SAE fields."""
    base, extra = ARCHS[arch]
    cls = get_config_class(base)
    kw = {"k": k} if base in ("topk", "batchtopk", "matryoshka") else {}
    cfg = cls(d_in=d_in, d_sae=d_sae, **kw, **extra).to_dict()
    sae = json.loads(json.dumps({f: cfg[f] for f in KEPT_FIELDS if f in cfg}))  # as cfg.json holds it
    return {"lr_used": default_lr(base, d_sae), "sae": sae}


def table(work: Path, tokens: int, steps: int, batch: int | None, collect_only: bool = False) -> None:
    """`saeforge eval` on each architecture's real-data run at today's defaults; results into defaults_eval.json.

    A run counts as "at the defaults" when its resolved lr and SAE fields equal what a run with nothing set gets
    now (a sweep row that set the values explicitly is the same computation)."""
    real = load_results("real")["runs"]
    path = RESULTS / "defaults_eval.json"
    out = json.loads(path.read_text()) if path.is_file() else {"tokens": tokens, "machine": machine(), "rows": []}
    for arch in ARCHS:
        want = current_defaults(arch, 576, REAL["d_sae"], REAL["k"])
        runs = [r for r in real if r["arch"] == arch and r["steps"] == steps
                and r.get("batch", REAL["batch"]) == (batch or REAL["batch"])
                and r["lr_used"] == want["lr_used"]
                and r["sae"] == want["sae"]]
        if not runs:
            print(f"{arch}: no real-data run at the current defaults {want} (a real grid with those values, finished)")
            continue
        r = runs[-1]
        if any(e["run_dir"] == r["run_dir"] for e in out["rows"]):
            continue
        start = time.time()
        done = Path(r["run_dir"]) / "eval.json"
        if not (done.is_file() and json.loads(done.read_text()).get("n_token_positions") == tokens):
            if collect_only:
                print(f"{arch}: {r['run_dir']} has no eval.json of {tokens} tokens yet")
                continue
            subprocess.run([sys.executable, "-m", "saeforge", "eval", r["run_dir"], "--tokens", str(tokens),
                            "--noplots", "--noprogress", "--device", "cpu"], check=True)
        report = json.loads(done.read_text())
        out["rows"].append({"arch": arch, "steps": r["steps"], "setting": _setting(r), "run_dir": r["run_dir"],
                            "heldout_sweep_metrics": r["metrics"], "eval": report,
                            "eval_wall_s": round(report.get("seconds", time.time() - start))})
        path.write_text(json.dumps(out, indent=1) + "\n")


def _setting(r: dict) -> str:
    sae = r.get("sae", {})
    coef = sae.get("l1_coefficient", sae.get("l0_coefficient"))
    parts = [f"lr {r['lr_used']:.3g}"]
    if coef is not None:
        parts.append(f"λ {coef:g}")
    if "threshold_init" in sae:
        parts.append(f"θ₀ {sae['threshold_init']:g}, ε {sae['bandwidth']:g}")
    return ", ".join(parts) + (" (the defaults then)" if r["lr"] == 0 and r["coef"] < 0 and not r["options"] else "")


def report(work: Path) -> None:
    """Print the Markdown tables of docs/defaults.md from the result files."""
    syn = load_results("synthetic")["runs"]
    print("| architecture | setting | steps | MMCS | recovered | L0 (true 12) | FVU | dead |\n"
          "|---|---|---:|---:|---:|---:|---:|---:|")
    for r in syn:
        m = r["metrics"]
        print(f"| {r['arch']} | {_setting(r)} | {r['steps']} | {m['mmcs']:.3f} | {m['recovered']:.0%} | {m['l0']:.1f} "
              f"| {m['fvu']:.3f} | {m['dead']:.1%} |")
    real = load_results("real")["runs"]
    print("\n| architecture | setting | steps × batch | FVU | L0 | dead | smallest active (median) |\n"
          "|---|---|---:|---:|---:|---:|---:|")
    for r in real:
        m = r["metrics"]
        print(f"| {r['arch']} | {_setting(r)} | {r['steps']} × {r.get('batch', REAL['batch'])} | {m['fvu']:.3f} "
              f"| {m['l0']:.1f} | {m['dead']:.1%} "
              f"| {m['smallest_active_median']:.2f} |")
    unfinished = []
    finished = {r.get("run_dir") for r in real}
    for folder in sorted((work / "runs" / "real").glob("*")):
        log = folder / "metrics.jsonl"
        if str(folder) in finished or not log.is_file() or not log.read_text().strip():
            continue
        info = json.loads((folder / "run.json").read_text())
        c = info["config"]
        last = json.loads(log.read_text().strip().splitlines()[-1])
        m = next(iter(last["saes"].values()))
        steps = f"{last['step']} of {c['tokens'] // c['batch_size']} × {c['batch_size']}"
        unfinished.append(f"| {folder.name.split('-', 2)[-1]} | lr {c['lr']:g}, λ {c['sparsity_coefficient']:g} "
                          f"{c['sae_options']} | {steps} | {m['fvu']:.3f} | {m['l0']:.1f} | {m['dead_fraction']:.1%} |")
    if unfinished:
        print("\nUnfinished runs, training-batch metrics at their last log (`metrics.jsonl`; dead: no firing in the "
              "last fifth of the run's tokens):\n\n| architecture | setting | step | FVU (one batch) | L0 | dead |\n"
              "|---|---|---:|---:|---:|---:|")
        print("\n".join(unfinished))
    path = RESULTS / "defaults_eval.json"
    if path.is_file():
        rows = json.loads(path.read_text())["rows"]
        print("\n| architecture | setting | FVU | L0 | dead | CE recovered | KL |\n|---|---|---:|---:|---:|---:|---:|")
        for r in rows:
            e = next(iter(r["eval"]["saes"].values()))
            print(f"| {r['arch']} | {r['setting']} | {e['fvu']:.3f} | {e['l0']:.1f} | {e['dead_fraction']:.1%} "
                  f"| {e['ce_recovered']:.1%} | {e['kl_div']:.3f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", choices=("synthetic", "real", "table", "report"))
    ap.add_argument("--grid", default="old")
    ap.add_argument("--work", type=Path, default=Path("/tmp/saeforge_defaults"), help="runs and the synthetic cache")
    ap.add_argument("--cache", type=Path, help="real data: saeforge cache of embedded:train at " + REAL_SITE)
    ap.add_argument("--validation-cache", type=Path, help="real data: saeforge cache of embedded:validation")
    ap.add_argument("--eval-tokens", type=int, default=4096, help="table: tokens for saeforge eval")
    ap.add_argument("--steps", type=int, default=256, help="table: the run length whose runs are evaluated")
    ap.add_argument("--batch", type=int, default=1024, help="table: the batch size of the runs evaluated (0: 4096)")
    ap.add_argument("--collect-only", action="store_true", help="table: use the eval.json already written, run none")
    ap.add_argument("--keep-runs", action="store_true", help="synthetic: keep the run folders")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.data == "report":
        report(args.work)
    elif args.data == "table":
        table(args.work, args.eval_tokens, args.steps, args.batch, args.collect_only)
    else:
        sweep(args.data, args.grid, args.work, args.cache, args.validation_cache, args.keep_runs)


if __name__ == "__main__":
    main()
