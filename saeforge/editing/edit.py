"""Applying edits: localise (or not, for the baselines), optimise a delta on the chosen neurons' output weights,
commit it, record it.

The loss of one edit is the target's negative log-likelihood after the prompt (teacher-forced, per token) plus
``locality_weight`` × the change the edit makes to the layer's MLP output where it should not act, relative to that
output's size: mean ‖a[M]·Δ‖² / mean ‖MLP(a)‖² over the tokens of unrelated retain text, plus the same over the last
tokens of neighbour prompts (prompts of the same relations about other subjects), with a the neuron activations, M
the edited neurons and Δ the delta (MEMIT's preservation of other keys, Meng et al., arXiv 2210.07229, as a
penalty). It is minimised with Adam on the delta alone; the edit stops early once the target's NLL falls below
``stop_nll``. This term stands in for the KL on retain logits of the reconstruction in ``docs/editing.md``: it needs
no forward pass, so a step costs about one forward and backward of the prompt from the edited layer on. Methods
(the same loss, steps and stopping rule for all):

- ``masked``: the neurons localised through the SAE (:func:`saeforge.editing.localize.localize`), the reconstruction
  of MicroEdit (see ``docs/editing.md``);
- ``random``: as many neurons as ``masked`` would take, drawn at random (does the choice of neurons matter?);
- ``unmasked``: every neuron of the layer, same loss (an unmasked edit of the same layer);
- ``finetune``: every neuron of the layer, the target's NLL alone (a plain fine-tune of the same weights).
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass, replace
from typing import Sequence

import torch

from saeforge.editing.facts import EncodedFact, Fact, encode_answer
from saeforge.editing.localize import Localization, localize, retain_means
from saeforge.editing.registry import EditRecord, EditRegistry
from saeforge.editing.scoring import FactBatch, forward_from
from saeforge.editing.weights import commit, down_projection, with_delta
from saeforge.errors import SaeforgeError
from saeforge.models.gradients import weights_without_grad
from saeforge.models.suffix import BlockInput, read_block_inputs

__all__ = ["EDIT_METHODS", "EditPrompt", "EditSettings", "Editor", "adds_to_residual", "check_method"]

EDIT_METHODS = ("masked", "random", "unmasked", "finetune")
REUSE = ("avoid", "allow")


@dataclass(frozen=True)
class EditSettings:
    """How each edit is localised and optimised."""

    latents: int = 8
    """SAE latents kept per edit (the most responsible for the target answer)."""
    neurons_per_latent: int = 8
    """Neurons taken from each kept latent (its largest decoder weights); the mask is their union."""
    reuse: str = "avoid"
    """avoid: skip neurons earlier edits own (the next largest instead) while unowned ones remain; allow: masks
    may overlap."""
    steps: int = 40
    """Adam steps at most per edit."""
    lr: float = 0.005
    """Adam learning rate of the delta on a mask's weights (masked, random)."""
    lr_full_layer: float = 0.002
    """Adam learning rate of the delta on every neuron of the layer (unmasked, finetune): lower, as it moves many
    times more weights (docs/editing.md)."""
    locality_weight: float = 10.0
    """Weight of the locality term (relative change of the layer's MLP output on retain text and neighbour
    prompts); 0: none."""
    stop_nll: float = 0.05
    """Stop an edit once the target's mean negative log-likelihood per token is at most this."""
    seed: int = 0
    """Seed of the random method's neuron draws."""

    def validate(self) -> None:
        if self.reuse not in REUSE:
            raise SaeforgeError(f"unknown --reuse {self.reuse!r}", "use --reuse avoid or --reuse allow")
        if self.steps < 1 or not self.lr > 0 or not self.lr_full_layer > 0 or self.locality_weight < 0 \
                or self.stop_nll < 0:
            raise SaeforgeError("--steps, --lr, --lr-full-layer must be positive and --locality-weight, --stop-nll "
                                "not negative",
                                "pass e.g. --steps 40 --lr 0.005 --locality-weight 10 --stop-nll 0.05")
        if self.latents < 1 or self.neurons_per_latent < 1:
            raise SaeforgeError("--latents and --neurons-per-latent must be at least 1",
                                "pass e.g. --latents 8 --neurons-per-latent 8")


def check_method(method: str) -> None:
    if method not in EDIT_METHODS:
        raise SaeforgeError(f"unknown edit method {method!r}", f"use one of {', '.join(EDIT_METHODS)}, e.g. "
                            "--method masked")


