"""End-to-end worker for SAELens (run in its own venv by benchmarks/end_to_end.py): model → TopK SAE with
SAELens's own runner (HF route, the hook after decoder layer 6, early-stopped forward), timed around ``run()``."""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--texts", required=True, help="JSON list of documents")
    ap.add_argument("--tokens", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--d-sae", type=int, default=4608)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--context", type=int, default=128)
    args = ap.parse_args()

    import datasets
    from importlib.metadata import version
    from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, LoggingConfig
    from sae_lens import TopKTrainingSAEConfig

    texts = json.load(open(args.texts))
    cfg = LanguageModelSAERunnerConfig(
        sae=TopKTrainingSAEConfig(d_in=576, d_sae=args.d_sae, k=args.k),
        model_class_name="AutoModelForCausalLM", model_name=args.model_dir, hook_name="model.layers.5",
        dataset_path="shakespeare", is_dataset_tokenized=False, streaming=False, context_size=args.context,
        training_tokens=args.tokens, train_batch_size_tokens=4096, n_batches_in_buffer=64, lr_end=3e-5,
        exclude_special_tokens=True, logger=LoggingConfig(log_to_wandb=False), device="cpu",
        checkpoint_path=os.path.join(args.out, "checkpoints"), output_path=os.path.join(args.out, "output"),
        verbose=False)
    runner = LanguageModelSAETrainingRunner(cfg, override_dataset=datasets.Dataset.from_dict({"text": texts}))
    t = time.perf_counter()
    sae = runner.run()
    dt = time.perf_counter() - t
    sae.save_model(os.path.join(args.out, "sae"))
    print("@@E2E " + json.dumps({"tool": "saelens", "version": version("sae-lens"), "seconds": dt,
                                 "tokens": args.tokens, "tokens_per_s": args.tokens / dt,
                                 "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                                 "sae_dir": os.path.join(args.out, "sae")}))


if __name__ == "__main__":
    main()
