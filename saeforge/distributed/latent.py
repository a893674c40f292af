"""``saeforge train --parallel latent`` under torchrun: one very wide TopK SAE split over the ranks by its latents.

Each rank holds ``d_sae / W`` consecutive latents (its encoder columns and bias entries, its decoder rows; ``b_dec``
is replicated) with their Adam state and dead-latent counters, and reads whole batches. A step:

1. every rank computes its latents' pre-activations and its own top ``k`` per token (the kernels of
   :mod:`saeforge.kernels`, on its slice);
2. the local top-``k`` values are all-gathered (``[N, W·k]`` per rank) and every rank takes the same global top
   ``k`` of each row from them; each keeps the winners it owns. The global top k of a row is among the union of the
   ranks' top k's, so this is the one-process selection (Gao et al., arXiv 2406.04093) exactly, up to ties;
3. each rank decodes its winners (a partial reconstruction); an all-reduce sums the partials into ``x_hat``, whose
   backward passes the loss gradient to every rank unchanged (every rank computes the same loss from the same sum);
4. AuxK the same way over the dead latents (each rank's dead latents are its own; the per-token top ``aux_k`` is
   chosen over all ranks' candidates), so the dead-latent statistics are global by construction;
5. ``b_dec``'s gradient is summed over the ranks (its decoder-side term counted once, on rank 0), as is the squared
   gradient norm for clipping; Adam, the decoder projection and renormalisation act per latent, so on slices.

A checkpoint holds the whole SAE (gathered on rank 0 in the one-process layout), so a latent-sharded run resumes on
one process, on data-parallel ranks or on another number of latent shards, and the other way. Per rank the
training memory of an SAE of P parameters is about 4P/W (weights, gradients, two Adam moments) and the dense
``[batch, d_sae/W]`` pre-activations; at the start, at each checkpoint and at the end the whole SAE is assembled
in host memory on rank 0 (as one process would hold it; a resume scatters the slices from there), every rank builds
the whole SAE's initial weights once in host memory at the start, and rank 0 assembles it on its device at the end to
compute its feature statistics.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from saeforge.data.activation_stream import LiveActivations
from saeforge.distributed.process_group import all_gather_object, broadcast_object, on_main, together
from saeforge.distributed.training import SharedLiveActivations, _RankedTrainer
from saeforge.errors import SaeforgeError
from saeforge.kernels import SparseLatents, encode_topk
from saeforge.saes import SAE, DeadLatentTracker, TrainOutput, TrainState, make_sae
from saeforge.saes.topk import TopKConfig, TopKSAE, _fired_and_l0, auxk_loss
from saeforge.training.checkpoint import read_checkpoint
from saeforge.training.scaling import scaler_from_dict
from saeforge.training.trainer import Trainee, Trainer

__all__ = ["LATENT_DIMS", "LatentParallelTrainer", "ShardedTopKSAE", "latent_sharding_problem", "select_global_top"]

# The dimension of each parameter that runs over the latents (b_dec has none: every rank holds all of it).
LATENT_DIMS = {"W_enc": 1, "b_enc": 0, "W_dec": 0}


def latent_sharding_problem(sae: SAE, world_size: int) -> tuple[str, str] | None:
    """(problem, fix) when ``sae`` cannot be split over ``world_size`` ranks by its latents, else None."""
    if type(sae) is not TopKSAE:
        return (f"{sae.architecture} cannot be latent-sharded: only TopK SAEs (architecture topk) are; the per-token "
                "top-k is what the ranks can choose together from their own top-k's",
                "train it with --parallel data or --parallel module, or in one process")
    if sae.cfg.d_sae % world_size:
        lower = sae.cfg.d_sae // world_size * world_size
        return (f"d_sae {sae.cfg.d_sae} does not split evenly over {world_size} ranks (every rank holds the same "
                "number of latents)",
                f"pass --d-sae {lower or world_size} or {lower + world_size} (a multiple of {world_size}), or start a "
                "number of ranks that divides it")
    return None


class _SumOverRanks(torch.autograd.Function):
    """Forward: the sum of every rank's tensor. Backward: the incoming gradient as is. Every rank computes the same
    loss from the same sum, so dL/d(its part) = dL/d(sum), which it already holds."""

    @staticmethod
    def forward(ctx, part: Tensor) -> Tensor:
        total = part.detach().clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad


def select_global_top(candidates: Tensor, k: int, rank: int) -> tuple[Tensor, Tensor]:
    """Every rank passes ``candidates [N, m]`` (its best values per row, -inf for none); returns (``keep [N, m]``:
    which of this rank's candidates are among the ``k`` largest of all ranks' in their row, the top values of each
    row ``[N, min(k, W·m)]``). Every rank gets the same answer: it is computed from the same gathered tensor."""
    n, m = candidates.shape
    parts = [torch.empty_like(candidates) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, candidates.contiguous())
    top = torch.cat(parts, 1).topk(min(k, m * len(parts)), dim=1, sorted=False)
    owned = (top.indices // m == rank) & (top.values > float("-inf"))
    # positions of this rank's winners; the others go to a spare column that is dropped (two ranks' winners may share
    # a position number, so they must not be written into one column)
    where = torch.where(owned, top.indices - rank * m, torch.full_like(top.indices, m))
    keep = torch.zeros(n, m + 1, dtype=torch.bool, device=candidates.device).scatter_(1, where, owned)
    return keep[:, :m], top.values


def _at(tree: Any, path: tuple) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _put(tree: Any, path: tuple, value: Any) -> None:
    _at(tree, path[:-1])[path[-1]] = value


def _slice_shape(shape: tuple[int, ...], dim: int, world: int) -> tuple[int, ...]:
    return tuple(n // world if d == dim else n for d, n in enumerate(shape))


def _without_shards(entry: dict[str, Any], paths: list[tuple[tuple, int]]) -> dict[str, Any]:
    """A copy of a checkpoint's SAE entry without its latent-sized tensors, which ``_shards`` lists (path, latent
    dimension, shape, dtype) for scattering."""
    skeleton = {**entry, "model": dict(entry["model"]),
                "optimizer": {**entry["optimizer"], "state": {i: dict(s) for i, s in entry["optimizer"]["state"].items()}}}
    shards = []
    for path, dim in paths:
        try:
            tensor = _at(entry, path)
        except KeyError:  # an optimiser moment this Adam does not keep (max_exp_avg_sq without amsgrad), or no state yet
            continue
        shards.append((path, dim, tuple(tensor.shape), tensor.dtype))
        _put(skeleton, path, None)
    skeleton["_shards"] = shards
    return skeleton


def _winners(lat: SparseLatents, n: int, width: int, k: int, rank: int) -> tuple[SparseLatents, Tensor]:
    """This rank's entries of ``lat`` (the same number in every row, at most ``width``) that win the global per-row
    top ``k``, and the winning values of every row."""
    per_row = lat.values.numel() // n
    # float32, or the values' own wider dtype: a float64 SAE's near-ties must not round into ties
    candidates = lat.values.new_full((n, width), float("-inf"), dtype=torch.promote_types(lat.values.dtype,
                                                                                          torch.float32))
    candidates[:, :per_row] = lat.values.detach().reshape(n, per_row)
    keep, top = select_global_top(candidates, k, rank)
    keep = keep[:, :per_row].reshape(-1)
    return SparseLatents(lat.values[keep], lat.rows[keep], lat.cols[keep], lat.shape), top


class ShardedTopKSAE(TopKSAE):
    """One rank's latents of a TopK SAE: a TopK SAE of ``d_sae / W`` latents (its config, ``cfg``) whose training
    forward takes part in the distributed top-k; ``full_cfg`` is the whole SAE's. Parameters in the order and under
    the names of the whole SAE's, so its optimiser state maps one to one."""

    def __init__(self, full_cfg: TopKConfig, rank: int, world_size: int):
        d_local = full_cfg.d_sae // world_size
        local = dataclasses.replace(full_cfg, d_sae=d_local, k=min(full_cfg.k, d_local),
                                    aux_k=min(full_cfg.aux_k, d_local))
        with torch.random.fork_rng(devices=[]):  # the slice is overwritten: its random init must not use the run's RNG
            super().__init__(local)
        self.full_cfg, self.rank, self.world_size = full_cfg, rank, world_size

    def _aux_wanted(self, dead_mask: Tensor | None) -> bool:
        """Whether some rank has dead latents (then every rank takes part in the AuxK selection)."""
        if dead_mask is None or self.full_cfg.aux_k == 0 or self.full_cfg.auxk_coefficient == 0:
            return False
        any_dead = dead_mask.any().float().reshape(1).to(self.device)
        dist.all_reduce(any_dead)
        return bool(any_dead > 0)

    def training_loss(self, x: Tensor, target: Tensor | None = None, *, state: TrainState) -> TrainOutput:
        x, target = self._check_batch(x, target)
        n, full = x.shape[0], self.full_cfg
        aux_wanted = self._aux_wanted(state.dead_mask)
        local_dead = state.dead_mask.to(self.device).bool() if aux_wanted else None
        lat, aux = encode_topk(x, self.W_enc, self.b_enc, k=self.cfg.k,
                               aux_k=self.cfg.aux_k if aux_wanted and bool(local_dead.any()) else 0,
                               aux_mask=local_dead, matmul_dtype=self._matmul_dtype, impl=self.cfg.kernel,
                               b_pre=self.b_dec if self.cfg.apply_b_dec_to_input else None)
        lat, top = _winners(lat, n, self.cfg.k, full.k, self.rank)
        # b_dec's decoder-side gradient is taken once (rank 0); its encoder-side part (through b_pre) on every rank;
        # the trainer sums b_dec's gradient over the ranks
        b_dec = self.b_dec if self.rank == 0 else self.b_dec.detach()
        x_hat = _SumOverRanks.apply(self._decode_sparse(lat)) + b_dec
        terms = {"mse": self._squared_error(x_hat, target), "auxk": x_hat.new_zeros(())}
        if aux_wanted:
            if aux is None:  # no dead latent here: this rank only offers its (empty) share of the candidates
                aux = SparseLatents(x.new_zeros(0), lat.rows[:0], lat.cols[:0], lat.shape)
            aux, _ = _winners(aux, n, self.cfg.aux_k, full.aux_k, self.rank)
            e_hat = _SumOverRanks.apply(self._decode_sparse(aux))
            terms["auxk"] = auxk_loss(e_hat, (target - x_hat).detach(), target, full.auxk_coefficient)
        fired, _ = _fired_and_l0(lat)  # this rank's latents
        l0 = float((top > 0).sum()) / n  # from the winners of every rank: the same on all
        return TrainOutput(loss=sum(terms.values()), terms=terms, x_hat=x_hat, fired=fired, l0=l0)


