"""What replacing the sites a dictionary writes means, for every kind of dictionary (``saeforge eval`` runs them all
through :func:`saeforge.evals.evaluate.evaluate_dictionaries`).

=============  ==============================================================================================
kind           the replaced forward pass
=============  ==============================================================================================
``sae``        the site read and written replaced by the reconstruction of its clean value
``transcoder`` the site written (``layers.L.mlp_out``: one MLP) replaced by the output computed from the site
               read; that site comes before the one written, so its value in the replaced pass is the clean one
``clt``        every site written replaced at once, each computed **in that same pass** layer by layer: layer
               j's MLP output becomes ``Σ_{i<=j} f_i W_dec[i→j] + b_dec[j]`` (+ skip) with each ``f_i``
               encoded from layer i's MLP input as the *replaced* model computed it, so errors compound as in a
               replacement model (Ameisen et al., "Circuit Tracing", transformer-circuits.pub 2025)
``crosscoder`` acausal (every latent reads all its sites), so it cannot run inside one pass: its output for
               every site is computed from the clean activations and spliced in at all its sites together; CE
               loss and KL with each site alone replaced are given too (``per_site``)
=============  ==============================================================================================

Only kept positions are replaced (BOS and special tokens keep their clean values), through
``LanguageModel.edit`` (the one intervention mechanism). The reconstruction figures are always those of the
dictionary's output computed from the *clean* reads, per written site (a CLT layer's L0 counts that layer's own
features) and over all written sites together (their concatenation: pooled FVU, L0 and dead latents over the whole
dictionary). The baselines zero- and mean-ablate every written site together.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from saeforge.errors import SaeforgeError
from saeforge.evals.downstream import replace_at

__all__ = ["CleanOutputs", "Replacement", "refuse_two_models", "replacement_for"]


@dataclass
class CleanOutputs:
    """A dictionary run on one batch's clean reads (kept positions only)."""

    latents: Tensor
    """[n, d_sae]: every latent (a CLT: the layers' latents side by side)."""
    site_latents: list[Tensor]
    """Per written site, the latents that write it (a CLT layer: its own features; otherwise all of them)."""
    outputs: list[Tensor]
    """Per written site, [n, d_site]."""


