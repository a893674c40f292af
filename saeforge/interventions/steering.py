"""Steering, clamping and ablation through SAE features, on top of ``LanguageModel.edit``.

Modes, for feature i with decoder direction d_i (a row of W_dec) and activation f_i:
- ``add``:   x ← x + c·d_i.
- ``clamp``: x ← x + (c − f_i)·d_i, i.e. the SAE reconstruction with f_i set to c plus the untouched SAE error term,
  so nothing but feature i moves (Templeton et al. 2024).
- ``scale``: x ← x + (r − 1)·f_i·d_i with r = S; r = 0 ablates the feature.

The strength S becomes the coefficient c by its unit:
- ``norm``: c·‖d_i‖ = S × the mean ‖x‖ at the write site, so S is the size of the push relative to the residual
  stream itself (S = 0.5 adds a vector half as long as a typical activation). The mean norm comes from the SAE's
  saved input normalisation (measured on its training data), else from a sample of its corpus or neutral prompts;
- ``max``: c = S × the feature's typical maximum activation (from the feature store, else the SAE's saved feature
  statistics), so S = 1 adds one "full" firing;
- ``raw``: c = S.

A dictionary is steered where it writes (``BoundSAE.written_rows``): an SAE at its site; a transcoder (reads A →
writes B) at B, where its decoder rows live, with f_i for clamp/scale encode(x_A) read at A earlier in the same
forward pass; a cross-layer transcoder's feature of layer l at the MLP outputs of layer l and every later layer of
the CLT, each with its own row (W_dec[l][i, j - l] at layer j), f_i from layer l's MLP input (``encode_layer``) —
so a clamp moves what the feature writes everywhere, as in the replacement model; a crosscoder's feature at each
site it reconstructs, each with that site's slice of its decoder. A crosscoder's latents read all its sites, later
ones included, so no forward knows f_i where it writes the earlier ones: ``add`` steers it, clamp and scale are
refused. In ``norm`` units d_i and ‖x‖ are taken over all the sites the feature writes together (‖x‖ as
√(Σ_s mean‖x_s‖²), the norm of a typical activation of those sites concatenated).

Edits apply at every non-special position (``positions="all"``) or only to generated tokens (``"generated"``): the
tokens of cached generation steps, or with ``prompt_length`` every token after the prompt (so a teacher-forced pass
over prompt + continuation is edited as the generation was).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

from saeforge.data.token_stream import TokenPolicy
from saeforge.errors import SaeforgeError
from saeforge.models.language_model import EditContext
from saeforge.runs import BoundSAE

MODES = ("add", "clamp", "scale")
UNITS = ("norm", "max", "raw")
MAX_STRENGTH = {"norm": 100.0, "max": 1000.0, "raw": 1e5}  # beyond these the residual stream is destroyed, not steered
NORM_SAMPLE_CONTEXTS = 8  # contexts of the SAE's corpus read to measure the mean norm when the SAE does not record it


@dataclass(frozen=True)
class FeatureEdit:
    """One feature intervention: ``sae`` is the SAE's name in the run (its site name by default)."""

    sae: str
    feature: int
    mode: str = "add"
    strength: float = 1.0
    unit: str = "max"

    def validate(self, d_sae: int) -> None:
        if self.mode not in MODES:
            raise SaeforgeError(f"unknown steering mode {self.mode!r}", f"use one of {', '.join(MODES)}")
        if self.unit not in UNITS:
            raise SaeforgeError(f"unknown strength unit {self.unit!r}", f"use one of {', '.join(UNITS)}")
        if not 0 <= self.feature < d_sae:
            raise SaeforgeError(f"feature {self.feature} is out of range for SAE {self.sae!r} (0..{d_sae - 1})",
                                f"pick an index below {d_sae}")
        s, limit = self.strength, MAX_STRENGTH[self.unit]
        if not isinstance(s, (int, float)) or not math.isfinite(s) or abs(s) > limit:
            raise SaeforgeError(f"steering strength {s!r} is not allowed",
                                f"use a finite number with |strength| ≤ {limit:g} (unit {self.unit})")


