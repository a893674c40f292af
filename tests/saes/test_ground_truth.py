"""Ground truth: trained on synthetic sparse features in superposition, the SAEs must find the true directions.

The data (saeforge.evals.synthetic): 128 unit directions in R^64 (2x overcomplete), power-law frequencies, an
expected 4 active features per sample (the true L0), per-feature scales spread over 0.5-2 and log-normal
per-occurrence magnitudes. Every step draws a fresh batch, so no SAE can overfit a fixed sample.

Each SAE is trained with a plain loop (Adam, linear LR decay over the last 30% of steps), scaled with the
"expected_norm" input normalisation, then the scale is folded into the weights and the SAE is evaluated on raw,
unseen data at inference semantics (BatchTopK-style SAEs through their learned threshold).

The hyper-parameters and bounds were checked by hand on seeds 0-7 (``python -m tests.saes.test_ground_truth``
prints them; worst cases are noted above the tests): the seed below is one of them, not a lucky pick, and every
bound holds with a margin on all eight.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import pytest
import torch

from saeforge.evals.synthetic import SparseFeatureModel, mean_max_cosine
from saeforge.saes import (
    ActivationScaler,
    BatchTopKConfig,
    DeadLatentTracker,
    GatedConfig,
    JumpReLUConfig,
    MatryoshkaConfig,
    ReLUConfig,
    TopKConfig,
    TrainState,
    make_sae,
)

SEED = 0
D, N_FEATURES, TRUE_L0 = 64, 128, 4
D_SAE = N_FEATURES
BATCH = 1024
DEAD_AFTER_TOKENS = 20_000  # the rarest feature fires about once every 60 tokens


def feature_model(seed: int) -> SparseFeatureModel:
    return SparseFeatureModel.create(D, N_FEATURES, mean_active=TRUE_L0, frequency_exponent=0.5,
                                     scale_range=(0.5, 2.0), magnitude="lognormal", magnitude_sigma=0.5, seed=seed)


@dataclass
class Result:
    mean_max_cosine: float
    dead: int           # latents that never fire on 16384 unseen samples
    l0: float           # mean active latents per sample at inference
    fvu: float          # fraction of variance unexplained on the unseen samples
    first_loss: float   # training loss at the first step
    last_loss: float    # mean training loss over the last 50 steps
    seconds: float


def train(cfg, *, steps: int, lr: float, seed: int = SEED, sparsity_warmup: float = 0.0) -> Result:
    torch.manual_seed(seed)
    model = feature_model(seed)
    g = torch.Generator().manual_seed(seed + 1)
    x_init, _ = model.sample(4096, generator=g)
    scaler = ActivationScaler.fit(x_init, "expected_norm")
    sae = make_sae(cfg)
    sae.init_from_data(scaler.scale_input(x_init))
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    decay_from = int(0.7 * steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (steps - s) / (steps - decay_from)))
    tracker = DeadLatentTracker(cfg.d_sae, getattr(cfg, "dead_after_tokens", DEAD_AFTER_TOKENS))
    resample_every = getattr(cfg, "resample_every", None) or 0
    losses = []
    start = time.perf_counter()
    for step in range(steps):
        x, _ = model.sample(BATCH, generator=g)
        x = scaler.scale_input(x)
        warm = 1.0 if sparsity_warmup == 0 else min(1.0, step / (sparsity_warmup * steps))
        out = sae.training_loss(x, state=TrainState(step=step, sparsity_scale=warm, dead_mask=tracker.dead_mask))
        out.loss.backward()
        sae.before_optimizer_step()
        opt.step()
        sae.after_optimizer_step()
        opt.zero_grad()
        sched.step()
        tracker.update(out.fired, BATCH)
        losses.append(float(out.loss.detach()))
        if resample_every and step > 0 and step % resample_every == 0:
            sae.resample_dead_latents(x, tracker.dead_mask, opt)
    seconds = time.perf_counter() - start

    scaler.fold_into(sae)  # evaluate on raw activations, as a saved SAE would be used
    x_eval, _ = model.sample(16384, generator=g)
    with torch.no_grad():
        f = sae.encode(x_eval)
        x_hat = sae.decode(f)
    fvu = float((x_hat - x_eval).pow(2).sum() / (x_eval - x_eval.mean(0)).pow(2).sum())
    return Result(
        mean_max_cosine=mean_max_cosine(sae.W_dec, model.directions),
        dead=int((~(f > 0).any(0)).sum()),
        l0=float((f > 0).sum(1).float().mean()),
        fvu=fvu,
        first_loss=losses[0],
        last_loss=sum(losses[-50:]) / 50,
        seconds=seconds,
    )


# name -> (config, training options). Shared by the tests below and by hand-run seed sweeps.
RECIPES = {
    "topk": (TopKConfig(d_in=D, d_sae=D_SAE, k=TRUE_L0, dead_after_tokens=DEAD_AFTER_TOKENS),
             {"steps": 1500, "lr": 1e-2}),
    "batchtopk": (BatchTopKConfig(d_in=D, d_sae=D_SAE, k=TRUE_L0, dead_after_tokens=DEAD_AFTER_TOKENS,
                                  threshold_start_step=750),
                  {"steps": 1500, "lr": 1e-2}),
    "matryoshka": (MatryoshkaConfig(d_in=D, d_sae=D_SAE, k=TRUE_L0, dead_after_tokens=DEAD_AFTER_TOKENS,
                                    threshold_start_step=750, group_sizes=(64, 64)),
                   {"steps": 1500, "lr": 1e-2}),
    # ε and the initial θ at the scale of "expected_norm" activations (active features are ~4 here); λ sets
    # the L0, chosen so it lands near the true L0.
    "jumprelu": (JumpReLUConfig(d_in=D, d_sae=D_SAE, l0_coefficient=0.7, bandwidth=0.2, threshold_init=1.0),
                 {"steps": 2000, "lr": 5e-3, "sparsity_warmup": 0.3}),
    "gated": (GatedConfig(d_in=D, d_sae=D_SAE, l1_coefficient=3.0), {"steps": 1500, "lr": 5e-3, "sparsity_warmup": 0.1}),
    "relu_april": (ReLUConfig(d_in=D, d_sae=D_SAE, l1_coefficient=1.0),
                   {"steps": 1500, "lr": 5e-3, "sparsity_warmup": 0.1}),
    "relu_classic": (ReLUConfig(d_in=D, d_sae=D_SAE, variant="classic", l1_coefficient=1.0, resample_every=500),
                     {"steps": 1500, "lr": 5e-3, "sparsity_warmup": 0.1}),
}


@pytest.fixture(autouse=True)
def one_thread():
    # These matrices are small enough that a second thread buys nothing, and on a busy machine OpenMP's spinning
    # threads made two-thread runs over ten times slower (measured: 215 s against 17 s). Restored afterwards.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run(name: str, seed: int = SEED) -> Result:
    cfg, options = RECIPES[name]
    return train(cfg, seed=seed, **options)


# Seeds 0-7 by hand (worst case in brackets): mean max cosine >= 0.942, dead <= 9, L0 3.48-4.07, FVU <= 0.067,
# last/first loss <= 0.17 for these four; gated / relu: cosine >= 0.923, dead <= 8, FVU <= 0.066, loss ratio <= 0.30.
@pytest.mark.parametrize("name", ["topk", "batchtopk", "matryoshka", "jumprelu"])
def test_recovers_the_true_features(name):
    r = run(name)
    assert r.mean_max_cosine >= 0.9, r
    assert r.dead <= 12, r  # of 128 latents
    assert 0.6 * TRUE_L0 <= r.l0 <= 1.4 * TRUE_L0, r
    assert r.fvu < 0.1, r
    assert r.last_loss < 0.3 * r.first_loss, r


@pytest.mark.parametrize("name", ["gated", "relu_april", "relu_classic"])
def test_l1_architectures_train(name):
    # An L1 penalty shrinks activations and lets weak features go, so the bar is lower (and the L0 is free).
    r = run(name)
    assert r.last_loss < 0.5 * r.first_loss, r
    assert r.mean_max_cosine >= 0.85, r
    assert r.dead <= 16, r
    assert r.fvu < 0.1, r


if __name__ == "__main__":  # hand-run seed sweep: python -m tests.saes.test_ground_truth [names...]
    import sys

    torch.set_num_threads(1)  # as the tests run
    names = sys.argv[1:] or list(RECIPES)
    for name in names:
        for seed in range(8):
            print(name, seed, run(name, seed), flush=True)
