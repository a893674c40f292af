"""SAELens side of ``benchmarks/interop.py``, run in the SAELens virtual environment (imports only SAELens, torch,
numpy). Two commands; each prints one ``@@INTEROP <json>`` line at the end.

    train  --acts A.npy --eval-rows E --out DIR ...   SAELens' own SAETrainer + TopKTrainingSAE on the first rows of
                                                      A (batches in file order), then saves the SAE twice: the
                                                      trainer's final checkpoint (save_final_checkpoint: cfg.json,
                                                      sae_weights, sparsity, trainer_state) and save_inference_model.
                                                      Writes the trained SAE's own encode of the last E rows to
                                                      DIR/encodings.npy.
    encode --acts A.npy --eval-rows E --sae DIR=OUT.npy [...]
                                                      SAE.load_from_disk(DIR).encode(last E rows) -> OUT.npy
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _protocol import eval_rows, interop_main, reply_interop  # noqa: E402


def train(args) -> None:
    from importlib.metadata import version

    from sae_lens import LoggingConfig, SAETrainer, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig

    torch.manual_seed(args.seed)
    arr = np.load(args.acts, mmap_mode="r")
    n_train = arr.shape[0] - args.eval_rows
    n_batches = n_train // args.batch
    if n_batches < 1:
        raise SystemExit(f"{args.acts}: too few rows for batch {args.batch} after holding out {args.eval_rows}")
    d_in = arr.shape[1]
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=args.d_sae, k=args.k, device="cpu",
                                                dtype="float32"))

    def provider():
        i = 0
        while True:
            j = i % n_batches
            yield torch.from_numpy(np.array(arr[j * args.batch:(j + 1) * args.batch], dtype=np.float32))
            i += 1

    args.lr = args.lr if args.lr > 0 else 2e-4 / (args.d_sae / 2**14) ** 0.5
    ckpt = os.path.join(args.out, "checkpoints")
    cfg = SAETrainerConfig(total_training_samples=args.batch * args.steps, train_batch_size_samples=args.batch,
                           lr=args.lr, lr_end=args.lr, device="cpu", checkpoint_path=ckpt,
                           save_final_checkpoint=True, logger=LoggingConfig(log_to_wandb=False))
    t0 = time.perf_counter()
    trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=provider())
    trained = trainer.fit()
    seconds = time.perf_counter() - t0
    final = sorted(os.listdir(ckpt))[-1]
    inference_dir = os.path.join(args.out, "inference")
    trained.save_inference_model(inference_dir)
    x = eval_rows(args.acts, args.eval_rows)
    with torch.no_grad():
        enc = trained.encode(x).numpy()
        mse = float(((trained.decode(trained.encode(x)) - x) ** 2).sum(-1).mean())
        var = float(((x - x.mean(0)) ** 2).sum(-1).mean())
    np.save(os.path.join(args.out, "encodings.npy"), enc)
    reply_interop({"tool": "saelens", "version": version("sae-lens"), "torch": torch.__version__,
                   "steps": args.steps, "batch": args.batch, "d_in": d_in, "d_sae": args.d_sae, "k": args.k,
                   "lr": args.lr, "train_seconds": seconds, "eval_fvu": mse / var,
                   "eval_l0": float((enc > 0).sum(1).mean()),
                   "rescale_acts_by_decoder_norm": bool(trained.cfg.rescale_acts_by_decoder_norm),
                   "checkpoint_dir": os.path.join(ckpt, final), "inference_dir": inference_dir})


def encode(args) -> None:
    from sae_lens import SAE

    x = eval_rows(args.acts, args.eval_rows)
    out = []
    for spec in args.sae:
        folder, target = spec.split("=", 1)
        sae = SAE.load_from_disk(folder, device="cpu")
        with torch.no_grad():
            enc = sae.encode(x).numpy()
        np.save(target, enc)
        out.append({"folder": folder, "class": type(sae).__name__, "architecture": sae.cfg.architecture(),
                    "metadata_hook_name": sae.cfg.metadata.hook_name})
    reply_interop({"tool": "saelens", "loaded": out})


def main() -> None:
    interop_main(train, encode, lr_help="0: 2e-4 / sqrt(d_sae / 2**14), as for the other tools")


if __name__ == "__main__":
    main()
