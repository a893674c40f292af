"""Dashboard latency on a 16k-feature store: the feature page (HTML) and its JSON endpoint, served by
``saeforge serve`` (uvicorn, its own process) and requested over loopback HTTP, one request at a time.

The store is synthetic but shaped like a real harvest with the default settings (``saeforge harvest``): 16,384
features, each with statistics, a 24-bin histogram, 5 top tokens, 10 promoted and 10 suppressed tokens, 10 neighbours
and an explanation; 20 top + 30 quantile + 10 random examples of 33 tokens (the default window) per feature — about a
million example rows — over 4,096 contexts of 128 tokens and a 49,152-token vocabulary. It is written straight
through ``FeatureStore``'s ``add_*`` methods (about 20 s on a 2-core machine) and kept under ``benchmarks/.work/``
for later runs (``--rebuild`` makes it again).

Each request asks for a different feature (uniformly random indices, seeded), so pages are not served from any cache
but SQLite's own page cache, as when someone browses. Also timed: the feature list with an explanation search and a
token search, the overview, and the same feature record read in process (no HTTP) to show where the time goes.

    .venv/bin/python benchmarks/dashboard.py            # --requests 400 by default

Writes ``benchmarks/results/dashboard.json``; the target is a feature page under 200 ms (p95 is reported against it).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import queue
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import machine, write_result  # noqa: E402

WORK = Path(__file__).parent / ".work" / "dashboard"
SAE = "layers.5.resid_post"
WORDS = ("punctuation comma period quote name place king verb noun plural past tense question negation number "
         "date title greeting farewell body emotion colour animal weather food drink travel war love death god "
         "time night day money law crown sword letter").split()


def build_store(path: Path, args) -> dict:
    """Write the synthetic store; returns what was built and how long it took."""
    from saeforge.features.store import FeatureStore

    t0 = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    n, T, V, W = args.features, args.context_length, args.vocab, args.window
    path.parent.mkdir(parents=True, exist_ok=True)
    for p in path.parent.glob(path.name + "*"):
        p.unlink()
    store = FeatureStore(path, create=True)
    store.con.execute("PRAGMA journal_mode = OFF")
    store.con.execute("PRAGMA synchronous = OFF")
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    vocab = {i: (" " if i % 3 else "") + "".join(rng.choice(letters, 1 + i % 7)) for i in range(V)}
    store.add_vocab(vocab)
    store.add_contexts(rng.integers(0, V, size=(args.contexts, T), dtype=np.int32), 0)
    sae_id = store.add_sae(SAE, SAE, n, "topk", "/synthetic")

    def toks(k):
        return [[vocab[int(t)], float(v)] for t, v in zip(rng.integers(0, V, k), rng.normal(0, 1, k))]

    records = []
    for i in range(n):
        max_act = float(rng.uniform(2, 20))
        counts = rng.integers(0, 200, 24).tolist()
        records.append({
            "idx": i, "density": float(rng.uniform(1e-5, 0.1)), "fire_count": int(sum(counts)), "max_act": max_act,
            "mean_act": max_act / 3, "quantiles": {str(q): max_act * q for q in (0.1, 0.25, 0.5, 0.75, 0.9, 0.99)},
            "histogram": {"edges": np.linspace(0, max_act, 25).tolist(), "counts": counts},
            "top_tokens": [[vocab[int(t)], int(c)] for t, c in zip(rng.integers(0, V, 5), rng.integers(1, 50, 5))],
            "promoted": toks(args.logits), "suppressed": toks(args.logits),
            "neighbors": [[int(j), float(c)] for j, c in zip(rng.choice(n, args.neighbors, replace=False),
                                                                np.sort(rng.uniform(0.1, 0.6, args.neighbors))[::-1])],
        })
    store.add_features(sae_id, records)

    def examples():
        per = [("top", r) for r in range(args.top)] + \
              [("quantile", b) for b in range(args.quantile_bins) for _ in range(args.per_bin)] + \
              [("random", r) for r in range(args.random)]
        for i in range(n):
            ctx = rng.integers(0, args.contexts, len(per))
            start = rng.integers(0, T - W, len(per))
            acts = np.where(rng.random((len(per), W)) < 0.15, rng.uniform(0, 10, (len(per), W)), 0.0)
            for j, (kind, rank) in enumerate(per):
                a = acts[j] if kind != "random" else np.zeros(W)
                yield (i, kind, rank, int(ctx[j]), int(start[j]), int(start[j]) + W - 9, float(a.max()), a)

    store.add_examples(sae_id, examples())
    store.commit()
    t_rows = time.perf_counter() - t0
    for i in range(n):  # every feature explained: the page then shows the neighbours' explanations as well
        words = rng.choice(WORDS, 3, replace=False)
        store.set_explanation(SAE, i, f"{words[0]} and {words[1]} near a {words[2]}", float(rng.uniform(0, 1)),
                              "synthetic")
    store.set_meta("n_tokens", args.contexts * T)
    store.set_meta("corpus", "synthetic")
    store.set_meta("context_length", T)
    store.commit()
    store.con.execute("PRAGMA journal_mode = WAL")
    n_examples = store.con.execute("SELECT COUNT(*) FROM examples").fetchone()[0]
    store.close()
    return {"features": n, "examples": int(n_examples), "contexts": args.contexts, "context_length": T,
            "vocab": V, "window": W, "build_seconds": round(time.perf_counter() - t0, 1),
            "rows_seconds": round(t_rows, 1), "size_mb": round(path.stat().st_size / 2**20, 1)}


def summary(ms: list[float]) -> dict:
    xs = sorted(ms)
    pct = lambda p: xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]  # noqa: E731
    return {"n": len(xs), "median_ms": round(statistics.median(xs), 2), "p95_ms": round(pct(95), 2),
            "p99_ms": round(pct(99), 2), "max_ms": round(xs[-1], 2), "mean_ms": round(statistics.fmean(xs), 2)}


def start_server(run: Path):
    code = ("import sys; from saeforge.web import ServeConfig, run_serve; "
            "run_serve(ServeConfig(path=sys.argv[1], port=0))")
    proc = subprocess.Popen([sys.executable, "-c", code, str(run)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: lines.put(proc.stdout.readline()), daemon=True).start()
    try:
        line = lines.get(timeout=120)
    except queue.Empty:
        proc.kill()
        raise SystemExit("the dashboard server did not start within 120 s")
    m = re.search(r"http://([\d.]+):(\d+)", line)
    if not m:
        proc.kill()
        raise SystemExit(f"unexpected server output: {line!r}")
    return proc, m.group(1), int(m.group(2))


def time_requests(host: str, port: int, paths: list[str], expect: str) -> tuple[list[float], int]:
    conn = http.client.HTTPConnection(host, port, timeout=30)
    out, size = [], 0
    for p in paths:
        t = time.perf_counter()
        conn.request("GET", p, headers={"Accept": "text/html" if expect == "html" else "application/json"})
        r = conn.getresponse()
        body = r.read()
        out.append((time.perf_counter() - t) * 1000)
        if r.status != 200:
            raise SystemExit(f"GET {p}: {r.status} {body[:200]!r}")
        size = max(size, len(body))
    conn.close()
    return out, size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--features", type=int, default=16_384)
    ap.add_argument("--contexts", type=int, default=4096)
    ap.add_argument("--context-length", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=49_152)
    ap.add_argument("--window", type=int, default=33, help="tokens per example (harvest default 24 + 1 + 8)")
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--quantile-bins", type=int, default=10)
    ap.add_argument("--per-bin", type=int, default=3)
    ap.add_argument("--random", type=int, default=10)
    ap.add_argument("--logits", type=int, default=10)
    ap.add_argument("--neighbors", type=int, default=10)
    ap.add_argument("--requests", type=int, default=400, help="timed requests per endpoint")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rebuild", action="store_true", help="make the store again even if it exists")
    ap.add_argument("--no-write", action="store_true", help="print only; do not write the results file")
    args = ap.parse_args()

    run = WORK / f"run_{args.features}"
    store_path = run / "features.sqlite"
    info_path = run / "built.json"
    if args.rebuild or not store_path.is_file() or not info_path.is_file():
        print(f"building a synthetic {args.features:,}-feature store in {run} ...", flush=True)
        built = build_store(store_path, args)
        info_path.write_text(json.dumps(built))
    built = json.loads(info_path.read_text())
    print(f"store: {built['features']:,} features, {built['examples']:,} examples, {built['size_mb']} MB "
          f"(built in {built['build_seconds']} s)", flush=True)

    rng = np.random.default_rng(args.seed + 1)
    n = built["features"]
    idxs = rng.integers(0, n, args.warmup + args.requests).tolist()

    # in process, no HTTP: the store read and the page's data
    from saeforge.web.data import RunData

    data = RunData(run)
    inproc = []
    for i in idxs[: args.warmup]:
        data.feature(SAE, i)
    for i in idxs[args.warmup:]:
        t = time.perf_counter()
        data.feature(SAE, i)
        inproc.append((time.perf_counter() - t) * 1000)
    data.close()

    proc, host, port = start_server(run)
    try:
        results = {}
        some = idxs[: args.warmup + args.requests // 4]
        plan = {
            "feature_page_html": ([f"/saes/{SAE}/features/{i}" for i in idxs], "html"),
            "feature_json": ([f"/api/saes/{SAE}/features/{i}" for i in idxs], "json"),
            "feature_list_search_explanation_html": (
                [f"/saes/{SAE}/features?q={WORDS[i % len(WORDS)]}" for i in some], "html"),
            "feature_list_search_token_json": (
                [f"/api/saes/{SAE}/features?token=ab{chr(97 + i % 26)}" for i in some], "json"),
            "overview_html": (["/"] * (args.warmup + args.requests // 4), "html"),
        }
        for name, (paths, kind) in plan.items():
            time_requests(host, port, paths[: args.warmup], kind)
            ms, size = time_requests(host, port, paths[args.warmup:], kind)
            results[name] = {**summary(ms), "largest_response_kb": round(size / 1024, 1)}
            print(f"{name:<40} median {results[name]['median_ms']:7.2f} ms   p95 {results[name]['p95_ms']:7.2f} ms"
                  f"   max {results[name]['max_ms']:7.2f} ms   ({results[name]['n']} requests)", flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    results["feature_in_process_no_http"] = summary(inproc)
    inp = results["feature_in_process_no_http"]
    label = "feature record in process (no HTTP)"
    print(f"{label:<40} median {inp['median_ms']:7.2f} ms   p95 {inp['p95_ms']:7.2f} ms", flush=True)
    target = 200.0
    ok = results["feature_page_html"]["p95_ms"] < target and results["feature_json"]["p95_ms"] < target
    print(f"feature page p95 under {target:.0f} ms: {'yes' if ok else 'NO'}")
    out = {
        "benchmark": "dashboard latency: feature page (HTML) and its JSON endpoint on a 16k-feature store",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(["python benchmarks/dashboard.py", *sys.argv[1:]]),
        "machine": {**machine(), "load_average": os.getloadavg()},
        "server": "saeforge serve (uvicorn, one process, default settings) on 127.0.0.1; one client, keep-alive, "
                  "sequential requests, a different random feature each request",
        "store": built,
        "results": results,
        "target_ms": target,
        "feature_page_p95_under_target": ok,
    }
    if not args.no_write:
        print(f"wrote {write_result('dashboard', out)}")


if __name__ == "__main__":
    main()
