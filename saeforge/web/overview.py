"""The run overview: what was trained, the evaluation metrics and plots, what the feature store holds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from saeforge.web.errors import WebError
from saeforge.web.render import share

if TYPE_CHECKING:
    from saeforge.web.data import RunData

# The eval.json metrics shown first on the overview, with their labels (everything else is under "all metrics").
KEY_METRICS = (
    ("fvu", "FVU (unexplained variance)"),
    ("explained_variance", "explained variance"),
    ("l0", "L0 (active latents per token)"),
    ("dead_fraction", "dead latents (on the evaluation tokens)"),
    ("ce_recovered", "CE loss recovered"),
    ("ce_loss_clean", "CE loss, clean"),
    ("ce_loss_sae", "CE loss, SAE spliced in"),
    ("kl_div", "KL divergence"),
    ("cosine_similarity", "cosine similarity"),
    ("n_tokens", "tokens evaluated"),
)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        return {"_unreadable": f"{path.name} could not be read: {err}"}


def plots(data: "RunData", sae: str) -> list[str]:
    folder = data.sae_folders.get(sae)
    if folder is None or not (folder / "plots").is_dir():
        return []
    return sorted(p.name for p in (folder / "plots").glob("*.png"))


def plot_file(data: "RunData", sae: str, name: str) -> Path:
    if name not in plots(data, sae):
        raise WebError(404, f"no plot {name!r} for SAE {sae!r}")
    return data.sae_folders[sae] / "plots" / name


def _key_metrics(scalars: dict, d_sae) -> list[dict]:
    out = []
    for key, label in KEY_METRICS:
        if key not in scalars:
            continue
        m = {"key": key, "label": label, "value": scalars[key], "display": None}
        if key == "dead_fraction" and d_sae:
            m["display"] = share(round(scalars[key] * int(d_sae)), int(d_sae))  # "12 (0.29 %)", as the plot says
        out.append(m)
    return out


SITE_METRICS = (("fvu", "FVU"), ("explained_variance", "explained variance"), ("l0", "L0"))


def _site_metrics(metrics: dict | None) -> list[dict] | None:
    """Per written site of a dictionary writing several (a CLT's layers, a crosscoder's sites): its figures, and
    for a crosscoder the CE loss and KL with that site alone replaced."""
    sites = (metrics or {}).get("sites")
    if not isinstance(sites, dict):
        return None
    alone = (metrics or {}).get("per_site") if isinstance((metrics or {}).get("per_site"), dict) else {}
    rows = []
    for site, figures in sites.items():
        row = {"site": site, **{k: figures.get(k) for k, _ in SITE_METRICS if isinstance(figures, dict)}}
        row.update({f"alone_{k}": (alone.get(site) or {}).get(k) for k in ("ce_loss_sae", "kl_div")})
        rows.append(row)
    return rows


def overview(data: "RunData") -> dict:
    run = _read_json(data.path / "run.json") or {}
    cfg = run.get("config", {}) if isinstance(run.get("config"), dict) else {}
    ev = _read_json(data.path / "eval.json")
    eval_saes = (ev or {}).get("saes", {}) if isinstance(ev, dict) else {}
    store_meta, store_saes, explained, dead = None, {}, {}, {}
    if data.has_store:
        st = data.store()
        store_meta = st.all_meta()
        store_saes = {s["name"]: s for s in st.saes()}
        explained = {n: st.count_explained(n) for n in store_saes}
        dead = {n: st.count_dead(n) for n in store_saes}
    names = list(dict.fromkeys([*data.sae_folders, *eval_saes, *store_saes]))
    saes = []
    for name in names:
        metrics = eval_saes.get(name)
        info = store_saes.get(name, {})
        scalars = {k: v for k, v in (metrics or {}).items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        d_sae = info.get("d_sae") or (metrics or {}).get("d_sae")
        saes.append({
            "name": name,
            "site": info.get("site") or (metrics or {}).get("site") or name,
            "architecture": info.get("architecture") or (metrics or {}).get("architecture"),
            "d_sae": d_sae,
            "in_store": name in store_saes,
            "n_explained": explained.get(name, 0),
            "n_dead_harvest": dead.get(name),
            "dead_harvest": share(dead[name], int(d_sae)) if name in dead and d_sae else None,
            "key_metrics": _key_metrics(scalars, d_sae),
            "metrics": scalars,
            # what it reads and which sites it replaces (a transcoder, CLT or crosscoder), with per-site figures
            "binding": {k: (metrics or {}).get(k) for k in ("kind", "reads", "writes")} if (metrics or {}).get("kind")
            else None,
            "site_metrics": _site_metrics(metrics),
            "plots": [f"/plots/{name}/{p}" for p in plots(data, name)],
            "plots_note": (metrics or {}).get("plots") if isinstance((metrics or {}).get("plots"), str) else None,
        })
    eval_info = None
    if isinstance(ev, dict):
        eval_info = {k: ev.get(k) for k in ("created", "model", "corpus", "context_length", "n_token_positions",
                                             "seconds", "warning", "_unreadable") if ev.get(k) is not None}
    return {
        "run": {"path": str(data.path), "name": data.path.name, "run_id": run.get("run_id"),
                "model": cfg.get("model"), "sites": cfg.get("sites"), "architecture": cfg.get("architecture"),
                "training_tokens": cfg.get("tokens"), "corpus": cfg.get("corpus"),
                "d_sae": cfg.get("d_sae"), "expansion_factor": cfg.get("expansion_factor"), "k": cfg.get("k")},
        "eval": eval_info,
        "store": store_meta,
        "saes": saes,
    }
