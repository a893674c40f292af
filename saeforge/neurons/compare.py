"""``saeforge snmf compare``: SNMF features against SAE features and DiffMeans on the same concepts.

The concept set is :mod:`saeforge.neurons.concepts` (five concepts, sixteen sentences each, and neutral sentences),
split into selection and test halves. As in arXiv 2506.10920 the SNMF is fitted on the MLP hidden activations of the
concept corpus itself (the selection half and the neutral selection sentences); the SAE is a pretrained one (any
saeforge SAE folder or run, e.g. the demo's ``layers.15.resid_post``), and DiffMeans is the supervised baseline: the
mean MLP hidden activation of a concept's selection sentences minus that of all other selection sentences.

- **Concept detection**: a sentence's score under a feature is its largest activation over the sentence's tokens
  (SNMF: coefficient × ‖z‖; SAE: the latent; DiffMeans: the projection on its direction). Per concept and method the
  feature with the best AUROC (concept sentences against all others) on the selection half is kept, and its AUROC on
  the test half is reported: a method cannot win by choosing among more features on the sentences it is judged on.
- **Steering**: the chosen SNMF feature's neuron pattern (at ``layers.L.mlp_hidden``), the SAE latent's decoder row
  (at the SAE's site) and the DiffMeans direction (at ``layers.L.mlp_hidden``) are each added at every non-special
  position with the norm that gives the target next-token KL on "I think that" (the paper's calibration, so the
  methods are compared at equal disruption, not equal norm). Continuations of neutral prompts are sampled with one
  seed and scored with the steering bench's scorers (``saeforge bench-steering``): concept words (the keyword
  scorer), perplexity under the plain model, coherence = min(1, baseline perplexity / perplexity) and behaviour ×
  coherence.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from simple_parsing.helpers import field

from saeforge.errors import SaeforgeError

METHODS = ("snmf", "sae", "diffmeans")
RESULT_FILE = "snmf_compare.json"


@dataclass(frozen=True)
class SNMFCompareConfig:
    """Compare SNMF features with SAE features and DiffMeans on a small built-in concept set: concept detection (test
    AUROC of each method's best feature) and steering at matched KL (concept words × coherence)."""

    sae: str = field(default="", positional=True)
    """An SAE folder or run directory with one SAE on the same model (e.g. the demo's
    ~/.cache/saeforge/runs/demo/run, `saeforge demo`)."""
    layer: int = 15
    """Layer whose MLP neurons SNMF and DiffMeans use (layers.L.mlp_hidden)."""
    rank: int = 30
    """SNMF features fitted on the concept corpus."""
    sparsity: float = 0.01
    """SNMF winner-take-all keep-fraction of the neurons."""
    max_iter: int = 1000
    """SNMF iteration limit."""
    patience: int = 100
    """SNMF patience."""
    concepts: tuple[str, ...] = ()
    """Concepts to use (default: all of colours, weekdays, animals, food, weather)."""
    target_kls: tuple[float, ...] = (0.1, 0.25)
    """Next-token KL targets (nats) the steering strengths are calibrated to."""
    max_new_tokens: int = 24
    """Tokens generated per steering prompt."""
    temperature: float = 0.7
    """Sampling temperature."""
    seed: int = 0
    """Seed of the SNMF initialisation and of the sampling."""
    out: str = ""
    """Folder for snmf_compare.json (and the SNMF fitted on the concepts); empty: print only."""
    model: str = ""
    """Model; empty: the SAE's."""
    device: str = "auto"
    """auto, cpu or cuda."""
    progress: bool = True
    """Show progress bars."""


def auroc(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Area under the ROC curve of scores ``pos`` ``[n_pos, m]`` against ``neg`` ``[n_neg, m]``, per column (ties
    count one half): the chance that a positive outscores a negative (contrast's Mann-Whitney statistic)."""
    from saeforge.features.contrast import mann_whitney

    area, _ = mann_whitney(pos.double().cpu().numpy(), neg.double().cpu().numpy())
    return torch.from_numpy(area).float()


def _sentence_acts(lm, sites: list[str], texts: list[str], policy) -> dict[str, list[torch.Tensor]]:
    """Per site, per sentence: ``[tokens, d]`` activations of its SAE-data positions."""
    from saeforge.data.prompts import PromptEncoder

    batch = PromptEncoder(lm, policy).batch(texts)
    acts = lm.read(batch.input_ids, sites, attention_mask=batch.attention_mask)
    keep = batch.keep.to(lm.device)
    return {s: [acts[s][i][keep[i]].float().cpu() for i in range(len(texts))] for s in sites}


def _max_scores(per_sentence: list[torch.Tensor], score) -> torch.Tensor:
    return torch.stack([score(x).amax(0) for x in per_sentence])


def check_compare_config(cfg: SNMFCompareConfig) -> list[str]:
    from saeforge.neurons.concepts import CONCEPTS
    from saeforge.neurons.snmf import SNMFSettings, check_settings

    if not cfg.sae:
        raise SaeforgeError("no SAE to compare with", "saeforge snmf compare ~/.cache/saeforge/runs/demo/run "
                            "(an SAE folder or run; `saeforge demo` makes that one)")
    unknown = [c for c in cfg.concepts if c not in CONCEPTS]
    if unknown:
        raise SaeforgeError(f"unknown concept(s) {', '.join(unknown)}", f"use any of {' '.join(CONCEPTS)}")
    concepts = list(cfg.concepts) or list(CONCEPTS)
    if len(concepts) < 2:
        raise SaeforgeError("detection needs at least 2 concepts", "pass two or more --concepts (or none: all)")
    check_settings(SNMFSettings(cfg.rank, cfg.sparsity, cfg.max_iter, cfg.patience))
    if not cfg.target_kls or any(not (0 < k < 10) for k in cfg.target_kls):
        raise SaeforgeError(f"target KLs {list(cfg.target_kls)} must be in (0, 10) nats", "pass --target-kls 0.1 0.25")
    if cfg.max_new_tokens < 1:
        raise SaeforgeError("--max-new-tokens must be at least 1", "pass --max-new-tokens 24")
    return concepts


def compare(cfg: SNMFCompareConfig) -> dict:
    """The comparison (see the module docstring); the report, also written to ``out`` when given."""
    from saeforge.neurons.concepts import CONCEPTS, NEUTRAL, split
    from saeforge.neurons.mlp import mlp_site
    from saeforge.neurons.snmf import SNMFSettings, fit_snmf
    from saeforge.runs import load_run

    concepts = check_compare_config(cfg)
    t0 = time.time()
    run = load_run(cfg.sae, model=cfg.model, device=cfg.device)
    if len(run.saes) != 1:
        raise SaeforgeError(f"{cfg.sae} holds {len(run.saes)} dictionaries; the comparison uses one SAE",
                            "pass one SAE folder (RUN_DIR/saes/NAME)")
    (sae_name, bound), = run.saes.items()
    if bound.is_transcoder or len(bound.writes) != 1:
        raise SaeforgeError(f"{sae_name} does not read and write one site", "compare with an SAE")
    lm, policy = run.lm, run.token_policy()
    mlp = mlp_site(lm, f"layers.{cfg.layer}.mlp_hidden").name
    sae_site = bound.read_site.name

    halves = {c: split(CONCEPTS[c]["sentences"]) for c in concepts}
    neutral = split(NEUTRAL)
    texts = {h: [s for c in concepts for s in halves[c][h]] + neutral[h] for h in (0, 1)}
    labels = {h: [c for c in concepts for _ in halves[c][h]] + ["neutral"] * len(neutral[h]) for h in (0, 1)}
    acts = {h: _sentence_acts(lm, [mlp, sae_site], texts[h], policy) for h in (0, 1)}

    fit = fit_snmf(torch.cat(acts[0][mlp]), SNMFSettings(cfg.rank, cfg.sparsity, cfg.max_iter, cfg.patience,
                                                        seed=cfg.seed),
                   progress=cfg.progress, info={"site": mlp, "model": lm.name, "source": "built-in concept set"})
    if cfg.out:
        fit.save(Path(cfg.out) / "snmf")
    sae = bound.sae
    scores = {}
    for h in (0, 1):
        with torch.inference_mode():
            scores[("snmf", h)] = _max_scores(acts[h][mlp], fit.activations)
            scores[("sae", h)] = _max_scores(acts[h][sae_site], lambda x: sae.encode(x.to(lm.device)).float().cpu())

    report = {"model": lm.name, "sae": sae_name, "sae_site": sae_site, "mlp_site": mlp, "layer": cfg.layer,
              "settings": asdict(cfg), "snmf": {"rank": fit.rank, "neurons_per_feature": fit.info["neurons_per_feature"],
                                                "rel_loss": fit.best_loss, "iterations": fit.info["iterations"],
                                                "tokens": fit.info["tokens"]},
              "n_sentences": {"selection": len(texts[0]), "test": len(texts[1])}, "detection": {}, "steering": []}
    directions: dict[tuple[str, str], tuple[str, torch.Tensor, int | None]] = {}
    for c in concepts:
        sel = torch.tensor([lab == c for lab in labels[0]])
        test = torch.tensor([lab == c for lab in labels[1]])
        row = {}
        for method in ("snmf", "sae"):
            a_sel = auroc(scores[(method, 0)][sel], scores[(method, 0)][~sel])
            best = int(a_sel.argmax())
            a_test = auroc(scores[(method, 1)][test][:, best:best + 1], scores[(method, 1)][~test][:, best:best + 1])
            row[method] = {"feature": best, "selection_auroc": float(a_sel[best]), "test_auroc": float(a_test[0])}
            d = fit.features[best] if method == "snmf" else sae.W_dec[best].detach().float().cpu()
            directions[(c, method)] = (mlp if method == "snmf" else bound.write_site.name, d, best)
        pos_tokens = torch.cat([x for x, lab in zip(acts[0][mlp], labels[0]) if lab == c])
        neg_tokens = torch.cat([x for x, lab in zip(acts[0][mlp], labels[0]) if lab != c])
        v = pos_tokens.mean(0) - neg_tokens.mean(0)
        proj = {h: _max_scores(acts[h][mlp], lambda x: (x @ v)[:, None]) for h in (0, 1)}
        row["diffmeans"] = {"feature": None, "selection_auroc": float(auroc(proj[0][sel], proj[0][~sel])[0]),
                            "test_auroc": float(auroc(proj[1][test], proj[1][~test])[0])}
        directions[(c, "diffmeans")] = (mlp, v, None)
        report["detection"][c] = row
    report["steering"] = _steering_table(lm, policy, concepts, directions, cfg)
    report["seconds"] = round(time.time() - t0, 1)
    if cfg.out:
        from saeforge.utils.atomic import atomic_write_json

        atomic_write_json(Path(cfg.out) / RESULT_FILE, report)
    return report


def _steering_table(lm, policy, concepts, directions, cfg) -> list[dict]:
    from tqdm.auto import tqdm

    from saeforge.interventions.bench import KeywordScorer, _score_rows
    from saeforge.interventions.generate import Continuations, pooled_perplexity
    from saeforge.neurons.concepts import CONCEPTS, STEERING_PROMPTS
    from saeforge.neurons.steer import VectorSteering

    rows: list[dict] = []
    calibrators: dict[str, VectorSteering] = {}
    plain = VectorSteering(lm, directions[(concepts[0], "snmf")][0], policy)
    gen = Continuations(plain.steerer, STEERING_PROMPTS, max_new_tokens=cfg.max_new_tokens,
                        temperature=cfg.temperature, seed=cfg.seed)

    def measure(new, scorer) -> dict:
        full, logits, _ = gen.read(new, [])
        texts = gen.decode(new)
        hits = scorer.score(STEERING_PROMPTS, texts)
        return {"behaviour": sum(hits) / len(hits), "perplexity": pooled_perplexity(gen.perplexity(logits, full)),
                "samples": texts[:2]}

    baseline_new = gen.sample()
    points = [(c, m, k) for c in concepts for m in METHODS for k in cfg.target_kls]
    for c in tqdm(concepts, desc="steering", disable=not cfg.progress, leave=False):
        scorer = KeywordScorer(CONCEPTS[c]["keywords"])
        concept_rows = [{"concept": c, "method": "none", "target_kl": 0.0, "strength": 0.0, "kl": 0.0,
                         "reached": True, **measure(baseline_new, scorer)}]
        for _, method, target in [p for p in points if p[0] == c]:
            site, d, feature = directions[(c, method)]
            steer = calibrators.setdefault(site, VectorSteering(lm, site, policy))
            cal = steer.calibrate_vector(d, target, lo=0.1, hi=1e4, steps=20, rel_tol=0.1)
            unit = d.float() / d.float().norm().clamp_min(1e-12)
            with steer.adding(cal.strength * unit):
                new = gen.sample()
            concept_rows.append({"concept": c, "method": method, "feature": feature, "site": site,
                                 "target_kl": target, "strength": cal.strength, "kl": cal.kl, "reached": cal.reached,
                                 **measure(new, scorer)})
        _score_rows(concept_rows)
        rows.extend(concept_rows)
    return rows


def summary(report: dict) -> dict:
    """Per method: mean test AUROC over the concepts, and per KL target the mean behaviour, coherence and behaviour
    × coherence over the concepts (and the unsteered baseline)."""
    out: dict = {"detection": {}, "steering": {}}
    det = report["detection"]
    for m in METHODS:
        vals = [det[c][m]["test_auroc"] for c in det]
        out["detection"][m] = sum(vals) / len(vals)
    for r in report["steering"]:
        key = (r["method"], r["target_kl"])
        out["steering"].setdefault(key, []).append(r)
    out["steering"] = {k: {f: sum(r[f] for r in rs) / len(rs) for f in
                           ("behaviour", "perplexity", "coherence", "behaviour_x_coherence", "kl")}
                       for k, rs in out["steering"].items()}
    return out


def format_report(report: dict) -> str:
    s = summary(report)
    lines = [f"{report['model']}: SNMF (k={report['snmf']['rank']}, {report['snmf']['neurons_per_feature']} neurons "
             f"each, fitted on {report['snmf']['tokens']} concept tokens at {report['mlp_site']}, relative loss "
             f"{report['snmf']['rel_loss']:.3f}) vs SAE {report['sae']} vs DiffMeans at {report['mlp_site']}",
             "", "concept detection: test AUROC of the feature chosen on the selection half",
             "| concept | SNMF (feature) | SAE (latent) | DiffMeans |", "|---|---|---|---|"]
    for c, row in report["detection"].items():
        lines.append(f"| {c} | {row['snmf']['test_auroc']:.3f} (#{row['snmf']['feature']}) | "
                     f"{row['sae']['test_auroc']:.3f} (#{row['sae']['feature']}) | {row['diffmeans']['test_auroc']:.3f} |")
    d = s["detection"]
    lines.append(f"| mean | {d['snmf']:.3f} | {d['sae']:.3f} | {d['diffmeans']:.3f} |")
    lines += ["", "steering at matched next-token KL (mean over concepts): concept words in the continuations, "
              "coherence = min(1, baseline ppl / ppl)",
              "| method | target KL | reached KL | concept words | perplexity | coherence | behaviour × coherence |",
              "|---|---|---|---|---|---|---|"]
    for (m, k), v in sorted(s["steering"].items(), key=lambda kv: (METHODS.index(kv[0][0])
                                                                    if kv[0][0] in METHODS else -1, kv[0][1])):
        lines.append(f"| {m} | {k:g} | {v['kl']:.3f} | {v['behaviour']:.0%} | {v['perplexity']:.1f} | "
                     f"{v['coherence']:.2f} | {v['behaviour_x_coherence']:.3f} |")
    missed = [r for r in report["steering"] if not r["reached"]]
    if missed:
        lines.append(f"({len(missed)} calibration(s) missed their target by more than 10 %: "
                     + ", ".join(f"{r['concept']}/{r['method']}@{r['target_kl']:g} → {r['kl']:.3f}" for r in missed)
                     + ")")
    return "\n".join(lines)


def run_compare(cfg: SNMFCompareConfig) -> dict:
    report = compare(cfg)
    print(format_report(report))
    if cfg.out:
        print(f"written {Path(cfg.out) / RESULT_FILE}")
    return report
