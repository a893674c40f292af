"""``saeforge finetune``: a brief, reproducible fine-tune of a copy of a model on one text, as the second model of a
model diff (:mod:`saeforge.diffing`).

The default fine-tunes the embedded SmolLM2-135M-Instruct on one play of the embedded corpus (A Midsummer Night's
Dream, ~25k tokens): packed contexts of ``context_length`` tokens (BOS first, as everywhere in saeforge), the last
``held_out_fraction`` of them held out, AdamW on every weight with a linear warm-up and a linear decay to zero,
gradient clipping at 1, full float32. Everything that decides a step is a function of ``seed`` and the step, so
the same command gives the same weights; a killed run resumes from its last checkpoint (``<out>.checkpoint.pt``,
removed at the end) to the same weights.

The output is an ordinary Hugging Face folder (``config.json``, ``model.safetensors``, the tokenizer) that every
saeforge command loads with ``--model <out>``, plus ``finetune.json``: the settings, the time taken and the
next-token loss before and after on the held-out contexts of the play and on other text (the embedded validation
plays by default), so what the fine-tune changed (and that it changed little elsewhere) is on record.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saeforge.errors import SaeforgeError
from saeforge.utils.atomic import atomic_directory, atomic_write, remove_stale_temporaries
from saeforge.utils.locking import exclusive_lock
from saeforge.utils.threads import thread_policy

__all__ = ["FinetuneConfig", "finetune", "run_finetune"]

RESULT_FILE = "finetune.json"
CHECKPOINT_FORMAT = "saeforge-finetune-checkpoint"


@dataclass(frozen=True)
class FinetuneConfig:
    """Fine-tune a copy of a model briefly on one text (by default one play of the embedded corpus), for model
    diffing (`saeforge diff`)."""

    out: str = ""
    """Folder to write the fine-tuned model to (a Hugging Face folder: --model OUT loads it)."""
    model: str = "embedded"
    """Model to start from: `embedded`, a hub id, a local Hugging Face folder or a .gguf file."""
    play: str = "midsummer_nights_dream"
    """A work of the embedded corpus to fine-tune on (file name without _gut.txt); ignored when --text is given."""
    text: str = ""
    """Fine-tune on this text instead: a .txt file, a folder of .txt files, a .jsonl file or hf:NAME."""
    reference_text: str = "embedded:validation"
    """Other text whose loss is reported before and after (what the fine-tune should leave mostly alone)."""
    steps: int = 120
    """Optimiser steps."""
    batch_size: int = 8
    """Contexts per step."""
    context_length: int = 64
    """Tokens per context, BOS included."""
    lr: float = 2e-4
    """Peak AdamW learning rate."""
    warmup_steps: int = 10
    """Linear warm-up steps; the rate then decays linearly to 0 at the last step."""
    held_out_fraction: float = 0.1
    """Fraction of the text's contexts (its end) held out to measure the loss."""
    eval_contexts: int = 64
    """Contexts of held-out and of reference text scored before and after."""
    seed: int = 0
    """Seed of the context order; the same seed gives the same weights."""
    checkpoint_every: int = 50
    """Write a resumable checkpoint every this many steps."""
    threads: int = 0
    """CPU threads; 0: automatic."""
    progress: bool = True
    """Show a progress bar."""

    def validate(self) -> None:
        def need(ok: bool, problem: str, fix: str) -> None:
            if not ok:
                raise SaeforgeError(problem, fix)

        need(bool(self.out), "no output folder given", "pass --out FOLDER (e.g. --out finetuned/)")
        need(self.steps > 0 and self.batch_size > 0, "--steps and --batch-size must be positive",
             "pass e.g. --steps 120 --batch-size 8")
        need(self.context_length >= 8, f"--context-length {self.context_length} is too short",
             "pass --context-length 64")
        need(math.isfinite(self.lr) and self.lr > 0, f"--lr must be positive, got {self.lr}", "pass --lr 2e-4")
        need(0 < self.held_out_fraction < 0.5, f"--held-out-fraction must lie in (0, 0.5), got "
             f"{self.held_out_fraction}", "pass --held-out-fraction 0.1")
        need(self.checkpoint_every > 0, "--checkpoint-every must be positive", "pass --checkpoint-every 50")
        need(self.eval_contexts > 0, "--eval-contexts must be positive", "pass --eval-contexts 64")

    def text_spec(self) -> str:
        if self.text:
            return self.text
        from saeforge.data.corpus import corpus_dir, corpus_files, work_name

        works = [work_name(p) for p in corpus_files("all")]
        if self.play not in works:
            raise SaeforgeError(f"{self.play!r} is not a work of the embedded corpus",
                                f"pass --play with one of: {', '.join(works)} (or --text FILE)")
        return str(corpus_dir() / f"{self.play}_gut.txt")


def _contexts(spec: str, lm, context_length: int) -> np.ndarray:
    from saeforge.data.text_source import TextSource
    from saeforge.data.token_stream import TokenPolicy, TokenStream

    stream = TokenStream.for_model(TextSource(spec), lm, TokenPolicy(context_length, True, True))
    rows = list(stream.contexts())
    if not rows:
        raise SaeforgeError(f"{spec} is shorter than one context of {context_length} tokens",
                            "pass a longer --text or a smaller --context-length")
    return np.stack(rows)


@torch.no_grad()
def _mean_loss(model, contexts: np.ndarray, batch_size: int) -> float:
    """Mean next-token cross-entropy over every position after BOS."""
    total, count = 0.0, 0
    model.eval()
    for s in range(0, len(contexts), batch_size):
        ids = torch.from_numpy(contexts[s:s + batch_size]).to(model.device)
        logits = model(input_ids=ids).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                reduction="sum")
        total += float(nll)
        count += ids[:, 1:].numel()
    return total / max(count, 1)


