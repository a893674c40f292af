"""A small finished run for the dashboard tests: the tiny Llama's trained TopK SAE (tests/conftest.py ``tiny_run``),
evaluated (eval.json and plots) and harvested (features.sqlite) on held-out text, with a few explanations."""

from __future__ import annotations

import random
import shutil

import pytest

pytest.importorskip("fastapi", reason="the dashboard needs the web extra: pip install -e '.[web]'")
pytest.importorskip("uvicorn", reason="the dashboard needs the web extra: pip install -e '.[web]'")

SAE = "layers.1.resid_post"
# feature -> explanation written into the store (the words are what the search tests look for); the "label" feature
# gets the top-token label explain falls back to, and "quiet" an explanation from the explainer's second try
EXPLANATIONS = {
    "quiet": "the particle 'to' before a verb",
    "busy": "punctuation closing a clause",
    "third": "names of English kings and places",
}
SCORES = {"busy": 0.9, "quiet": 0.8, "third": 0.55, "label": 0.5}
SOURCES = {"quiet": "llm-retry", "label": "top-tokens"}
CHANCE_SD = 0.25 * (1 / 10 + 1 / 10) ** 0.5  # 10 + 10 scored excerpts


NEVER_FIRES = 127  # a latent the fixture silences, so the "never fired" paths are always exercised


def _silence_latent(weights_file, latent: int) -> None:
    """No input can put this TopK latent among the k largest (its encoder row is zero and its bias far below any
    other pre-activation), so the harvest records it as never firing."""
    from safetensors.torch import load_file, save_file

    weights = load_file(str(weights_file))
    weights["W_enc"][:, latent] = 0
    weights["b_enc"][latent] = -1e4
    save_file(weights, str(weights_file))


@pytest.fixture(scope="session")
def web_run(tiny_run, tiny_llama, tmp_path_factory):
    """(run directory, {role: feature index}): a copy of the tiny run, evaluated, harvested and partly explained."""
    from saeforge.evals.evaluate import EvalConfig, evaluate
    from saeforge.features.harvest import HarvestConfig, harvest
    from saeforge.features.store import FeatureStore
    from tests.conftest import TEXT

    folder = tmp_path_factory.mktemp("web")
    run = folder / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("checkpoints"))
    _silence_latent(run / "saes" / SAE / "sae_weights.safetensors", NEVER_FIRES)
    words = TEXT.split()
    rng = random.Random(7)
    heldout = folder / "heldout.txt"
    heldout.write_text(" ".join(rng.choice(words) for _ in range(2500)))
    evaluate(EvalConfig(path=str(run), corpus=str(heldout), tokens=64 * 8, batch_size=8, device="cpu",
                        progress=False))
    harvest(HarvestConfig(path=str(run), corpus=str(heldout), tokens=64 * 16, batch_size=8, top_examples=5,
                          quantile_bins=4, examples_per_bin=2, random_examples=3, window_before=8, window_after=3,
                          n_logits=5, n_neighbors=4, device="cpu", progress=False))
    from saeforge.features.autointerp.quality import top_token_label

    with FeatureStore(run / "features.sqlite") as store:
        firing = [r["idx"] for r in store.list_features(SAE, order="density", limit=1000) if r["density"] > 0]
        roles = {"busy": firing[0], "quiet": firing[-1], "third": firing[len(firing) // 2],
                 "label": firing[len(firing) // 3]}
        for role, idx in roles.items():
            text = EXPLANATIONS.get(role) or top_token_label(store.feature(SAE, idx, with_examples=False)["top_tokens"])
            store.set_explanation(SAE, idx, text, SCORES[role], f"test:judge | detection={SCORES[role]:.3f}",
                                  source=SOURCES.get(role, "llm"), chance=0.5,
                                  detail={"chance_sd": CHANCE_SD, "detection": {"n_pos": 10, "n_neg": 10}})
    return run, roles
