"""``saeforge compare-steering``: CAA, STA, SAE-refined CAA and single features, on one behaviour.

The behaviour is given by two text files (texts that show it, texts that do not). Each method's vector is added at
the SAE's write site at every non-special position, at the same norm (the CAA vector's, times each multiplier α), and
the same prompts are sampled with the same seed. Two single features compete: the one that separates the two sets
best (by AUROC: a *detector* of the behaviour) and, given keywords, the one whose decoder direction has the largest
output effect on them (junk features dropped; ``saeforge.interventions.selection``). Everything is measured by the
plain model on the generated text: the mean activation of the AUROC target feature over the generated tokens, the
rate of generations that contain a keyword, and the perplexity of the generations.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from simple_parsing.helpers import field

from saeforge.errors import SaeforgeError
from saeforge.options import DeviceOptions, RunModelOptions, flat_options
from saeforge.utils.atomic import atomic_write_json


@flat_options
@dataclass(frozen=True)
class CompareSteeringConfig:
    """Compare steering vectors (CAA, STA, SAE-refined CAA, single features) on one behaviour."""

    path: str = field(default="", positional=True)
    """A run directory with one SAE (or an SAE folder)."""
    positive: str = ""
    """Texts showing the behaviour (.txt, one per line, or .jsonl)."""
    negative: str = ""
    """Texts not showing it."""
    prompts_file: str = ""
    """Neutral prompts to steer, one per line."""
    keywords: tuple[str, ...] = ()
    """Words whose presence in a generation counts as the behaviour (case-insensitive, whole words); they also
    choose the output-effect feature."""
    multipliers: tuple[float, ...] = (2.0, 4.0, 8.0)
    """Vector norms as multiples of the CAA vector's norm."""
    trim: float = 0.35
    """STA: top fraction of sign-consistent atoms kept."""
    fdr: float = 0.05
    """Refined CAA: false-discovery rate for the relevant features."""
    max_new_tokens: int = 32
    """Tokens generated per prompt."""
    temperature: float = 0.7
    """Sampling temperature."""
    seed: int = 0
    """Sampling seed (the same for every method)."""
    out: str = ""
    """Folder for steering_comparison.json; empty: print only (the run folder is never written unless named)."""
    model_options: RunModelOptions = field(default_factory=RunModelOptions)
    """The model the SAE reads and that generates."""
    device_options: DeviceOptions = field(default_factory=DeviceOptions)
    """Where the model runs."""


def keyword_rate(texts: list[str], keywords) -> float:
    from saeforge.interventions.selection import theme_rate

    return theme_rate(texts, list(keywords))


