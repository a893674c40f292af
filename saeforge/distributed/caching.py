"""``saeforge cache`` under torchrun: the ranks share the text, each writes its own shards, rank 0 the one manifest.

The shards are the ones a single process writes (:func:`saeforge.data.activation_cache.build_cache`): the same
context ranges, cut at the same token counts, read in the same batches of contexts, so a cache built on W ranks is
the cache one process builds (shard for shard; bit for bit where the model computes a batch the same on every
rank, as on CPUs with the same thread count). Where the shards fall depends only on the tokens, so every rank first
tokenizes the text up to the target (cheap next to the model) and computes the same plan; then the ranks build the
shards in rounds, shard ``j`` on rank ``j mod W``, and after each round rank 0 records the round's shards in the
manifest, in order. A killed rank stops the round (torchrun ends the others); running the same command again
deletes what was not recorded and continues from the last complete round, on any number of ranks.

The ranks write into one folder: on several machines it must be on a file system they share.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch

from saeforge.data.activation_cache import (
    ActivationCache,
    CacheConfig,
    _append_shard,
    _open_to_extend,
    _refuse_foreign_folder,
    _write_shard,
)
from saeforge.data.activation_reader import read_activations
from saeforge.data.text_source import TextSource
from saeforge.data.token_stream import TokenStream
from saeforge.distributed.process_group import all_gather_object, leave_together, on_main, start, stop, together
from saeforge.errors import SaeforgeError
from saeforge.utils.atomic import atomic_write_json
from saeforge.utils.locking import exclusive_lock
from saeforge.utils.threads import thread_policy

__all__ = ["ShardPlan", "build_cache_distributed", "plan_shards"]


@dataclass(frozen=True)
class ShardPlan:
    """One shard to write: contexts ``[context_start, context_end)``, the first ``tokens`` kept positions of them."""

    index: int
    context_start: int
    context_end: int
    tokens: int
    truncated: bool

    def entry(self) -> dict:
        return {"name": f"{self.index:05d}", "context_start": self.context_start, "context_end": self.context_end,
                "truncated": self.truncated}


def plan_shards(token_stream: TokenStream, *, batch_size: int, shard_tokens: int, start_context: int,
                first_index: int, done_tokens: int, target: int) -> list[ShardPlan]:
    """The shards one process would write from ``start_context`` on (the rule of ``build_cache``: a shard ends after
    the batch that brings it to ``shard_tokens`` kept positions or the cache to ``target``), from the tokens alone."""
    plans: list[ShardPlan] = []
    pending, shard_start, done = 0, start_context, done_tokens
    for first, input_ids in token_stream.batches(batch_size, start=start_context):
        pending += int(token_stream.keep_mask(input_ids).sum())
        end = first + int(input_ids.shape[0])
        if pending >= shard_tokens or done + pending >= target:
            need = target - done
            plans.append(ShardPlan(first_index + len(plans), shard_start, end, min(pending, need), pending > need))
            done += min(pending, need)
            pending, shard_start = 0, end
            if done >= target:
                return plans
    raise SaeforgeError(f"the corpus ran out after {done + pending} of the {target} tokens asked for",
                        f"ask for at most {done + pending} tokens (--tokens), or use a larger corpus")


def _read_shard(lm, token_stream: TokenStream, sites, plan: ShardPlan, batch_size: int):
    acts: dict[str, list[torch.Tensor]] = {s.name: [] for s in sites}
    tokens = []
    for first, input_ids in token_stream.batches(batch_size, start=plan.context_start):
        if first >= plan.context_end:
            break
        batch = read_activations(lm, token_stream, input_ids, sites, dtype=lm.dtype)
        for name, act in batch.acts.items():
            acts[name].append(act)
        tokens.append(batch.tokens)
    return ({name: torch.cat(parts)[:plan.tokens] for name, parts in acts.items()},
            torch.cat(tokens)[:plan.tokens])


def build_cache_distributed(cfg: CacheConfig, progress: bool | None = None) -> ActivationCache:
    """:func:`saeforge.data.activation_cache.build_cache` on one rank of a torchrun launch (every rank calls it with
    the same options)."""
    from tqdm.auto import tqdm

    from saeforge.models.language_model import LanguageModel

    ranks = start(cfg.device)
    folder = Path(cfg.out)
    try:
        def check() -> None:
            cfg.validate()
            _refuse_foreign_folder(folder)

        together(check)
        everyone = all_gather_object(cfg)
        if any(other != everyone[0] for other in everyone):
            raise SaeforgeError("the ranks were started with different cache options",
                                "start every rank with the same command line "
                                "(`torchrun --nproc-per-node N -m saeforge cache ...`)")
        with contextlib.ExitStack() as held, thread_policy(cfg.threads):
            lm = together(lambda: LanguageModel.load(cfg.model, dtype=cfg.model_dtype, device=str(ranks.device)))
            sites = [lm.site(s) for s in cfg.sites]
            token_stream = TokenStream.for_model(TextSource(cfg.corpus, cfg.text_field), lm, cfg.token_policy())
            manifest_path = folder / "manifest.json"

            def open_on_main() -> dict:
                held.enter_context(exclusive_lock(folder, "saeforge cache"))  # rank 0 holds it to the end
                manifest, _, _ = _open_to_extend(cfg, lm, sites, folder)
                manifest["complete"] = manifest["token_count"] >= cfg.tokens
                atomic_write_json(manifest_path, manifest)
                return manifest

            manifest = on_main(open_on_main)
            if not manifest["complete"]:
                start_context = manifest["shards"][-1]["context_end"] if manifest["shards"] else 0
                plans = together(lambda: plan_shards(
                    token_stream, batch_size=cfg.batch_size, shard_tokens=cfg.shard_tokens,
                    start_context=start_context, first_index=len(manifest["shards"]),
                    done_tokens=manifest["token_count"], target=cfg.tokens))
                _build_rounds(cfg, folder, manifest, plans, lm, token_stream, sites, ranks,
                              tqdm(total=cfg.tokens, initial=manifest["token_count"], unit="tok", unit_scale=True,
                                   desc=f"caching on {ranks.world_size} ranks", dynamic_ncols=True,
                                   disable=not ((cfg.progress if progress is None else progress) and ranks.is_main)))
            leave_together()
            return ActivationCache(folder)
    finally:
        stop(ranks)


def _build_rounds(cfg, folder, manifest, plans, lm, token_stream, sites, ranks, bar) -> None:
    shards_dir = folder / "shards"
    manifest_path = folder / "manifest.json"
    with bar:
        for round_start in range(0, len(plans), ranks.world_size):
            mine = round_start + ranks.rank
            entry = None
            if mine < len(plans):
                plan = plans[mine]

                def build() -> dict:
                    acts, tokens = _read_shard(lm, token_stream, sites, plan, cfg.batch_size)
                    return _write_shard(shards_dir, plan.entry(), acts, cfg.model_dtype, tokens)

                entry = together(build)
            else:
                together(lambda: None)  # this round has no shard for this rank; it still takes part in the check
            entries = all_gather_object(entry)
            if ranks.is_main:
                for e in entries:
                    if e is not None:
                        _append_shard(manifest, manifest_path, e)
                        bar.update(e["tokens"])
    on_main(lambda: None)  # the manifest is complete before any rank returns
