"""``saeforge compare-steering``: CAA, STA, SAE-refined CAA and the single best feature, on one behaviour.

The behaviour is given by two text files (texts that show it, texts that do not). Each method's vector is added at
the SAE's site at every non-special position, at the same norm (the CAA vector's, times each multiplier α), and the
same prompts are sampled with the same seed. Measured per method and α: the mean activation of the target feature
(the feature that separates the two sets best, by AUROC) over the generated tokens, the rate of generations that
contain one of the behaviour's keywords, and the perplexity of the generations under the plain model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from simple_parsing.helpers import field

from saeforge.errors import SaeforgeError
from saeforge.utils.atomic import atomic_write_json


@dataclass(frozen=True)
class CompareSteeringConfig:
    """Compare steering vectors (CAA, STA, SAE-refined CAA, best single feature) on one behaviour."""

    path: str = field(default="", positional=True)
    """A run directory with one SAE (or an SAE folder)."""
    positive: str = ""
    """Texts showing the behaviour (.txt, one per line, or .jsonl)."""
    negative: str = ""
    """Texts not showing it."""
    prompts_file: str = ""
    """Neutral prompts to steer, one per line."""
    keywords: tuple[str, ...] = ()
    """Words whose presence in a generation counts as the behaviour (case-insensitive, whole words)."""
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
    model: str = ""
    """Model; empty: the one the SAE was trained on."""
    device: str = "auto"
    """auto, cpu or cuda."""


def keyword_rate(texts: list[str], keywords) -> float:
    if not keywords:
        return float("nan")
    pattern = re.compile(r"\b(" + "|".join(re.escape(k) for k in keywords) + r")\b", re.IGNORECASE)
    return sum(bool(pattern.search(t)) for t in texts) / max(len(texts), 1)


def compare_steering(cfg: CompareSteeringConfig, steerer=None) -> dict:
    from saeforge.data.texts import read_texts
    from saeforge.features.contrast import mann_whitney
    from saeforge.interventions.generate import _perplexity, _teacher_forced, prompt_batch, sample
    from saeforge.interventions.steering import Steerer
    from saeforge.interventions.vectors import caa_vector, collect, refined_caa_vector, sta_vector

    if not (cfg.positive and cfg.negative and cfg.prompts_file):
        raise SaeforgeError("give --positive, --negative and --prompts-file", "one text per line in each")
    steerer = steerer or Steerer.from_run(cfg.path, model=cfg.model, device=cfg.device)
    if len(steerer.saes) != 1:
        raise SaeforgeError(f"the run has {len(steerer.saes)} SAEs; compare-steering uses one",
                            "pass one SAE folder (RUN_DIR/saes/NAME)")
    name, (sae, site) = next(iter(steerer.saes.items()))
    lm = steerer.lm
    pos = collect(lm, sae, site.name, read_texts(cfg.positive, min_count=2), steerer.policy)
    neg = collect(lm, sae, site.name, read_texts(cfg.negative, min_count=2), steerer.policy)
    prompts = read_texts(cfg.prompts_file)
    caa = caa_vector(pos, neg)
    sta, sta_atoms = sta_vector(sae, pos, neg, caa, cfg.trim)
    refined, relevant = refined_caa_vector(sae, pos, neg, caa, cfg.fdr)
    auroc, _ = mann_whitney(pos.feats.numpy(), neg.feats.numpy())
    target = int(auroc.argmax())
    d_target = sae.W_dec[target].detach().float().cpu()
    unit = lambda v: v / v.norm().clamp_min(1e-12)  # noqa: E731
    methods = {"caa": unit(caa), "sta": unit(sta), "refined_caa": unit(refined), "single_feature": unit(d_target)}
    norm = float(caa.norm())

    batch = prompt_batch(steerer, prompts, cfg.max_new_tokens)
    ids, mask = batch.input_ids, batch.attention_mask
    n_prompt = ids.shape[1]

    def measure(new):
        full, logits, acts = _teacher_forced(lm, ids, mask, new, [site.name])
        with torch.inference_mode():
            f = sae.encode(acts[site.name][:, n_prompt:].float())[..., target]
        texts = [lm.tokenizer.decode(t, skip_special_tokens=True) for t in new]
        ppl = _perplexity(logits, full, n_prompt)
        return {"target_activation": float(f.mean()), "keyword_rate": keyword_rate(texts, cfg.keywords),
                "perplexity": sum(ppl) / len(ppl), "samples": texts[:3]}

    base = sample(lm, ids, mask, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=cfg.seed)
    rows = [{"method": "none", "multiplier": 0.0, **measure(base)}]
    for method, v in methods.items():
        for m in cfg.multipliers:
            with steerer.steering(vectors={site.name: v * norm * m}):
                new = sample(lm, ids, mask, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                             seed=cfg.seed)
            rows.append({"method": method, "multiplier": m, **measure(new)})
    report = {"sae": name, "site": site.name, "target_feature": target, "target_auroc": float(auroc[target]),
              "caa_norm": norm, "sta_atoms": sta_atoms.tolist(), "relevant_features": relevant.tolist(),
              "n_prompts": len(prompts), "rows": rows}
    out = Path(cfg.path) / "steering_comparison.json"
    atomic_write_json(out, report)
    report["path"] = str(out)
    return report


def format_comparison(report: dict) -> str:
    lines = [f"target feature {report['sae']}:{report['target_feature']} (AUROC {report['target_auroc']:.3f}); "
             f"‖v_CAA‖ = {report['caa_norm']:.2f}; STA atoms {len(report['sta_atoms'])}, relevant features "
             f"{len(report['relevant_features'])}",
             "| method | α (× ‖v_CAA‖) | target activation | keyword rate | perplexity |", "|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['method']} | {r['multiplier']:g} | {r['target_activation']:.2f} | "
                     f"{r['keyword_rate']:.0%} | {r['perplexity']:.1f} |")
    return "\n".join(lines)


def run_compare_steering(cfg: CompareSteeringConfig) -> dict:
    report = compare_steering(cfg)
    print(format_comparison(report))
    print(f"written {report['path']}")
    return report
