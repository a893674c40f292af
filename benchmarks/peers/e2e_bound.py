"""The serial bound of saeforge's end to end (run by benchmarks/end_to_end.py in the main venv): the two things a
run cannot avoid, each timed on its own, over the same tokens as ``e2e_saeforge.py``'s run —

- the bare truncated forward: the HF model's own decoder with its layers cut after the site's (layer index 5) and
  no final norm, no hooks, the same dtype, contexts and batches of contexts as the run;
- the SAE step: saeforge's training step (``Trainer._train_step``: cast, scale, TopK loss, backward, Adam,
  bookkeeping) on the activations that forward produced, in the run's shuffled batches.

``bound tokens/s = tokens / (forward seconds + step seconds)``: what saeforge would reach if tokenizing, the fills'
copies and shuffles, start-up (model load, initialisation) and saving cost nothing, and the forward and the step
never overlapped. Model load, tokenizing and initialisation run untimed.
"""

from __future__ import annotations

import json
import os
import resource
import time

from e2e_saeforge import SITE, run_config


def main() -> None:
    args, cfg = run_config()

    import torch

    from saeforge.data.activation_stream import LiveActivations
    from saeforge.data.text_source import TextSource
    from saeforge.data.token_stream import TokenPolicy, TokenStream
    from saeforge.models.language_model import LanguageModel
    from saeforge.training.trainer import Trainer
    from saeforge.utils.threads import thread_policy

    site = SITE
    steps = cfg.tokens // cfg.batch_size
    with thread_policy(cfg.threads) as threads:
        lm = LanguageModel.load("embedded", dtype=args.model_dtype, device="cpu")
        tokens = TokenStream.for_model(TextSource(cfg.corpus), lm, TokenPolicy(context_length=args.context))
        # the run's plan of contexts per fill (which contexts, which of their vectors), computed the same way
        plan = LiveActivations(lm, tokens, [site], buffer_tokens=cfg.buffer_tokens, batch_size=cfg.batch_size,
                               total_batches=steps)
        base = lm.model.model  # the decoder without the LM head
        base.layers = torch.nn.ModuleList(list(base.layers)[:6])  # decoder layers 0..5: the site is layer 5's output
        base.norm = torch.nn.Identity()
        timed = {"forward": 0.0, "steps": 0.0}

        class BareForwardFills:
            """Fills of the run's vectors from the bare truncated forward, timed."""

            sites = [site]

            def __init__(self):
                self._last = None

            def fill(self, index):
                if self._last is not None and self._last[0] == index:
                    return self._last[1]
                ids, offset, count = plan.fill_plan(index)
                parts = []
                for b in range(0, ids.shape[0], plan.batch_contexts):
                    chunk = ids[b:b + plan.batch_contexts]
                    started = time.perf_counter()
                    with torch.inference_mode():
                        hidden = base(input_ids=chunk, use_cache=False).last_hidden_state
                    timed["forward"] += time.perf_counter() - started
                    parts.append(hidden[tokens.keep_mask(chunk)])
                data = {site: torch.cat(parts)[offset:offset + count]}
                self._last = (index, data)
                return data

        class BoundTrainer(Trainer):
            def _make_source(self):
                self.data_info = {}
                return BareForwardFills()

        trainer = BoundTrainer(cfg, os.path.join(args.out, "run"), run_info={"run_id": "bound"})
        trainer._build_trainees()
        batches = iter(trainer.stream)
        while trainer.step < steps:
            batch = next(batches)
            started = time.perf_counter()
            trainer._train_step(batch)
            timed["steps"] += time.perf_counter() - started
            trainer.step += 1
    n = steps * cfg.batch_size
    total = timed["forward"] + timed["steps"]
    print("@@E2E " + json.dumps({
        "tool": "serial_bound", "tokens": n, "model_dtype": args.model_dtype, "threads": threads,
        "forward_s": timed["forward"], "steps_s": timed["steps"], "seconds": total, "tokens_per_s": n / total,
        "forward_tokens_per_s": n / timed["forward"], "step_tokens_per_s": n / timed["steps"],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


if __name__ == "__main__":
    main()
