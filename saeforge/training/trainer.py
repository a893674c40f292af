"""The training loop: one or many SAEs fed from one ActivationStream, checkpointed atomically, resumed exactly.

A run directory (:mod:`saeforge.training.run_dir`) holds ``run.json``, ``checkpoints/checkpoint.pt``
(:mod:`saeforge.training.checkpoint`), ``metrics.jsonl`` and, at the end, ``saes/<name>/`` (SAELens-compatible files
with the input normalisation folded in). A run killed at any moment resumes from its last checkpoint and ends with
weights bit-identical to an uninterrupted run: everything that determines a step is a function of the seed, the
step and the checkpointed state.

The loop knows no architecture: each SAE's config class says how the generic options map onto it
(:meth:`~saeforge.saes.SAEConfig.from_training_options`), which site bindings it trains
(:meth:`~saeforge.saes.SAEConfig.for_binding`) and what its default learning rate is, and the SAE handles its own
dead latents in :meth:`~saeforge.saes.SAE.after_step`.

Every dictionary reads one or several sites and writes one or several (:class:`~saeforge.runs.SiteBinding`): its
input is the concatenation of the sites it reads, its target that of the sites it writes (none for an SAE, which
reconstructs its input), all from the same batch of the one stream, so a cross-layer transcoder over L layers is
trained from one pass over the data. A dictionary over several sites scales each site on its own
(:mod:`saeforge.training.scaling`).
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from saeforge.data.activation_stream import ActivationStream, CachedActivations, LiveActivations
from saeforge.errors import SaeforgeError
from saeforge.models.loading import resolve_device
from saeforge.runs import SiteBinding
from saeforge.saes import SAE, ActivationScaler, DeadLatentTracker, TrainOutput, TrainState, make_sae, save_sae
from saeforge.saes.feature_stats import feature_statistics
from saeforge.saes.registry import get_config_class
from saeforge.training.checkpoint import checkpoint_state, load_checkpoint, read_checkpoint, write_checkpoint
from saeforge.training.config import TrainConfig, label_site, non_default_fields, parse_sae_options, resolve_config
from saeforge.training.run_dir import open_run, record_data, record_ranks
from saeforge.training.scaling import SiteScaler
from saeforge.training.schedules import lr_factor, sparsity_factor
from saeforge.utils.atomic import atomic_write_json
from saeforge.utils.finite import all_finite
from saeforge.utils.threads import thread_policy

__all__ = ["Trainer", "train"]

INIT_SAMPLE_TOKENS = 32_768  # vectors used to estimate the input scale and initialise b_dec (OpenAI: 32,768)
DEFAULT_DEAD_AFTER_TOKENS = 10_000_000  # OpenAI's definition of a dead latent


@dataclass
class Trainee:
    """One SAE being trained, with everything that belongs to it alone."""

    name: str
    binding: SiteBinding
    sae: SAE
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    tracker: DeadLatentTracker
    scaler: ActivationScaler | SiteScaler
    label_site: str | None = None  # the cache site of its per-token labels, when its architecture trains on some
    metrics: dict[str, float] | None = None  # of the last step that was logged

    @property
    def has_target(self) -> bool:
        """Whether it writes other sites than it reads (a transcoder or CLT), i.e. trains against a target."""
        return self.binding.writes != self.binding.reads


def _joined(acts: dict[str, torch.Tensor], sites: tuple[str, ...]) -> torch.Tensor:
    """The activations of ``sites`` side by side (no copy for one site)."""
    return acts[sites[0]] if len(sites) == 1 else torch.cat([acts[s] for s in sites], dim=-1)


class Trainer:
    """Build with :func:`train` (or ``Trainer(cfg, run_dir)``); :meth:`fit` runs to the end and returns the final
    metrics per SAE."""

    # Under torchrun, saeforge.distributed's subclasses override the hooks marked "(a hook)": one process runs as is.
    writes_run_dir = True  # whether this process writes run.json, metrics, checkpoints and SAEs
    world_size, parallel_mode = 1, None  # ranks and --parallel mode, recorded in run.json (run_dir.record_ranks)

    def __init__(self, cfg: TrainConfig, run_dir: Path, run_info: dict[str, Any] | None = None):
        cfg.validate()
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.device = self._device()
        self.total_steps = cfg.tokens // cfg.batch_size
        self.checkpoint_path = self.run_dir / "checkpoints" / "checkpoint.pt"
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.run_info = run_info if run_info is not None else json.loads((self.run_dir / "run.json").read_text())
        self.lm = None
        # wall seconds per phase of this process's run (run.json "seconds"): where the time goes, without a profiler
        self.seconds = {"load": 0.0, "init": 0.0, "data": 0.0, "steps": 0.0, "finish": 0.0}
        started = time.perf_counter()
        self.source = self._make_source()
        self.seconds["load"] = time.perf_counter() - started
        self.stream = ActivationStream(self.source, batch_size=cfg.batch_size, seed=cfg.seed)
        self.step = 0
        self.trainees: list[Trainee] = []
        self._checkpoint_writer: _BackgroundCall | None = None

    # ------------------------------------------------------------------------------------------------ set-up
    def _device(self) -> torch.device:
        """(a hook) The device this process trains on."""
        return resolve_device(self.cfg.device)

    def _make_source(self):
        cfg = self.cfg
        sites = cfg.needed_sites()
        if cfg.cache:
            from saeforge.data.activation_cache import ActivationCache

            cache = ActivationCache(cfg.cache)
            self.data_info = cache.data_info()
            return CachedActivations(cache, sites, shards_per_fill=cfg.shards_per_fill, seed=cfg.seed)
        from saeforge.data.text_source import TextSource
        from saeforge.data.token_stream import TokenStream
        from saeforge.models.language_model import LanguageModel

        self.lm = LanguageModel.load(cfg.model, dtype=cfg.model_dtype, device=str(self.device))
        tokens = TokenStream.for_model(TextSource(cfg.corpus, cfg.text_field), self.lm,
                                       cfg.text_options.token_policy())
        self.data_info = {"model_name": cfg.model, "model_fingerprint": self.lm.fingerprint(),
                          "context_size": cfg.context_length, "prepend_bos": cfg.prepend_bos,
                          "exclude_special_tokens": cfg.exclude_special_tokens, "dataset_path": cfg.corpus}
        return LiveActivations(self.lm, tokens, sites, buffer_tokens=cfg.buffer_tokens, batch_size=cfg.batch_size,
                               total_batches=self.total_steps)

    def _dead_after_tokens(self, spec: dict[str, Any]) -> int:
        if spec["dead_after_tokens"] > 0:
            return int(spec["dead_after_tokens"])
        # OpenAI's 10M tokens, but never more than a fifth of the run so short runs still see dead latents.
        return int(min(DEFAULT_DEAD_AFTER_TOKENS, max(self.cfg.batch_size, self.cfg.tokens // 5)))

    def _build_trainees(self) -> None:
        started = time.perf_counter()
        try:
            self._build_trainees_from(self.source.fill(0))
        finally:
            self.seconds["init"] += time.perf_counter() - started

    def _build_trainees_from(self, sample: dict[str, torch.Tensor] | None) -> None:
        cfg = self.cfg
        if sample is None:
            raise SaeforgeError("the activation source is empty",
                                "cache activations first (`saeforge cache` or `saeforge import-activations`), "
                                "or pass a larger --corpus")
        torch.manual_seed(cfg.seed)
        for spec in cfg.sae_specs():
            binding = SiteBinding(spec["reads"], spec["writes"])
            xs = [sample[r][:INIT_SAMPLE_TOKENS].to(self.device, torch.float32) for r in binding.reads]
            ys = None
            if binding.writes != binding.reads:
                ys = [sample[w][:INIT_SAMPLE_TOKENS].to(self.device, torch.float32) for w in binding.writes]
            for site, a in zip(binding.sites, xs + (ys or [])):
                self._check_finite(a, site, "the initialisation sample")
            x = xs[0] if len(xs) == 1 else torch.cat(xs, 1)
            y = None if ys is None else (ys[0] if len(ys) == 1 else torch.cat(ys, 1))
            dead_after = self._dead_after_tokens(spec)
            config_class = get_config_class(spec["architecture"]).for_binding(binding.kind)
            read_widths = tuple(int(a.shape[1]) for a in xs)
            write_widths = read_widths if ys is None else tuple(int(a.shape[1]) for a in ys)
            sae_cfg = config_class.from_training_options(
                d_in=x.shape[1], d_sae=spec["d_sae"] or spec["expansion_factor"] * x.shape[1],
                d_out=y.shape[1] if y is not None else None, k=spec["k"],
                sparsity_coefficient=spec["sparsity_coefficient"], dead_after_tokens=dead_after,
                options=parse_sae_options(spec["sae_options"]), read_widths=read_widths, write_widths=write_widths)
            sae = make_sae(sae_cfg).to(self.device)
            if len(xs) == 1 and (ys is None or len(ys) == 1):
                scaler = ActivationScaler.fit(x, cfg.normalize_activations, y)
            else:
                scaler = SiteScaler.fit(xs, cfg.normalize_activations, ys)
            sae.init_from_data(scaler.scale_input(x), scaler.scale_target(y) if y is not None else None)
            lr = spec["lr"] or sae_cfg.learning_rate_for_run(self.total_steps)
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
            self.trainees.append(Trainee(spec["name"], binding, sae, optimizer, scheduler, tracker, scaler,
                                         label_site(spec)))
        # a copy, so the whole first fill is not kept alive for the run by a view of it
        self.init_sample = {k: v[:INIT_SAMPLE_TOKENS].clone() for k, v in sample.items()}

    # ------------------------------------------------------------------------------------------------ checkpoints
    def _save_checkpoint(self) -> None:
        state = checkpoint_state(run_id=self.run_info["run_id"], step=self.step, stream_state=self.stream.state_dict(),
                                 metrics_path=self.metrics_path, trainees=self.trainees)
        if self.step < self.total_steps:
            write_checkpoint(self.checkpoint_path, state)
        else:
            # The last one is written while the finish computes the feature statistics (it keeps the finish
            # resumable; nothing changes the state it holds after the last step); the run is marked complete once
            # it is on disk.
            self._checkpoint_writer = _BackgroundCall(lambda: write_checkpoint(self.checkpoint_path, state))

    def _wait_for_checkpoint(self) -> None:
        writer, self._checkpoint_writer = self._checkpoint_writer, None
        if writer is not None:
            writer.wait()

    def _load_checkpoint(self) -> bool:
        loaded = load_checkpoint(self.checkpoint_path, run_id=self.run_info["run_id"], trainees=self.trainees,
                                 metrics_path=self.metrics_path if self.writes_run_dir else None,
                                 device=self.device, read=self._read_checkpoint)
        if loaded is None:
            return False
        self.step, stream_state = loaded
        self.stream.load_state_dict(stream_state)
        return True

    def _read_checkpoint(self, path: Path) -> dict[str, Any] | None:
        """(a hook) The checkpoint's contents, None when there is none yet."""
        return read_checkpoint(path, self.device)

    # ------------------------------------------------------------------------------------------------ loop
    def _check_finite(self, x: torch.Tensor, site: str, what: str) -> None:
        if not all_finite(x):
            raise SaeforgeError(
                f"NaN or Inf in the activations at site {site!r} in {what}",
                f"check the activation source; the last good checkpoint ({self.checkpoint_path}) is intact and "
                f"`saeforge train --resume {self.run_dir}` continues from it")

    def _check_input(self, x: torch.Tensor, t: Trainee) -> None:
        """(a hook) Refuse a batch with NaN or Inf."""
        self._check_finite(x, ", ".join(t.binding.reads), f"the batch of step {self.step}")

    def _backward(self, t: Trainee, out: TrainOutput, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(a hook) Check the loss, back-propagate it; return the latents that fired and the tokens seen."""
        if not torch.isfinite(out.loss):
            raise SaeforgeError(
                f"the loss of SAE {t.name!r} became {out.loss.item()} at step {self.step}",
                f"lower the learning rate (--lr); the last good checkpoint ({self.checkpoint_path}) is intact")
        out.loss.backward()
        return out.fired, x.shape[0]

    def _step_metrics(self, t: Trainee, out: TrainOutput, reference: torch.Tensor) -> dict[str, Any]:
        """(a hook) The metrics of one logged step."""
        return _step_metrics(out, reference, getattr(t.scaler, "widths_out", ()))

    def _clip_gradients(self, t: Trainee) -> None:
        """(a hook) Clip the SAE's gradient norm to --grad-clip-norm (0: no clipping)."""
        if self.cfg.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(t.sae.parameters(), self.cfg.grad_clip_norm)

    def _after_step_input(self, t: Trainee, x: torch.Tensor) -> torch.Tensor:
        """(a hook) The batch an SAE's own dead-latent handling (after_step) sees."""
        return x

    def _trained_here(self) -> list[Trainee]:
        """(a hook) The trainees this process trains."""
        return self.trainees

    def _train_step(self, batch: dict[str, torch.Tensor]) -> None:
        cfg = self.cfg
        warm = int(cfg.sparsity_warmup_fraction * self.total_steps)
        logging = (self.step + 1) % cfg.log_every == 0 or self.step + 1 == self.total_steps
        for t in self._trained_here():
            x = _joined(batch, t.binding.reads).to(self.device, torch.float32, non_blocking=True)
            self._check_input(x, t)
            x = t.scaler.scale_input(x)
            target = None
            if t.has_target:
                target = t.scaler.scale_target(_joined(batch, t.binding.writes).to(self.device, torch.float32))
            state = TrainState(step=self.step, total_steps=self.total_steps,
                               sparsity_scale=sparsity_factor(self.step, warm),
                               dead_mask=t.tracker.dead_mask,
                               labels=None if t.label_site is None else batch[t.label_site].to(self.device,
                                                                                               torch.float32))
            out = t.sae.training_loss(x, target, state=state)
            fired, n_tokens = self._backward(t, out, x)
            t.sae.before_optimizer_step()
            self._clip_gradients(t)
            t.optimizer.step()
            t.sae.after_optimizer_step()
            t.optimizer.zero_grad(set_to_none=True)
            t.scheduler.step()
            t.tracker.update(fired, n_tokens)
            if logging:  # before after_step, which may change the SAE: the metrics describe this forward
                t.metrics = self._step_metrics(t, out, x if target is None else target)
            t.sae.after_step(self.step, self.total_steps, t.tracker.dead_mask, self._after_step_input(t, x),
                             t.optimizer)

    def _log(self, t0: float, tokens_at_start: int) -> dict[str, Any]:
        elapsed = time.time() - t0
        tokens = self.step * self.cfg.batch_size
        record: dict[str, Any] = {"step": self.step, "tokens": tokens,
                                  "tokens_per_s": (tokens - tokens_at_start) / max(elapsed, 1e-9),
                                  "saes": self._sae_records()}
        if self.writes_run_dir:
            with open(self.metrics_path, "a") as fh:
                fh.write(json.dumps(record) + "\n")
        return record

    def _sae_records(self) -> dict[str, dict[str, Any]]:
        """(a hook) The metrics of the last logged step, the dead fraction and the learning rate, per SAE."""
        return {t.name: {**(t.metrics or {}), "dead_fraction": float(t.tracker.dead_mask.float().mean()),
                         "lr": t.scheduler.get_last_lr()[0]} for t in self.trainees}

    def _batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """(a hook) The batches this process trains on, in order."""
        return iter(self.stream)

    def fit(self) -> dict[str, Any]:
        from tqdm.auto import tqdm

        if not self.trainees:
            self._build_trainees()
        resumed = self._load_checkpoint()
        if self.step >= self.total_steps and (self.run_dir / "saes").is_dir() and self.run_info.get(
                "status") == "complete":
            return self.run_info.get("final", {})
        if self.writes_run_dir:
            record_ranks(self.run_dir, self.run_info, self.step, self.world_size, self.parallel_mode)
        bar = tqdm(total=self.total_steps, initial=self.step, unit="step", desc="training",
                   disable=not (self.cfg.progress and self.writes_run_dir), dynamic_ncols=True)
        if resumed:
            bar.write(f"resumed {self.run_dir} at step {self.step}")
        t0, tokens_at_start = time.time(), self.step * self.cfg.batch_size
        last: dict[str, Any] | None = None
        batches = self._batches()
        try:
            while self.step < self.total_steps:
                started = time.perf_counter()
                try:
                    batch = next(batches)
                except StopIteration:
                    raise SaeforgeError(f"the activation source ran out at step {self.step} of {self.total_steps}",
                                        "train on fewer --tokens or cache more activations") from None
                ready = time.perf_counter()
                self._train_step(batch)
                self.seconds["data"] += ready - started
                self.seconds["steps"] += time.perf_counter() - ready
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
        try:
            return self._finish(last)
        finally:
            if self._checkpoint_writer is not None:  # the finish failed: its error is the news, not the write's
                with contextlib.suppress(Exception):
                    self._wait_for_checkpoint()

    # ------------------------------------------------------------------------------------------------ output
    def _feature_stats(self, t: Trainee, sae: SAE) -> dict[str, torch.Tensor]:
        """Density, max and mean activation per latent of the final (folded) SAE on the initialisation sample."""
        return feature_statistics(sae, _joined(self.init_sample, t.binding.reads))

    def _finish(self, last: dict[str, Any] | None) -> dict[str, Any]:
        started = time.perf_counter()
        final = {}
        if last is None and self.metrics_path.exists():
            lines = self.metrics_path.read_text().strip().splitlines()
            last = json.loads(lines[-1]) if lines else None
        for t in self.trainees:
            sae = make_sae(t.sae.cfg).to(self.device)
            sae.load_state_dict(t.sae.state_dict())
            t.scaler.fold_into(sae)
            meta = {**t.binding.to_metadata(), **self.data_info,
                    "saeforge_run": self.run_info["run_id"], "normalization": t.scaler.to_dict(),
                    "training_tokens": self.total_steps * self.cfg.batch_size}
            save_sae(sae, self.run_dir / "saes" / t.name, metadata=meta, feature_stats=self._feature_stats(t, sae))
            final[t.name] = (last or {}).get("saes", {}).get(t.name, {})
        self._wait_for_checkpoint()
        self.seconds["finish"] += time.perf_counter() - started
        self.run_info.update(status="complete", final=final, finished=time.strftime("%Y-%m-%dT%H:%M:%S"),
                             seconds={k: round(v, 3) for k, v in self.seconds.items()})
        atomic_write_json(self.run_dir / "run.json", self.run_info)
        return final


class _BackgroundCall(threading.Thread):
    """``fn()`` on a thread of its own; :meth:`wait` joins it and raises what it raised."""

    def __init__(self, fn: Callable[[], None]):
        super().__init__(name="saeforge-background-write")
        self._fn, self._error = fn, None
        self.start()

    def run(self) -> None:
        try:
            self._fn()
        except BaseException as err:  # noqa: BLE001 - handed to the waiting thread
            self._error = err

    def wait(self) -> None:
        self.join()
        if self._error is not None:
            raise self._error


def _fvu(x_hat: torch.Tensor, reference: torch.Tensor) -> float:
    """In float64, as the data-parallel trainer sums it: a float32 batch mean and variance would round at ~1e-7."""
    x_hat, reference = x_hat.double(), reference.double()
    return float((x_hat - reference).pow(2).sum() / (reference - reference.mean(0)).pow(2).sum().clamp_min(1e-12))


def _step_metrics(out: TrainOutput, reference: torch.Tensor, widths: tuple[int, ...] = ()) -> dict[str, Any]:
    """Loss, its terms, L0 and FVU (against the batch's own mean) of one training forward; with several sites
    written (``widths``), the FVU of each too (``fvu_sites``, in the binding's order)."""
    with torch.no_grad():
        metrics: dict[str, Any] = {"loss": float(out.loss.detach()), "l0": out.l0, "fvu": _fvu(out.x_hat, reference),
                                   **{f"loss_{k}": float(v.detach()) for k, v in out.terms.items()}}
        if len(widths) > 1:
            parts = zip(out.x_hat.split(list(widths), dim=1), reference.split(list(widths), dim=1))
            metrics["fvu_sites"] = [_fvu(a, b) for a, b in parts]
    return metrics


# ---------------------------------------------------------------------------------------------------- entry
def train(cfg: TrainConfig, given: list[str] | None = None) -> dict[str, Any]:
    """Train (or resume) and return the final metrics per SAE.

    ``given`` names the options set explicitly (the CLI passes those on its command line); they override a
    ``--config`` file and, on resume, must equal the saved run's. None: the fields that differ from the defaults.
    The run directory is locked for the whole run: a second ``saeforge train`` on it is refused.
    """
    given = non_default_fields(cfg) if given is None else given
    from saeforge.distributed.process_group import launched_by_torchrun

    if launched_by_torchrun():  # one of several ranks (torchrun): saeforge.distributed runs the same loop
        from saeforge.distributed.training import train_distributed

        return train_distributed(cfg, given)
    cfg = resolve_config(cfg, given)
    with open_run(cfg, given) as (cfg, run_dir, info), thread_policy(cfg.threads) as threads:
        info["threads_used"] = threads  # the automatic choice depends on the load at the start: recorded
        trainer = Trainer(cfg, run_dir, info)
        # every SAE's settings are checked (its config built) before run.json is written: a refused setting leaves
        # no run behind, so the corrected command can use the same --out
        trainer._build_trainees()
        record_data(run_dir, info, trainer.data_info)
        return trainer.fit()