def parse_feature(spec: str, known: Sequence[str]) -> tuple[str, int]:
    """``SAE:IDX`` (SAE = its name or site) → (name, idx)."""
    name, sep, idx = spec.rpartition(":")
    if not sep or not idx.lstrip("-").isdigit():
        raise SaeforgeError(f"feature {spec!r} is not SITE:INDEX", "e.g. --feature layers.15.resid_post:1234")
    if name not in known:
        raise SaeforgeError(f"{spec!r}: no SAE {name!r} in this run", f"the run has: {', '.join(known)}")
    return name, int(idx)


def loading_message(path: str | Path, model: str = "") -> str:
    """What loading a run involves, from its config files alone (nothing heavy is read): printed before the
    15–60 s of loading so a command is not silent."""
    from saeforge.runs import find_saes
    from saeforge.saes import read_sae_config

    folders = find_saes(path)
    meta = read_sae_config(next(iter(folders.values()))).get("metadata") or {}
    name = model or meta.get("model_name") or "the SAE's model"
    what = "1 SAE" if len(folders) == 1 else f"{len(folders)} SAEs"
    return f"loading the model {name} and {what} ({', '.join(folders)}) from {path} ..."


def recorded_mean_norms(bound: BoundSAE) -> dict[str, float] | None:
    """Mean ‖x‖ at each site the dictionary writes on its training data, ``{site: norm}``, from its saved input
    normalisation (saeforge scales every site to E‖x‖ = √d: scale = √d / mean norm; ``scale_out`` holds the written
    sites' scales, one per site for a dictionary writing several)."""
    norm = (bound.meta or {}).get("normalization")
    if not isinstance(norm, dict) or norm.get("method") != "expected_norm":
        return None
    scales = norm.get("scale_out", norm.get("scale_in"))
    scales = scales if isinstance(scales, list) else [scales]
    if len(scales) != len(bound.writes):
        return None
    out = {}
    for site, scale in zip(bound.writes, scales):
        try:
            scale = float(scale)
        except (TypeError, ValueError):
            return None
        if not (math.isfinite(scale) and scale > 0):
            return None
        out[site.name] = math.sqrt(site.d) / scale
    return out


def recorded_mean_norm(bound: BoundSAE) -> float | None:
    """Mean ‖x‖ at the one site a dictionary writes, on its training data (:func:`recorded_mean_norms`)."""
    norms = recorded_mean_norms(bound)
    return next(iter(norms.values())) if norms and len(norms) == 1 else None


def latent_source(bound: BoundSAE, feature: int):
    """Where the activation of latent ``feature`` comes from in a forward pass: (site read, key, encode, column):
    ``encode(x)`` of the activation at the site read gives the latents, whose ``column`` is the feature. A CLT
    latent of layer l comes from layer l's read alone (``encode_layer``); an SAE or transcoder reads one site. None
    for a dictionary whose latents read several sites (a crosscoder)."""
    from saeforge.saes.clt import CrossLayerTranscoder

    sae = bound.sae
    if isinstance(sae, CrossLayerTranscoder) and len(bound.reads) > 1:
        layer, column = divmod(feature, sae.features_per_layer)
        return bound.reads[layer], (bound.name, layer), lambda x: sae.encode_layer(layer, x), column
    if len(bound.reads) != 1:
        return None
    return bound.reads[0], (bound.name, None), sae.encode, feature


