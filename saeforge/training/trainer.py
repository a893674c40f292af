"""The training loop: one or many SAEs fed from one ActivationStream, checkpointed atomically, resumed exactly.

A run directory holds ``run.json`` (the full config, versions, a run id), ``checkpoints/checkpoint.pt`` (weights,
optimiser and scheduler state, dead-latent counters, RNG states, the stream position and the length of
``metrics.jsonl`` at that step), ``metrics.jsonl`` and, at the end, ``saes/<name>/`` (SAELens-compatible files with
the input normalisation folded in). A run killed at any moment resumes from its last checkpoint and ends with
weights bit-identical to an uninterrupted run: everything that determines a step is a function of the seed, the
step and the checkpointed state.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saeforge.data.activation_stream import ActivationStream, CachedActivations, LiveActivations
from saeforge.errors import SaeforgeError
from saeforge.models.loading import resolve_device
from saeforge.saes import SAE, ActivationScaler, DeadLatentTracker, SAEConfig, TrainState, make_sae, save_sae
from saeforge.saes.registry import get_config_class
from saeforge.training.config import TrainConfig, load_config_file
from saeforge.training.schedules import lr_factor, sparsity_factor
from saeforge.utils.atomic import atomic_write, atomic_write_json, remove_stale_temporaries

RUN_FORMAT = "saeforge-run"
CHECKPOINT_FORMAT = "saeforge-checkpoint"
FORMAT_VERSION = 1
INIT_SAMPLE_TOKENS = 32_768  # vectors used to estimate the input scale and initialise b_dec (OpenAI: 32,768)
TOPK_FAMILY = ("topk", "batchtopk", "matryoshka")
DEFAULT_LR = {"relu": 3e-3, "gated": 3e-3, "jumprelu": 3e-3}  # the papers' rates are for 100x longer runs: docs/defaults.md
DEFAULT_DEAD_AFTER_TOKENS = 10_000_000  # OpenAI's definition of a dead latent


# TopK family: Gao et al.'s 1/sqrt(d_sae) scaling (Fig. 3) with a coefficient 5x their 2e-4, which is far too small
# with saeforge's input scaling (E||x|| = sqrt(d)) at the run lengths people use. On SmolLM2-135M (d_sae 4608, k 32,
# batch 4096, 1M tokens) held-out FVU at layer 6 / layer 15 is 0.143 / 0.092 with 2e-4 and 0.096 / 0.068 with 1e-3;
# larger coefficients leave more latents silent on held-out text (12 % at layer 15 with 1.5e-3). docs/architecture.md
TOPK_LR_COEFFICIENT = 1e-3


def default_lr(architecture: str, d_sae: int) -> float:
    if architecture in TOPK_FAMILY:
        return TOPK_LR_COEFFICIENT / math.sqrt(d_sae / 2**14)
    return DEFAULT_LR.get(architecture, 1e-4)


def build_sae_config(spec: dict[str, Any], d_in: int, d_out: int, dead_after_tokens: int) -> SAEConfig:
    """Turn a per-SAE spec of the training config into the architecture's config."""
    cls = get_config_class(spec["architecture"])
    fields = {f.name for f in dataclasses.fields(cls)}
    kw: dict[str, Any] = {"d_in": d_in, "d_sae": spec["d_sae"] or spec["expansion_factor"] * d_in}
    if spec.get("target_site"):
        # A transcoder's b_dec lives in the output space, even when both sites have the same width.
        kw.update(d_out=d_out, apply_b_dec_to_input=False)
    if "k" in fields:
        kw["k"] = spec["k"]
    if spec["sparsity_coefficient"] >= 0:
        name = next((n for n in ("l1_coefficient", "l0_coefficient", "sparsity_coefficient") if n in fields), None)
        if name is None:
            raise SaeforgeError(f"architecture {spec['architecture']!r} has no sparsity coefficient",
                                "leave --sparsity-coefficient unset for it (TopK-style SAEs fix L0 with k)")
        kw[name] = spec["sparsity_coefficient"]
    if "dead_after_tokens" in fields:
        kw["dead_after_tokens"] = dead_after_tokens
    opts = spec["sae_options"]
    opts = json.loads(opts) if isinstance(opts, str) and opts else (opts or {})
    return SAEConfig.from_dict({"architecture": spec["architecture"], **kw, **opts})


