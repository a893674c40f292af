"""``saeforge edit apply`` and the Python entry points: load the SAE that localises edits, apply edits to a model,
save the edited model as a Hugging Face folder with its edit registry.

    from saeforge.editing import Fact, edit_model
    lm, registry = edit_model("runs/l20", [Fact("The capital of France is", " Rome")], out="edited/")
    # edited/ is an ordinary Hugging Face folder: LanguageModel.load("edited/"), AutoModelForCausalLM, --model edited/
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from simple_parsing.helpers import field

from saeforge.editing.edit import EditSettings, Editor, check_method
from saeforge.editing.facts import Fact, builtin_facts, encode_answer, read_facts
from saeforge.editing.registry import EditRegistry
from saeforge.errors import SaeforgeError
from saeforge.options import flat_options

__all__ = ["ApplyConfig", "edit_model", "load_edit_sae", "run_apply", "save_edited"]

REPORT_FILE = "edit_report.json"


def load_edit_sae(sae: str, *, model: str = "", device: str = "auto", lm=None):
    """``(lm, bound SAE)``: the one SAE under ``sae``, which must read a ``layers.L.mlp_hidden`` site."""
    from saeforge.runs import load_run

    run = load_run(sae, model=model, device=device, lm=lm)
    if len(run.saes) != 1:
        raise SaeforgeError(f"{sae} holds {len(run.saes)} SAEs ({', '.join(run.saes)}); editing uses one",
                            f"pass one SAE folder, e.g. {sae}/saes/{next(iter(run.saes))}")
    bound = next(iter(run.saes.values()))
    if bound.kind != "sae" or bound.read_site.kind != "mlp_hidden":
        raise SaeforgeError(f"{sae} is a {bound.describe()}; localised editing needs an SAE on the MLP's neurons "
                            "(layers.L.mlp_hidden)", "train one: saeforge cache --sites layers.20.mlp_hidden --out "
                            "CACHE && saeforge train --cache CACHE --sites layers.20.mlp_hidden --out RUN")
    return run.lm, bound


def save_edited(lm, registry: EditRegistry, out: str | Path, report: dict[str, Any] | None = None) -> Path:
    """Write the edited model as a Hugging Face folder (weights, config, tokenizer) with its edit registry
    (``edits.json``, ``edits.safetensors``) and ``report``, atomically; ``out`` must not exist or be empty."""
    from saeforge.utils.atomic import atomic_directory

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise SaeforgeError(f"{out} exists and is not empty", "pass a new folder to --out")
    if out.exists():
        out.rmdir()
    with atomic_directory(out) as tmp:
        lm.model.save_pretrained(tmp)
        lm.tokenizer.save_pretrained(tmp)
        registry.save(tmp)
        if report is not None:
            import json

            (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return out


def _retain(lm, spec: str, contexts: int, length: int) -> torch.Tensor:
    from saeforge.editing.bench import text_contexts

    return text_contexts(lm, spec, contexts, length)


def edit_model(sae: str, facts: Sequence[Fact], *, out: str = "", model: str = "", registry: str = "",
               method: str = "masked", settings: EditSettings = EditSettings(), retain_text: str = "embedded:train",
               retain_contexts: int = 16, neighbours: str = "builtin", context_length: int = 64,
               device: str = "auto", lm=None):
    """Apply ``facts`` one after the other; returns ``(lm, registry)`` and, with ``out``, saves the edited model.

    ``model``: the model to edit (empty: the SAE's); a folder written by an earlier edit continues its registry.
    ``registry``: an explicit registry folder to continue (refused if it belongs to another model)."""
    from saeforge.data.prompts import PromptEncoder

    from saeforge.editing.bench import neighbour_prompts_of

    check_method(method)
    settings.validate()
    neighbour_list = neighbour_prompts_of(neighbours)
    if not facts:
        raise SaeforgeError("no edit requests given", "pass --prompt TEXT --target ' ANSWER', or --facts FILE")
    lm, bound = load_edit_sae(sae, model=model, device=device, lm=lm)
    encoder = PromptEncoder(lm)
    encoded = [encode_answer(lm, encoder, f.prompt, f.target) for f in facts]  # bad targets before any edit
    previous = None
    source = Path(registry) if registry else (Path(model) if model and EditRegistry.exists(model) else None)
    if source is not None:
        previous = EditRegistry.load(source, lm)
        if previous.layer != bound.read_site.layer:
            raise SaeforgeError(f"the registry at {source} edits layer {previous.layer}; the SAE reads layer "
                                f"{bound.read_site.layer}", f"use an SAE on layers.{previous.layer}.mlp_hidden")
    if out:
        out_path = Path(out)
        if out_path.exists() and any(out_path.iterdir()):
            raise SaeforgeError(f"{out} exists and is not empty", "pass a new folder to --out")
    retain = _retain(lm, retain_text, retain_contexts, context_length)
    editor = Editor(lm, bound.sae, bound.read_site, retain, settings, method=method, neighbours=neighbour_list,
                    registry=previous, encoder=encoder, sae_name=str(bound.folder))
    for f, e in zip(facts, encoded):
        editor.edit(e, prompt=f.prompt, target=f.target)
    if out:
        save_edited(lm, editor.registry, out)
    return lm, editor.registry


@flat_options
@dataclass(frozen=True)
class ApplyConfig:
    """Edit facts into a model through an SAE on one layer's MLP neurons (only the weights of the few neurons each
    fact is localised to change), and save the edited model as a Hugging Face folder with its edit registry."""

    sae: str = field(default="", positional=True)
    """The SAE (a run directory from `saeforge train` or an SAE folder) on layers.L.mlp_hidden; layer L is
    edited."""
    out: str = ""
    """Folder to write the edited model to (a Hugging Face folder: --model OUT loads it)."""
    model: str = ""
    """Model to edit; empty: the one the SAE was trained on. A folder written by `saeforge edit apply` continues
    its edits (lifelong editing; its registry comes along)."""
    registry: str = ""
    """Continue this registry (a folder with edits.json) instead of the model folder's own."""
    prompt: str = ""
    """One edit: the prompt, e.g. "The capital of France is"."""
    target: str = ""
    """One edit: the new answer, e.g. " Rome" (a leading space starts a new word)."""
    facts: str = ""
    """Several edits: a .jsonl file ({"prompt": ..., "target": ..., "paraphrases": [...]} a line), or builtin:N for
    the first N built-in counterfactual facts."""
    method: str = "masked"
    """masked (neurons localised through the SAE), random (as many random neurons), unmasked (every neuron of the
    layer) or finetune (every neuron, no locality term)."""
    edit_settings: EditSettings = field(default_factory=EditSettings)
    """How each edit is localised and optimised."""
    retain_text: str = "embedded:train"
    """Unrelated text whose neuron activations make the locality term and the latents' baseline."""
    retain_contexts: int = 16
    """Contexts of retain text."""
    neighbours: str = "builtin"
    """Neighbour prompts each edit must leave alone (the built-in relations about subjects never edited nor
    measured, docs/editing.md), or none."""
    context_length: int = 64
    """Tokens per retain context, BOS included."""
    device: str = "auto"
    """auto, cpu or cuda."""
    threads: int = 0
    """CPU threads; 0: automatic."""

    def edit_requests(self) -> list[Fact]:
        if bool(self.prompt) != bool(self.target):
            raise SaeforgeError("--prompt and --target go together", "pass both, e.g. --prompt 'The capital of "
                                "France is' --target ' Rome'")
        if self.prompt and self.facts:
            raise SaeforgeError("both --prompt/--target and --facts given", "pass one of them")
        if self.prompt:
            return [Fact(self.prompt, self.target)]
        if self.facts.startswith("builtin:"):
            count = self.facts.split(":", 1)[1]
            if not count.isdigit():
                raise SaeforgeError(f"--facts {self.facts}: expected builtin:N", "pass e.g. --facts builtin:10")
            return builtin_facts(int(count))[0]
        if self.facts:
            return read_facts(self.facts)
        raise SaeforgeError("no edit requests given", "pass --prompt 'The capital of France is' --target ' Rome', "
                            "or --facts FILE")


