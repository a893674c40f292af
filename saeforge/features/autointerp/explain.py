"""``saeforge explain``: explain features with an LLM and score the explanations; results go into the feature store.

Per chunk of ``batch_size`` features: one batched round of explainer prompts, then one batched round of scorer
prompts (detection, and fuzzing with ``--fuzzing``); then each feature's explanation and score are written in one
transaction. A feature is therefore either fully explained and scored in the store or not there at all, and a re-run
skips the explained ones (``--overwrite`` redoes them). An unreachable endpoint stops the run with a clear error
after its retries; features written before that stay written.

A degenerate explanation (empty, repetitive, self-referential, a copied excerpt or instruction: see
:mod:`~saeforge.features.autointerp.quality`) is retried once with a request naming its problem; if the retry is no
better, the feature gets a plain label of its top tokens (``tokens: " king", " queen"``), stored as such
(``explanation_source = 'top-tokens'``) and scored like any explanation.

The store's ``score`` column holds the detection balanced accuracy (None when the feature has no non-activating
excerpts to score against) and ``score_chance`` what a judge guessing at random scores on average (0.5 for balanced
accuracy; ``score_detail`` adds the spread of such a judge over the excerpts scored); the ``explainer`` column names
the back end and model and lists the scores, e.g. ``local:embedded | detection=0.650 fuzzing=0.550``, and
``explainer_model`` the back end and model alone. The run holds the folder's writer lock, which ``harvest`` takes too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from simple_parsing.helpers import field

from saeforge.errors import SaeforgeError
from saeforge.features.autointerp import prompts as P
from saeforge.features.autointerp import quality as Q
from saeforge.features.autointerp import scoring as S
from saeforge.features.autointerp.backends import Backend, make_backend
from saeforge.features.store import STORE_FILE, WRITER_LOCK, FeatureStore
from saeforge.options import DeviceOptions, flat_options
from saeforge.utils.locking import exclusive_lock

NO_EXPLANATION = "(the explainer gave no explanation)"


@flat_options
@dataclass(frozen=True)
class ExplainConfig:
    """Explain SAE features with an LLM (explainer prompt from top and quantile examples) and score each explanation
    by detection (and optionally fuzzing) balanced accuracy; results go into the feature store (resumable)."""

    path: str = field(default="", positional=True)
    """A harvested run directory, SAE folder, or features.sqlite file."""
    features: tuple[str, ...] = ()
    """Feature indices and inclusive ranges, e.g. `0-9 42` or `0-9,42`."""
    sae: str = ""
    """SAE name in the store; empty: every SAE in the store."""
    backend: str = "local"
    """local (a Hugging Face causal LM run here) or openai (any OpenAI-compatible chat endpoint: base URL from
    SAEFORGE_LLM_BASE_URL or OPENAI_BASE_URL, key from SAEFORGE_LLM_API_KEY or OPENAI_API_KEY)."""
    model: str = ""
    """Explainer/scorer model. local: empty means the embedded SmolLM2-135M-Instruct (weak), else a hub id or HF
    folder; openai: the served model name (required)."""
    device_options: DeviceOptions = field(default_factory=DeviceOptions)
    """Where the local back end's model runs."""
    batch_size: int = 8
    """Prompts per generation batch (local) or concurrent requests (openai); also features per chunk written."""
    fuzzing: bool = False
    """Also run the fuzzing scorer (marked tokens correct vs random)."""
    overwrite: bool = False
    """Explain again features that already have an explanation."""
    explain_top: int = 10
    """Top-activating examples shown to the explainer."""
    explain_quantile: int = 10
    """Quantile-sampled examples shown to the explainer (at most half of them; the rest are held out for scoring)."""
    score_examples: int = 10
    """Held-out activating and non-activating examples scored per feature (at most, each)."""
    mark_threshold: float = 0.0
    """Tokens count as activating above this fraction of the feature's maximum activation (0: any nonzero)."""
    show_activations: bool = True
    """Show the explainer each marked token's activation on a 0-10 scale."""
    explanation_tokens: int = 48
    """Most tokens generated for an explanation."""
    answer_tokens: int = 3
    """Most tokens generated for a scorer's yes/no answer."""
    retries: int = 5
    """openai: retries per request on connection errors, 429 and 5xx (exponential back-off)."""
    retry_delay: float = 1.0
    """openai: first back-off delay in seconds (doubles each retry)."""
    timeout: float = 120.0
    """openai: seconds to wait for one response."""
    seed: int = 0
    """Seed for the fuzzing scorer's random marks."""
    progress: bool = True
    """Show a progress bar."""


