"""Format interop proven against the real peers: SAELens and sparsify each train a TopK SAE on the same cached
activations (SmolLM2-135M-Instruct, saeforge site ``layers.5.resid_post``, d_in 576), and

1. saeforge loads their saved SAEs (``saeforge.formats.load_any``; SAELens: the trainer's final checkpoint and
   ``save_inference_model``'s folder; sparsify: ``save_to_disk``) and its encodings of held-out rows match the peers'
   own ``encode`` of the same rows;
2. saeforge trains a TopK SAE itself, saves it (native format, plain SAELens format, sparsify format), and SAELens
   (``SAE.load_from_disk``) and sparsify (``SparseCoder.load_from_disk``) load it and encode like saeforge;
3. across the peers through saeforge: sparsify's SAE converted to a SAELens folder is encoded by SAELens exactly as
   sparsify encodes it, and SAELens' SAE converted to a sparsify folder is encoded by sparsify as SAELens encodes it;
4. transcoders (``--coders on|only|off``), on the MLP input and output of layer 5 of the embedded model: saeforge's
   TopK skip transcoder written as a sparsify folder and its JumpReLU and BatchTopK skip transcoders written as
   SAELens folders are loaded by the peers, whose encodings *and outputs* (skip term included) must match
   saeforge's; a skip transcoder trained by sparsify and one built by SAELens are read by saeforge and must match
   the peers' own.

The peers run in their own virtual environments (``benchmarks/setup_peers.sh``; ``SAEFORGE_PEERS=/work/peers``
reuses existing ones) through ``benchmarks/peers/interop_saelens.py`` / ``interop_sparsify.py``, which exchange
folders and ``.npy`` encodings with this script. Every comparison is on the last ``--eval-rows`` rows of the
activations (never trained on): max |difference| of the dense [rows, d_sae] encodings, relative to the largest
activation, and the number of rows whose set of active latents differs. A comparison passes when no active set
differs and max |diff| <= ``--rtol`` x max |activation|; the script exits non-zero otherwise.

    SAEFORGE_PEERS=/work/peers .venv/bin/python benchmarks/interop.py --acts benchmarks/.work/acts_smollm2_l5.npy

Writes ``benchmarks/results/interop.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

MARK = "@@INTEROP "


def peer_python(peers: Path, tool: str) -> Path:
    py = peers / tool / "bin" / "python"
    if not py.is_file():
        raise SystemExit(f"no virtual environment for {tool} at {peers / tool}: run benchmarks/setup_peers.sh "
                         "(or set SAEFORGE_PEERS to where the peer venvs live)")
    return py


def run_peer(py: Path, script: str, argv: list[str], log: Path, threads: int) -> dict:
    env = dict(os.environ, WANDB_MODE="disabled", HF_HUB_OFFLINE="1", TQDM_DISABLE="1",
               INTEROP_THREADS=str(threads), PYTHONWARNINGS="ignore")
    cmd = [str(py), str(HERE / "peers" / script), *argv]
    t0 = time.perf_counter()
    with open(log, "a") as err:
        err.write(f"\n$ {' '.join(cmd)}\n")
        err.flush()
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env, cwd=str(REPO))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{script} {argv[0]} failed (exit {proc.returncode}); see {log}\n{proc.stdout[-2000:]}")
    out = json.loads(lines[-1][len(MARK):])
    out["wall_seconds"] = round(time.perf_counter() - t0, 1)
    return out


def compare(name: str, ref: np.ndarray, got: np.ndarray, rtol: float, what: str) -> dict:
    if ref.shape != got.shape:
        raise SystemExit(f"{name}: shapes differ {ref.shape} vs {got.shape}")
    diff = np.abs(ref.astype(np.float64) - got.astype(np.float64))
    scale = float(np.abs(ref).max())
    active_ref, active_got = ref > 0, got > 0
    rows_differ = int((active_ref != active_got).any(axis=1).sum())
    max_diff = float(diff.max())
    ok = rows_differ == 0 and max_diff <= rtol * max(scale, 1e-30)
    return {"name": name, "what": what, "rows": int(ref.shape[0]), "max_abs_diff": max_diff,
            "max_abs_activation": scale, "max_rel_diff": max_diff / scale if scale else 0.0,
            "identical": bool(np.array_equal(ref, got)), "rows_with_different_active_set": rows_differ,
            "mean_l0": float(active_ref.sum(1).mean()), "passed": bool(ok)}


def train_saeforge(acts: np.ndarray, n_train: int, args) -> tuple[object, dict]:
    import torch

    from saeforge.saes import TopKConfig, TrainState, make_sae

    torch.manual_seed(args.seed)
    d_in = acts.shape[1]
    sae = make_sae(TopKConfig(d_in=d_in, d_sae=args.d_sae, k=args.k))
    n_batches = n_train // args.batch

    def batch(i: int) -> torch.Tensor:
        j = i % n_batches
        return torch.from_numpy(np.array(acts[j * args.batch:(j + 1) * args.batch], dtype=np.float32))

    sae.init_from_data(batch(0))
    lr = 2e-4 / (args.d_sae / 2**14) ** 0.5
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    t0 = time.perf_counter()
    loss = float("nan")
    for step in range(args.saeforge_steps):
        out = sae.training_loss(batch(step), state=TrainState(step=step))
        out.loss.backward()
        sae.before_optimizer_step()
        opt.step()
        sae.after_optimizer_step()
        opt.zero_grad(set_to_none=True)
        loss = float(out.terms["mse"].detach())
    return sae, {"steps": args.saeforge_steps, "batch": args.batch, "lr": lr, "final_mse": loss,
                 "train_seconds": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--acts", default=str(HERE / ".work" / "acts_smollm2_l5.npy"),
                    help="float32 .npy [N, 576] activations (benchmarks/make_acts.py)")
    ap.add_argument("--peers", default=os.environ.get("SAEFORGE_PEERS", str(HERE / ".work" / "peers")),
                    help="folder holding the saelens/ and sparsify/ venvs (env SAEFORGE_PEERS)")
    ap.add_argument("--work", default=str(HERE / ".work" / "interop"), help="scratch folder (replaced)")
    ap.add_argument("--d-sae", type=int, default=2304)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=300, help="training steps for each peer")
    ap.add_argument("--saeforge-steps", type=int, default=300)
    ap.add_argument("--eval-rows", type=int, default=2048, help="held-out rows (the last ones) to encode")
    ap.add_argument("--rtol", type=float, default=1e-5, help="pass: max |diff| <= rtol * max |activation|")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="result name under benchmarks/results (default interop)")
    ap.add_argument("--coders", choices=("on", "only", "off"), default="on",
                    help="also check transcoders (on), only them (only: no peer TopK training), or not (off)")
    ap.add_argument("--coder-rows", type=int, default=6144, help="MLP input/output rows made for the transcoder checks")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from common import machine, write_result

    from saeforge.formats import read_any, save_as

    peers = Path(args.peers)
    if args.coders == "only":
        work = Path(args.work)
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        results = coder_comparisons(args, peers, work, work / "peers.stderr.log")
        report(results, {"config": vars(args)}, args.out or "interop_coders")
        return
    acts_path = Path(args.acts)
    if not acts_path.is_file():
        raise SystemExit(f"{acts_path} not found: run benchmarks/make_acts.py first, or pass --acts")
    acts = np.load(acts_path, mmap_mode="r")
    if acts.ndim != 2 or acts.dtype != np.float32:
        raise SystemExit(f"{acts_path}: expected a float32 [N, d] array, got {acts.dtype} {acts.shape}")
    n_train = acts.shape[0] - args.eval_rows
    x_eval = torch.from_numpy(np.array(acts[-args.eval_rows:], dtype=np.float32))
    py_lens, py_sp = peer_python(peers, "saelens"), peer_python(peers, "sparsify")
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    log = work / "peers.stderr.log"
    common_args = ["--acts", str(acts_path), "--eval-rows", str(args.eval_rows)]
    train_args = [*common_args, "--d-sae", str(args.d_sae), "--k", str(args.k), "--batch", str(args.batch),
                  "--steps", str(args.steps), "--seed", str(args.seed)]
    meta = {"hook_name": "layers.5.resid_post", "model_name": "HuggingFaceTB/SmolLM2-135M-Instruct"}

    def encode_saeforge(sae) -> np.ndarray:
        with torch.no_grad():
            return sae.encode(x_eval).float().numpy()

    results: list[dict] = []
    notes: dict[str, list[str]] = {}

    # 1. the peers train and save; saeforge loads their folders
    print(f"SAELens trains a TopK SAE ({args.steps} steps x {args.batch}, d_sae {args.d_sae}, k {args.k}) ...",
          flush=True)
    lens = run_peer(py_lens, "interop_saelens.py", ["train", *train_args, "--out", str(work / "saelens")], log,
                    args.threads)
    print(f"sparsify trains a TopK SAE ({args.steps} steps x {args.batch}) ...", flush=True)
    spar = run_peer(py_sp, "interop_sparsify.py", ["train", *train_args, "--out", str(work / "sparsify")], log,
                    args.threads)
    lens_ref = np.load(work / "saelens" / "encodings.npy")
    spar_ref = np.load(work / "sparsify" / "encodings.npy")
    for label, folder in (("trainer checkpoint", lens["checkpoint_dir"]), ("save_inference_model", lens["inference_dir"])):
        imp = read_any(folder)
        notes[f"saelens {label}"] = imp.notes
        results.append(compare(f"saeforge loads SAELens ({label})", lens_ref, encode_saeforge(imp.sae), args.rtol,
                               f"load_any({Path(folder).relative_to(work)}) [{imp.fmt} -> {imp.sae.architecture}] "
                               "vs SAELens' own encode"))
    imp = read_any(spar["folder"])
    notes["sparsify"] = imp.notes
    results.append(compare("saeforge loads sparsify", spar_ref, encode_saeforge(imp.sae), args.rtol,
                           f"load_any({Path(spar['folder']).relative_to(work)}) [{imp.fmt} -> {imp.sae.architecture}] "
                           "vs sparsify's own encode"))

    # 2. saeforge trains and saves; the peers load its folders
    print(f"saeforge trains a TopK SAE ({args.saeforge_steps} steps x {args.batch}) ...", flush=True)
    sf_sae, sf_info = train_saeforge(acts, n_train, args)
    sf_sae.eval()
    save_as(sf_sae, work / "saeforge_native", "saeforge", metadata=meta)
    save_as(sf_sae, work / "saeforge_as_saelens", "saelens", metadata=meta)
    save_as(sf_sae, work / "saeforge_as_sparsify", "sparsify")
    sf_ref = encode_saeforge(sf_sae)
    # 3. across the peers through saeforge
    save_as(read_any(spar["folder"]).sae, work / "sparsify_as_saelens", "saelens", metadata=meta)
    save_as(read_any(lens["inference_dir"]).sae, work / "saelens_as_sparsify", "sparsify")

    print("SAELens and sparsify load the folders saeforge wrote ...", flush=True)
    lens_loaded = run_peer(py_lens, "interop_saelens.py", [
        "encode", *common_args,
        "--sae", f"{work / 'saeforge_native'}={work / 'lens_enc_saeforge_native.npy'}",
        "--sae", f"{work / 'saeforge_as_saelens'}={work / 'lens_enc_saeforge_as_saelens.npy'}",
        "--sae", f"{work / 'sparsify_as_saelens'}={work / 'lens_enc_sparsify_as_saelens.npy'}"], log, args.threads)
    spar_loaded = run_peer(py_sp, "interop_sparsify.py", [
        "encode", *common_args,
        "--sae", f"{work / 'saeforge_as_sparsify'}={work / 'sp_enc_saeforge_as_sparsify.npy'}",
        "--sae", f"{work / 'saelens_as_sparsify'}={work / 'sp_enc_saelens_as_sparsify.npy'}"], log, args.threads)
    results.append(compare("SAELens loads saeforge (native folder)", sf_ref,
                           np.load(work / "lens_enc_saeforge_native.npy"), args.rtol,
                           "SAE.load_from_disk(saeforge_native).encode vs saeforge's encode"))
    results.append(compare("SAELens loads saeforge (plain SAELens folder)", sf_ref,
                           np.load(work / "lens_enc_saeforge_as_saelens.npy"), args.rtol,
                           "SAE.load_from_disk(saeforge_as_saelens).encode vs saeforge's encode"))
    results.append(compare("sparsify loads saeforge", sf_ref, np.load(work / "sp_enc_saeforge_as_sparsify.npy"),
                           args.rtol, "SparseCoder.load_from_disk(saeforge_as_sparsify).encode vs saeforge's encode"))
    results.append(compare("sparsify -> saeforge -> SAELens", spar_ref,
                           np.load(work / "lens_enc_sparsify_as_saelens.npy"), args.rtol,
                           "SAELens' encode of sparsify's SAE (converted by saeforge) vs sparsify's own encode"))
    results.append(compare("SAELens -> saeforge -> sparsify", lens_ref,
                           np.load(work / "sp_enc_saelens_as_sparsify.npy"), args.rtol,
                           "sparsify's encode of SAELens' SAE (converted by saeforge) vs SAELens' own encode"))

    if args.coders == "on":
        results.extend(coder_comparisons(args, peers, work, log))
    print_table(results)
    print(f"\nSAELens {lens['version']}: trained {lens['train_seconds']:.0f}s, held-out FVU {lens['eval_fvu']:.3f}; "
          f"sparsify {spar['version']}: trained {spar['train_seconds']:.0f}s, held-out FVU {spar['eval_fvu']:.3f}; "
          f"saeforge: trained {sf_info['train_seconds']:.0f}s")
    for key, lines in notes.items():
        for line in lines:
            print(f"  note ({key}): {line}")
    passed = all(r["passed"] for r in results)
    data = {"benchmark": "interop", "machine": machine(),
            "config": {k: v for k, v in vars(args).items() if k not in ("peers", "work", "out")},
            "acts": {"path": str(acts_path), "rows": int(acts.shape[0]), "d": int(acts.shape[1]),
                     "eval_rows": args.eval_rows},
            "peers": {"saelens": lens, "sparsify": spar, "saelens_load": lens_loaded, "sparsify_load": spar_loaded},
            "saeforge": sf_info, "notes": notes, "comparisons": results, "passed": passed}
    path = write_result(args.out or "interop", data)
    print(f"{'all comparisons passed' if passed else 'SOME COMPARISONS FAILED'}; wrote {path}")
    sys.exit(0 if passed else 1)


def print_table(results: list[dict]) -> None:
    print()
    print(f"{'comparison':<56} {'max|diff|':>10} {'max|act|':>9} {'rel':>9} {'rows≠':>6} {'L0':>6}  result")
    for r in results:
        print(f"{r['name']:<56} {r['max_abs_diff']:>10.3g} {r['max_abs_activation']:>9.3g} {r['max_rel_diff']:>9.2g} "
              f"{r['rows_with_different_active_set']:>6} {r['mean_l0']:>6.1f}  "
              f"{'identical' if r['identical'] else ('ok' if r['passed'] else 'FAILED')}")


def report(results: list[dict], extra: dict, name: str) -> None:
    from common import machine, write_result

    print_table(results)
    passed = all(r["passed"] for r in results)
    path = write_result(name, {"benchmark": "interop", "machine": machine(), **extra, "comparisons": results,
                               "passed": passed})
    print(f"{'all comparisons passed' if passed else 'SOME COMPARISONS FAILED'}; wrote {path}")
    sys.exit(0 if passed else 1)


def compare_outputs(name: str, ref: np.ndarray, got: np.ndarray, rtol: float, what: str) -> dict:
    """Outputs (signed, dense): max |difference| relative to the largest |output|."""
    diff = np.abs(ref.astype(np.float64) - got.astype(np.float64))
    scale = float(np.abs(ref).max())
    return {"name": name, "what": what, "rows": int(ref.shape[0]), "max_abs_diff": float(diff.max()),
            "max_abs_activation": scale, "max_rel_diff": float(diff.max()) / scale if scale else 0.0,
            "identical": bool(np.array_equal(ref, got)), "rows_with_different_active_set": 0, "mean_l0": 0.0,
            "passed": bool(diff.max() <= rtol * max(scale, 1e-30))}


def mlp_activations(work: Path, rows: int) -> tuple[Path, Path]:
    """[rows, 576] MLP inputs and outputs of layer 5 of the embedded model on the embedded validation text."""
    import torch

    from saeforge.data.text_source import TextSource
    from saeforge.data.token_stream import TokenPolicy, TokenStream
    from saeforge.models.language_model import LanguageModel

    lm = LanguageModel.load("embedded", device="cpu")
    stream = TokenStream.for_model(TextSource("embedded:validation"), lm, TokenPolicy(128, True, True))
    xs, ys, n = [], [], 0
    for _, ids in stream.batches(8):
        keep = stream.keep_mask(ids)
        acts = lm.read(ids, ["layers.5.mlp_in", "layers.5.mlp_out"])
        xs.append(acts["layers.5.mlp_in"][keep].float())
        ys.append(acts["layers.5.mlp_out"][keep].float())
        n += int(keep.sum())
        if n >= rows:
            break
    x_path, y_path = work / "mlp_in.npy", work / "mlp_out.npy"
    np.save(x_path, torch.cat(xs)[:rows].numpy())
    np.save(y_path, torch.cat(ys)[:rows].numpy())
    return x_path, y_path


def train_transcoder(cfg, x: np.ndarray, y: np.ndarray, n_train: int, steps: int, batch: int):
    """A plain saeforge training loop (expected-norm scaling folded in at the end), enough for non-trivial weights."""
    import torch

    from saeforge.saes import ActivationScaler, TrainState, make_sae

    torch.manual_seed(0)
    xt, yt = torch.from_numpy(np.array(x[:n_train])), torch.from_numpy(np.array(y[:n_train]))
    scaler = ActivationScaler.fit(xt[:4096], "expected_norm", yt[:4096])
    sae = make_sae(cfg)
    sae.init_from_data(scaler.scale_input(xt[:4096]), scaler.scale_target(yt[:4096]))
    opt = torch.optim.Adam(sae.parameters(), lr=2e-3)
    n_batches = max(1, n_train // batch)
    for step in range(steps):
        j = step % n_batches
        out = sae.training_loss(scaler.scale_input(xt[j * batch:(j + 1) * batch]),
                                scaler.scale_target(yt[j * batch:(j + 1) * batch]), state=TrainState(step=step))
        out.loss.backward()
        sae.before_optimizer_step()
        opt.step()
        sae.after_optimizer_step()
        opt.zero_grad(set_to_none=True)
    scaler.fold_into(sae)
    return sae.eval()


def coder_comparisons(args, peers: Path, work: Path, log: Path) -> list[dict]:
    """Section 4 of the module docstring."""
    import torch

    from saeforge.formats import read_any, save_as
    from saeforge.saes import BatchTopKSkipTranscoderConfig, JumpReLUSkipTranscoderConfig, TopKSkipTranscoderConfig

    py_lens, py_sp = peer_python(peers, "saelens"), peer_python(peers, "sparsify")
    cw = work / "coders"
    cw.mkdir(parents=True, exist_ok=True)
    print(f"transcoders: MLP input/output of layer 5 of the embedded model ({args.coder_rows} rows) ...", flush=True)
    x_path, y_path = mlp_activations(cw, args.coder_rows)
    x, y = np.load(x_path), np.load(y_path)
    n_eval = min(1024, args.coder_rows // 4)
    n_train = x.shape[0] - n_eval
    x_eval = torch.from_numpy(x[-n_eval:])
    rows = ["--x", str(x_path), "--eval-rows", str(n_eval)]
    meta = {"reads": ["layers.5.mlp_in"], "writes": ["layers.5.mlp_out"], "hook_name": "layers.5.mlp_in",
            "hook_name_out": "layers.5.mlp_out", "model_name": "HuggingFaceTB/SmolLM2-135M-Instruct"}

    def ours(sae):
        with torch.no_grad():
            return sae.encode(x_eval).float().numpy(), sae(x_eval).float().numpy()

    results = []
    d, k = 576, args.k
    made = {
        "topk_skip_transcoder": (TopKSkipTranscoderConfig(d_in=d, d_sae=args.d_sae, k=k), "sparsify", py_sp,
                                 "sparsify-load", "SparseCoder.load_from_disk"),
        "jumprelu_skip_transcoder": (JumpReLUSkipTranscoderConfig(d_in=d, d_sae=args.d_sae, l0_coefficient=1e-3,
                                                                  bandwidth=0.05, threshold_init=0.05),
                                     "saelens", py_lens, "saelens-load", "SAE.load_from_disk"),
        "batchtopk_skip_transcoder": (BatchTopKSkipTranscoderConfig(d_in=d, d_sae=args.d_sae, k=k,
                                                                    threshold_start_step=5),
                                      "saelens", py_lens, "saelens-load", "SAE.load_from_disk"),
    }
    for arch, (cfg, fmt, py, cmd, loader) in made.items():
        print(f"saeforge trains a {arch} and writes it as {fmt} ...", flush=True)
        sae = train_transcoder(cfg, x, y, n_train, steps=40, batch=1024)
        folder = cw / f"saeforge_{arch}_as_{fmt}" / ("layers.5.mlp" if fmt == "sparsify" else "")
        save_as(sae, folder, fmt, metadata=meta)
        enc, out = ours(sae)
        prefix = str(cw / f"{fmt}_loads_{arch}")
        run_peer(py, "interop_coders.py", [cmd, *rows, "--sae", str(folder), "--out", prefix], log, args.threads)
        results.append(compare(f"{fmt} loads saeforge's {arch}", enc, np.load(prefix + ".enc.npy"), args.rtol,
                               f"{loader}(...).encode vs saeforge's encode"))
        results.append(compare_outputs(f"{fmt} loads saeforge's {arch}: outputs", out, np.load(prefix + ".out.npy"),
                                       args.rtol, f"{loader}(...) forward (skip included) vs saeforge's forward"))
    print("sparsify trains a skip transcoder; SAELens builds one; saeforge reads both ...", flush=True)
    run_peer(py_sp, "interop_coders.py", ["sparsify-make", *rows, "--y", str(y_path), "--out",
                                          str(cw / "sparsify_made" / "layers.5.mlp"), "--d-sae", str(args.d_sae),
                                          "--k", str(k)], log, args.threads)
    run_peer(py_lens, "interop_coders.py", ["saelens-make", *rows, "--out", str(cw / "saelens_made"),
                                            "--d-sae", str(args.d_sae)], log, args.threads)
    for label, folder in (("sparsify", cw / "sparsify_made" / "layers.5.mlp"), ("SAELens", cw / "saelens_made")):
        imp = read_any(folder)
        enc, out = ours(imp.sae)
        results.append(compare(f"saeforge loads {label}'s skip transcoder", np.load(folder / "enc.npy"), enc,
                               args.rtol, f"read_any -> {imp.sae.architecture}, encode vs {label}'s own"))
        results.append(compare_outputs(f"saeforge loads {label}'s skip transcoder: outputs",
                                       np.load(folder / "out.npy"), out, args.rtol,
                                       f"saeforge forward (skip included) vs {label}'s own"))
    return results


if __name__ == "__main__":
    main()