@torch.no_grad()
def adds_to_residual(lm, layer: int, module, ids: torch.Tensor) -> bool:
    """Whether the output of ``module`` (layer ``layer``'s down projection) reaches the residual stream as it is, i.e.
    adding p to it adds exactly p to the block's output: then an edit's change can be added to the cached block
    output (:class:`EditPrompt`). Checked on the model with a push as large as the residual stream (``ids``: a short
    batch), since some families put a norm after the MLP (Gemma 2/3, OLMo 2) and their configs do not say so in one
    place."""
    site = lm.site(f"layers.{layer}.resid_post")
    clean = lm.read(ids, [site])[site.name].float()
    scale = float(clean.pow(2).mean().sqrt())
    push = torch.randn(clean.shape, generator=torch.Generator().manual_seed(0)) * scale

    def hook(mod, args, output):
        return output + push.to(device=output.device, dtype=output.dtype)

    handle = module.register_forward_hook(hook)
    try:
        pushed = lm.read(ids, [site])[site.name].float()
    finally:
        handle.remove()
    return bool(torch.allclose((pushed - clean).cpu(), push, rtol=1e-3, atol=1e-3 * scale))


@dataclass
class EditPrompt:
    """An edit prompt read once up to the edited block: the block's output without the edit (the input of the next
    block) and the block's neuron activations. The delta changes the block's output by a[M]·Δ and nothing before it,
    so a step of the edit runs only the blocks after the edited one, on that output plus a[M]·Δ; the target's NLL
    equals the hooked forward's up to rounding (tested)."""

    block_input: BlockInput
    acts: torch.Tensor  # [1, seq, d_mlp] the neuron activations of the edited block
    keep: torch.Tensor  # the positions that predict the target's tokens
    tokens: torch.Tensor  # the target's tokens

    @classmethod
    def read(cls, lm, encoded: EncodedFact, site) -> "EditPrompt":
        ids = torch.tensor([encoded.ids], dtype=torch.long)
        inputs, acts = read_block_inputs(lm, ids, [site.layer + 1], [site])
        got = inputs[site.layer + 1]
        # ordinary tensors (not inference tensors): the forward with gradients starts from them
        block_input = BlockInput(got.start, got.hidden.clone(), got.input_ids.clone(), None, got.rest)
        as_long = lambda x: torch.tensor(x, dtype=torch.long, device=lm.device)  # noqa: E731
        return cls(block_input, acts[site.name].clone(), as_long(encoded.positions), as_long(encoded.answer_ids))

    def nll(self, lm, neurons: torch.Tensor | None, delta: torch.Tensor) -> torch.Tensor:
        """The target's mean NLL per token with the delta on ``neurons`` (None: every neuron)."""
        part = self.acts if neurons is None else self.acts.index_select(-1, neurons)
        hidden = self.block_input.hidden
        edited = replace(self.block_input, hidden=hidden + (part.to(delta.dtype) @ delta).to(hidden.dtype))
        logits = forward_from(lm, edited, self.keep)[0].float()
        return torch.nn.functional.cross_entropy(logits, self.tokens)


