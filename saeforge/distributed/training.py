"""``saeforge train`` under torchrun: the one training loop (:class:`saeforge.training.Trainer`) with its hooks
filled in for several ranks.

- **data** (``--parallel data``, the default): every rank holds every SAE and trains it on its slice of each global
  batch of the one deterministic stream (rank r takes rows ``[r·B/W, (r+1)·B/W)``). After each backward one
  all-reduce per SAE carries the gradients (averaged), the latents that fired (so the dead-latent counters, AuxK and
  resampling see the same dead latents on every rank) and each rank's non-finite flags (so one rank's NaN stops
  every rank with the same error). AuxK's normalisation and BatchTopK's N·k selection are taken over the global
  batch (:mod:`saeforge.distributed.batch`), HSAE's per-level L0 averaged over the ranks; an SAE with its own
  dead-latent handling (classic ReLU resampling) gets the gathered global batch. The replicas stay bit-identical (an all-reduce gives every rank the same sum); that is
  checked at every checkpoint. The result equals a one-process run with the same global batch to floating-point
  rounding (the gradient is summed in another order).
- **module** (``--parallel module``): every rank reads whole batches and trains only its share of the SAEs (balanced
  by parameter count); checkpoints and the final SAEs are gathered on rank 0. Each SAE sees exactly what it sees in
  one process, so the weights are bit-identical to a one-process run (for architectures that draw no random
  numbers while training).

- **latent** (``--parallel latent``): every TopK SAE split over the ranks by its latents, with a distributed top-k
  (:mod:`saeforge.distributed.latent`).

In all three, the initial SAEs and their input normalisation (fitted on the first fill) are broadcast from rank 0, only
rank 0 writes the run directory, and a checkpoint holds one copy of every SAE and the global stream position: it
resumes on any number of ranks (docs/distributed.md says what "bit-identical" means across world sizes).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist

from saeforge.data.activation_reader import read_activations
from saeforge.data.activation_stream import LiveActivations
from saeforge.distributed.batch import batch_sharded_over
from saeforge.distributed.process_group import (
    Ranks,
    all_gather_object,
    broadcast_object,
    leave_together,
    on_main,
    start,
    stop,
    together,
)
from saeforge.errors import SaeforgeError
from saeforge.saes import SAE, TrainOutput
from saeforge.saes.batchtopk import BatchTopKSAE
from saeforge.training.checkpoint import read_checkpoint
from saeforge.training.config import TrainConfig, resolve_config
from saeforge.training.run_dir import open_run, record_data
from saeforge.training.scaling import scaler_from_dict
from saeforge.training.trainer import Trainee, Trainer
from saeforge.utils.finite import all_finite
from saeforge.utils.threads import thread_policy

__all__ = ["DataParallelTrainer", "ModuleParallelTrainer", "data_parallel_problem", "train_distributed"]

# Fields that may differ between ranks: they change neither what is computed nor what is written.
RANK_FREE_FIELDS = ("threads", "progress")

def data_parallel_problem(sae: SAE) -> str | None:
    """Why ``sae`` cannot be trained data-parallel with the result of one process, or None when it can."""
    name = sae.architecture
    # BatchTopK and its forms (Matryoshka, transcoder, crosscoder) choose the batch's N·k largest over the ranks
    # (saeforge.distributed.batch); the cross-layer transcoder selects in its own code, which does not
    if (getattr(sae, "batch_selection", False) and not isinstance(sae, BatchTopKSAE)) or getattr(
            sae, "code", None) == "batchtopk":
        return f"{name} keeps the largest N·k activations of the whole batch, a selection no rank can make alone"
    return None


# Statistics of its batch that an SAE keeps from its training forward for its after_step (HSAE: each level's mean L0,
# which its sparsity coefficients follow). Means over equal slices: their mean over the ranks is the global batch's.
BATCH_MEAN_STATISTICS = ("_step_level_l0",)


class _RankedTrainer(Trainer):
    """What data- and module-parallel training share: the device of the rank, one writer, rank 0's start state."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, run_info: dict[str, Any], ranks: Ranks):
        self.ranks = ranks
        self.writes_run_dir = ranks.is_main
        self.world_size, self.parallel_mode = ranks.world_size, cfg.parallel
        super().__init__(cfg, run_dir, run_info)

    def _device(self) -> torch.device:
        return self.ranks.device

    def _build_trainees(self) -> None:
        together(super()._build_trainees)
        # Rank 0's initial SAEs and input normalisation for all (the first fill is the same data on every rank, but
        # a model on another GPU may compute it with other rounding).
        for t in self.trainees:
            for tensor in t.sae.state_dict().values():
                dist.broadcast(tensor, src=0)
            t.scaler = scaler_from_dict(broadcast_object(t.scaler.to_dict()))

    def _read_checkpoint(self, path: Path) -> dict[str, Any] | None:
        # rank 0 reads it (on the CPU, so the tensors travel) and sends it to the others: no shared file system needed
        return on_main(lambda: read_checkpoint(path, torch.device("cpu")))

    def _save_checkpoint(self) -> None:
        if self.writes_run_dir:
            super()._save_checkpoint()

    def _finish(self, last: dict[str, Any] | None) -> dict[str, Any]:
        return on_main(lambda: Trainer._finish(self, last))

    def fit(self) -> dict[str, Any]:
        final = super().fit()
        dist.barrier()
        return final