class LatentParallelTrainer(_RankedTrainer):
    """Every SAE split over all ranks by its latents; every rank reads whole batches. Built by
    :func:`saeforge.distributed.training.train_distributed` for ``--parallel latent``."""

    def _make_source(self):
        source = super()._make_source()
        return SharedLiveActivations(source, self.ranks) if isinstance(source, LiveActivations) else source

    # ---- set-up: the whole SAEs in host memory, rank 0's slices sent out
    def _build_trainees(self) -> None:
        device, self.device = self.device, torch.device("cpu")
        try:
            together(lambda: Trainer._build_trainees(self))
        finally:
            self.device = device
        for t in self.trainees:  # the same SAEs on every rank, so the same verdict everywhere
            problem = latent_sharding_problem(t.sae, self.ranks.world_size)
            if problem:
                raise SaeforgeError(f"SAE {t.name!r}: {problem[0]}", problem[1])
        self.trainees = [self._shard(t) for t in self.trainees]

    def _shard(self, t: Trainee) -> Trainee:
        """``t`` with its SAE replaced by this rank's slice of rank 0's, and its optimiser, scheduler and dead-latent
        counter by ones for that slice."""
        rank, world = self.ranks.rank, self.ranks.world_size
        local = ShardedTopKSAE(t.sae.cfg, rank, world).to(self.device)
        with torch.no_grad():
            for name, p in local.named_parameters():
                whole = getattr(t.sae, name).detach()
                if name in LATENT_DIMS:
                    parts = [s.contiguous().to(self.device) for s in whole.chunk(world, LATENT_DIMS[name])]
                    dist.scatter(p.data, parts if rank == 0 else None, src=0)
                else:
                    p.copy_(whole)
                    dist.broadcast(p.data, src=0)
        optimizer = type(t.optimizer)(local.parameters(), **t.optimizer.defaults)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, t.scheduler.lr_lambdas[0])
        tracker = DeadLatentTracker(local.cfg.d_sae, t.tracker.threshold_tokens, device=self.device)
        scaler = scaler_from_dict(broadcast_object(t.scaler.to_dict()))
        return Trainee(t.name, t.binding, local, optimizer, scheduler, tracker, scaler)

    # ---- the step: collective checks (every rank reads the same batch, but a check must never leave a rank waiting)
    def _check_input(self, x: Tensor, t: Trainee) -> None:
        together(lambda: Trainer._check_input(self, x, t))

    def _backward(self, t: Trainee, out: TrainOutput, x: Tensor) -> tuple[Tensor, int]:
        fired, n_tokens = together(lambda: Trainer._backward(self, t, out, x))
        b_dec = t.sae.b_dec
        if b_dec.grad is None:
            b_dec.grad = torch.zeros_like(b_dec)
        dist.all_reduce(b_dec.grad)
        return fired, n_tokens

    def _clip_gradients(self, t: Trainee) -> None:
        """Clip to --grad-clip-norm by the norm of the whole SAE's gradient (torch's clip_grad_norm_ rule)."""
        if self.cfg.grad_clip_norm <= 0:
            return
        grads = {name: p.grad for name, p in t.sae.named_parameters() if p.grad is not None}
        sharded = torch.stack([g.double().pow(2).sum() for name, g in grads.items() if name in LATENT_DIMS]).sum()
        dist.all_reduce(sharded)
        replicated = sum((g.double().pow(2).sum() for name, g in grads.items() if name not in LATENT_DIMS),
                         torch.zeros((), dtype=torch.float64, device=self.device))
        norm = (sharded + replicated).sqrt()
        factor = (self.cfg.grad_clip_norm / (norm + 1e-6)).clamp(max=1.0)
        for g in grads.values():
            g.mul_(factor.to(g.dtype))

    def _sae_records(self) -> dict[str, dict[str, Any]]:
        records = super()._sae_records()
        dead = torch.stack([t.tracker.dead_mask.sum() for t in self.trainees]).double()
        dist.all_reduce(dead)
        for t, count in zip(self.trainees, dead):
            records[t.name]["dead_fraction"] = float(count) / t.sae.full_cfg.d_sae
        return records

    # ---- checkpoints and the end: the whole SAEs, in the one-process layout
    def _gather(self, tensor: Tensor, dim: int | None) -> Tensor | None:
        """The whole tensor on rank 0 (on the CPU) from every rank's slice along ``dim`` (None: rank 0's copy)."""
        if dim is None:
            return tensor.detach().cpu() if self.ranks.is_main else None
        parts = [torch.empty_like(tensor) for _ in range(self.ranks.world_size)] if self.ranks.is_main else None
        dist.gather(tensor.detach().contiguous(), parts, dst=0)
        return torch.cat(parts, dim).cpu() if self.ranks.is_main else None

    def _whole(self, t: Trainee) -> Trainee | None:
        """``t`` whole on rank 0 (SAE, Adam state, dead-latent counter; on the CPU), None on the other ranks."""
        local: ShardedTopKSAE = t.sae
        names = [name for name, _ in local.named_parameters()]
        weights = {name: self._gather(p, LATENT_DIMS.get(name)) for name, p in local.named_parameters()}
        opt = t.optimizer.state_dict()
        state = {}
        for i, (name, p) in enumerate(local.named_parameters()):
            state[i] = {key: (self._gather(v.to(p.device), LATENT_DIMS.get(name))
                              if torch.is_tensor(v) and v.shape == p.shape else v)
                        for key, v in opt["state"].get(i, {}).items()}
        counts = self._gather(t.tracker.tokens_since_fired, 0)
        if not self.ranks.is_main:
            return None
        with torch.random.fork_rng(devices=[]):
            sae = make_sae(local.full_cfg)
        sae.load_state_dict({name: weights[name] for name in names})
        optimizer = type(t.optimizer)(sae.parameters(), **t.optimizer.defaults)
        optimizer.load_state_dict({"state": {i: s for i, s in state.items() if s}, "param_groups": opt["param_groups"]})
        tracker = DeadLatentTracker(local.full_cfg.d_sae, t.tracker.threshold_tokens)
        tracker.tokens_since_fired.copy_(counts)
        return Trainee(t.name, t.binding, sae, optimizer, t.scheduler, tracker, t.scaler, t.metrics)

    def _check_replicas(self) -> None:
        """b_dec, held by every rank, must be the same everywhere (an all-reduced gradient, the same Adam)."""
        digests = [hashlib.sha1(t.sae.b_dec.detach().cpu().numpy().tobytes()).hexdigest() for t in self.trainees]
        if len(set(map(tuple, all_gather_object(digests)))) > 1:
            raise SaeforgeError(f"the ranks' copies of b_dec differ at step {self.step}",
                                "this is a saeforge bug: report it; the last checkpoint is intact, resume it in one "
                                f"process with `saeforge train --resume {self.run_dir}`")

    def _save_checkpoint(self) -> None:
        self._check_replicas()
        whole = [self._whole(t) for t in self.trainees]
        if self.ranks.is_main:
            sharded, self.trainees = self.trainees, whole
            try:
                super()._save_checkpoint()
            finally:
                self.trainees = sharded

    def _read_checkpoint(self, path) -> dict[str, Any] | None:
        """The checkpoint (written in the one-process layout) with this rank's slices in place of the whole tensors:
        rank 0 reads it and scatters the slices, so no other rank ever holds a whole SAE's state. The trainer then
        loads it into the sliced SAEs, optimisers and counters as it loads a one-process checkpoint."""
        whole: dict[str, Any] | None = None

        def skeleton_on_main() -> dict[str, Any] | None:
            nonlocal whole
            whole = read_checkpoint(path, torch.device("cpu"))
            if whole is None or whole["run_id"] != self.run_info["run_id"] or set(whole["saes"]) != {
                    t.name for t in self.trainees}:
                return whole and {k: v for k, v in whole.items() if k != "saes"} | {
                    "saes": dict.fromkeys(whole["saes"])}  # load_checkpoint refuses it, on every rank
            skeleton = {k: v for k, v in whole.items() if k != "saes"}
            skeleton["saes"] = {name: _without_shards(s, self._shard_paths(name)) for name, s in whole["saes"].items()}
            return skeleton

        state = on_main(skeleton_on_main)
        if state is None or state["run_id"] != self.run_info["run_id"] or any(
                state["saes"][name] is None for name in state["saes"]):
            return state
        world, rank = self.ranks.world_size, self.ranks.rank
        for t in self.trainees:
            for path, dim, shape, dtype in state["saes"][t.name].pop("_shards"):
                mine = torch.empty(_slice_shape(shape, dim, world), dtype=dtype, device=self.device)
                parts = None
                if rank == 0:
                    parts = [c.contiguous().to(self.device) for c in _at(whole["saes"][t.name], path).chunk(world, dim)]
                dist.scatter(mine, parts, src=0)
                _put(state["saes"][t.name], path, mine)
        return state

    def _shard_paths(self, name: str) -> list[tuple[tuple, int]]:
        """Where the latent-sized tensors of SAE ``name``'s checkpoint entry are, with their latent dimension."""
        t = next(t for t in self.trainees if t.name == name)
        names = [n for n, _ in t.sae.named_parameters()]
        paths = [(("model", n), LATENT_DIMS[n]) for n in names if n in LATENT_DIMS]
        paths += [(("optimizer", "state", i, key), LATENT_DIMS[n]) for i, n in enumerate(names) if n in LATENT_DIMS
                  for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")]
        return paths + [(("tokens_since_fired",), 0)]

    def _finish(self, last: dict[str, Any] | None) -> dict[str, Any]:
        whole = [self._whole(t) for t in self.trainees]
        if self.ranks.is_main:
            self.trainees = whole
        return super()._finish(last)