def compare_steering(cfg: CompareSteeringConfig, steerer=None) -> dict:
    from saeforge.data.texts import read_texts
    from saeforge.features.contrast import mann_whitney
    from saeforge.interventions.generate import Continuations, pooled_perplexity
    from saeforge.interventions.selection import parse_words, rank_by_output_effect
    from saeforge.interventions.steering import Steerer
    from saeforge.interventions.vectors import caa_vector, collect, refined_caa_vector, sta_vector

    if not (cfg.positive and cfg.negative and cfg.prompts_file):
        raise SaeforgeError("give --positive, --negative and --prompts-file", "one text per line in each")
    keywords = parse_words(cfg.keywords) if cfg.keywords else []
    positives = read_texts(cfg.positive, min_count=2)
    negatives = read_texts(cfg.negative, min_count=2)
    prompts = read_texts(cfg.prompts_file)
    steerer = steerer or Steerer.from_run(cfg.path, model=cfg.model, device=cfg.device)
    if len(steerer.bound) != 1:
        raise SaeforgeError(f"the run has {len(steerer.bound)} SAEs; compare-steering uses one",
                            "pass one SAE folder (RUN_DIR/saes/NAME)")
    name, bound = next(iter(steerer.bound.items()))
    if bound.is_transcoder:
        raise SaeforgeError(f"{name} is a transcoder; CAA compares activations at one site",
                            "compare steering vectors with an SAE (one that reads and writes one site)")
    sae, site = bound.sae, bound.write_site
    lm = steerer.lm
    pos = collect(lm, sae, site.name, positives, steerer.policy)
    neg = collect(lm, sae, site.name, negatives, steerer.policy)
    caa = caa_vector(pos, neg)
    sta, sta_atoms = sta_vector(sae, pos, neg, caa, cfg.trim)
    refined, relevant = refined_caa_vector(sae, pos, neg, caa, cfg.fdr)
    auroc, _ = mann_whitney(pos.feats.numpy(), neg.feats.numpy())
    target = int(auroc.argmax())
    unit = lambda v: v / v.norm().clamp_min(1e-12)  # noqa: E731
    W = sae.W_dec.detach().float().cpu()
    methods = {"caa": unit(caa), "sta": unit(sta), "refined_caa": unit(refined), "single_feature": unit(W[target])}
    output_feature = None
    if keywords and site.d == lm.d_model:
        output_feature = rank_by_output_effect(lm, bound, keywords, top=1, lens=steerer.lens).best
        methods["output_feature"] = unit(W[output_feature])
    norm = float(caa.norm())

    gen = Continuations(steerer, prompts, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                        seed=cfg.seed)

    def measure(new):
        full, logits, acts = gen.read(new, [site.name])  # the plain model on the generated text
        with torch.inference_mode():
            f = sae.encode(acts[site.name][:, gen.n_prompt:].float())[..., target]
        texts = gen.decode(new)
        return {"target_activation": float(f.mean()), "keyword_rate": keyword_rate(texts, keywords),
                "perplexity": pooled_perplexity(gen.perplexity(logits, full)), "samples": texts[:3]}

    rows = [{"method": "none", "multiplier": 0.0, **measure(gen.sample())}]
    for method, v in methods.items():
        for m in cfg.multipliers:
            with steerer.steering(vectors={site.name: v * norm * m}):
                new = gen.sample()
            rows.append({"method": method, "multiplier": m, **measure(new)})
    report = {"sae": name, "site": site.name, "target_feature": target, "target_auroc": float(auroc[target]),
              "output_feature": output_feature, "keywords": keywords, "caa_norm": norm,
              "sta_atoms": sta_atoms.tolist(), "relevant_features": relevant.tolist(), "n_prompts": len(prompts),
              "rows": rows}
    if cfg.out:
        from saeforge.utils.locking import exclusive_lock

        with exclusive_lock(cfg.out, "saeforge compare-steering"):
            report["path"] = str(atomic_write_json(Path(cfg.out) / "steering_comparison.json", report))
    return report


def format_comparison(report: dict) -> str:
    lines = [f"target feature {report['sae']}:{report['target_feature']} (AUROC {report['target_auroc']:.3f})" +
             ("" if report.get("output_feature") is None else
              f"; output-effect feature {report['output_feature']}") +
             f"; ‖v_CAA‖ = {report['caa_norm']:.2f}; STA atoms {len(report['sta_atoms'])}, relevant features "
             f"{len(report['relevant_features'])}",
             "| method | α (× ‖v_CAA‖) | target activation (plain model) | keyword rate | perplexity |",
             "|---|---|---|---|---|"]
    for r in report["rows"]:
        rate = "n/a" if r["keyword_rate"] != r["keyword_rate"] else f"{r['keyword_rate']:.0%}"
        lines.append(f"| {r['method']} | {r['multiplier']:g} | {r['target_activation']:.2f} | "
                     f"{rate} | {r['perplexity']:.1f} |")
    return "\n".join(lines)


def run_compare_steering(cfg: CompareSteeringConfig) -> dict:
    from saeforge.interventions.steering import loading_message

    print(loading_message(cfg.path, cfg.model), flush=True)
    report = compare_steering(cfg)
    print(format_comparison(report))
    print(f"written {report['path']}" if "path" in report else "(nothing written; add --out DIR to keep the JSON)")
    return report