class DataParallelTrainer(_RankedTrainer):
    """Every SAE on every rank, each rank its slice of every global batch."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, run_info: dict[str, Any], ranks: Ranks):
        super().__init__(cfg, run_dir, run_info, ranks)
        self.local_batch = cfg.batch_size // ranks.world_size
        self._input_finite: torch.Tensor | None = None

    def _build_trainees(self) -> None:
        super()._build_trainees()
        for t in self.trainees:  # the same SAEs on every rank, so the same answer everywhere
            problem = data_parallel_problem(t.sae)
            if problem:
                raise SaeforgeError(f"SAE {t.name!r} cannot be trained data-parallel: {problem}",
                                    "train it module-parallel (add --parallel module) or in one process")

    def _make_source(self):
        source = super()._make_source()
        if isinstance(source, LiveActivations):  # the model's work on a fill is shared too
            return SharedLiveActivations(source, self.ranks)
        return source

    def _batches(self) -> Iterator[dict[str, torch.Tensor]]:
        lo = self.ranks.rank * self.local_batch
        for batch in self.stream:
            yield {site: x[lo:lo + self.local_batch] for site, x in batch.items()}

    def _check_input(self, x: torch.Tensor, t: Trainee) -> None:
        # reported in the collective of _backward; one aminmax pass, as the one-process trainer checks
        self._input_finite = torch.tensor(all_finite(x), device=x.device)

    def _backward(self, t: Trainee, out: TrainOutput, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        world, rank = self.ranks.world_size, self.ranks.rank
        loss_finite = torch.isfinite(out.loss.detach())
        if bool(loss_finite) and bool(self._input_finite):
            out.loss.backward()
        params = list(t.sae.parameters())
        # one buffer, one all-reduce: gradients, which parameters have one, the latents that fired, and each rank's
        # [input finite, loss finite, loss] in its own slots
        status = torch.zeros(3 * world, dtype=torch.float32, device=self.device)
        status[3 * rank:3 * rank + 3] = torch.stack([(~self._input_finite).float(), (~loss_finite).float(),
                                                     torch.nan_to_num(out.loss.detach().float(), nan=0.0,
                                                                      posinf=0.0, neginf=0.0)])
        # summed in float32, or float64 for a float64 SAE (whose gradients float32 would round)
        wide = functools.reduce(torch.promote_types, (p.dtype for p in params), torch.float32)
        parts = [p.grad.reshape(-1).to(wide) if p.grad is not None else p.new_zeros(p.numel(), dtype=wide)
                 for p in params]
        has_grad = torch.tensor([float(p.grad is not None) for p in params], dtype=wide, device=self.device)
        buffer = torch.cat([*parts, has_grad, out.fired.to(wide).to(self.device), status.to(wide)])
        dist.all_reduce(buffer)
        status = buffer[-3 * world:].view(world, 3)
        for r in range(world):
            if status[r, 0] > 0:
                raise SaeforgeError(
                    f"NaN or Inf in the activations at site {', '.join(t.binding.reads)!r} in rank {r}'s share of "
                    f"the batch of step {self.step}",
                    f"check the activation source; the last good checkpoint ({self.checkpoint_path}) is intact and "
                    f"`torchrun ... -m saeforge train --resume {self.run_dir}` continues from it")
            if status[r, 1] > 0:
                raise SaeforgeError(
                    f"the loss of SAE {t.name!r} became non-finite on rank {r} at step {self.step}",
                    f"lower the learning rate (--lr); the last good checkpoint ({self.checkpoint_path}) is intact")
        offset = 0
        counts = buffer[sum(p.numel() for p in params):][:len(params)]
        for p, count in zip(params, counts):
            n = p.numel()
            if count > 0:
                p.grad = (buffer[offset:offset + n] / world).view_as(p).to(p.dtype)
            offset += n
        fired = buffer[offset + len(params):offset + len(params) + out.fired.numel()] > 0
        return fired, x.shape[0] * world

    def _step_metrics(self, t: Trainee, out: TrainOutput, reference: torch.Tensor) -> dict[str, Any]:
        """The one-process metrics of the global batch: means of the ranks' loss terms and L0, FVU from summed
        squared errors and sums of the reference (float64)."""
        world = self.ranks.world_size
        with torch.no_grad():
            ref = reference.double()
            names = list(out.terms)
            scalars = torch.tensor([float(out.loss.detach()), out.l0, *(float(out.terms[k].detach()) for k in names)],
                                   dtype=torch.float64, device=ref.device)
            buffer = torch.cat([scalars, (out.x_hat.double() - ref).pow(2).sum(0), ref.sum(0), ref.pow(2).sum(0)])
            dist.all_reduce(buffer)
        n = reference.shape[0] * world
        scalars, rest = buffer[:len(scalars)] / world, buffer[len(scalars):]
        sse, s1, s2 = rest.view(3, -1)
        variance = s2 - s1.pow(2) / n  # Σ over rows of (ref - mean)² per column

        def fvu(cols: slice) -> float:
            return float(sse[cols].sum() / variance[cols].sum().clamp_min(1e-12))

        metrics: dict[str, Any] = {"loss": float(scalars[0]), "l0": float(scalars[1]), "fvu": fvu(slice(None)),
                                   **{f"loss_{k}": float(v) for k, v in zip(names, scalars[2:])}}
        widths = getattr(t.scaler, "widths_out", ())
        if len(widths) > 1:
            starts = [sum(widths[:i]) for i in range(len(widths))]
            metrics["fvu_sites"] = [fvu(slice(s, s + w)) for s, w in zip(starts, widths)]
        return metrics

    def _after_step_input(self, t: Trainee, x: torch.Tensor) -> torch.Tensor:
        # the batch statistics after_step reads, over the global batch; and after_step is the SAE's own dead-latent
        # handling: it reads the batch only when there are dead latents (the same on every rank), so the batch is
        # gathered only then
        for attr in BATCH_MEAN_STATISTICS:
            statistic = getattr(t.sae, attr, None)
            if statistic is not None:
                dist.all_reduce(statistic)
                statistic.div_(self.ranks.world_size)
        if type(t.sae).after_step is SAE.after_step or not bool(t.tracker.dead_mask.any()):
            return x
        parts = [torch.empty_like(x) for _ in range(self.ranks.world_size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    def _save_checkpoint(self) -> None:
        digests = [hashlib.sha1(b"".join(v.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()
                                         for v in t.sae.state_dict().values())).hexdigest() for t in self.trainees]
        if len(set(map(tuple, all_gather_object(digests)))) > 1:
            raise SaeforgeError(f"the ranks' copies of the SAEs differ at step {self.step}",
                                "this is a saeforge bug: report it; the last checkpoint is intact, resume it in one "
                                f"process with `saeforge train --resume {self.run_dir}`")
        super()._save_checkpoint()

    def fit(self) -> dict[str, Any]:
        with batch_sharded_over(self.ranks.world_size):
            return super().fit()


class SharedLiveActivations(LiveActivations):
    """The live model's fills, each rank running the model on its block of the fill's contexts and the blocks
    all-gathered, so every rank holds the whole fill (the same rows, in the same order, as one process computes)."""

    def __init__(self, source: LiveActivations, ranks: Ranks):
        self.__dict__.update(source.__dict__)
        self.ranks = ranks

    def fill(self, index: int) -> dict[str, torch.Tensor] | None:
        if self._last is not None and self._last[0] == index:
            return self._last[1]
        plan = self.fill_plan(index)  # tokenizing: every rank, cheap
        if plan is None:
            return None
        ids, offset, count = plan
        per_rank = -(-ids.shape[0] // self.ranks.world_size)
        lo, hi = min(self.ranks.rank * per_rank, ids.shape[0]), min((self.ranks.rank + 1) * per_rank, ids.shape[0])
        parts: dict[str, list[torch.Tensor]] = {s: [] for s in self.sites}
        for b in range(lo, hi, self.batch_contexts):
            batch = read_activations(self.lm, self.tokens, ids[b:min(b + self.batch_contexts, hi)], self.site_objs,
                                     dtype=self.dtype)
            for s, act in batch.acts.items():
                parts[s].append(act)
        data = {s: _all_gather_rows(torch.cat(p) if p else None, self.dtype or self.lm.dtype,
                                    self.lm.device)[offset:offset + count] for s, p in parts.items()}
        self._last = (index, data)
        return data


def _all_gather_rows(mine: torch.Tensor | None, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every rank's rows ``[n_r, d]``, in rank order (ranks may hold different numbers of rows, or none)."""
    shapes = all_gather_object(None if mine is None else tuple(mine.shape))
    d = next(shape[1] for shape in shapes if shape is not None)
    counts = [0 if shape is None else shape[0] for shape in shapes]
    padded = torch.zeros(max(counts), d, dtype=dtype, device=device)
    if mine is not None:
        padded[:mine.shape[0]] = mine
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, counts)])