def parse_features(spec: tuple[str, ...] | list[str] | str) -> list[int]:
    """``("0-9", "42")`` or ``"0-9,42"`` -> sorted unique indices."""
    parts = spec.split() if isinstance(spec, str) else list(spec)
    out: set[int] = set()
    for part in parts:
        for item in filter(None, re.split(r"[,\s]+", str(part))):
            m = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
            if not m:
                raise SaeforgeError(f"cannot read the feature list item {item!r}",
                                    "give indices and inclusive ranges, e.g. --features 0-9 42")
            lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
            if hi < lo:
                raise SaeforgeError(f"the range {item!r} runs backwards", f"write it as {hi}-{lo}")
            out.update(range(lo, hi + 1))
    return sorted(out)


def store_path(path: str | Path) -> Path:
    p = Path(path)
    if p.is_file():
        return p
    if not p.exists():
        raise SaeforgeError(f"{p} does not exist", "pass a harvested run directory, SAE folder or features.sqlite")
    return p / STORE_FILE


def explainer_label(backend_name: str, detection: float | None, fuzzing: float | None, fuzzed: bool) -> str:
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    return f"{backend_name} | detection={fmt(detection)}" + (f" fuzzing={fmt(fuzzing)}" if fuzzed else "")


def _fit_examples(backend, shown: list[dict], max_act: float, cfg: ExplainConfig) -> list[dict]:
    """Drop the last (weakest) shown examples until the explainer prompt fits the local model's context."""
    count = getattr(backend, "count_tokens", None)
    budget_fn = getattr(backend, "prompt_budget", None)
    if count is None or budget_fn is None:
        return shown
    budget = budget_fn(cfg.explanation_tokens)
    while len(shown) > 1 and count(_explainer_prompt(shown, max_act, cfg)) > budget:
        shown = shown[:-1]
    return shown


def _explainer_prompt(shown, max_act, cfg):
    return P.explainer_prompt(shown, max_act, threshold=cfg.mark_threshold * max_act,
                              show_activations=cfg.show_activations)


def _answers(backend: Backend, prompts: list, max_new_tokens: int) -> list[str]:
    """The scorer's replies; a back end with ``yes_no`` (the local one) answers by constrained decoding."""
    if not prompts:
        return []
    yes_no = getattr(backend, "yes_no", None)
    if yes_no is not None:
        return [{True: "yes", False: "no", None: ""}[a] for a in yes_no(prompts)]
    return backend.generate(prompts, max_new_tokens)


def _explanations_for(backend: Backend, jobs: list[dict], cfg: ExplainConfig) -> None:
    """Fill each job's ``explanation``, ``source`` (llm, llm-retry, top-tokens), ``raw`` replies and ``rejected``
    reasons: one batched round, a second round for the degenerate replies, then the top-token fallback."""
    replies = backend.generate([j["prompt"] for j in jobs], cfg.explanation_tokens)
    retry = []
    for j, reply in zip(jobs, replies):
        j["raw"], j["rejected"] = [reply], []
        j["explanation"] = P.parse_explanation(reply)
        reason = Q.degeneracy(j["explanation"], j["shown"], cfg.mark_threshold * j["rec"]["max_act"])
        if reason is None:
            j["source"] = "llm"
        else:
            j["rejected"].append(reason)
            retry.append(j)
    if retry:
        replies = backend.generate([Q.retry_prompt(j["prompt"], j["raw"][0], j["rejected"][0]) for j in retry],
                                   cfg.explanation_tokens)
        for j, reply in zip(retry, replies):
            j["raw"].append(reply)
            text = P.parse_explanation(reply)
            reason = Q.degeneracy(text, j["shown"], cfg.mark_threshold * j["rec"]["max_act"])
            if reason is None:
                j["explanation"], j["source"] = text, "llm-retry"
                continue
            j["rejected"].append(reason)
            label = Q.top_token_label(j["rec"].get("top_tokens"))
            j["explanation"], j["source"] = (label, "top-tokens") if label else (NO_EXPLANATION, "none")