def run_apply(cfg: ApplyConfig) -> EditRegistry:
    from saeforge.data.prompts import PromptEncoder
    from saeforge.editing.scoring import FactBatch
    from saeforge.utils.locking import exclusive_lock
    from saeforge.utils.threads import thread_policy

    if not cfg.out:
        raise SaeforgeError("no output folder given", "pass --out FOLDER (the edited model is written there)")
    facts = cfg.edit_requests()
    out = Path(cfg.out)
    with exclusive_lock(out.parent / f".{out.name}.edit-lock", "saeforge edit apply"), thread_policy(cfg.threads):
        lm, registry = edit_model(cfg.sae, facts, model=cfg.model, registry=cfg.registry, method=cfg.method,
                                  settings=cfg.edit_settings, retain_text=cfg.retain_text,
                                  retain_contexts=cfg.retain_contexts, neighbours=cfg.neighbours,
                                  context_length=cfg.context_length,
                                  device=cfg.device)
        new = registry.records[-len(facts):]
        encoder = PromptEncoder(lm)
        batch = FactBatch.build(lm, [encode_answer(lm, encoder, f.prompt, f.target) for f in facts],
                                block=registry.layer)
        exact = batch.score(lm)["exact"].tolist()
        report = {"edits": [{"prompt": r.prompt, "target": r.target, "greedy_gives_target": bool(x),
                             "neurons": len(r.neurons), "latents": list(r.latents), "source": r.source,
                             "steps": r.steps, "nll_before": r.nll_before, "nll_after": r.nll_after}
                            for r, x in zip(new, exact)], "overlap": registry.overlap()}
        save_edited(lm, registry, out, report)
    for row in report["edits"]:
        mark = "ok" if row["greedy_gives_target"] else "not the argmax"
        print(f"{row['prompt']!r} -> {row['target']!r}: {mark}; {row['neurons']} neurons ({row['source']}), "
              f"{row['steps']} steps, NLL {row['nll_before']:.2f} -> {row['nll_after']:.2f}")
    ov = registry.overlap()
    print(f"registry: {ov['edits']} edits on layer {registry.layer}, {ov['union']} neurons in all, "
          f"{ov['shared_neurons']} shared by two or more edits")
    print(f"written {out} (load it with --model {out})")
    return registry