class ModuleParallelTrainer(_RankedTrainer):
    """Each rank trains its share of the SAEs on whole batches; rank 0 gathers them to checkpoint and save."""

    def _build_trainees(self) -> None:
        super()._build_trainees()
        if len(self.trainees) < self.ranks.world_size:
            raise SaeforgeError(f"module-parallel training of {len(self.trainees)} SAE(s) over {self.ranks.world_size} "
                                "ranks would leave a rank idle",
                                f"start at most {len(self.trainees)} ranks (`torchrun --nproc-per-node "
                                f"{len(self.trainees)} ...`), or share each batch with --parallel data")
        self.owner = balanced_owners([sum(p.numel() for p in t.sae.parameters()) for t in self.trainees],
                                     self.ranks.world_size)

    def _trained_here(self) -> list[Trainee]:
        return [t for t, owner in zip(self.trainees, self.owner) if owner == self.ranks.rank]

    def _train_step(self, batch: dict[str, torch.Tensor]) -> None:
        # a rank's error (NaN, a diverged loss) stops every rank with it, before anyone waits in another collective
        together(lambda: super(ModuleParallelTrainer, self)._train_step(batch))

    def _sae_records(self) -> dict[str, dict[str, Any]]:
        mine = {name: record for name, record in super()._sae_records().items()
                if name in {t.name for t in self._trained_here()}}
        merged = {name: record for part in all_gather_object(mine) for name, record in part.items()}
        return {t.name: merged[t.name] for t in self.trainees}

    def _gather_on_main(self) -> None:
        """Rank 0's copy of every SAE takes its owner's weights, optimiser, scheduler and dead-latent counter."""
        mine = {t.name: {"model": {k: v.cpu() for k, v in t.sae.state_dict().items()},
                         "optimizer": t.optimizer.state_dict(), "scheduler": t.scheduler.state_dict(),
                         "tokens_since_fired": t.tracker.tokens_since_fired.cpu()} for t in self._trained_here()}
        parts: list[Any] = [None] * self.ranks.world_size
        dist.gather_object(mine, parts if self.ranks.is_main else None, dst=0)
        if not self.ranks.is_main:
            return
        by_name = {t.name: t for t in self.trainees}
        for part in parts[1:]:
            for name, s in part.items():
                t = by_name[name]
                t.sae.load_state_dict(s["model"])
                t.optimizer.load_state_dict(s["optimizer"])
                t.scheduler.load_state_dict(s["scheduler"])
                t.tracker.tokens_since_fired.copy_(s["tokens_since_fired"])

    def _save_checkpoint(self) -> None:
        self._gather_on_main()
        super()._save_checkpoint()

    def _finish(self, last: dict[str, Any] | None) -> dict[str, Any]:
        self._gather_on_main()
        return super()._finish(last)