def _order(n_train: int, seed: int, epoch: int) -> list[int]:
    rng = random.Random(f"{seed}:{epoch}")
    order = list(range(n_train))
    rng.shuffle(order)
    return order


def _batch_indices(step: int, batch_size: int, n_train: int, seed: int) -> list[int]:
    """Contexts of step ``step``: consecutive slices of a seeded permutation per epoch (a pure function of the
    step, so a resumed run draws the same batches)."""
    out = []
    start = step * batch_size
    for i in range(start, start + batch_size):
        epoch, j = divmod(i, n_train)
        out.append(_order(n_train, seed, epoch)[j])
    return out


def _lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def _checkpoint_path(out: Path) -> Path:
    return out.parent / f"{out.name}.checkpoint.pt"


def finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """Run the fine-tune (or resume it) and return the content of ``finetune.json``."""
    from tqdm.auto import tqdm

    from saeforge.models.language_model import LanguageModel

    cfg.validate()
    out = Path(cfg.out)
    if (out / RESULT_FILE).is_file():
        return json.loads((out / RESULT_FILE).read_text())
    if out.exists() and any(p for p in out.iterdir()):
        raise SaeforgeError(f"--out {out} exists and is not a finished fine-tune", "pass a new or empty folder")
    spec = cfg.text_spec()
    ckpt_path = _checkpoint_path(out)
    with exclusive_lock(out.parent / f".{out.name}.finetune-lock", "saeforge finetune"), \
            thread_policy(cfg.threads):
        remove_stale_temporaries(out.parent)
        lm = LanguageModel.load(cfg.model, device="cpu")
        contexts = _contexts(spec, lm, cfg.context_length)
        n_held = max(1, int(round(len(contexts) * cfg.held_out_fraction)))
        if len(contexts) - n_held < cfg.batch_size:
            raise SaeforgeError(f"{spec} gives only {len(contexts)} contexts of {cfg.context_length} tokens",
                                "pass a longer text, a smaller --batch-size or a shorter --context-length")
        train_ctx, held_ctx = contexts[:-n_held], contexts[-n_held:][:cfg.eval_contexts]
        reference = _contexts(cfg.reference_text, lm, cfg.context_length)[:cfg.eval_contexts]
        model = lm.model
        model.train()
        for p in model.parameters():
            p.requires_grad_(True)
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer,
                                                      lambda s: _lr_factor(s, cfg.steps, cfg.warmup_steps))
        step, before, losses = 0, None, []
        if ckpt_path.is_file():
            state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
            if state.get("format") != CHECKPOINT_FORMAT or state.get("config") != asdict(cfg):
                raise SaeforgeError(f"{ckpt_path} belongs to a fine-tune with other settings",
                                    f"resume with the same options, or delete {ckpt_path} to start again")
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            step, before, losses = state["step"], state["before"], state["losses"]
        if before is None:
            before = {"held_out": _mean_loss(model, held_ctx, cfg.batch_size),
                      "reference": _mean_loss(model, reference, cfg.batch_size)}
        t0 = time.time()
        bar = tqdm(total=cfg.steps, initial=step, unit="step", desc="fine-tuning", disable=not cfg.progress,
                   dynamic_ncols=True)
        model.train()
        while step < cfg.steps:
            idx = _batch_indices(step, cfg.batch_size, len(train_ctx), cfg.seed)
            ids = torch.from_numpy(train_ctx[idx])
            loss = model(input_ids=ids, labels=ids).loss
            if not torch.isfinite(loss):
                raise SaeforgeError(f"the fine-tuning loss became {float(loss)} at step {step}", "lower --lr")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if step % cfg.checkpoint_every == 0 and step < cfg.steps:
                state = {"format": CHECKPOINT_FORMAT, "config": asdict(cfg), "step": step, "before": before,
                         "losses": losses, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict()}
                atomic_write(ckpt_path, lambda p: torch.save(state, p))
                model.train()
        bar.close()
        model.eval()
        after = {"held_out": _mean_loss(model, held_ctx, cfg.batch_size),
                 "reference": _mean_loss(model, reference, cfg.batch_size)}
        report = {"format": "saeforge-finetune", "base_model": cfg.model, "text": spec,
                  "config": asdict(cfg), "contexts": {"train": len(train_ctx), "held_out": len(held_ctx),
                                                      "reference": len(reference)},
                  "tokens_seen": cfg.steps * cfg.batch_size * cfg.context_length,
                  "loss_before": before, "loss_after": after, "train_loss_first": losses[:5],
                  "train_loss_last": losses[-5:], "seconds_this_session": round(time.time() - t0, 1),
                  "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        for p in model.parameters():
            p.requires_grad_(False)
        with atomic_directory(out if not out.exists() else out.parent / f"{out.name}.new") as tmp:
            model.save_pretrained(tmp)
            lm.tokenizer.save_pretrained(tmp)
            (tmp / RESULT_FILE).write_text(json.dumps(report, indent=2) + "\n")
        if (out.parent / f"{out.name}.new").exists():  # an empty --out folder existed: put the result in it
            out.rmdir()
            (out.parent / f"{out.name}.new").rename(out)
        ckpt_path.unlink(missing_ok=True)
    return report


def run_finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    report = finetune(cfg)
    b, a = report["loss_before"], report["loss_after"]
    print(f"fine-tuned {report['base_model']} on {report['text']} ({report['tokens_seen']:,} tokens seen)")
    print(f"  held-out loss of that text: {b['held_out']:.3f} -> {a['held_out']:.3f}")
    print(f"  loss on {cfg.reference_text}: {b['reference']:.3f} -> {a['reference']:.3f}")
    print(f"written {cfg.out} (load it with --model {cfg.out})")
    return report
