"""``saeforge personalize train``: fit DEP's sparse autoencoder and alignment MLPs (:mod:`saeforge.personalization.model`)
on a user file, the language model frozen.

Each training example is one query of a user (``split`` train): the sequence ``BOS, the user's soft tokens, the
prompt, the target, EOS`` goes through the frozen model, and the loss is the paper's (arXiv 2507.20849)::

    CE(target | soft tokens, prompt) + sae_weight · (smooth-L1(x̂, x) + kl_weight · KL(ρ ‖ ρ̂))

with AdamW (weight decay 0.025 as in the paper), a linear warm-up and a linear decay to zero. The paper interleaves
each soft token with the text of its history item in the prompt; here they are prepended alone, so everything the
model learns of a user comes through the embeddings.

The run folder holds ``personalize.json`` (the settings, the model's fingerprint), ``user_inputs.pt`` (every user's
embeddings, computed once), ``checkpoint.pt`` while training (atomic, every ``checkpoint_every`` steps; the batches
are a function of the seed and the step, so a killed run resumes to the same weights), then ``adapter.safetensors``
and ``train.json``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from saeforge.errors import SaeforgeError
from saeforge.personalization.model import DEPAdapter, UserInputs, stack_rows, user_inputs
from saeforge.personalization.users import User, read_users
from saeforge.utils.atomic import atomic_save_safetensors, atomic_write, atomic_write_json, remove_stale_temporaries
from saeforge.utils.locking import exclusive_lock
from saeforge.utils.threads import thread_policy

__all__ = ["PersonalizeTrainConfig", "TrainedPersonalizer", "load_personalizer", "run_personalize_train",
           "train_personalizer"]

SETTINGS_FILE = "personalize.json"
INPUTS_FILE = "user_inputs.pt"
CHECKPOINT_FILE = "checkpoint.pt"
ADAPTER_FILE = "adapter.safetensors"
RESULT_FILE = "train.json"
CHECKPOINT_FORMAT = "saeforge-dep-checkpoint"


@dataclass(frozen=True)
class PersonalizeTrainConfig:
    """Train DEP's sparse autoencoder and alignment MLPs on a user file (the language model stays frozen)."""

    users: str = ""
    """User file (JSON lines: user_id, history, queries); `saeforge personalize users` writes synthetic ones."""
    out: str = ""
    """Run folder to write (re-running the same command resumes it)."""
    model: str = "embedded"
    """The frozen model: `embedded` (SmolLM2-135M-Instruct), a hub id, a local Hugging Face folder or a .gguf file."""
    slots: int = 8
    """History items per user (the most recent with a peer), each giving a history and a difference soft token."""
    embed_layer: int = -1
    """Hidden state the texts are embedded with: -1 the final (normalised) one, L the output of block L."""
    d_sae: int = 256
    """Width of the sparse autoencoder over the embeddings."""
    sparsity_target: float = 0.05
    """ρ of the KL sparsity prior on the mean code of a user's slots."""
    sae_weight: float = 100.0
    """Weight of the autoencoder's loss (reconstruction + KL) next to the LM's cross-entropy."""
    kl_weight: float = 1e-3
    """Weight of the KL prior inside the autoencoder's loss."""
    steps: int = 150
    """Optimiser steps."""
    batch_size: int = 4
    """Queries per step."""
    lr: float = 1e-2
    """Peak AdamW learning rate."""
    weight_decay: float = 0.025
    """AdamW weight decay."""
    warmup_steps: int = 10
    """Linear warm-up steps; the rate then decays linearly to 0 at the last step."""
    max_prompt_tokens: int = 96
    """Prompts longer than this are cut (their start kept)."""
    max_target_tokens: int = 48
    """Targets longer than this are cut."""
    seed: int = 0
    """Seed of the initial weights and of the order of the queries."""
    checkpoint_every: int = 25
    """Write a resumable checkpoint every this many steps."""
    device: str = "auto"
    """auto, cpu or cuda (auto: cuda when available)."""
    threads: int = 0
    """CPU threads; 0: automatic."""
    progress: bool = True
    """Show progress bars."""

    def validate(self) -> None:
        def need(ok: bool, problem: str, fix: str) -> None:
            if not ok:
                raise SaeforgeError(problem, fix)

        need(bool(self.users), "no user file given", "pass --users users.jsonl (`saeforge personalize users "
             "--out users.jsonl` writes synthetic users)")
        need(bool(self.out), "no run folder given", "pass --out FOLDER (e.g. --out dep_run)")
        for name in ("slots", "d_sae", "steps", "batch_size", "checkpoint_every", "max_prompt_tokens",
                     "max_target_tokens"):
            need(getattr(self, name) > 0, f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}",
                 f"pass --{name.replace('_', '-')} {getattr(PersonalizeTrainConfig, name)}")
        need(0 < self.sparsity_target < 1, f"--sparsity-target must lie in (0, 1), got {self.sparsity_target}",
             "pass --sparsity-target 0.05")
        need(math.isfinite(self.lr) and self.lr > 0, f"--lr must be positive, got {self.lr}", "pass --lr 1e-2")
        need(self.sae_weight >= 0 and self.kl_weight >= 0 and self.weight_decay >= 0,
             "--sae-weight, --kl-weight and --weight-decay must not be negative", "pass e.g. --sae-weight 100")