@dataclass
class Trainee:
    """One SAE being trained, with everything that belongs to it alone."""

    name: str
    site: str
    target_site: str | None
    sae: SAE
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    tracker: DeadLatentTracker
    scaler: ActivationScaler
    sums: dict[str, float] = dataclasses.field(default_factory=dict)
    n_logged: int = 0


def _versions() -> dict[str, str]:
    import transformers

    from saeforge import __version__

    return {"saeforge": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Trainer:
    """Build with :func:`train` (or ``Trainer(cfg, run_dir)``); :meth:`fit` runs to the end and returns the final
    metrics per SAE."""

    def __init__(self, cfg: TrainConfig, run_dir: Path):
        cfg.validate()
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.device = resolve_device(cfg.device)
        self.total_steps = cfg.tokens // cfg.batch_size
        self.checkpoint_path = self.run_dir / "checkpoints" / "checkpoint.pt"
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.run_info = json.loads((self.run_dir / "run.json").read_text())
        self.lm = None
        self.source = self._make_source()
        self.stream = ActivationStream(self.source, batch_size=cfg.batch_size, seed=cfg.seed)
        self.step = 0
        self.trainees: list[Trainee] = []

    # ------------------------------------------------------------------------------------------------ set-up
    def _make_source(self):
        cfg = self.cfg
        sites = cfg.needed_sites()
        if cfg.cache:
            from saeforge.data.activation_cache import ActivationCache

            cache = ActivationCache(cfg.cache)
            m = cache.manifest
            self.data_info = {"model_name": m["model"], "model_fingerprint": m["model_fingerprint"],
                              "context_size": m["context_length"], "prepend_bos": m["prepend_bos"],
                              "exclude_special_tokens": m["exclude_special_tokens"], "dataset_path": m["corpus"]}
            return CachedActivations(cache, sites, shards_per_fill=cfg.shards_per_fill, seed=cfg.seed)
        from saeforge.data.text_source import TextSource
        from saeforge.data.token_stream import TokenPolicy, TokenStream
        from saeforge.models.language_model import LanguageModel

        self.lm = LanguageModel.load(cfg.model, dtype=cfg.model_dtype, device=cfg.device)
        tokens = TokenStream.for_model(TextSource(cfg.corpus, cfg.text_field), self.lm,
                                       TokenPolicy(cfg.context_length, cfg.prepend_bos, cfg.exclude_special_tokens))
        self.data_info = {"model_name": cfg.model, "model_fingerprint": self.lm.fingerprint(),
                          "context_size": cfg.context_length, "prepend_bos": cfg.prepend_bos,
                          "exclude_special_tokens": cfg.exclude_special_tokens, "dataset_path": cfg.corpus}
        return LiveActivations(self.lm, tokens, sites, buffer_tokens=cfg.buffer_tokens)

    def _dead_after_tokens(self, spec: dict[str, Any]) -> int:
        if spec["dead_after_tokens"] > 0:
            return int(spec["dead_after_tokens"])
        # OpenAI's 10M tokens, but never more than a fifth of the run so short runs still see dead latents.
        return int(min(DEFAULT_DEAD_AFTER_TOKENS, max(self.cfg.batch_size, self.cfg.tokens // 5)))

    def _build_trainees(self) -> None:
        cfg = self.cfg
        sample = self.source.fill(0)
        if sample is None:
            raise SaeforgeError("the activation source is empty", "check the cache or corpus")
        torch.manual_seed(cfg.seed)
        for spec in cfg.sae_specs():
            site, target_site = spec["site"], spec["target_site"]
            x = sample[site][:INIT_SAMPLE_TOKENS].to(self.device, torch.float32)
            y = sample[target_site][:INIT_SAMPLE_TOKENS].to(self.device, torch.float32) if target_site else None
            self._check_finite(x, site, "the initialisation sample")
            dead_after = self._dead_after_tokens(spec)
            sae_cfg = build_sae_config(spec, x.shape[1], y.shape[1] if y is not None else x.shape[1], dead_after)
            sae = make_sae(sae_cfg).to(self.device)
            scaler = ActivationScaler.fit(x, cfg.normalize_activations, y)
            sae.init_from_data(scaler.scale_input(x), scaler.scale_target(y) if y is not None else None)
            lr = spec["lr"] or default_lr(sae_cfg.architecture, sae_cfg.d_sae)
            opt_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
            # fused: one kernel for the whole update (CPU and CUDA), measurably faster at SAE sizes
            optimizer = opt_cls(sae.parameters(), lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                                weight_decay=cfg.weight_decay, fused=self.device.type in ("cpu", "cuda"))
            # a warm-up longer than a twentieth of the run would leave short runs at a fraction of their rate
            warm = min(cfg.lr_warmup_steps, max(1, self.total_steps // 20))
            total, decay, frac = self.total_steps, cfg.lr_decay, cfg.lr_decay_fraction
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer,
                                                          lambda s: lr_factor(s, total, warm, decay, frac))
            tracker = DeadLatentTracker(sae_cfg.d_sae, dead_after, device=self.device)
            self.trainees.append(Trainee(spec["name"], site, target_site, sae, optimizer, scheduler, tracker, scaler))
        # a copy, so the whole first fill is not kept alive for the run by a view of it
        self.init_sample = {k: v[:INIT_SAMPLE_TOKENS].clone() for k, v in sample.items()}

    # ------------------------------------------------------------------------------------------------ checkpoints
    def _save_checkpoint(self) -> None:
        state = {
            "format": CHECKPOINT_FORMAT,
            "version": FORMAT_VERSION,
            "run_id": self.run_info["run_id"],
            "step": self.step,
            "stream": self.stream.state_dict(),
            "metrics_bytes": self.metrics_path.stat().st_size if self.metrics_path.exists() else 0,
            "rng": _rng_state(),
            "saes": {t.name: {"model": t.sae.state_dict(), "optimizer": t.optimizer.state_dict(),
                              "scheduler": t.scheduler.state_dict(),
                              "tokens_since_fired": t.tracker.tokens_since_fired,
                              "scaler": t.scaler.to_dict()} for t in self.trainees},
        }
        atomic_write(self.checkpoint_path, lambda p: torch.save(state, p))

    def _load_checkpoint(self) -> bool:
        if not self.checkpoint_path.is_file():
            return False
        try:
            state = torch.load(self.checkpoint_path, map_location=self.device, weights_only=False)
        except Exception as err:
            raise SaeforgeError(f"checkpoint {self.checkpoint_path} is unreadable: {err}",
                                "it was not written by saeforge or is damaged; start a new run") from err
        if state.get("format") != CHECKPOINT_FORMAT or state.get("version", 99) > FORMAT_VERSION:
            raise SaeforgeError(f"{self.checkpoint_path} is not a saeforge checkpoint this version can read",
                                "start a new run or upgrade saeforge")
        if state["run_id"] != self.run_info["run_id"]:
            raise SaeforgeError(f"{self.checkpoint_path} belongs to another run ({state['run_id']}, this run is "
                                f"{self.run_info['run_id']})", "resume the run that wrote it, or start afresh")
        by_name = {t.name: t for t in self.trainees}
        if set(state["saes"]) != set(by_name):
            raise SaeforgeError(f"checkpoint holds SAEs {sorted(state['saes'])}, the config has {sorted(by_name)}",
                                "resume with the run's own config")
        for name, s in state["saes"].items():
            t = by_name[name]
            t.sae.load_state_dict(s["model"])
            t.optimizer.load_state_dict(s["optimizer"])
            t.scheduler.load_state_dict(s["scheduler"])
            t.tracker.tokens_since_fired.copy_(s["tokens_since_fired"])
            t.scaler = ActivationScaler.from_dict(s["scaler"])
        self.step = state["step"]
        self.stream.load_state_dict(state["stream"])
        _set_rng_state(state["rng"])
        if self.metrics_path.exists():  # drop metrics recorded after the checkpoint; they will be recorded again
            with open(self.metrics_path, "r+b") as fh:
                fh.truncate(state["metrics_bytes"])
        return True

    # ------------------------------------------------------------------------------------------------ loop
    def _check_finite(self, x: torch.Tensor, site: str, what: str) -> None:
        if not torch.isfinite(x).all():
            raise SaeforgeError(
                f"NaN or Inf in the activations at site {site!r} in {what}",
                f"check the activation source; the last good checkpoint ({self.checkpoint_path}) is intact and "
                "`saeforge train --resume` continues from it")

    def _train_step(self, batch: dict[str, torch.Tensor]) -> None:
        cfg = self.cfg
        warm = int(cfg.sparsity_warmup_fraction * self.total_steps)
        for t in self.trainees:
            x = batch[t.site].to(self.device, torch.float32, non_blocking=True)
            self._check_finite(x, t.site, f"the batch of step {self.step}")
            x = t.scaler.scale_input(x)
            target = None
            if t.target_site:
                target = t.scaler.scale_target(batch[t.target_site].to(self.device, torch.float32))
            state = TrainState(step=self.step, sparsity_scale=sparsity_factor(self.step, warm),
                               dead_mask=t.tracker.dead_mask)
            out = t.sae.training_loss(x, target, state=state)
            if not torch.isfinite(out.loss):
                raise SaeforgeError(
                    f"the loss of SAE {t.name!r} became {out.loss.item()} at step {self.step}",
                    f"lower the learning rate; the last good checkpoint ({self.checkpoint_path}) is intact")
            out.loss.backward()
            t.sae.before_optimizer_step()
            if cfg.grad_clip_norm > 0:
                torch.nn.utils.clip_grad_norm_(t.sae.parameters(), cfg.grad_clip_norm)
            t.optimizer.step()
            t.sae.after_optimizer_step()
            t.optimizer.zero_grad(set_to_none=True)
            t.scheduler.step()
            t.tracker.update(out.fired, x.shape[0])
            resample_every = getattr(t.sae.cfg, "resample_every", None)
            if resample_every and (self.step + 1) % resample_every == 0:
                t.sae.resample_dead_latents(x, t.tracker.dead_mask, t.optimizer)
            if (self.step + 1) % cfg.log_every == 0 or self.step + 1 == self.total_steps:
                with torch.no_grad():
                    ref = x if target is None else target
                    fvu = float((out.x_hat - ref).pow(2).sum() / (ref - ref.mean(0)).pow(2).sum().clamp_min(1e-12))
                self._accumulate(t, out, fvu)

    def _accumulate(self, t: Trainee, out, fvu: float) -> None:
        vals = {"loss": float(out.loss.detach()), "l0": out.l0, "fvu": fvu,
                **{f"loss_{k}": float(v.detach()) for k, v in out.terms.items()}}
        for k, v in vals.items():
            t.sums[k] = t.sums.get(k, 0.0) + v
        t.n_logged += 1

    def _log(self, t0: float, tokens_at_start: int) -> dict[str, Any]:
        elapsed = time.time() - t0
        tokens = (self.step) * self.cfg.batch_size
        record: dict[str, Any] = {"step": self.step, "tokens": tokens,
                                  "tokens_per_s": (tokens - tokens_at_start) / max(elapsed, 1e-9), "saes": {}}
        for t in self.trainees:
            m = {k: v / max(t.n_logged, 1) for k, v in t.sums.items()}
            m["dead_fraction"] = float(t.tracker.dead_mask.float().mean())
            m["lr"] = t.scheduler.get_last_lr()[0]
            record["saes"][t.name] = m
            t.sums, t.n_logged = {}, 0
        with open(self.metrics_path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        return record

    def fit(self) -> dict[str, Any]:
        from tqdm.auto import tqdm

        self._build_trainees()
        resumed = self._load_checkpoint()
        if self.step >= self.total_steps and (self.run_dir / "saes").is_dir() and self.run_info.get(
                "status") == "complete":
            return self.run_info.get("final", {})
        bar = tqdm(total=self.total_steps, initial=self.step, unit="step", desc="training",
                   disable=not self.cfg.progress, dynamic_ncols=True)
        if resumed:
            bar.write(f"resumed {self.run_dir} at step {self.step}")
        t0, tokens_at_start = time.time(), self.step * self.cfg.batch_size
        last: dict[str, Any] | None = None
        batches = iter(self.stream)
        try:
            while self.step < self.total_steps:
                try:
                    batch = next(batches)
                except StopIteration:
                    raise SaeforgeError(f"the activation source ran out at step {self.step} of {self.total_steps}",
                                        "train on fewer --tokens or cache more activations") from None
                self._train_step(batch)
                self.step += 1
                bar.update(1)
                if self.step % self.cfg.log_every == 0 or self.step == self.total_steps:
                    last = self._log(t0, tokens_at_start)
                    first = last["saes"][self.trainees[0].name]
                    bar.set_postfix(loss=f"{first['loss']:.4g}", L0=f"{first['l0']:.1f}", FVU=f"{first['fvu']:.3f}",
                                    dead=f"{first['dead_fraction']:.1%}", tok_s=f"{last['tokens_per_s']:.0f}")
                if self.step % self.cfg.checkpoint_every == 0 or self.step == self.total_steps:
                    self._save_checkpoint()
        finally:
            bar.close()
        return self._finish(last)

    # ------------------------------------------------------------------------------------------------ output
    @torch.no_grad()
    def _feature_stats(self, t: Trainee, sae: SAE, chunk: int = 4096) -> dict[str, torch.Tensor]:
        """Density, max and mean activation per latent on the initialisation sample, in chunks (a dense
        [tokens, d_sae] matrix of the whole sample would be the run's largest allocation)."""
        x_all = self.init_sample[t.site]
        d = sae.cfg.d_sae
        fired = torch.zeros(d, device=self.device)
        total = torch.zeros(d, device=self.device)
        top = torch.zeros(d, device=self.device)
        for s in range(0, x_all.shape[0], chunk):
            f = sae.encode(x_all[s:s + chunk].to(self.device, torch.float32))
            fired += (f > 0).sum(0)
            total += f.sum(0)
            top = torch.maximum(top, f.max(0).values)
        density = fired / max(x_all.shape[0], 1)
        return {"sparsity": torch.log10(density.clamp_min(1e-10)), "max_activation": top,
                "mean_activation": total / fired.clamp_min(1)}

    def _finish(self, last: dict[str, Any] | None) -> dict[str, Any]:
        final = {}
        if last is None and self.metrics_path.exists():
            lines = self.metrics_path.read_text().strip().splitlines()
            last = json.loads(lines[-1]) if lines else None
        for t in self.trainees:
            sae = make_sae(t.sae.cfg).to(self.device)
            sae.load_state_dict(t.sae.state_dict())
            t.scaler.fold_into(sae)
            meta = {"hook_name": t.site, **self.data_info, "saeforge_run": self.run_info["run_id"],
                    "normalization": t.scaler.to_dict(), "training_tokens": self.total_steps * self.cfg.batch_size}
            if t.target_site:
                meta["hook_name_out"] = t.target_site
            save_sae(sae, self.run_dir / "saes" / t.name, metadata=meta, feature_stats=self._feature_stats(t, sae))
            final[t.name] = (last or {}).get("saes", {}).get(t.name, {})
        self.run_info.update(status="complete", final=final, finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
        atomic_write_json(self.run_dir / "run.json", self.run_info)
        return final


# ---------------------------------------------------------------------------------------------------- entry
def _new_run(cfg: TrainConfig) -> Path:
    if not cfg.out:
        raise SaeforgeError("no run directory given", "pass --out RUN_DIR (or --resume RUN_DIR)")
    run_dir = Path(cfg.out)
    if (run_dir / "run.json").exists():
        raise SaeforgeError(f"{run_dir} already holds a run", f"resume it with --resume {run_dir}, or pick a new --out")
    if run_dir.exists() and any(run_dir.iterdir()):
        raise SaeforgeError(f"--out {run_dir} exists and is not empty", "pick a new or empty folder")
    run_dir.mkdir(parents=True, exist_ok=True)
    info = {"format": RUN_FORMAT, "version": FORMAT_VERSION, "run_id": uuid.uuid4().hex,
            "config": cfg.to_dict(), "versions": _versions(), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "status": "running"}
    atomic_write_json(run_dir / "run.json", info)
    return run_dir


def _resumed_run(cfg: TrainConfig, given: list[str] | None) -> tuple[TrainConfig, Path]:
    run_dir = Path(cfg.resume)
    path = run_dir / "run.json"
    if not path.is_file():
        raise SaeforgeError(f"{run_dir} is not a saeforge run (no run.json)", "pass the folder given to --out")
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise SaeforgeError(f"{path} is corrupt: {err}", "the run cannot be resumed; start a new one") from err
    if info.get("format") != RUN_FORMAT or info.get("version", 99) > FORMAT_VERSION:
        raise SaeforgeError(f"{path} is not a run this saeforge version can resume", "start a new run")
    saved = TrainConfig.from_dict(info["config"])
    diffs = cfg.differences(saved, given)
    if diffs:
        raise SaeforgeError("the run was started with another config; differences:\n    " + "\n    ".join(diffs),
                            "resume with the saved settings (just --resume RUN_DIR), or start a new run with --out")
    keep = {f: getattr(cfg, f) for f in ("device", "progress")}
    return dataclasses.replace(saved, resume=str(run_dir), **keep), run_dir


def non_default_fields(cfg: TrainConfig) -> list[str]:
    default = TrainConfig()
    return [f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(default, f.name)]


def resolve_config(cfg: TrainConfig, given: list[str]) -> TrainConfig:
    """Lay the explicitly given options over the config file's (``--config``), if there is one."""
    if not cfg.config:
        return cfg
    data = load_config_file(cfg.config)
    base = TrainConfig.from_dict({**TrainConfig().to_dict(), **data, "config": cfg.config})
    return dataclasses.replace(base, **{f: getattr(cfg, f) for f in given if f != "config"})


def train(cfg: TrainConfig, given: list[str] | None = None) -> dict[str, Any]:
    """Train (or resume) and return the final metrics per SAE.

    ``given`` names the options set explicitly (the CLI passes those on its command line); they override a
    ``--config`` file and, on resume, must equal the saved run's. None: the fields that differ from the defaults.
    """
    given = non_default_fields(cfg) if given is None else given
    cfg = resolve_config(cfg, given)
    if cfg.resume:
        cfg, run_dir = _resumed_run(cfg, given)
    else:
        cfg.validate()
        run_dir = _new_run(cfg)
    remove_stale_temporaries(run_dir / "checkpoints")
    remove_stale_temporaries(run_dir)
    trainer = Trainer(cfg, run_dir)
    data = {"data": trainer.data_info}
    if trainer.run_info.get("data") != data["data"]:
        if "data" in trainer.run_info:
            raise SaeforgeError(f"the training data changed since the run started (was {trainer.run_info['data']}, "
                                f"now {trainer.data_info})", "resume with the same model and cache")
        trainer.run_info.update(data)
        atomic_write_json(run_dir / "run.json", trainer.run_info)
    return trainer.fit()
