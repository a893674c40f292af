"""``saeforge edit bench``: lifelong editing measured the standard way (reliability, generalisation, locality after
T sequential edits; WISE, Wang et al., arXiv 2405.14768) for SAE-localised edits and the baselines, plus the drift
of held-out perplexity.

For each method the same edit requests are applied one after the other to one layer; after T of them (each T of
``--checkpoints``):

- **reliability**: share of the T edited prompts whose target is the argmax at every target token (teacher-forced
  argmax at every token is exactly greedy decoding producing the target); ``reliability_tokens`` the share of target
  tokens;
- **generalisation**: the same on the paraphrases of those T prompts;
- **locality**: share of the locality facts' answer tokens whose argmax is what the unedited model predicted there
  (the locality facts are the built-in facts the unedited model answers, never edited); ``locality_known``: share
  of them the model still answers;
- **perplexity drift**: held-out perplexity relative to the unedited model's (``--heldout-text``);
- the masks' overlap and size (:meth:`saeforge.editing.registry.EditRegistry.overlap`) and the time taken.

Writes ``bench.json`` (after every checkpoint), ``bench.md`` (the table) and ``bench.png`` (the metrics against T).
A killed run resumes: each method's layer weights and registry are saved at every checkpoint and reloaded.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from simple_parsing.helpers import field

from saeforge.editing.edit import EDIT_METHODS, EditSettings, Editor, check_method
from saeforge.editing.facts import (EncodedFact, Fact, KnownFact, builtin_facts, encode_answer, read_facts,
                                    read_known_facts)
from saeforge.editing.registry import EditRegistry
from saeforge.editing.scoring import FactBatch, TextBatch
from saeforge.errors import SaeforgeError
from saeforge.options import flat_dict, flat_options

__all__ = ["BenchConfig", "EditBench", "bench", "run_bench", "text_contexts"]

RESULT_FILE = "bench.json"
METRICS = ("reliability", "generalisation", "locality", "locality_known", "perplexity_drift")


@flat_options
@dataclass(frozen=True)
class BenchConfig:
    """Benchmark SAE-localised knowledge editing against an unmasked edit of the same layer, a plain fine-tune and
    random masks: reliability, generalisation (paraphrases) and locality after T sequential edits, and the drift of
    held-out perplexity."""

    sae: str = field(default="", positional=True)
    """The SAE (a run directory from `saeforge train` or an SAE folder) on layers.L.mlp_hidden; layer L is
    edited."""
    out: str = ""
    """Folder for bench.json, bench.md, bench.png and each method's resumable state."""
    model: str = ""
    """Model; empty: the one the SAE was trained on."""
    facts: str = "builtin"
    """builtin (the built-in counterfactual facts, docs/editing.md) or a .jsonl file of edit requests."""
    locality: str = "builtin"
    """Locality candidates: builtin (the built-in facts that are never edited) or a .jsonl file of
    {"prompt": ..., "answer": ...}; only those the unedited model answers are kept."""
    edits: int = 100
    """Sequential edits per method (the largest T)."""
    checkpoints: tuple[int, ...] = (1, 10, 50, 100)
    """Numbers of edits T after which everything is measured."""
    methods: tuple[str, ...] = EDIT_METHODS
    """Methods to compare: masked, random, unmasked, finetune."""
    edit_settings: EditSettings = field(default_factory=EditSettings)
    """How each edit is localised and optimised (the same for every method)."""
    retain_text: str = "embedded:train"
    """Unrelated text whose neuron activations make the locality term and the latents' baseline."""
    retain_contexts: int = 16
    """Contexts of retain text."""
    neighbours: str = "builtin"
    """Neighbour prompts each edit must leave alone (the built-in relations about subjects never edited nor
    measured, docs/editing.md), or none."""
    heldout_text: str = "embedded:validation"
    """Held-out text whose perplexity drift is measured."""
    heldout_contexts: int = 16
    """Contexts of held-out text."""
    context_length: int = 64
    """Tokens per retain and held-out context, BOS included."""
    device: str = "auto"
    """auto, cpu or cuda."""
    threads: int = 0
    """CPU threads; 0: automatic."""
    progress: bool = True
    """Show a progress bar."""

    def validate(self) -> None:
        if not self.sae:
            raise SaeforgeError("no SAE given", "saeforge edit bench RUN_DIR --out bench/ (an SAE on "
                                "layers.L.mlp_hidden)")
        if not self.out:
            raise SaeforgeError("no output folder given", "pass --out FOLDER")
        if self.edits < 1:
            raise SaeforgeError(f"--edits {self.edits} must be at least 1", "pass --edits 100")
        bad = [t for t in self.checkpoints if not 1 <= t <= self.edits]
        if not self.checkpoints or bad:
            raise SaeforgeError(f"checkpoints {bad or '(none)'} are not between 1 and --edits {self.edits}",
                                f"pass e.g. --checkpoints 1 10 {self.edits}")
        if not self.methods:
            raise SaeforgeError("no methods given", f"pass --methods {' '.join(EDIT_METHODS)}")
        for m in self.methods:
            check_method(m)
        neighbour_prompts_of(self.neighbours)
        if min(self.retain_contexts, self.heldout_contexts) < 1 or self.context_length < 8:
            raise SaeforgeError("--retain-contexts and --heldout-contexts must be positive and --context-length at "
                                "least 8", "pass e.g. --retain-contexts 16 --heldout-contexts 16 --context-length 64")
        self.edit_settings.validate()