def _explain_chunk(store: FeatureStore, sae: str, idxs: list[int], backend: Backend, cfg: ExplainConfig,
                   results: dict, rng_base: int) -> None:
    jobs = []
    for idx in idxs:
        rec = store.feature(sae, idx)
        rec["examples"] = {k: [P.drop_special_tokens(e) for e in v] for k, v in rec["examples"].items()}
        split = S.split_examples(rec["examples"], n_top=cfg.explain_top, n_quantile=cfg.explain_quantile,
                                 n_score=cfg.score_examples)
        if not split.shown:
            results["no_examples"].append((sae, idx))
            continue
        shown = _fit_examples(backend, split.shown, rec["max_act"], cfg)
        jobs.append({"idx": idx, "rec": rec, "split": split, "shown": shown,
                     "prompt": _explainer_prompt(shown, rec["max_act"], cfg)})
    if not jobs:
        return
    _explanations_for(backend, jobs, cfg)
    scoring_prompts = []
    for j in jobs:
        j["samples"] = {"detection": S.detection_samples(j["explanation"], j["split"])}
        if cfg.fuzzing:
            rng = np.random.default_rng([cfg.seed, rng_base, j["idx"]])
            j["samples"]["fuzzing"] = S.fuzzing_samples(j["explanation"], j["split"], rng,
                                                        cfg.mark_threshold * j["rec"]["max_act"])
        for kind, samples in j["samples"].items():
            if j["explanation"] == NO_EXPLANATION:
                continue  # nothing to score; the feature is stored with no score
            scoring_prompts.extend((id(j), kind, s.prompt) for s in samples)
    answers = _answers(backend, [p for _, _, p in scoring_prompts], cfg.answer_tokens)
    by_job: dict[tuple[int, str], list[str]] = {}
    for (jid, kind, _), a in zip(scoring_prompts, answers):
        by_job.setdefault((jid, kind), []).append(a)
    # only now, with every reply in hand, is anything written: one transaction per feature
    for j in jobs:
        scores = {kind: S.score(samples, by_job.get((id(j), kind), [])) if j["explanation"] != NO_EXPLANATION
                  else S.balanced_accuracy([], []) for kind, samples in j["samples"].items()}
        det = scores["detection"]["balanced_accuracy"]
        fuzz = scores["fuzzing"]["balanced_accuracy"] if "fuzzing" in scores else None
        chance = S.chance_level(scores["detection"]["n_pos"], scores["detection"]["n_neg"])
        detail = {kind: {k: v for k, v in sc.items() if k != "balanced_accuracy"} for kind, sc in scores.items()}
        detail.update(chance_sd=chance["sd"], rejected=j["rejected"])
        store.set_explanation(sae, j["idx"], j["explanation"], det,
                              explainer_label(backend.name, det, fuzz, cfg.fuzzing), model=backend.name,
                              source=j["source"], chance=chance["mean"] if det is not None else None, detail=detail)
        results["explained"].setdefault(sae, {})[j["idx"]] = {
            "explanation": j["explanation"], "source": j["source"], "reply": j["raw"][0], "replies": j["raw"],
            "rejected": j["rejected"], "detection": scores["detection"], "fuzzing": scores.get("fuzzing"),
            "chance": chance, "shown": len(j["split"].shown), "held_out": len(j["split"].held_out),
            "negatives": len(j["split"].negatives)}