# ------------------------------------------------------------------------------------------------------ batches
@dataclass
class Example:
    user: int
    """Index in the user inputs."""
    prompt_ids: list[int]
    target_ids: list[int]


def tokenize_examples(lm, users: Sequence[User], inputs: UserInputs, split: str, max_prompt: int,
                      max_target: int) -> list[Example]:
    """The queries of ``split`` as token ids: prompt (cut to ``max_prompt``), target with a leading space and EOS."""
    tok = lm.tokenizer
    eos = tok.eos_token_id
    out = []
    for u in users:
        for q in u.queries:
            if q.split != split:
                continue
            target = tok(" " + q.target.strip(), add_special_tokens=False)["input_ids"][:max_target]
            out.append(Example(inputs.index(u.user_id), tok(q.prompt, add_special_tokens=False)["input_ids"]
                               [:max_prompt], target + ([eos] if eos is not None else [])))
    return out


def dep_rows(lm, adapter: DEPAdapter, inputs: UserInputs, user_rows: Sequence[int],
             prompt_ids: Sequence[Sequence[int]]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per example the input embeddings ``BOS, soft tokens (the used slots), prompt`` and the autoencoder loss
    terms of the batch's users."""
    dev = lm.device
    idx = torch.tensor(list(user_rows))
    x = inputs.x[idx].to(dev)
    used = inputs.slots[idx].to(dev)
    soft, z, x_hat = adapter(x)
    embed = lm.model.get_input_embeddings()
    bos = lm.bos_token_id()
    k = adapter.slots
    rows = []
    for i, ids in enumerate(prompt_ids):
        n = int(used[i])
        head = [embed(torch.tensor([bos], device=dev))] if bos is not None else []
        rows.append(torch.cat(head + [soft[i, :n].to(lm.dtype), soft[i, k:k + n].to(lm.dtype),
                                      embed(torch.tensor(list(ids), device=dev, dtype=torch.long))]))
    return rows, (x, z, x_hat, adapter.slot_mask(used))


def batch_loss(lm, adapter: DEPAdapter, inputs: UserInputs, batch: Sequence[Example],
               cfg: PersonalizeTrainConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """The DEP loss of a batch: target cross-entropy through the frozen model plus the weighted autoencoder loss."""
    dev = lm.device
    rows, (x, z, x_hat, slot_mask) = dep_rows(lm, adapter, inputs, [e.user for e in batch],
                                              [e.prompt_ids for e in batch])
    embed = lm.model.get_input_embeddings()
    full, label_pos, labels = [], [], []
    for b, (row, e) in enumerate(zip(rows, batch)):
        target = torch.tensor(e.target_ids, device=dev, dtype=torch.long)
        # the target's last token is only predicted, never read
        full.append(torch.cat([row, embed(target[:-1])]))
        start = row.shape[0] - 1
        label_pos += [(b, start + t) for t in range(len(e.target_ids))]
        labels.append(target)
    embeds, mask = stack_rows(full, left=False)
    hidden = lm.model.base_model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    pos = torch.tensor(label_pos, device=dev)
    logits = lm.model.get_output_embeddings()(hidden[pos[:, 0], pos[:, 1]]).float()
    cap = getattr(lm.model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    ce = F.cross_entropy(logits, torch.cat(labels))
    recon, kl = adapter.sae.losses(x, z, x_hat, slot_mask, cfg.sparsity_target)
    loss = ce + cfg.sae_weight * (recon + cfg.kl_weight * kl)
    return loss, {"loss": float(loss.detach()), "ce": float(ce.detach()), "recon": float(recon.detach()),
                  "kl": float(kl.detach())}


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> list[int]:
    """Examples of step ``step``: consecutive slices of a seeded permutation per epoch (a function of the step)."""
    out = []
    for i in range(step * batch_size, (step + 1) * batch_size):
        epoch, j = divmod(i, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        out.append(int(order[j]))
    return out


# ---------------------------------------------------------------------------------------------------- the run
def _settings(cfg: PersonalizeTrainConfig, lm, users_path: Path) -> dict[str, Any]:
    return {"format": "saeforge-dep", "config": asdict(cfg) | {"users": str(users_path)},
            "model_fingerprint": lm.fingerprint(), "d_embed": lm.d_model, "d_model": lm.d_model}


def _compared(settings: dict[str, Any]) -> dict[str, Any]:
    """What must match for a run to resume: everything but how it runs."""
    config = {k: v for k, v in settings["config"].items() if k not in ("device", "threads", "progress")}
    return {**settings, "config": config}


def _load_inputs(folder: Path, lm, users: Sequence[User], cfg: PersonalizeTrainConfig) -> UserInputs:
    path = folder / INPUTS_FILE
    if path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=False)
        if saved["user_ids"] == [u.user_id for u in users]:
            return UserInputs(saved["user_ids"], saved["x"], saved["slots"], saved["history_index"])
    inputs = user_inputs(lm, users, slots=cfg.slots, layer=cfg.embed_layer, progress=cfg.progress)
    atomic_write(path, lambda p: torch.save(
        {"user_ids": inputs.user_ids, "x": inputs.x, "slots": inputs.slots, "history_index": inputs.history_index},
        p))
    return inputs


def new_adapter(cfg: PersonalizeTrainConfig, d_embed: int, d_model: int) -> DEPAdapter:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return DEPAdapter(d_embed, cfg.d_sae, d_model, cfg.slots)


def train_personalizer(cfg: PersonalizeTrainConfig, *, lm=None) -> dict[str, Any]:
    """Train (or resume, or return the finished run's ``train.json``) and return the training report."""
    from tqdm.auto import tqdm

    from saeforge.models.language_model import LanguageModel
    from saeforge.training.schedules import lr_factor

    cfg.validate()
    folder = Path(cfg.out)
    users_path = Path(cfg.users).resolve()
    users = read_users(users_path)  # every field checked before the model loads
    if not any(q.split == "train" for u in users for q in u.queries):
        raise SaeforgeError(f"{users_path} has no training query", "give users queries with \"split\": \"train\" "
                            "(or no split)")
    if (folder / RESULT_FILE).is_file():
        return json.loads((folder / RESULT_FILE).read_text())
    with exclusive_lock(folder, "saeforge personalize train"), thread_policy(cfg.threads):
        remove_stale_temporaries(folder)
        if lm is None:
            lm = LanguageModel.load(cfg.model, device=cfg.device)
        lm.model.eval()
        for p in lm.model.parameters():
            p.requires_grad_(False)
        settings = _settings(cfg, lm, users_path)
        if (folder / SETTINGS_FILE).is_file():
            before = json.loads((folder / SETTINGS_FILE).read_text())
            if _compared(before) != _compared(settings):
                diff = sorted(k for k in set(before["config"]) | set(settings["config"])
                              if before["config"].get(k) != settings["config"].get(k)
                              and k not in ("device", "threads", "progress"))
                raise SaeforgeError(f"{folder} holds a run with other settings ({', '.join(diff) or 'the model'})",
                                    "re-run with the same options to resume, or pass another --out")
        else:
            atomic_write_json(folder / SETTINGS_FILE, settings)
        inputs = _load_inputs(folder, lm, users, cfg)
        examples = tokenize_examples(lm, users, inputs, "train", cfg.max_prompt_tokens, cfg.max_target_tokens)
        adapter = new_adapter(cfg, inputs.x.shape[-1], lm.d_model).to(lm.device)
        optimizer = torch.optim.AdamW(adapter.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, cfg.steps, cfg.warmup_steps, "linear", 1.0))
        step, history = 0, []
        ckpt = folder / CHECKPOINT_FILE
        if ckpt.is_file():
            state = torch.load(ckpt, map_location=lm.device, weights_only=False)
            if state.get("format") != CHECKPOINT_FORMAT:
                raise SaeforgeError(f"{ckpt} is not a DEP checkpoint", f"delete {ckpt} to start again")
            adapter.load_state_dict(state["adapter"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            step, history = state["step"], state["history"]
        t0 = time.time()
        bar = tqdm(total=cfg.steps, initial=step, unit="step", desc="training DEP", disable=not cfg.progress,
                   dynamic_ncols=True)
        while step < cfg.steps:
            batch = [examples[i] for i in batch_indices(step, cfg.batch_size, len(examples), cfg.seed)]
            loss, parts = batch_loss(lm, adapter, inputs, batch, cfg)
            if not torch.isfinite(loss):
                raise SaeforgeError(f"the DEP loss became {float(loss)} at step {step}", "lower --lr")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(adapter.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            history.append(parts)
            step += 1
            bar.update(1)
            bar.set_postfix(ce=f"{parts['ce']:.3f}")
            if step % cfg.checkpoint_every == 0 and step < cfg.steps:
                state = {"format": CHECKPOINT_FORMAT, "step": step, "history": history,
                         "adapter": adapter.state_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict()}
                atomic_write(ckpt, lambda p: torch.save(state, p))
        bar.close()
        atomic_save_safetensors(folder / ADAPTER_FILE, adapter.state_dict())
        report = {"format": "saeforge-dep-train", "users": len(users), "train_queries": len(examples),
                  "slots_used_mean": float(inputs.slots.float().mean()), "steps": cfg.steps,
                  "first": history[:5], "last": history[-5:],
                  "seconds_this_session": round(time.time() - t0, 1),
                  "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        atomic_write_json(folder / RESULT_FILE, report)
        ckpt.unlink(missing_ok=True)
    return report


# ------------------------------------------------------------------------------------------------ loading a run
@dataclass
class TrainedPersonalizer:
    """A finished run: the frozen model, the trained adapter and the run's settings."""

    lm: Any
    adapter: DEPAdapter
    cfg: PersonalizeTrainConfig
    folder: Path

    def inputs(self, users: Sequence[User]) -> UserInputs:
        """The users' DEP inputs (those of the training users read from the run, others computed)."""
        saved = torch.load(self.folder / INPUTS_FILE, map_location="cpu", weights_only=False)
        if saved["user_ids"] == [u.user_id for u in users]:
            return UserInputs(saved["user_ids"], saved["x"], saved["slots"], saved["history_index"])
        return user_inputs(self.lm, users, slots=self.cfg.slots, layer=self.cfg.embed_layer,
                           progress=self.cfg.progress)


def load_personalizer(folder: str | Path, *, device: str = "auto", lm=None) -> TrainedPersonalizer:
    """Load a finished ``saeforge personalize train`` run."""
    from safetensors.torch import load_file

    from saeforge.models.language_model import LanguageModel

    folder = Path(folder)
    if not (folder / ADAPTER_FILE).is_file() or not (folder / SETTINGS_FILE).is_file():
        raise SaeforgeError(f"{folder} is not a finished DEP run (no {ADAPTER_FILE})",
                            f"train one first: saeforge personalize train --users users.jsonl --out {folder}")
    settings = json.loads((folder / SETTINGS_FILE).read_text())
    cfg = PersonalizeTrainConfig(**settings["config"])
    if lm is None:
        lm = LanguageModel.load(cfg.model, device=device)
    if lm.fingerprint() != settings["model_fingerprint"]:
        raise SaeforgeError(f"the model given is not the one {folder} was trained with ({cfg.model})",
                            f"load {cfg.model}")
    lm.model.eval()
    for p in lm.model.parameters():
        p.requires_grad_(False)
    adapter = DEPAdapter(settings["d_embed"], cfg.d_sae, settings["d_model"], cfg.slots)
    adapter.load_state_dict(load_file(str(folder / ADAPTER_FILE)))
    return TrainedPersonalizer(lm, adapter.to(lm.device).eval(), cfg, folder)


def run_personalize_train(cfg: PersonalizeTrainConfig) -> dict[str, Any]:
    report = train_personalizer(cfg)
    first, last = report["first"][0], report["last"][-1]
    print(f"trained DEP on {report['train_queries']} queries of {report['users']} users ({report['steps']} steps)")
    print(f"  target cross-entropy {first['ce']:.3f} -> {last['ce']:.3f}; autoencoder reconstruction "
          f"{first['recon']:.4f} -> {last['recon']:.4f}")
    print(f"written {cfg.out}; score it with `saeforge personalize eval {cfg.out}`")
    return report