def neighbour_prompts_of(spec: str) -> list[str]:
    """``--neighbours``: builtin or none."""
    if spec == "none":
        return []
    if spec == "builtin":
        from saeforge.editing.facts import neighbour_prompts

        return neighbour_prompts()
    raise SaeforgeError(f"--neighbours {spec!r} is neither builtin nor none", "pass --neighbours builtin")


def text_contexts(lm, spec: str, n: int, context_length: int) -> torch.Tensor:
    """The first ``n`` contexts ``[n, context_length]`` (BOS first) of a text."""
    from saeforge.data.text_source import TextSource
    from saeforge.data.token_stream import TokenPolicy, TokenStream

    stream = TokenStream.for_model(TextSource(spec), lm, TokenPolicy(context_length, True, True))
    rows = []
    for row in stream.contexts():
        rows.append(torch.as_tensor(row, dtype=torch.long))
        if len(rows) == n:
            break
    if len(rows) < n:
        raise SaeforgeError(f"{spec} gives only {len(rows)} contexts of {context_length} tokens; {n} were asked for",
                            "pass a longer text or fewer contexts")
    return torch.stack(rows)


def bench_facts(spec: str, edits: int, locality: str = "builtin") -> tuple[list[Fact], list[KnownFact]]:
    """The edit requests and the locality candidates (never one of the edited prompts)."""
    if spec == "builtin":
        requests, candidates = builtin_facts(edits)
    else:
        requests = read_facts(spec)
        if len(requests) < edits:
            raise SaeforgeError(f"{spec} holds {len(requests)} edit requests; --edits is {edits}",
                                f"pass --edits {len(requests)} or add requests")
        requests = requests[:edits]
        candidates = builtin_facts(1)[1]
    if locality != "builtin":
        candidates = read_known_facts(locality)
    edited = {f.prompt for f in requests}
    return requests, [c for c in candidates if c.prompt not in edited]