def explain(cfg: ExplainConfig, backend: Backend | None = None) -> dict:
    """Explain and score ``cfg.features`` of every (or the named) SAE in the store. Returns ``{"store", "explained":
    {sae: {idx: {...}}}, "skipped": [(sae, idx)], "no_examples": [(sae, idx)], "explainer"}``. ``backend`` replaces
    the one ``cfg`` names (tests use scripted ones)."""
    from tqdm.auto import tqdm

    if not cfg.path:
        raise SaeforgeError("no run directory given", "saeforge explain RUN_DIR --features 0-9")
    idxs = parse_features(cfg.features)
    if not idxs:
        raise SaeforgeError("no features given", "pass --features, e.g. --features 0-9 42")
    if cfg.backend not in ("local", "openai"):
        raise SaeforgeError(f"unknown back end {cfg.backend!r}", "use --backend local or --backend openai")
    for name in ("batch_size", "explanation_tokens", "answer_tokens"):
        if getattr(cfg, name) < 1:
            raise SaeforgeError(f"--{name.replace('_', '-')} must be at least 1", "pass a positive number")
    path = store_path(cfg.path)
    results: dict = {"store": str(path), "explained": {}, "skipped": [], "no_examples": [], "explainer": None}
    if not path.is_file():
        raise SaeforgeError(f"no feature store at {path}", f"run `saeforge harvest {cfg.path}` first")
    with exclusive_lock(path.parent, WRITER_LOCK), FeatureStore(path) as store:
        saes = [cfg.sae] if cfg.sae else [s["name"] for s in store.saes()]
        todo: dict[str, list[int]] = {}
        for sae in saes:
            for i in idxs:
                store.check_index(sae, i)
            done = set() if cfg.overwrite else store.explained(sae)
            todo[sae] = [i for i in idxs if i not in done]
            results["skipped"].extend((sae, i) for i in idxs if i in done)
        total = sum(len(v) for v in todo.values())
        if total == 0:
            return results
        if backend is None:  # only now: a fully resumed run loads no model and calls no endpoint
            backend = make_backend(cfg.backend, cfg.model, device=cfg.device, batch_size=cfg.batch_size,
                                   retries=cfg.retries, retry_delay=cfg.retry_delay, timeout=cfg.timeout)
        results["explainer"] = backend.name
        bar = tqdm(total=total, unit="feature", desc="explaining", disable=not cfg.progress, dynamic_ncols=True)
        try:
            for s, sae in enumerate(saes):
                for c in range(0, len(todo[sae]), cfg.batch_size):
                    chunk = todo[sae][c:c + cfg.batch_size]
                    _explain_chunk(store, sae, chunk, backend, cfg, results, s)
                    bar.update(len(chunk))
        finally:
            bar.close()
    return results


def run_explain(cfg: ExplainConfig) -> dict:
    res = explain(cfg)
    for sae, feats in res["explained"].items():
        for idx, r in feats.items():
            det = r["detection"]["balanced_accuracy"]
            line = f"{sae} #{idx}: {r['explanation']!r}  detection {'n/a' if det is None else f'{det:.2f}'}"
            if det is not None:
                line += f" (chance 0.50 ± {r['chance']['sd']:.2f})"
            if r["fuzzing"] is not None:
                fz = r["fuzzing"]["balanced_accuracy"]
                line += f"  fuzzing {'n/a' if fz is None else f'{fz:.2f}'}"
            print(line)
    n = sum(len(v) for v in res["explained"].values())
    print(f"explained {n} feature(s) with {res['explainer'] or 'no explainer'}; results are in {res['store']}")
    sources = [r["source"] for feats in res["explained"].values() for r in feats.values()]
    if sources.count("llm-retry"):
        print(f"{sources.count('llm-retry')} explanation(s) came from a second try (the first reply was unusable)")
    if sources.count("top-tokens"):
        print(f"{sources.count('top-tokens')} feature(s) got a top-token label instead (both replies were unusable: "
              f"empty, repetitive or only about the task)")
    if n:
        print("scores are detection balanced accuracy: 0.5 is what a judge guessing at random gets")
    if res["skipped"]:
        print(f"skipped {len(res['skipped'])} already explained (pass --overwrite to redo them)")
    if res["no_examples"]:
        print(f"left out {len(res['no_examples'])} feature(s) that never fired in the harvest: "
              + ", ".join(f"{s} #{i}" for s, i in res["no_examples"][:20]))
    if cfg.backend == "local" and not cfg.model:
        print("note: the embedded SmolLM2-135M-Instruct is a weak explainer and judge; use --backend openai with a "
              "strong model for explanations worth trusting")
    return res
