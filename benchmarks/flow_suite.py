"""Step time of an SAE suite (saeforge flow suite; docs/flow.md): N SAEs fed by one forward pass, against N separate
runs and against the bound.

On the embedded model (SmolLM2-135M-Instruct, bfloat16 as the documented suite recipe runs it), ``--layers`` (default
10-11) gives N = 3 × layers + 1 SAEs (resid_post, mlp_out, attn_out of each layer and the input residual), TopK,
d_sae ``--d-sae``, k 32, Adam, one batch of ``--batch`` tokens (128-token contexts):

- suite step: one forward stopped after the last layer (``LanguageModel.read`` of all N sites) + the N SAE steps;
- separate: for each SAE its own forward (stopped at its layer) + its step, as N runs of ``saeforge train`` do;
- bound: the forward to the last layer alone + the N SAE steps alone (each timed by itself).

Target: the suite step at ≥ 90 % of the bound (bound / suite ≥ 0.9). Also timed: the trainer itself
(``saeforge.training.train`` on the suite's config, live model, ``--trainer-steps`` steps), per step, whose extra
costs (buffer shuffling, the first fill, checkpointing once) show against the same bound. Rounds interleave the
three so a shared machine disturbs them alike; figures are medians.

    .venv/bin/python benchmarks/flow_suite.py [--layers 10-11] [--rounds 3]

Writes ``benchmarks/results/flow_suite.json``.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from benchmarks.common import machine, median, peak_rss_mb, write_result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", default="10-11")
    ap.add_argument("--d-sae", type=int, default=2304)
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--trainer-steps", type=int, default=6)
    args = ap.parse_args()

    from saeforge.data.text_source import TextSource
    from saeforge.data.token_stream import TokenPolicy, TokenStream
    from saeforge.flow.suite import SuiteConfig, parse_layers, parse_site, suite_sites, suite_train_config
    from saeforge.models.language_model import LanguageModel
    from saeforge.saes import TopKConfig, TrainState, make_sae

    lm = LanguageModel.load("embedded", dtype="bfloat16", device="cpu")
    sites = suite_sites(parse_layers(args.layers, lm.n_layers))
    stream = TokenStream.for_model(TextSource("embedded:train"), lm, TokenPolicy(128, True, True))
    contexts = []
    for ctx in stream.contexts():
        contexts.append(torch.as_tensor(ctx))
        if len(contexts) * 128 >= args.batch:
            break
    ids = torch.stack(contexts)
    saes = {}
    for s in sites:
        torch.manual_seed(0)
        sae = make_sae(TopKConfig(d_in=lm.d_model, d_sae=args.d_sae, k=32))
        saes[s] = (sae, torch.optim.Adam(sae.parameters(), lr=1e-3, fused=True))

    def sae_step(site: str, x: torch.Tensor) -> None:
        sae, opt = saes[site]
        out = sae.training_loss(x.reshape(-1, x.shape[-1]).float(), None, state=TrainState(step=0, sparsity_scale=1.0))
        out.loss.backward()
        sae.before_optimizer_step()
        opt.step()
        sae.after_optimizer_step()
        opt.zero_grad(set_to_none=True)

    deepest = f"layers.{max(parse_site(s)[0] for s in sites)}.resid_post"  # a layer's resid_post is its last site

    def suite_step():
        acts = lm.read(ids, sites)
        for s in sites:
            sae_step(s, acts[s])

    def separate():
        for s in sites:
            sae_step(s, lm.read(ids, [s])[s])

    def forward_only():
        lm.read(ids, [deepest])

    def sae_only():
        x = {s: torch.randn(ids.numel(), lm.d_model) for s in sites}
        t = 0.0
        for s in sites:
            t0 = time.perf_counter()
            sae_step(s, x[s])
            t += time.perf_counter() - t0
        return t

    def train_steps() -> float:
        import dataclasses

        from saeforge.training import train

        with tempfile.TemporaryDirectory() as tmp:
            cfg = suite_train_config(SuiteConfig(out=f"{tmp}/suite", layers=args.layers,
                                                 tokens=args.batch * args.trainer_steps, batch_size=args.batch,
                                                 d_sae=args.d_sae, k=32, model_dtype="bfloat16", device="cpu",
                                                 progress=False, checkpoint_every=10_000), lm.n_layers)
            cfg = dataclasses.replace(cfg, buffer_tokens=args.batch * args.trainer_steps, lr_warmup_steps=1)
            t0 = time.perf_counter()
            train(cfg)
            return (time.perf_counter() - t0) / args.trainer_steps

    suite_step(), separate()  # warm-up
    rows = {"suite": [], "separate": [], "forward": [], "saes": [], "trainer": []}
    for r in range(args.rounds):
        for name, fn in (("suite", suite_step), ("separate", separate), ("forward", forward_only)):
            t0 = time.perf_counter()
            fn()
            rows[name].append(time.perf_counter() - t0)
        rows["saes"].append(sae_only())
        if args.trainer_steps:
            rows["trainer"].append(train_steps())
        print(f"round {r}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in rows.items() if v), flush=True)
    m = {k: median(v) for k, v in rows.items() if v}
    bound = m["forward"] + m["saes"]
    out = {"machine": machine(), "layers": args.layers, "n_saes": len(sites), "d_sae": args.d_sae,
           "batch_tokens": int(ids.numel()), "seconds": m, "bound_s": bound,
           "suite_fraction_of_bound": bound / m["suite"], "separate_over_suite": m["separate"] / m["suite"],
           "trainer_fraction_of_bound": bound / m["trainer"] if "trainer" in m else None,
           "peak_rss_mb": peak_rss_mb()}
    print(f"{len(sites)} SAEs, {ids.numel()} tokens a step: suite {m['suite']:.2f} s, separate {m['separate']:.2f} s "
          f"({out['separate_over_suite']:.2f}×), bound {bound:.2f} s (forward {m['forward']:.2f} + SAEs "
          f"{m['saes']:.2f}) -> suite at {out['suite_fraction_of_bound']:.0%} of the bound"
          + (f"; trainer {m['trainer']:.2f} s/step = {out['trainer_fraction_of_bound']:.0%} of the bound"
             if "trainer" in m else ""))
    print(f"written {write_result('flow_suite', out)}")


if __name__ == "__main__":
    main()
