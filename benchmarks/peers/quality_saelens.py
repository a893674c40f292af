"""SAELens side of ``benchmarks/quality_cached.py``, run in the SAELens virtual environment (imports only sae_lens,
torch, numpy).

It runs SAELens's own training loop, ``SAETrainer(...).fit()``, on a ``TopKTrainingSAE`` with the trainer settings
its ``LanguageModelSAERunnerConfig`` defaults to (Adam lr 3e-4, β (0.9, 0.999), constant schedule, no warm-up,
no input normalisation), fed the cached batches in file order (the coordinator writes the file shuffled), and saves
the inference SAE with ``save_inference_model``. Prints one ``@@QUALITY <json>`` line.
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TQDM_DISABLE", "1")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _protocol import batch_at, quality_run, reply_quality  # noqa: E402


def main() -> None:
    args, arr = quality_run()

    from importlib.metadata import version

    from sae_lens import LoggingConfig, SAETrainer, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import LanguageModelSAERunnerConfig, SAETrainerConfig

    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=arr.shape[1], d_sae=args.d_sae, k=args.k, device="cpu",
                                                dtype="float32"))

    def provider():
        for step in range(args.steps + 1):  # fit() may peek one batch past the last step
            j = min(step, args.steps - 1)
            yield batch_at(arr, j, args.batch)

    runner_defaults = {f: LanguageModelSAERunnerConfig.__dataclass_fields__[f].default
                       for f in ("lr", "lr_end", "lr_scheduler_name", "lr_warm_up_steps", "lr_decay_steps",
                                 "adam_beta1", "adam_beta2", "dead_feature_window", "feature_sampling_window")}
    if runner_defaults["lr_end"] is None:  # what the runner config's __post_init__ does
        runner_defaults["lr_end"] = runner_defaults["lr"] / 10
    cfg = SAETrainerConfig(total_training_samples=args.batch * args.steps, train_batch_size_samples=args.batch,
                           device="cpu", logger=LoggingConfig(log_to_wandb=False), **runner_defaults)
    t0 = time.perf_counter()
    trained = SAETrainer(cfg=cfg, sae=sae, data_provider=provider()).fit()
    seconds = time.perf_counter() - t0
    folder = os.path.join(args.out, "sae")
    trained.save_inference_model(folder)
    reply_quality({
        "tool": "saelens", "version": version("sae-lens"), "steps": args.steps, "batch": args.batch,
        "tokens": args.steps * args.batch, "lr": cfg.lr, "optimizer": "Adam (SAETrainer)", "train_seconds": seconds,
        "sae_dir": folder})


if __name__ == "__main__":
    main()
