"""Multi-layer steering along a flow graph (arXiv 2502.03032, §6 and App. B).

The flow graph of a target residual feature gives one or more features per layer l_start..l_end. Steering acts on
them at every non-special token of the prompt and the generation, through ``LanguageModel.edit``:

- activate: h ← h + c_l · ν_site · d̂ for each chosen feature (d̂ its unit decoder direction, ν_site the mean
  residual-stream norm at its site on held-out text, so c_l is in units of the site's typical norm);
- deactivate: h ← h + (c_l − 1) · (a · V) — the chosen features rescaled by c_l (0 removes them, < 0 flips them).

Scopes: ``target`` acts on the target feature alone (classical single-feature steering), ``single`` on the graph's
features of the target's layer, ``cumulative`` on every residual feature of the graph from l_start up to the target's
layer (``cumulative_all``: through l_end). The coefficient c is spread over the layers by a schedule: ``constant``
c_l = c; ``linear`` c_l = k·l + b with k = (c* − c)/(l_end − l_start), b = c − k·l_start, c* = 1 for deactivation
and 0 for activation (a coefficient that fades out towards the end of the span; the paper interpolates to 1 in its
raw units); ``exponential`` c_l = c·e^{α·l} with α = −0.05.

Judged on the generated text read by the clean model: theme presence (the target feature's mean activation and the
share of continuations with a theme keyword; an LLM judge's 0–5 behaviour and coherence scores when a judge model is
named) and coherence (perplexity of the continuation under the clean model).
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from simple_parsing.helpers import field

from saeforge.errors import SaeforgeError
from saeforge.options import DeviceOptions, RunModelOptions, flat_options
from saeforge.flow.data import with_threads

SCHEDULES = ("constant", "linear", "exponential")
SCOPES = ("target", "single", "cumulative", "cumulative_all")
MODES = ("activate", "deactivate")
EXP_ALPHA = -0.05


def schedule(kind: str, c: float, layers: Sequence[int], *, end_value: float, alpha: float = EXP_ALPHA
             ) -> dict[int, float]:
    """Coefficient per layer (see the module docstring)."""
    if kind not in SCHEDULES:
        raise SaeforgeError(f"unknown schedule {kind!r}", f"use {', '.join(SCHEDULES)}")
    layers = sorted(layers)
    if kind == "constant" or len(layers) == 1 and kind == "linear":
        return {l: c for l in layers}
    if kind == "exponential":
        return {l: c * math.exp(alpha * l) for l in layers}
    lo, hi = layers[0], layers[-1]
    k = (end_value - c) / (hi - lo)
    b = c - k * lo
    return {l: k * l + b for l in layers}


@dataclass
class SteeringPlan:
    """Which features to act on, where, with which coefficient."""

    mode: str
    items: list[tuple[str, int, float]]  # (site, feature, coefficient)

    def describe(self) -> str:
        return ", ".join(f"{s.split('.')[1]}/{s.split('.')[2][0].upper()}/{i}×{c:.2f}" for s, i, c in self.items)


def plan(graph, scope: str, schedule_kind: str, c: float, mode: str, *, with_modules: bool = False) -> SteeringPlan:
    """The features of ``graph`` that ``scope`` acts on and their coefficients under ``schedule_kind``."""
    from saeforge.flow.suite import parse_site

    if scope not in SCOPES:
        raise SaeforgeError(f"unknown scope {scope!r}", f"use {', '.join(SCOPES)}")
    if mode not in MODES:
        raise SaeforgeError(f"unknown mode {mode!r}", f"use {', '.join(MODES)}")
    site, idx = graph.target.rsplit(":", 1)
    target_layer = parse_site(site)[0]
    if scope == "target":
        return SteeringPlan(mode, [(site, int(idx), c)])
    kinds = ("resid_post", "mlp_out", "attn_out") if with_modules else ("resid_post",)
    nodes = [n for n in graph.nodes if n.kind in kinds]
    if scope == "single":
        nodes = [n for n in nodes if n.layer == target_layer]
    elif scope == "cumulative":
        nodes = [n for n in nodes if n.layer <= target_layer]
    layers = sorted({n.layer for n in nodes})
    coef = schedule(schedule_kind, c, layers, end_value=1.0 if mode == "deactivate" else 0.0)
    return SteeringPlan(mode, [(n.site, n.idx, coef[n.layer]) for n in sorted(nodes, key=lambda n: n.layer)])


def plan_edits(lm, bound: dict, p: SteeringPlan, site_norms: dict[str, float]) -> dict:
    """``{site: fn}`` for ``LanguageModel.edit``: all of a site's features in one function. Special tokens (BOS...)
    are left alone."""
    specials = torch.tensor(lm.special_token_ids() or [-1])
    by_site: dict[str, list[tuple[int, float]]] = {}
    for s, i, c in p.items:
        by_site.setdefault(s, []).append((i, c))
    edits = {}
    for s, feats in by_site.items():
        sae = bound[s].sae
        idx = torch.tensor([i for i, _ in feats])
        coef = torch.tensor([c for _, c in feats], dtype=torch.float32)
        dirs = sae.W_dec.detach().float()[idx]  # [n, d]
        if p.mode == "activate":
            add = (coef[:, None] * site_norms[s] * dirs / dirs.norm(dim=1, keepdim=True)).sum(0)

            def fn(x, ctx, add=add):
                keep = _keep(ctx, x, specials)
                return x + (keep[..., None] * add.to(x.device, x.dtype))
        else:
            def fn(x, ctx, sae=sae, idx=idx, coef=coef, dirs=dirs):
                keep = _keep(ctx, x, specials)
                a = sae.encode(x.float())[..., idx]  # [b, t, n]
                delta = ((coef.to(x.device) - 1.0) * a) @ dirs.to(x.device)
                return x + (keep[..., None] * delta).to(x.dtype)
        edits[s] = fn
    return edits


def _keep(ctx, x: torch.Tensor, specials: torch.Tensor) -> torch.Tensor:
    if ctx.input_ids is None:
        return torch.ones(x.shape[:2], device=x.device)
    ids = ctx.input_ids.to(x.device)
    keep = ~torch.isin(ids, specials.to(x.device)) & (ctx.positions.to(x.device) >= 0)
    return keep.to(x.dtype)


# ---------------------------------------------------------------------------------------------------- measuring
@torch.no_grad()
def site_mean_norms(lm, sites: Sequence[str], corpus: str = "embedded:validation", contexts: int = 8,
                    context_length: int = 64) -> dict[str, float]:
    """Mean activation norm at each site over SAE-data tokens of held-out text (the strength unit)."""
    from saeforge.flow.data import sample_tokens

    sample = sample_tokens(lm, corpus, contexts=contexts, context_length=context_length, per_context=1)
    acts = lm.read(sample.ids, list(sites))
    keep = sample.keep.to(lm.device)
    return {s: float(a.float()[keep].norm(dim=-1).mean()) for s, a in acts.items()}


@torch.no_grad()
def generate(lm, prompts: Sequence[str], *, max_new_tokens: int, temperature: float, top_p: float, seed: int,
             samples: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(prompt ids, mask, new ids) for every prompt × ``samples`` (left-padded batch; edits in force apply)."""
    from saeforge.data.prompts import PromptEncoder

    batch = PromptEncoder(lm).batch([p for p in prompts for _ in range(samples)], padding="left",
                                    reserve=max_new_tokens)
    torch.manual_seed(seed)
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else lm.tokenizer.eos_token_id
    out = lm.model.generate(input_ids=batch.input_ids.to(lm.device), attention_mask=batch.attention_mask.to(lm.device),
                            max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, pad_token_id=pad,
                            do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    return batch.input_ids, batch.attention_mask, out[:, batch.input_ids.shape[1]:].cpu()


@torch.no_grad()
def measure(lm, bound: dict, ids: torch.Tensor, mask: torch.Tensor, new: torch.Tensor, target: tuple[str, int],
            keywords: Sequence[str]) -> dict[str, Any]:
    """Theme and coherence of continuations, read by the clean model (call outside any edit block)."""
    full = torch.cat([ids, new], 1)
    full_mask = torch.cat([mask, torch.ones_like(new)], 1)
    site, idx = target
    with lm.record([site]) as cap:
        logits = lm.logits(full, full_mask).float()
    n = ids.shape[1]
    logp = F.log_softmax(logits[:, n - 1:-1], -1)
    nll = -logp.gather(-1, new[..., None].to(logp.device)).squeeze(-1).mean(1)
    z = bound[site].sae.encode(cap[site][:, n:].float())[..., idx]
    from saeforge.interventions.compare import keyword_rate  # share of texts with a keyword (NaN without keywords)

    texts = [lm.tokenizer.decode(t, skip_special_tokens=True) for t in new]
    return {"target_activation": float(z.mean()), "target_firing": float((z > 0).float().mean()),
            "keyword_rate": keyword_rate(texts, keywords), "perplexity": float(torch.exp(nll).median()),
            "texts": texts}


JUDGE_PROMPT = """Rate the text below on two scales from 0 to 5.
Behaviour: how strongly the text is about the theme "{theme}" (0: not at all, 5: entirely).
Coherence: how fluent and coherent the text is (0: gibberish, 5: perfectly fluent).
Answer with two integers only, as: behaviour=<n> coherence=<n>

Text: {text}"""


def judge(backend, texts: Sequence[str], theme: str) -> dict[str, float]:
    """Mean behaviour and coherence (0–5) from an LLM judge; replies it cannot read are left out."""
    prompts = [[{"role": "user", "content": JUDGE_PROMPT.format(theme=theme, text=t)}] for t in texts]
    scores = []
    for reply in backend.generate(prompts, 16):
        m = re.search(r"behaviou?r\s*=\s*([0-5]).*?coherence\s*=\s*([0-5])", reply, re.IGNORECASE | re.DOTALL)
        if m:
            scores.append((int(m.group(1)), int(m.group(2))))
    if not scores:
        return {"judge_behaviour": float("nan"), "judge_coherence": float("nan"), "judge_score": float("nan")}
    b = sum(s[0] for s in scores) / len(scores) / 5
    c = sum(s[1] for s in scores) / len(scores) / 5
    return {"judge_behaviour": b, "judge_coherence": c,
            "judge_score": sum(s[0] * s[1] for s in scores) / len(scores) / 25}


# ---------------------------------------------------------------------------------------------------- command
@flat_options
@dataclass(frozen=True)
class FlowSteerConfig:
    """Steer a theme along the flow graph of a residual feature: the target alone, the graph's features at its layer,
    or cumulatively over the graph's layers, with constant, linear or exponential coefficient schedules; switch the
    theme on (activate) or off (deactivate). Judged on the generations read by the clean model: target activation,
    keyword rate, perplexity (and an LLM judge with --judge-model). Writes SUITE/flow/steer/<feature>_<mode>.json
    and a plot."""

    suite: str = field(default="", positional=True)
    """The suite."""
    feature: str = ""
    """The target: layers.L.resid_post:INDEX (its flow graph gives the features of the other layers)."""
    mode: str = "activate"
    """activate (add the directions) or deactivate (rescale the features)."""
    strengths: tuple[float, ...] = (0.5, 1.0, 2.0)
    """activate: coefficients in units of each site's mean norm; deactivate: rescaling factors r (0 removes)."""
    scopes: tuple[str, ...] = ("target", "single", "cumulative")
    """target (the feature alone), single (the graph's features at the target's layer), cumulative (graph layers up
    to the target's), cumulative_all (the whole graph)."""
    schedules: tuple[str, ...] = SCHEDULES
    """Coefficient schedules across layers (multi-layer scopes): constant, linear, exponential."""
    with_modules: bool = False
    """Act on the graph's MLP/attention features too, not only its residual ones."""
    prompts: tuple[str, ...] = ("I think", "The story begins", "My favourite thing is", "Yesterday")
    """Prompts to continue."""
    samples: int = 4
    """Continuations per prompt."""
    max_new_tokens: int = 32
    """Tokens generated per continuation."""
    temperature: float = 1.0
    """Sampling temperature (the paper: 1.27 with top_p 0.7)."""
    top_p: float = 0.9
    """Nucleus sampling."""
    keywords: tuple[str, ...] = ()
    """Theme keywords (whole words, any case) for the keyword rate."""
    theme: str = ""
    """Theme name for the LLM judge (e.g. "kings and royalty")."""
    judge_model: str = ""
    """LLM judge through an OpenAI-compatible endpoint (SAEFORGE_LLM_BASE_URL / OPENAI_BASE_URL); empty: no judge."""
    residual_threshold: float = 0.5
    """Flow graph: residual similarity threshold."""
    module_threshold: float = 0.15
    """Flow graph: module similarity threshold."""
    seed: int = 0
    """Sampling seed (the same for every setting, so differences come from the steering)."""
    model_options: RunModelOptions = field(default_factory=RunModelOptions)
    """The model the SAEs read."""
    device_options: DeviceOptions = field(default_factory=DeviceOptions)
    """Where the model runs."""
    out: str = ""
    """Output folder; empty: SUITE/flow/steer/."""
    threads: int = 0
    """CPU threads for PyTorch; 0: automatic (fewer when other work keeps the CPUs busy)."""


def _settings(cfg: FlowSteerConfig) -> list[tuple[str, str, float]]:
    out = []
    for c in cfg.strengths:
        for scope in cfg.scopes:
            for sched in (cfg.schedules if scope.startswith("cumulative") else ("constant",)):
                out.append((scope, sched, c))
    return out


@with_threads
def run_flow_steer(cfg: FlowSteerConfig) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from saeforge.flow.graph import build_flow_graph, empty_graph_message
    from saeforge.flow.suite import open_suite
    from saeforge.utils.atomic import atomic_write_json
    from saeforge.utils.locking import exclusive_lock

    for name, values, allowed in (("mode", (cfg.mode,), MODES), ("scopes", cfg.scopes, SCOPES),
                                  ("schedules", cfg.schedules, SCHEDULES)):
        bad = [v for v in values if v not in allowed]
        if bad:
            raise SaeforgeError(f"unknown {name} {', '.join(bad)}", f"use {', '.join(allowed)}")
    if not cfg.feature:
        raise SaeforgeError("no feature given", "pass --feature layers.L.resid_post:INDEX")
    if not all(math.isfinite(s) and abs(s) <= 1000 for s in cfg.strengths):
        raise SaeforgeError(f"strengths must be finite numbers of at most 1000 in size, got {cfg.strengths}",
                            "pass e.g. --strengths 0.5 1 2")
    suite = open_suite(cfg.suite)
    graph = build_flow_graph(suite, cfg.feature, residual_threshold=cfg.residual_threshold,
                             module_threshold=cfg.module_threshold)
    if graph.is_empty and any(s != "target" for s in cfg.scopes):
        raise SaeforgeError(empty_graph_message(graph), "lower --residual-threshold, or use --scopes target")
    backend = None
    if cfg.judge_model:
        from saeforge.features.autointerp.backends import make_backend

        backend = make_backend("openai", cfg.judge_model)
    out = Path(cfg.out) if cfg.out else Path(cfg.suite) / "flow" / "steer"
    with exclusive_lock(out, "saeforge flow steer"):  # one writer per output folder, refused before the slow work
        lm = suite.load_model(cfg.model, cfg.device)
        bound = suite.bind(lm)
        target = cfg.feature.rsplit(":", 1)
        target = (target[0], int(target[1]))
        sites = sorted({n.site for n in graph.nodes})
        norms = site_mean_norms(lm, sites)
        settings = _settings(cfg)
        gen_kw = dict(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed,
                      samples=cfg.samples)
        rows = []
        t0 = time.time()
        with tqdm(total=len(settings) + 1, unit="setting", desc="steering") as bar:
            ids, mask, new = generate(lm, cfg.prompts, **gen_kw)
            base = {"scope": "none", "schedule": "-", "strength": 0.0, "features": 0,
                    **measure(lm, bound, ids, mask, new, target, cfg.keywords)}
            rows.append(base)
            bar.update(1)
            for scope, sched, c in settings:
                p = plan(graph, scope, sched, c, cfg.mode, with_modules=cfg.with_modules)
                with lm.edit(plan_edits(lm, bound, p, norms)):
                    ids, mask, new = generate(lm, cfg.prompts, **gen_kw)
                row = {"scope": scope, "schedule": sched, "strength": c, "features": len(p.items), "plan": p.describe(),
                       **measure(lm, bound, ids, mask, new, target, cfg.keywords)}
                rows.append(row)
                bar.update(1)
        for row in rows:
            row["coherence"] = min(1.0, base["perplexity"] / row["perplexity"])
            theme = row["keyword_rate"] if cfg.keywords else row["target_firing"]
            row["score"] = (theme if cfg.mode == "activate" else 1.0 - theme) * row["coherence"]
            if backend is not None:
                row.update(judge(backend, row["texts"], cfg.theme or cfg.feature))
                if cfg.mode == "deactivate":
                    row["judge_score"] = (1 - row["judge_behaviour"]) * row["judge_coherence"]
        result = {"feature": cfg.feature, "mode": cfg.mode, "graph": graph.to_dict(), "site_norms": norms,
                  "keywords": list(cfg.keywords), "prompts": list(cfg.prompts), "samples": cfg.samples,
                  "rows": rows, "seconds": time.time() - t0}
        stem = f"{cfg.feature.replace(':', '_')}_{cfg.mode}"
        atomic_write_json(out / f"{stem}.json", result)
        print(format_rows(rows, cfg.mode))
        plot = plot_rows(rows, cfg.mode, out / f"{stem}.png", cfg.feature)
        print(f"written: {out / stem}.json" + (f", {plot}" if plot else ""))
        return result


def format_rows(rows: list[dict], mode: str) -> str:
    lines = ["| scope | schedule | strength | features | target activation | firing | keyword rate | perplexity | "
             "score |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        kw = "—" if math.isnan(r["keyword_rate"]) else f"{r['keyword_rate']:.0%}"
        lines.append(f"| {r['scope']} | {r['schedule']} | {r['strength']:g} | {r['features']} | "
                     f"{r['target_activation']:.2f} | {r['target_firing']:.0%} | {kw} | {r['perplexity']:.1f} | "
                     f"{r['score']:.2f} |")
    return "\n".join(lines)


def plot_rows(rows: list[dict], mode: str, path: Path, feature: str) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    groups: dict[str, list[dict]] = {}
    for r in rows[1:]:
        groups.setdefault(f"{r['scope']}/{r['schedule']}" if r["scope"].startswith("cumulative") else r["scope"],
                          []).append(r)
    for label, rs in groups.items():
        xs = [r["strength"] for r in rs]
        axes[0].plot(xs, [r["target_activation"] for r in rs], marker="o", label=label)
        axes[1].plot(xs, [r["perplexity"] for r in rs], marker="o", label=label)
    for ax, what, key in ((axes[0], "target activation (clean model)", "target_activation"),
                          (axes[1], "perplexity (clean model)", "perplexity")):
        ax.axhline(rows[0][key], color="#888", ls="--", lw=1, label="no steering")
        ax.set_xlabel("strength" if mode == "activate" else "r")
        ax.set_ylabel(what)
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{mode} along the flow graph of {feature}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path
