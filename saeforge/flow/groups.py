"""Origin groups with data (arXiv 2502.03032, §5): for every residual feature active on a sampled token, which of its
top-1 matched predecessors (in R_{L-1}, M_L, A_L) are active on the same token.

The eight groups: "From RES", "From MLP", "From ATT", their three pairs, all three, and "From nowhere" (none active).
The per-layer shares are drawn as stacked bars, as in the paper's figure of feature formation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from simple_parsing.helpers import field

from saeforge.errors import SaeforgeError
from saeforge.options import DeviceOptions, RunModelOptions, flat_options
from saeforge.flow.data import with_threads
from saeforge.flow.suite import open_suite, parse_layers, site_name

GROUPS = ("From RES", "From MLP", "From ATT", "From RES & MLP", "From RES & ATT", "From MLP & ATT",
          "From RES & MLP & ATT", "From nowhere")
_CODE_TO_GROUP = {1: 0, 2: 1, 4: 2, 3: 3, 5: 4, 6: 5, 7: 6, 0: 7}  # bit 1 RES, 2 MLP, 4 ATT


@flat_options
@dataclass(frozen=True)
class GroupsConfig:
    """Origin groups on data: for residual features active on sampled tokens, which of their top-1 matched
    predecessors (residual of the layer before, MLP, attention) are active too. Writes SUITE/flow/groups.json and a
    stacked per-layer plot (groups.png)."""

    suite: str = field(default="", positional=True)
    """The suite."""
    layers: str = ""
    """Layers (e.g. 10-13); empty: every layer with all its predecessors."""
    corpus: str = "embedded:validation"
    """Text the tokens are sampled from."""
    contexts: int = 250
    """Texts (contexts) sampled (the paper: 250 per dataset)."""
    tokens_per_context: int = 5
    """Random SAE-data tokens per context (the paper: 5, never BOS)."""
    context_length: int = 128
    """Tokens per context."""
    seed: int = 0
    """Seed for the token sample."""
    model_options: RunModelOptions = field(default_factory=RunModelOptions)
    """The model the SAEs read."""
    device_options: DeviceOptions = field(default_factory=DeviceOptions)
    """Where the model runs."""
    out: str = ""
    """Output folder; empty: SUITE/flow/."""
    threads: int = 0
    """CPU threads for PyTorch; 0: automatic (fewer when other work keeps the CPUs busy)."""


def top1_tables(suite, layers: list[int]) -> dict[int, dict[str, torch.Tensor]]:
    """``{L: {"R"|"M"|"A": top-1 predecessor index per feature of R_L}}`` (stored tables when present)."""
    from saeforge.flow.links import load_matches
    from saeforge.flow.matching import predecessor_matches

    out = {}
    for L in layers:
        target = site_name(L, "resid_post")
        preds = {"R": site_name(L - 1, "resid_post"), "M": site_name(L, "mlp_out"), "A": site_name(L, "attn_out")}
        stored = {k: load_matches(suite.path, target, p, "top1") for k, p in preds.items()}
        if any(v is None for v in stored.values()):
            stored = predecessor_matches(suite, L, "top1")
        out[L] = {k: m.top1 for k, m in stored.items()}
    return out


def group_codes(acts: dict[str, torch.Tensor], top1: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """For activations at the same tokens (``acts["T"]`` of R_L, ``acts["R"|"M"|"A"]`` of the predecessors, each
    ``[n_tokens, d]``): (token index, feature index) of every active R_L feature and its group code (bit 1: the
    top-1 RES predecessor is active, 2: MLP, 4: ATT)."""
    tok, feat = torch.nonzero(acts["T"] > 0, as_tuple=True)
    code = torch.zeros_like(feat)
    for bit, key in ((1, "R"), (2, "M"), (4, "A")):
        j = top1[key][feat]
        ok = j >= 0
        active = torch.zeros_like(ok)
        active[ok] = acts[key][tok[ok], j[ok]] > 0
        code |= active.long() * bit
    return torch.stack([tok, feat]), code


def count_groups(code: torch.Tensor) -> list[int]:
    counts = torch.bincount(code, minlength=8)
    return [int(counts[c]) for c in sorted(_CODE_TO_GROUP, key=_CODE_TO_GROUP.get)]


@with_threads
def run_groups(cfg: GroupsConfig) -> dict[str, Any]:
    from saeforge.flow.data import encode_sites, sample_tokens
    from saeforge.utils.atomic import atomic_write_json
    from saeforge.utils.locking import exclusive_lock

    suite = open_suite(cfg.suite)
    layers = parse_layers(cfg.layers) if cfg.layers else suite.analysable_layers()
    if not layers:
        raise SaeforgeError(f"the suite {cfg.suite} has no layer with R_L, M_L, A_L and R_(L-1)",
                            "train a suite over a layer range: saeforge flow suite --layers 8-12")
    suite.require(layers)
    tables = top1_tables(suite, layers)  # before the model loads: cheap and may fail on its own
    out = Path(cfg.out) if cfg.out else Path(cfg.suite) / "flow"
    with exclusive_lock(out, "saeforge flow groups"):  # one writer per output folder, refused before the slow work
        lm = suite.load_model(cfg.model, cfg.device)
        bound = suite.bind(lm)
        t0 = time.time()
        sample = sample_tokens(lm, cfg.corpus, contexts=cfg.contexts, context_length=cfg.context_length,
                               per_context=cfg.tokens_per_context, seed=cfg.seed)
        sites = sorted({site_name(L, k) for L in layers for k in ("resid_post", "mlp_out", "attn_out")}
                       | {site_name(L - 1, "resid_post") for L in layers})
        acts = {s: a.reshape(-1, a.shape[-1]) for s, a in
                encode_sites(lm, bound, sample.ids, sites, positions=sample.positions).items()}
        result: dict[str, Any] = {"groups": list(GROUPS), "layers": {}, "tokens": int(sample.positions.numel()),
                                  "corpus": cfg.corpus}
        for L in layers:
            layer_acts = {"T": acts[site_name(L, "resid_post")], "R": acts[site_name(L - 1, "resid_post")],
                          "M": acts[site_name(L, "mlp_out")], "A": acts[site_name(L, "attn_out")]}
            _, code = group_codes(layer_acts, tables[L])
            counts = count_groups(code)
            total = max(sum(counts), 1)
            result["layers"][str(L)] = {"active": sum(counts), "counts": dict(zip(GROUPS, counts)),
                                        "shares": {g: c / total for g, c in zip(GROUPS, counts)}}
            shares = result["layers"][str(L)]["shares"]
            print(f"layer {L:>3}: {sum(counts):>6} active | " + ", ".join(
                f"{g.removeprefix('From ')} {shares[g]:.1%}" for g in GROUPS), flush=True)
        result["seconds"] = time.time() - t0
        atomic_write_json(out / "groups.json", result)
        plot = plot_groups(result, out / "groups.png")
        print(f"written: {out / 'groups.json'}" + (f", {plot}" if plot else ""))
        return result


def plot_groups(result: dict[str, Any], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is in the dev and plots extras
        return None
    layers = sorted(result["layers"], key=int)
    colors = ["#1f77b4", "#2ca02c", "#d62728", "#17becf", "#9467bd", "#bcbd22", "#8c564b", "#c7c7c7"]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.5 * len(layers) + 3), 4.0))
    bottom = [0.0] * len(layers)
    for g, color in zip(GROUPS, colors):
        vals = [result["layers"][L]["shares"][g] for L in layers]
        ax.bar([int(L) for L in layers], vals, bottom=bottom, color=color, label=g, width=0.8)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_xlabel("layer")
    ax.set_ylabel("share of active residual features")
    ax.set_ylim(0, 1)
    ax.set_title(f"origin groups ({result['tokens']} tokens of {result['corpus']})", fontsize=10)
    ax.legend(fontsize=7, bbox_to_anchor=(1.02, 1), loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path