def balanced_owners(sizes: list[int], world_size: int) -> list[int]:
    """The rank of each SAE: largest first onto the least-loaded rank (ties: the lower rank), so the parameters
    (memory and work) spread evenly; a function of the sizes alone, so every rank computes the same."""
    load = [0] * world_size
    owner = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += sizes[i]
    return owner


def _check_same_config(cfg: TrainConfig) -> None:
    mine = {k: v for k, v in cfg.to_dict().items() if k not in RANK_FREE_FIELDS}
    everyone = all_gather_object(mine)
    for r, theirs in enumerate(everyone):
        diffs = [f"{k}: rank 0 {everyone[0].get(k)!r}, rank {r} {theirs.get(k)!r}"
                 for k in sorted(set(theirs) | set(everyone[0])) if theirs.get(k) != everyone[0].get(k)]
        if diffs:
            raise SaeforgeError("the ranks were started with different training configs:\n    " + "\n    ".join(diffs),
                                "start every rank with the same options: torchrun runs one command line on every "
                                "rank (`torchrun --nproc-per-node N -m saeforge train ...`); on several machines give "
                                "each the same command and config file")


def _check_batch_split(cfg: TrainConfig, world_size: int) -> None:
    if cfg.parallel == "data" and cfg.batch_size % world_size:
        lower = cfg.batch_size // world_size * world_size
        raise SaeforgeError(
            f"--batch-size {cfg.batch_size} does not split evenly over {world_size} ranks (data-parallel training "
            "gives every rank the same share of each batch)",
            f"pass --batch-size {lower or world_size} or {lower + world_size} (a multiple of {world_size}), "
            "or start a number of ranks that divides it")