@dataclass
class EditBench:
    """Everything measured, encoded once: edit targets, paraphrases, locality facts and held-out text, all run
    from the edited layer."""

    facts: list[Fact]
    targets: FactBatch
    originals: FactBatch | None
    paraphrases: FactBatch | None
    paraphrase_owner: torch.Tensor
    locality: FactBatch
    locality_facts: list[KnownFact]
    base_argmax: torch.Tensor
    heldout: TextBatch
    base_perplexity: float
    base: dict[str, Any]

    @classmethod
    def build(cls, lm, encoder, facts: Sequence[Fact], candidates: Sequence[KnownFact], heldout: torch.Tensor,
              block: int) -> "EditBench":
        enc_targets = [encode_answer(lm, encoder, f.prompt, f.target) for f in facts]
        para: list[EncodedFact] = []
        owner: list[int] = []
        for i, f in enumerate(facts):
            for p in f.paraphrases:
                para.append(encode_answer(lm, encoder, p, f.target))
                owner.append(i)
        originals = [encode_answer(lm, encoder, f.prompt, f.original, what="original answer")
                     for f in facts if f.original]
        cand = [encode_answer(lm, encoder, c.prompt, c.answer, what="answer") for c in candidates]
        targets = FactBatch.build(lm, enc_targets, block=block)
        cand_batch = FactBatch.build(lm, cand, block=block)
        known = cand_batch.score(lm)["exact"].tolist()
        kept = [c for c, k in zip(cand, known) if k]
        if not kept:
            raise SaeforgeError("the model answers none of the locality facts, so locality cannot be measured",
                                "use a model that knows some of the built-in facts (docs/editing.md)")
        locality = FactBatch.build(lm, kept, block=block)
        original_batch = FactBatch.build(lm, originals, block=block) if originals else None
        para_batch = FactBatch.build(lm, para, block=block) if para else None
        heldout_batch = TextBatch.build(lm, heldout, block=block)
        target_score = targets.score(lm)
        base = {"edit_requests": len(facts), "paraphrases": len(para),
                "locality_candidates": len(candidates), "locality_facts": len(kept),
                "locality_known_by_relation": _by_relation([c for c, k in zip(candidates, known) if k], candidates),
                "targets_already_predicted": float(target_score["exact"].float().mean()),
                "originals_known": (float(original_batch.score(lm)["exact"].float().mean())
                                    if original_batch else None)}
        return cls(list(facts), targets, original_batch, para_batch, torch.tensor(owner, dtype=torch.long), locality,
                   [c for c, k in zip(candidates, known) if k], locality.score(lm)["argmax"], heldout_batch,
                   heldout_batch.perplexity(lm), base)

    def measure(self, lm, t: int) -> dict[str, float]:
        """The metrics after the first ``t`` edits."""
        rel = self.targets.score(lm)
        out = {"reliability": float(rel["exact"][:t].float().mean()),
               "reliability_tokens": float(rel["accuracy"][:t].mean())}
        if self.paraphrases is not None and bool((self.paraphrase_owner < t).any()):
            gen = self.paraphrases.score(lm)
            mine = self.paraphrase_owner < t
            out["generalisation"] = float(gen["exact"][mine].float().mean())
            out["generalisation_tokens"] = float(gen["accuracy"][mine].mean())
        loc = self.locality.score(lm)
        out["locality"] = float((loc["argmax"] == self.base_argmax).float().mean())
        out["locality_known"] = float(loc["exact"].float().mean())
        out["perplexity"] = self.heldout.perplexity(lm)
        out["perplexity_drift"] = out["perplexity"] / self.base_perplexity - 1.0
        return out


def _by_relation(kept: Sequence[KnownFact], all_: Sequence[KnownFact]) -> dict[str, str]:
    out = {}
    for rel in dict.fromkeys(c.relation for c in all_):
        out[rel] = f"{sum(c.relation == rel for c in kept)}/{sum(c.relation == rel for c in all_)}"
    return out


def _state_files(out: Path, method: str) -> tuple[Path, Path]:
    folder = out / method
    return folder, folder / "layer.safetensors"


