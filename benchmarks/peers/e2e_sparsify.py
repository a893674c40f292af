"""End-to-end worker for sparsify (run in its own venv by benchmarks/end_to_end.py): model → TopK SAE with
sparsify's own ``Trainer`` on layer index 5, timed around ``fit()`` (tokenization happens before, untimed)."""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


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
    from sparsify import SparseCoderConfig, Trainer, TrainConfig
    from sparsify.data import chunk_and_tokenize
    from transformers import AutoModelForCausalLM, AutoTokenizer

    texts = json.load(open(args.texts))
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    data = chunk_and_tokenize(datasets.Dataset.from_dict({"text": texts}), tok, max_seq_len=args.context, num_proc=1)
    n_ctx = args.tokens // args.context
    data = data.select(range(min(n_ctx, len(data))))
    model = AutoModelForCausalLM.from_pretrained(args.model_dir)
    cfg = TrainConfig(SparseCoderConfig(num_latents=args.d_sae, k=args.k), batch_size=4096 // args.context,
                      layers=[5], log_to_wandb=False, save_dir=os.path.join(args.out, "sparsify"))
    trainer = Trainer(cfg, data, model)
    t = time.perf_counter()
    trainer.fit()
    dt = time.perf_counter() - t
    tokens = len(data) * args.context
    print("@@E2E " + json.dumps({"tool": "sparsify", "version": version("eai-sparsify"), "seconds": dt,
                                 "tokens": tokens, "tokens_per_s": tokens / dt,
                                 "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                                 "sae_dir": os.path.join(args.out, "sparsify")}))


if __name__ == "__main__":
    main()