class Editor:
    """Sequential (lifelong) edits of one layer of ``lm``: ``editor.edit(fact)`` changes the model in place and
    appends to ``editor.registry``.

    ``sae``: a saeforge SAE on ``layers.L.mlp_hidden`` (only the ``masked`` method uses it) and ``site`` that site;
    ``retain``: ``[n, seq]`` token ids of unrelated text (BOS first); ``neighbours``: prompts the edits must leave
    alone (each adds its last token). Their neuron activations at the layer (BOS left out) make the locality term
    and the latents' baseline. They are read once, when the editor is made; edits of the layer do not change them
    (they are the MLP's input)."""

    def __init__(self, lm, sae, site, retain: torch.Tensor, settings: EditSettings = EditSettings(), *,
                 method: str = "masked", neighbours: Sequence[str] = (), registry: EditRegistry | None = None,
                 encoder=None, sae_name: str = ""):
        from saeforge.data.prompts import PromptEncoder

        settings.validate()
        check_method(method)
        site = lm.site(site) if isinstance(site, str) else site
        if site.kind != "mlp_hidden":
            raise SaeforgeError(f"the SAE reads {site.name}; localised editing needs an SAE on the MLP's neurons, "
                                "layers.L.mlp_hidden", "train one: saeforge cache --sites layers.20.mlp_hidden ... && "
                                "saeforge train --sites layers.20.mlp_hidden ...")
        if sae is not None and int(sae.cfg.d_in) != int(lm.d_mlp):
            raise SaeforgeError(f"the SAE has d_in {sae.cfg.d_in} but the MLP has {lm.d_mlp} neurons",
                                "use an SAE trained on this model's layers.L.mlp_hidden")
        if sae is None and method == "masked":
            raise SaeforgeError(f"the {method} method needs an SAE", "pass the SAE's run directory")
        self.lm, self.sae, self.site, self.settings, self.method = lm, sae, site, settings, method
        self.layer = int(site.layer)
        self.module = down_projection(lm, self.layer)
        self.encoder = encoder or PromptEncoder(lm)
        self.registry = registry or EditRegistry.for_model(lm, self.layer, sae_name)
        if self.registry.layer != self.layer:
            raise SaeforgeError(f"the registry edits layer {self.registry.layer}, the SAE reads layer {self.layer}",
                                f"use an SAE on layers.{self.registry.layer}.mlp_hidden for this registry")
        acts = lm.read(retain, [site])[site.name][:, 1:]
        groups = [acts.reshape(-1, acts.shape[-1])]
        if neighbours:
            from saeforge.editing.scoring import last_token_activations

            groups.append(last_token_activations(lm, self.encoder, neighbours, site))
        # ordinary tensors (not inference tensors): they meet autograd in the locality term
        self.retain_acts = [g.float().clone() for g in groups]
        with torch.no_grad():
            self.retain_scale = [float(self.module(g.to(self.module.weight.dtype)).float().pow(2).sum(-1).mean())
                                 for g in self.retain_acts]
        self.means = retain_means(sae, self.retain_acts) if sae is not None else None
        self.additive = adds_to_residual(lm, self.layer, self.module, retain[:1, :16])

    def encode(self, fact: Fact) -> EncodedFact:
        return encode_answer(self.lm, self.encoder, fact.prompt, fact.target)

    def neurons_for(self, encoded: EncodedFact, index: int) -> Localization | None:
        """The neurons the next edit may change (None: all of the layer)."""
        s = self.settings
        avoid = self.registry.owned() if s.reuse == "avoid" else set()
        if self.method == "masked":
            return localize(self.lm, self.sae, self.site, encoded, block=self.layer, means=self.means,
                            latents=s.latents, neurons_per_latent=s.neurons_per_latent, avoid=avoid)
        if self.method == "random":
            rng = random.Random(f"{s.seed}:{index}")
            count = min(self.lm.d_mlp, s.latents * s.neurons_per_latent)
            fresh = [i for i in range(self.lm.d_mlp) if i not in avoid]
            chosen = rng.sample(fresh, min(count, len(fresh)))
            if len(chosen) < count:  # the layer has run out of unowned neurons: reuse owned ones
                chosen += rng.sample(sorted(avoid), count - len(chosen))
            return Localization((), (), tuple(sorted(chosen)), "random")
        return None

    def edit(self, fact: Fact | EncodedFact, *, prompt: str = "", target: str = "") -> EditRecord:
        """Apply one edit to the model (in place) and record it."""
        encoded = fact if isinstance(fact, EncodedFact) else self.encode(fact)
        if isinstance(fact, Fact):
            prompt, target = fact.prompt, fact.target
        s = self.settings
        where = self.neurons_for(encoded, len(self.registry.records))
        neurons = None if where is None else torch.tensor(where.neurons, dtype=torch.long, device=self.lm.device)
        n = self.lm.d_mlp if neurons is None else len(neurons)
        weight = self.module.weight
        delta = torch.zeros(n, self.lm.d_model, dtype=torch.float32, device=weight.device, requires_grad=True)
        optimizer = torch.optim.Adam([delta], lr=s.lr if neurons is not None else s.lr_full_layer)
        weight_locality = 0.0 if self.method == "finetune" else s.locality_weight
        steps, nll_before, nll = 0, None, None
        retain = [(a if neurons is None else a.index_select(1, neurons.cpu())).to(delta.device)
                  for a in self.retain_acts]

        def retain_change() -> torch.Tensor:
            return sum((a @ delta).pow(2).sum(-1).mean() / scale for a, scale in zip(retain, self.retain_scale))

        if self.additive:
            edit_prompt = EditPrompt.read(self.lm, encoded, self.site)
            hooked = contextlib.nullcontext()
            target_nll = lambda: edit_prompt.nll(self.lm, neurons, delta)  # noqa: E731
        else:
            batch = FactBatch.build(self.lm, [encoded], block=self.layer)
            hooked = with_delta(self.module, neurons, delta)
            target_nll = lambda: batch.nll(self.lm)  # noqa: E731
        with weights_without_grad(self.lm.model), hooked, torch.enable_grad():
            for steps in range(s.steps + 1):
                nll = target_nll()
                if nll_before is None:
                    nll_before = float(nll.detach())
                if float(nll.detach()) <= s.stop_nll or steps == s.steps:
                    break
                loss = nll + weight_locality * retain_change() if weight_locality > 0 else nll
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        with torch.no_grad():
            change = float(retain_change().sqrt())
        commit(self.module, neurons, delta)
        record = EditRecord(prompt, target, self.method, tuple(range(n)) if where is None else where.neurons,
                            () if where is None else where.latents, () if where is None else where.latent_scores,
                            "all" if where is None else where.source, steps, nll_before, float(nll.detach()), change,
                            float(delta.detach().norm()))
        self.registry.add(record)
        return record

    def edit_all(self, facts: Sequence[Fact]) -> list[EditRecord]:
        encoded = [self.encode(f) for f in facts]  # every target checked before the first edit
        return [self.edit(e, prompt=f.prompt, target=f.target) for f, e in zip(facts, encoded)]