class Replacement:
    """One dictionary as a replacement of the sites it writes (see the module docstring); built by
    :func:`replacement_for`. ``dictionary`` needs ``encode`` and ``__call__`` (an SAE, transcoder or crosscoder),
    or ``encode_layer``/``decode_layer`` (a CLT; ``skip_layer`` when ``cfg.skip_connection``)."""

    def __init__(self, dictionary: Any, kind: str, reads: Sequence[str], writes: Sequence[str],
                 widths: Sequence[int]):
        self.dictionary, self.kind = dictionary, kind
        self.reads, self.writes, self.widths = list(reads), list(writes), list(widths)
        self.layerwise = kind == "clt"
        if self.layerwise and not (hasattr(dictionary, "encode_layer") and hasattr(dictionary, "decode_layer")):
            raise SaeforgeError(f"a {type(dictionary).__name__} bound as a cross-layer transcoder ({len(reads)} "
                                f"site(s) read, {len(writes)} written) has no encode_layer/decode_layer",
                                "bind a saeforge CLT (topk_clt, batchtopk_clt, jumprelu_clt) to its layers")
        if self.layerwise and len(reads) == 1 and len(writes) > 1:
            raise SaeforgeError(f"a dictionary reading one site ({reads[0]}) and writing {len(writes)} cannot be "
                                "evaluated as a cross-layer transcoder, which reads one site per layer",
                                "bind it to as many read sites as written sites")

    @property
    def per_site(self) -> bool:
        """Whether each written site alone is replaced too (a crosscoder over several sites)."""
        return self.kind == "crosscoder" and len(self.writes) > 1

    @property
    def edited_sites(self) -> list[str]:
        """Every site the replaced forward edits or reads in-pass."""
        return self.reads + self.writes if self.layerwise else list(self.writes)

    def _skip(self, i: int, x: Tensor) -> Tensor | None:
        if getattr(self.dictionary.cfg, "skip_connection", False):
            return self.dictionary.skip_layer(i, x)
        return None

    def _layer_output(self, j: int, latents: Sequence[Tensor], x_j: Tensor) -> Tensor:
        out = self.dictionary.decode_layer(j, latents)
        skip = self._skip(j, x_j)
        return out if skip is None else out + skip

    @torch.no_grad()
    def clean(self, xs: Sequence[Tensor]) -> CleanOutputs:
        """The dictionary run on the clean reads ``xs`` (one [n, d] per site read, float32)."""
        d = self.dictionary
        if self.layerwise:
            fs = [d.encode_layer(i, x) for i, x in enumerate(xs)]
            outs = [self._layer_output(j, fs, xs[j]) for j in range(len(self.writes))]
            return CleanOutputs(torch.cat(fs, -1), fs, outs)
        x = xs[0] if len(xs) == 1 else torch.cat(list(xs), -1)
        f = d.encode(x)
        out = d(x)  # forward, not decode(f): a skip transcoder adds its skip term there
        outs = [out] if len(self.writes) == 1 else list(out.split(self.widths, dim=-1))
        return CleanOutputs(f, [f] * len(outs), outs)

    def edits(self, keep: Tensor, clean: CleanOutputs) -> dict[str, Callable]:
        """The ``{site: edit}`` of the replaced forward of the batch whose keep mask is ``keep`` [batch, seq]."""
        if not self.layerwise:
            return {w: replace_at(keep, out) for w, out in zip(self.writes, clean.outputs)}
        return self._in_pass_edits(keep)

    def _in_pass_edits(self, keep: Tensor) -> dict[str, Callable]:
        """A CLT run inside the forward: each read site's edit encodes what the replaced model gives it, each
        written site's edit decodes the latents of its layer and the earlier ones."""
        inputs: dict[int, Tensor] = {}
        latents: dict[int, Tensor] = {}

        def rows(x: Tensor, ctx) -> Tensor:
            if tuple(keep.shape) != tuple(x.shape[:2]):
                raise SaeforgeError(f"the replacement at {ctx.site.name} was built for a batch of shape "
                                    f"{tuple(keep.shape)} but the forward pass has {tuple(x.shape[:2])}",
                                    "build the edits with the keep mask of the batch they run on")
            return keep.to(x.device)

        def read(i: int) -> Callable:
            def edit(x: Tensor, ctx) -> None:
                inputs[i] = x[rows(x, ctx)].float()
                latents[i] = self.dictionary.encode_layer(i, inputs[i])
                return None

            return edit

        def write(j: int) -> Callable:
            def edit(x: Tensor, ctx) -> Tensor:
                m = rows(x, ctx)
                missing = [self.reads[i] for i in range(j + 1) if i not in latents]
                if missing:
                    raise SaeforgeError(f"{self.writes[j]} was reached before {', '.join(missing)}: the dictionary "
                                        "would write a site the model computes before one it reads",
                                        "bind it to sites in forward order (reads before writes)")
                out = x.clone()
                out[m] = self._layer_output(j, [latents[i] for i in range(j + 1)], inputs[j]).to(x.dtype)
                return out

            return edit

        edits: dict[str, Callable] = {s: read(i) for i, s in enumerate(self.reads)}
        for j, s in enumerate(self.writes):
            if s in edits:
                raise SaeforgeError(f"{s} is both read and written by a cross-layer transcoder",
                                    "bind its layers' MLP inputs as reads and their MLP outputs as writes")
            edits[s] = write(j)
        return edits


def replacement_for(bound: Any) -> Replacement:
    """The :class:`Replacement` of a :class:`~saeforge.runs.BoundSAE` (its kind and sites from its binding)."""
    from saeforge.runs import check_site_order

    binding = bound.binding
    refuse_two_models(bound.name, binding)
    check_site_order(binding, where=f"{bound.kind} {bound.name}")
    return Replacement(bound.sae, binding.kind, [s.name for s in bound.reads], [s.name for s in bound.writes],
                       [s.d for s in bound.writes])


def refuse_two_models(name: str, binding: Any) -> None:
    """A crosscoder over two models (sites ``a--SITE``, ``b--SITE``) cannot be spliced into one model."""
    if binding.models:
        raise SaeforgeError(f"{name} is a crosscoder over {len(binding.models)} models ({', '.join(binding.sites)}); "
                            "saeforge eval runs one model",
                            "its analysis is the diff.json that `saeforge diff --model-b MODEL_B --out DIFF_DIR` "
                            "wrote beside it")
