"""Opening what ``saeforge train`` wrote (a run directory) or a single SAE folder, with its model and sites.

Every step after training (eval, harvest, inspect, contrast, steer, the dashboard) starts here, so the rules live in
one place: which SAEs a path holds, which model and site each belongs to (their ``metadata``, overridable), and that
the SAE's width matches the site.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from saeforge.errors import SaeforgeError


def find_saes(path: str | Path) -> dict[str, Path]:
    """``{name: folder}`` of the SAEs under ``path`` (a run directory or an SAE folder)."""
    path = Path(path)
    if not path.exists():
        raise SaeforgeError(f"{path} does not exist", "pass a run directory from `saeforge train` or an SAE folder")
    if (path / "cfg.json").is_file():
        return {path.name: path}
    saes = path / "saes"
    found = {p.name: p for p in sorted(saes.iterdir()) if (p / "cfg.json").is_file()} if saes.is_dir() else {}
    if not found:
        raise SaeforgeError(f"{path} holds no SAE (no cfg.json, and no saes/<name>/cfg.json)",
                            "pass a run directory from `saeforge train` or an SAE folder")
    return found


@dataclass
class RunSAE:
    name: str
    folder: Path
    sae: Any
    site: Any  # saeforge.models.sites.Site
    meta: dict


@dataclass
class LoadedRun:
    path: Path
    lm: Any  # LanguageModel
    saes: dict[str, RunSAE]
    meta: dict  # the first SAE's metadata (model, context, token policy)

    def context_length(self, override: int = 0) -> int:
        return override or int(self.meta.get("context_size") or 128)

    def token_policy(self, context_length: int = 0):
        from saeforge.data.token_stream import TokenPolicy

        return TokenPolicy(self.context_length(context_length), bool(self.meta.get("prepend_bos", True)),
                           bool(self.meta.get("exclude_special_tokens", True)))

    @property
    def sites(self) -> list[str]:
        return sorted({r.site.name for r in self.saes.values()})


def load_run(path: str | Path, *, model: str = "", device: str = "auto", dtype: str = "float32", lm=None,
             site: str = "") -> LoadedRun:
    """The model (``model`` or the SAEs' ``metadata.model_name``) and every SAE under ``path`` with its site."""
    from saeforge.models.language_model import LanguageModel
    from saeforge.saes import load_sae, read_sae_config

    found = find_saes(path)
    metas = {n: read_sae_config(f).get("metadata", {}) or {} for n, f in found.items()}
    first = next(iter(metas.values()))
    if lm is None:
        model_name = model or first.get("model_name")
        if not model_name:
            raise SaeforgeError("the SAE's metadata does not name its model", "pass --model")
        lm = LanguageModel.load(model_name, dtype=dtype, device=device)
    saes = {}
    for name, folder in found.items():
        site_name = site or metas[name].get("hook_name")
        if not site_name:
            raise SaeforgeError(f"SAE {folder} does not say which site it reads (no metadata.hook_name)",
                                "pass --site with the saeforge site name, e.g. layers.5.resid_post")
        s = lm.site(site_name)
        sae = load_sae(folder, device=lm.device).eval()
        if sae.cfg.d_in != s.d:
            raise SaeforgeError(f"SAE {name} has d_in {sae.cfg.d_in} but site {site_name} of "
                                f"{model or first.get('model_name') or 'the model'} has width {s.d}",
                                "use the model and site the SAE was trained on")
        saes[name] = RunSAE(name, folder, sae, s, metas[name])
    return LoadedRun(Path(path), lm, saes, first)