class Steerer:
    """The dictionaries of a run loaded once, with what their strength units need (max activations, mean norms).

    ``saes``: name → :class:`~saeforge.runs.BoundSAE` (or, as before, name → (SAE, site) for an SAE at one site).
    :attr:`bound` holds the bound dictionaries; :attr:`saes` keeps the older name → (SAE, write site) view."""

    def __init__(self, lm, saes: dict, max_acts: dict[str, torch.Tensor | None], policy: TokenPolicy | None = None,
                 mean_norms: dict[str, float] | None = None):
        self.lm = lm
        self.bound: dict[str, BoundSAE] = {
            n: v if isinstance(v, BoundSAE) else BoundSAE(n, v[0], (v[1],), (v[1],)) for n, v in saes.items()}
        # the older (SAE, write site) view: None for a dictionary writing several sites (a CLT, a crosscoder), which
        # steering reaches through `bound` (every site a feature writes)
        self.saes = {n: (b.sae, b.writes[0] if len(b.writes) == 1 else None) for n, b in self.bound.items()}
        self.max_acts = max_acts
        self.policy = policy or TokenPolicy()  # the run's token rules, for tokenizing prompts
        self._norms: dict[str, tuple[float, str]] = {n: (float(v), "given") for n, v in (mean_norms or {}).items()}
        self._lens = None

    @classmethod
    def from_run(cls, path: str | Path, lm=None, *, model: str = "", device: str = "auto") -> "Steerer":
        from saeforge.features.store import STORE_FILE, FeatureStore
        from saeforge.runs import load_run
        from saeforge.saes import load_feature_stats

        run = load_run(path, model=model, device=device, lm=lm)
        store_path = Path(path) / STORE_FILE
        max_acts: dict[str, torch.Tensor | None] = {}
        for name, bound in run.saes.items():
            max_acts[name] = None
            if store_path.is_file():
                with FeatureStore(store_path, readonly=True) as store:
                    if name in {s["name"] for s in store.saes()}:  # a dictionary added after the harvest has none
                        max_acts[name] = torch.from_numpy(store.max_activations(name))
            if max_acts[name] is None:
                stats = load_feature_stats(bound.folder)
                if stats and "max_activation" in stats:
                    max_acts[name] = stats["max_activation"].float().cpu()
        return cls(run.lm, run.saes, max_acts, run.token_policy())

    # ------------------------------------------------------------------------------------------------ units
    def mean_norm(self, name: str, feature: int | None = None) -> tuple[float, str]:
        """(mean ‖x‖ where dictionary ``name`` writes, where it was measured): at its one write site; for one that
        writes several, over the sites ``feature`` writes (all of them without one) together, √(Σ_s mean‖x_s‖²)."""
        if name not in self._norms:
            bound = self.bound[name]
            values = recorded_mean_norms(bound)
            self._norms[name] = (values, "the SAE's training data") if values else self._measure_norms(bound)
        norms, source = self._norms[name]
        if isinstance(norms, float):  # given for the dictionary as a whole
            return norms, source
        sites = norms if feature is None else self.bound[name].written_rows(feature)
        return math.sqrt(sum(norms[s] ** 2 for s in sites)), source

    @torch.inference_mode()
    def _measure_norms(self, bound: BoundSAE) -> tuple[dict[str, float], str]:
        """Mean ‖x‖ at each write site over a few contexts of the SAE's corpus (a local one), else neutral
        prompts."""
        from saeforge.data.prompts import PromptEncoder
        from saeforge.interventions.selection import NEUTRAL_PROMPTS

        texts, source = list(NEUTRAL_PROMPTS), f"{len(NEUTRAL_PROMPTS)} neutral prompts"
        corpus = str((bound.meta or {}).get("dataset_path") or "")
        if corpus and not corpus.startswith("hf:"):
            try:
                from saeforge.data.text_source import TextSource

                docs = []
                for doc in TextSource(corpus).documents():
                    docs.append(doc[:2000])
                    if len(docs) == NORM_SAMPLE_CONTEXTS:
                        break
                texts, source = docs, f"{len(docs)} texts of {corpus}"
            except (SaeforgeError, OSError):
                pass
        encoder = PromptEncoder(self.lm, self.policy, max_tokens=min(self.policy.context_length, 512))
        batch = encoder.batch(texts, truncate=True)
        sites = [s.name for s in bound.writes]
        acts = self.lm.read(batch.input_ids, sites, attention_mask=batch.attention_mask)
        keep = batch.keep.to(self.lm.device)
        if not bool(keep.any()):
            raise SaeforgeError(f"no token to measure the mean norm at {', '.join(sites)}",
                                "give the strength with --unit max or --unit raw")
        norms = {s: float(acts[s][keep].float().norm(dim=-1).mean()) for s in sites}
        return norms, f"{int(keep.sum())} tokens of {source}"

    def value(self, edit: FeatureEdit) -> float:
        """The coefficient c of the edit (x + c·d_i for add, f_i ← c for clamp; the ratio for scale)."""
        if edit.unit == "raw" or edit.mode == "scale":
            return float(edit.strength)
        if edit.unit == "norm":
            rows = self.bound[edit.sae].written_rows(edit.feature).values()
            d_norm = math.sqrt(sum(float(r.detach().float().pow(2).sum()) for r in rows))
            if d_norm <= 0:
                raise SaeforgeError(f"feature {edit.feature} has a zero decoder row, so it cannot steer",
                                    "pick another feature")
            return float(edit.strength) * self.mean_norm(edit.sae, edit.feature)[0] / d_norm
        m = self.max_acts.get(edit.sae)
        if m is None:
            raise SaeforgeError(f"no feature statistics for SAE {edit.sae!r}, so 'max' units are unknown",
                                "harvest the run first (saeforge harvest) or give the strength in norm or raw units "
                                "(--unit norm)")
        top = float(m[edit.feature])
        if top <= 0:
            raise SaeforgeError(f"feature {edit.feature} never fired in the harvested text, so its max is 0",
                                "use --unit norm (or raw), or pick a feature that fires")
        return float(edit.strength) * top

    @property
    def lens(self):
        """The model's :class:`~saeforge.interventions.selection.LogitLens`, built once."""
        if self._lens is None:
            from saeforge.interventions.selection import LogitLens

            self._lens = LogitLens(self.lm)
        return self._lens

    def check(self, edits: Sequence[FeatureEdit]) -> None:
        for e in edits:
            if e.sae not in self.bound:
                raise SaeforgeError(f"no SAE {e.sae!r} in this run", f"the run has: {', '.join(self.bound)}")
            bound = self.bound[e.sae]
            e.validate(bound.d_sae)
            if e.mode != "add" and bound.kind != "sae" and latent_source(bound, e.feature) is None:
                reads = ", ".join(s.name for s in bound.reads)
                raise SaeforgeError(
                    f"{e.sae} is a crosscoder: its latents read all its sites ({reads}), so a forward pass has not "
                    f"computed feature {e.feature} yet where it writes the earlier ones, and {e.mode} needs it there",
                    f"steer it by adding its decoder rows (--mode add), e.g. --feature {e.sae}:{e.feature} "
                    "--mode add")

    # ------------------------------------------------------------------------------------------------ edits
    def _feature_ops(self, e: FeatureEdit, latents: dict) -> dict[str, object]:
        """{write site: op(flat, mask, ctx)} for one edit at every site its feature writes, each with its own
        decoder row; ``latents`` holds the latents of the current forward call that a dictionary reading elsewhere
        recorded at its read site (:func:`latent_source`)."""
        bound = self.bound[e.sae]
        value = self.value(e)
        source = None if bound.kind == "sae" else latent_source(bound, e.feature)

        def op_at(site: str, row: torch.Tensor):
            def op(flat: torch.Tensor, mask: torch.Tensor, ctx: EditContext) -> torch.Tensor:
                d = row.detach().to(flat)
                if e.mode == "add":
                    return flat + value * d
                if source is None:  # an SAE: f_i from the site itself, as it is now
                    f_i = bound.sae.encode(flat)[:, e.feature]
                else:
                    read, key, _, column = source
                    call, f = latents.get(key, (None, None))
                    if f is None or call != ctx.call:
                        raise SaeforgeError(f"{bound.name} writes {site}, which this forward reached before the site "
                                            f"it reads ({read.name})",
                                            "steer a transcoder whose read site comes before its write site")
                    f_i = f[mask.to(f.device)][:, column].to(flat)
                target = value if e.mode == "clamp" else value * f_i
                return flat + (target - f_i)[:, None] * d

            return op

        return {site: op_at(site, row) for site, row in bound.written_rows(e.feature).items()}

    def _mask(self, x: torch.Tensor, ctx: EditContext, positions: str, prompt_length: int | None,
              special: torch.Tensor) -> torch.Tensor | None:
        mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        if positions == "generated":
            if prompt_length is not None:
                mask &= (ctx.columns >= prompt_length).to(x.device)[None, :]
            elif not ctx.is_generated:
                return None  # the prompt's forward pass
        if ctx.input_ids is not None:
            mask &= ~torch.isin(ctx.input_ids, special.to(ctx.input_ids.device)).to(x.device)  # BOS, padding
        return mask if bool(mask.any()) else None

    def _edit_fn(self, ops: list, readers: list, latents: dict, positions: str,
                 prompt_length: int | None):
        special = torch.tensor(self.lm.special_token_ids())

        def fn(x: torch.Tensor, ctx: EditContext) -> torch.Tensor | None:
            out = x
            mask = self._mask(x, ctx, positions, prompt_length, special) if ops else None
            if mask is not None:
                out = x.clone()
                flat = out[mask].float()
                for op in ops:
                    flat = op(flat, mask, ctx)
                out[mask] = flat.to(x.dtype)
            for key, encode in readers:  # dictionaries reading this site: their latents for where they write
                latents[key] = (ctx.call, encode(out.float()))
            return None if out is x else out

        return fn

    @contextlib.contextmanager
    def steering(self, edits: Sequence[FeatureEdit] = (), positions: str = "all",
                 vectors: dict[str, torch.Tensor] | None = None, *, prompt_length: int | None = None
                 ) -> Iterator[None]:
        """Apply feature ``edits`` (and raw ``vectors`` added at their sites) to every forward pass inside the block
        (generation included). With ``positions="generated"`` only generated tokens are edited: those of cached
        generation steps, or, given ``prompt_length``, every token from that column on."""
        if positions not in ("all", "generated"):
            raise SaeforgeError(f"unknown positions {positions!r}", "use all or generated")
        self.check(edits)
        sites: dict[str, object] = {}
        ops: dict[str, list] = {}
        readers: dict[str, dict] = {}  # site -> {latent key: encode}
        latents: dict = {}
        for e in edits:
            bound = self.bound[e.sae]
            for name, op in self._feature_ops(e, latents).items():
                sites[name] = next(s for s in bound.writes if s.name == name)
                ops.setdefault(name, []).append(op)
            if e.mode != "add" and bound.kind != "sae":
                read, key, encode, _ = latent_source(bound, e.feature)
                sites[read.name] = read
                readers.setdefault(read.name, {}).setdefault(key, encode)
        for site, v in (vectors or {}).items():
            if not torch.isfinite(v).all():
                raise SaeforgeError("the steering vector contains NaN or Inf", "check how it was computed")
            resolved = self.lm.site(site)
            sites[resolved.name] = resolved
            ops.setdefault(resolved.name, []).append(lambda flat, mask, ctx, v=v: flat + v.to(flat))
        fns = {site: self._edit_fn(ops.get(name, []), list(readers.get(name, {}).items()), latents, positions,
                                   prompt_length)
               for name, site in sites.items()}
        with self.lm.edit(fns):
            yield