def _trainer_class(parallel: str) -> type[_RankedTrainer]:
    if parallel == "latent":
        from saeforge.distributed.latent import LatentParallelTrainer

        return LatentParallelTrainer
    return DataParallelTrainer if parallel == "data" else ModuleParallelTrainer


def train_distributed(cfg: TrainConfig, given: list[str]) -> dict[str, Any]:
    """:func:`saeforge.training.train` on one rank of a torchrun launch; every rank calls it with the same options
    and gets the final metrics."""
    ranks = start(cfg.device)
    try:
        def check() -> TrainConfig:
            resolved = resolve_config(cfg, given)
            resolved.validate()
            return resolved

        resolved = together(check)
        _check_same_config(resolved)  # every rank sees every config: the same verdict everywhere
        with contextlib.ExitStack() as held:
            def open_on_main() -> tuple[TrainConfig, str, dict[str, Any]]:
                run_cfg, run_dir, info = held.enter_context(open_run(resolved, given))  # rank 0 holds the lock
                return run_cfg, str(run_dir), info

            run_cfg, run_dir, info = on_main(open_on_main)
            together(lambda: _check_batch_split(run_cfg, ranks.world_size))
            trainer_class = _trainer_class(run_cfg.parallel)
            with thread_policy(run_cfg.threads):
                trainer = together(lambda: trainer_class(run_cfg, Path(run_dir), info, ranks))
                data_infos = all_gather_object(trainer.data_info)
                if any(d != data_infos[0] for d in data_infos):
                    raise SaeforgeError("the ranks read different data: " + "; ".join(
                        f"rank {r}: {d}" for r, d in enumerate(data_infos)),
                        "give every rank the same --cache (or model and corpus), on a file system they share")
                on_main(lambda: record_data(Path(run_dir), info, trainer.data_info))
                final = trainer.fit()
                leave_together()
                return final
    finally:
        stop(ranks)