def bench(cfg: BenchConfig) -> dict[str, Any]:
    """Run (or resume) the benchmark; returns the content of ``bench.json``."""
    import json

    from safetensors.torch import load_file
    from tqdm.auto import tqdm

    from saeforge.data.prompts import PromptEncoder
    from saeforge.editing.api import load_edit_sae
    from saeforge.utils.atomic import atomic_save_safetensors, atomic_write_json
    from saeforge.utils.locking import exclusive_lock
    from saeforge.utils.threads import thread_policy

    cfg.validate()
    out = Path(cfg.out)
    with exclusive_lock(out, "saeforge edit bench"), thread_policy(cfg.threads):
        lm, bound = load_edit_sae(cfg.sae, model=cfg.model, device=cfg.device)
        site = bound.read_site
        encoder = PromptEncoder(lm)
        facts, candidates = bench_facts(cfg.facts, cfg.edits, cfg.locality)
        encoded = [encode_answer(lm, encoder, f.prompt, f.target) for f in facts]  # every target checked first
        checkpoints = sorted(set(cfg.checkpoints))
        result_path = out / RESULT_FILE
        result: dict[str, Any] = {}
        if result_path.is_file():
            result = json.loads(result_path.read_text())
            if result.get("config") != flat_dict(cfg):
                raise SaeforgeError(f"{out} holds a benchmark with other settings",
                                    f"resume with the same options, or pass another --out")
        for method in cfg.methods:  # a foreign or damaged registry to resume is refused before any slow work
            folder, _ = _state_files(out, method)
            if EditRegistry.exists(folder):
                EditRegistry.load(folder, lm)
        t0 = time.time()
        retain = text_contexts(lm, cfg.retain_text, cfg.retain_contexts, cfg.context_length)
        heldout = text_contexts(lm, cfg.heldout_text, cfg.heldout_contexts, cfg.context_length)
        measured = EditBench.build(lm, encoder, facts, candidates, heldout, block=site.layer)
        result.setdefault("config", flat_dict(cfg))
        result.update(model=lm.name, model_fingerprint=lm.fingerprint(), site=site.name, sae=str(bound.folder),
                      base=measured.base | {"perplexity": measured.base_perplexity},
                      setup_seconds=round(time.time() - t0, 1))
        result.setdefault("methods", {})
        module = None
        base_weight = None
        for method in cfg.methods:
            rows = result["methods"].setdefault(method, {"checkpoints": []})
            if rows.get("done"):
                continue
            folder, layer_file = _state_files(out, method)
            registry = None
            done = 0
            editor = Editor(lm, bound.sae, site, retain, cfg.edit_settings, method=method, encoder=encoder,
                            neighbours=neighbour_prompts_of(cfg.neighbours), sae_name=str(bound.folder))
            module = editor.module
            if base_weight is None:
                base_weight = module.weight.detach().clone()
            with torch.no_grad():
                module.weight.copy_(base_weight)
            if EditRegistry.exists(folder) and layer_file.is_file():
                registry = EditRegistry.load(folder, lm)
                done = len(registry.records)
                with torch.no_grad():
                    module.weight.copy_(load_file(str(layer_file))["weight"])
                editor.registry = registry
                rows["checkpoints"] = [r for r in rows["checkpoints"] if r["edits"] <= done]
            elapsed = rows.get("seconds", 0.0)
            bar = tqdm(total=cfg.edits, initial=done, desc=method, unit="edit", disable=not cfg.progress,
                       dynamic_ncols=True)
            for t in range(done + 1, cfg.edits + 1):
                start = time.time()
                record = editor.edit(encoded[t - 1], prompt=facts[t - 1].prompt, target=facts[t - 1].target)
                elapsed += time.time() - start
                bar.update(1)
                bar.set_postfix(nll=f"{record.nll_after:.2f}", steps=record.steps)
                if t in checkpoints or t == cfg.edits:
                    row = {"edits": t, **measured.measure(lm, t), **editor.registry.overlap(),
                           "mean_steps": sum(r.steps for r in editor.registry.records) / t,
                           "seconds_per_edit": elapsed / t,
                           "sae_localised": sum(r.source == "sae" for r in editor.registry.records) / t}
                    rows["checkpoints"].append(row)
                    rows["seconds"] = elapsed
                    rows["done"] = t == cfg.edits
                    atomic_save_safetensors(layer_file, {"weight": module.weight.detach()})
                    editor.registry.save(folder)
                    atomic_write_json(result_path, result)
            bar.close()
        if module is not None and base_weight is not None:
            with torch.no_grad():
                module.weight.copy_(base_weight)
        atomic_write_json(result_path, result)
        from saeforge.utils.atomic import atomic_write_text

        atomic_write_text(out / "bench.md", bench_table(result))
        plot_bench(result, out / "bench.png")
    return result


def bench_table(result: dict[str, Any]) -> str:
    """The benchmark as a Markdown table: one row per method and T."""
    lines = ["| method | T | reliability | generalisation | locality | still known | ppl drift | mask | shared "
             "neurons | mean Jaccard | steps | s/edit |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for method, rows in result["methods"].items():
        for r in rows["checkpoints"]:
            gen = f"{r['generalisation']:.2f}" if "generalisation" in r else "–"
            lines.append(f"| {method} | {r['edits']} | {r['reliability']:.2f} | {gen} | {r['locality']:.3f} | "
                         f"{r['locality_known']:.2f} | {r['perplexity_drift']:+.2%} | {r['mean_mask']:.0f} | "
                         f"{r['shared_neurons']} | {r['mean_jaccard']:.3f} | {r['mean_steps']:.1f} | "
                         f"{r['seconds_per_edit']:.1f} |")
    return "\n".join(lines) + "\n"


def plot_bench(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from saeforge.utils.atomic import atomic_write

    names = ("reliability", "generalisation", "locality", "perplexity_drift")
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.2))
    for ax, name in zip(axes, names):
        for method, rows in result["methods"].items():
            pts = [(r["edits"], r[name]) for r in rows["checkpoints"] if name in r]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=method)
        ax.set_xscale("log")
        ax.set_xlabel("edits T")
        ax.set_title(name.replace("_", " "))
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110))
    plt.close(fig)


def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    result = bench(cfg)
    b = result["base"]
    print(f"{result['model']} at {result['site']}: {b['edit_requests']} edit requests, {b['locality_facts']} "
          f"locality facts known of {b['locality_candidates']}, held-out perplexity {b['perplexity']:.2f}")
    print(bench_table(result), end="")
    print(f"written {Path(cfg.out) / RESULT_FILE}, bench.md, bench.png")
    return result
