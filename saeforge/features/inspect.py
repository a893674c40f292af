"""Prompt inspection: for each token of a text, the most active features of each SAE, with their explanations.

Each dictionary encodes the activations of the sites it reads (:meth:`~saeforge.runs.BoundSAE.input`: one site, or a
CLT's or crosscoder's several concatenated); for a transcoder that is not the site it writes, and the output says
both."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from simple_parsing.helpers import field

from saeforge.data.prompts import PromptEncoder
from saeforge.errors import SaeforgeError
from saeforge.features.store import STORE_FILE, FeatureStore
from saeforge.options import DeviceOptions, RunModelOptions, flat_options
from saeforge.runs import BoundSAE

MAX_PROMPT_TOKENS = 1024
TOP_TOKENS_SHOWN = 4  # per feature in `saeforge inspect`, when the store has no explanation


@flat_options
@dataclass(frozen=True)
class InspectConfig:
    """Show, for each token of a text, the most active features and their explanations."""

    path: str = field(default="", positional=True)
    """A run directory (every SAE under saes/) or one SAE folder."""
    text: str = field(default="", positional=True)
    """The text to inspect."""
    top: int = 5
    """Features shown per token."""
    model_options: RunModelOptions = field(default_factory=RunModelOptions)
    """The model the SAEs read."""
    device_options: DeviceOptions = field(default_factory=DeviceOptions)
    """Where the model runs."""


class Inspector:
    """Loads the model and SAEs of a run once; :meth:`inspect` is then cheap (the dashboard keeps one)."""

    def __init__(self, path: str | Path, *, model: str = "", device: str = "auto", lm=None):
        from saeforge.runs import load_run

        self.path = Path(path)
        self.run = load_run(self.path, model=model, device=device, lm=lm)
        self.lm = lm = self.run.lm
        self.saes: dict[str, BoundSAE] = dict(self.run.saes)
        store_path = self.path / STORE_FILE
        self.store_path = store_path if store_path.is_file() else None
        if self.store_path is not None:
            FeatureStore.ensure_current(self.store_path)  # an older store is migrated once, as the dashboard does
        self.max_tokens = min(MAX_PROMPT_TOKENS, lm.max_context or MAX_PROMPT_TOKENS)
        # the run's own token rules (BOS, which positions are SAE data), with the inspector's length limit
        self.prompts = PromptEncoder(lm, self.run.token_policy(), max_tokens=self.max_tokens)

    @property
    def sites(self) -> list[str]:
        """The sites the dictionaries read (what :meth:`inspect` runs the model to)."""
        return sorted({s.name for b in self.saes.values() for s in b.reads})

    def _name(self, sae: str | None) -> str:
        if sae is None:
            if len(self.saes) != 1:
                raise SaeforgeError(f"the run has {len(self.saes)} dictionaries; say which",
                                    f"pass sae= one of {', '.join(self.saes)}")
            return next(iter(self.saes))
        if sae not in self.saes:
            raise SaeforgeError(f"no SAE {sae!r} in this run", f"the run has: {', '.join(self.saes)}")
        return sae

    @torch.inference_mode()
    def encode(self, text: str, sae: str | None = None) -> torch.Tensor:
        """The latents of ``text`` [tokens, d_sae] under dictionary ``sae`` (the run's only one by default), the text
        tokenised with the run's token rules; positions that are not SAE data (BOS, control tokens) are all zero."""
        bound = self.saes[self._name(sae)]
        batch = self.prompts.one(text)
        acts = self.lm.read(batch.input_ids, [s.name for s in bound.reads])
        f = bound.sae.encode(bound.input(acts)[0].float())
        return f * batch.keep[0].to(f.device)[:, None]

    def top_features(self, text: str, k: int = 10, sae: str | None = None) -> list[tuple[int, float, str | None]]:
        """The ``k`` features most active anywhere in ``text`` (largest activation over its SAE-data positions):
        ``[(feature, activation, label or None)]``, the label from the feature store when the run has one."""
        if k < 1:
            raise SaeforgeError(f"k must be at least 1, got {k}", "ask for k=10 features")
        name = self._name(sae)
        peak = self.encode(text, name).max(0).values
        vals, idx = peak.topk(min(k, peak.numel()))
        labels = self.labels(name, [int(i) for i in idx])
        return [(int(i), float(v), labels.get(int(i))) for v, i in zip(vals, idx) if v > 0]

    def bindings(self) -> dict[str, dict]:
        """Per dictionary: ``{"kind", "reads", "writes", "description"}`` (the sites by name)."""
        return {name: {"kind": b.kind, "reads": [s.name for s in b.reads], "writes": [s.name for s in b.writes],
                       "description": b.describe()} for name, b in self.saes.items()}

    def labels(self, name: str, idxs) -> dict[int, str]:
        """What the store says of features ``idxs`` of dictionary ``name``: the explanation, else the tokens the
        feature fires on most (``top tokens ' king' ' queen'``); empty without a store (or before a harvest)."""
        if self.store_path is None:
            return {}
        with FeatureStore(self.store_path, readonly=True) as store:
            try:
                brief = store.brief_features(name, idxs)
            except SaeforgeError:  # the store does not know this dictionary
                return {}
        out = {}
        for i, b in brief.items():
            if b["explanation"]:
                out[i] = b["explanation"]
            elif b["top_tokens"]:
                out[i] = "top tokens " + " ".join(repr(t) for t, _ in b["top_tokens"][:TOP_TOKENS_SHOWN])
        return out

    @torch.inference_mode()
    def inspect(self, text: str, top: int = 5) -> list[dict]:
        check_top(top)
        batch = self.prompts.one(text)
        ids, keep = batch.input_ids, batch.keep[0]
        acts = self.lm.read(ids, self.sites)
        tokens = [self.lm.tokenizer.decode([int(i)]) for i in ids[0]]
        special = set(self.lm.special_token_ids())
        out = [{"token": t, "special": int(i) in special, "features": {}} for t, i in zip(tokens, ids[0])]
        explanations: dict[str, dict[int, str]] = {}
        per_sae = {}
        for name, bound in self.saes.items():
            f = bound.sae.encode(bound.input(acts, 0).float())
            k = min(top, f.shape[-1])
            vals, idx = f.topk(k, dim=-1)
            per_sae[name] = (vals, idx)
            wanted = {int(i) for i, v in zip(idx.flatten(), vals.flatten()) if v > 0}
            explanations[name] = {}
            if self.store_path is not None and wanted:
                with FeatureStore(self.store_path, readonly=True) as store:
                    try:
                        explanations[name] = store.explanations(name, wanted)
                    except SaeforgeError:
                        pass
        for name, (vals, idx) in per_sae.items():
            for t, row in enumerate(out):
                if not keep[t]:
                    row["features"][name] = []  # positions outside the SAE's data (BOS, special tokens)
                    continue
                row["features"][name] = [[int(i), float(v), explanations[name].get(int(i))]
                                         for v, i in zip(vals[t], idx[t]) if v > 0]
        return out


def inspect_prompt(path: str | Path, text: str, *, top: int = 5, model: str = "", device: str = "auto",
                   lm=None) -> list[dict]:
    """Per token: ``{"token", "special", "features": {sae_name: [[idx, activation, explanation_or_None], ...]}}``."""
    return Inspector(path, model=model, device=device, lm=lm).inspect(text, top)


def check_top(top: int, fix: str = "pass --top 5") -> None:
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise SaeforgeError(f"--top {top}: the number of features shown per token must be at least 1", fix)


def run_inspect(cfg: InspectConfig) -> None:
    from saeforge.interventions.steering import loading_message

    if not cfg.path or not cfg.text:
        raise SaeforgeError("give a run directory and a text", 'saeforge inspect RUN_DIR "To be, or not to be"')
    check_top(cfg.top, f"saeforge inspect {cfg.path} {cfg.text!r} --top 5")
    print(loading_message(cfg.path, cfg.model), flush=True)
    inspector = Inspector(cfg.path, model=cfg.model, device=cfg.device)
    rows = inspector.inspect(cfg.text, cfg.top)
    labels = {name: inspector.labels(name, {f[0] for row in rows for f in row["features"].get(name, [])})
              for name in inspector.saes}
    for name, binding in inspector.bindings().items():
        print(f"{name}: {binding['description']}")
    for row in rows:
        if row["special"]:
            continue
        for name, feats in row["features"].items():
            shown = "  ".join(f"#{i} {a:.2f}" + (f" ({labels[name][i]})" if i in labels[name] else "")
                              for i, a, _ in feats)
            print(f"{row['token']!r:>16}  {name}: {shown or '(no feature fires)'}")
    if inspector.store_path is None:
        print(f"no feature store in {cfg.path}: `saeforge harvest {cfg.path}` records each feature's top tokens "
              f"(shown here), `saeforge explain {cfg.path}` explains them")
