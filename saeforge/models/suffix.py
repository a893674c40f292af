"""Forwards that start part-way through the model, from hidden states cached by an earlier pass.

Evaluation runs several forwards of one batch that differ only from one site on (the clean model, the SAE spliced
in, the site zero- or mean-ablated). Everything before the first edited block is the same in all of them, so it is
computed once (:func:`read_block_inputs`, an early-stopped forward) and each later forward runs only the blocks from
there on (:func:`logits_from`, or :func:`skipping_blocks` around any forward).

How: while :func:`skipping_blocks` is in force, the blocks before ``start`` are stubs that return the cached hidden
states in the block's own output format (a tensor, or the tuple older transformers versions return). The rest of
the model's forward runs as usual: the embedding, the rotary position embeddings and the attention masks are
recomputed (they are cheap), every block from ``start`` on and the final norm and unembedding run on exactly the
tensors the full forward gives them, so the logits equal the full forward's **bit for bit** (tested for every
family, with and without padding and with edits in the suffix). Edits and reads through
:meth:`~saeforge.models.language_model.LanguageModel.edit` apply as usual at sites from block ``start`` on, and at
the output of block ``start − 1`` (``layers.{start-1}.resid_post``: forward hooks on a stub see the cached output).
A hook anywhere else in the skipped blocks would silently do nothing, so it is refused.

Which block to start from for a site: :func:`first_block`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import torch

from saeforge.errors import SaeforgeError
from saeforge.models.sites import Site


@dataclass(frozen=True)
class BlockInput:
    """The hidden states entering block ``start`` for one batch, i.e. the output of block ``start − 1``."""

    start: int
    """The first block a forward from here runs (0: nothing is skipped, ``hidden`` is None)."""
    hidden: torch.Tensor | None
    """``[batch, seq, d_model]``, on the model's device and in its dtype."""
    input_ids: torch.Tensor
    """The batch the hidden states belong to (on the model's device)."""
    attention_mask: torch.Tensor | None
    rest: tuple | None = None
    """The other elements of block ``start − 1``'s output when the block returns a tuple (older transformers);
    None when it returns the hidden states alone."""

    @property
    def nbytes(self) -> int:
        return 0 if self.hidden is None else self.hidden.numel() * self.hidden.element_size()

    def output(self):
        """What block ``start − 1`` returned: the hidden states, in the block's own format."""
        return self.hidden if self.rest is None else (self.hidden,) + self.rest


def first_block(lm, sites: Iterable[str | Site]) -> int:
    """The first block a forward must run for edits and reads at every site of ``sites`` to take effect.

    ``resid_pre``/``attn_out``/``mlp_out`` of layer L and raw modules inside block L: L. ``resid_post`` of L (the
    block's output, also as a raw module path): L + 1, since a stub's output hooks see the cached value. A site
    outside the blocks (the embedding; a model without a known family): 0. The final norm or the unembedding:
    ``n_layers``.
    """
    starts = [_first_block(lm, s if isinstance(s, Site) else lm.site(s)) for s in sites]
    if not starts:
        raise SaeforgeError("no sites given", "pass the sites the forward edits or reads, e.g. ['layers.5.mlp_out']")
    return min(starts)


def _first_block(lm, site: Site) -> int:
    fam = lm.family
    if fam is None:
        return 0
    if site.layer is None:
        after = {fam.final_norm, "lm_head"}
        return lm.n_layers if site.module_path in after or site.module_path.startswith(fam.final_norm + ".") else 0
    if site.hook == "output" and site.module_path == lm._block_path(site.layer):
        return site.layer + 1
    return site.layer


def _check_starts(lm, starts: Iterable[int]) -> list[int]:
    out = sorted({int(s) for s in starts})
    if not out:
        raise SaeforgeError("no block to start from given", "pass starts=[first_block(lm, sites)]")
    for s in out:
        if not 0 <= s <= lm.n_layers:
            raise SaeforgeError(f"block {s} does not exist: the model has blocks 0..{lm.n_layers - 1} "
                                f"(a forward may start from 0 to {lm.n_layers})",
                                "use saeforge.models.suffix.first_block(lm, sites) to choose the block")
    if out[-1] > 0 and lm.family is None:
        raise SaeforgeError(f"saeforge does not know where the blocks of a {lm.model_type} model are, so a forward "
                            "cannot start part-way through it", "start from block 0 (the full forward)")
    return out


@torch.inference_mode()
def read_block_inputs(lm, input_ids: torch.Tensor, starts: Iterable[int], sites: Sequence[str | Site] = (),
                      attention_mask: torch.Tensor | None = None
                      ) -> tuple[dict[int, BlockInput], dict[str, torch.Tensor]]:
    """One forward of ``input_ids`` that stops once it has the input of every block in ``starts`` and the
    activations at ``sites`` (which may lie before or after those blocks). Edits in force apply.

    Returns ``({start: BlockInput}, {site name: activation [batch, seq, d]})``.
    """
    starts = _check_starts(lm, starts)
    ids = input_ids.to(lm.device)
    mask = attention_mask.to(lm.device) if attention_mask is not None else None
    # the input of block s is the output of block s − 1, i.e. the site layers.{s-1}.resid_post; a hook beside the
    # read keeps the rest of the block's output when it is a tuple
    block_sites = {s: lm.site(f"layers.{s - 1}.resid_post") for s in starts if s > 0}
    rests: dict[int, tuple | None] = {}

    def format_hook(start: int):
        def hook(module, args, output):
            rests.setdefault(start, tuple(output[1:]) if isinstance(output, tuple) else None)

        return hook

    resolved = lm._resolve(sites)
    handles = [lm._modules[site.module_path].register_forward_hook(format_hook(s)) for s, site in block_sites.items()]
    try:
        wanted = list(block_sites.values()) + resolved
        acts = lm.read(ids, wanted, attention_mask=mask) if wanted else {}
    finally:
        for h in handles:
            h.remove()
    inputs = {s: BlockInput(s, acts[site.name], ids, mask, rests.get(s)) for s, site in block_sites.items()}
    if 0 in starts:
        inputs[0] = BlockInput(0, None, ids, mask)
    return inputs, {site.name: acts[site.name] for site in resolved}


def _skipped_hooks(lm, start: int) -> list[str]:
    """Hooks (other than transformers' own output recorders) that the stubs of blocks 0..start−1 would bypass."""
    last = lm._block_path(start - 1)
    blocks = {lm._block_path(i) for i in range(start)}
    inside = tuple(b + "." for b in blocks)
    found = []
    for path, module in lm._modules.items():
        if not (path in blocks or path.startswith(inside)):
            continue
        hooks = [("input", h) for h in module._forward_pre_hooks.values()]
        if path != last:  # the last stub's output hooks run on the cached output: resid_post of start − 1
            hooks += [("output", h) for h in module._forward_hooks.values()]
        for where, fn in hooks:
            if not (getattr(fn, "__module__", "") or "").startswith("transformers"):
                found.append(f"{where} of {path}")
    return found


@contextlib.contextmanager
def skipping_blocks(lm, block_input: BlockInput) -> Iterator[None]:
    """Inside the block, every forward of ``lm`` skips blocks ``0 .. start − 1``: they return
    ``block_input``'s cached hidden states. The forward must be of the same batch (``block_input.input_ids``)."""
    start = _check_starts(lm, [block_input.start])[0]
    if start == 0:
        yield
        return
    bypassed = _skipped_hooks(lm, start)
    if bypassed:
        raise SaeforgeError(f"an edit or read at the {bypassed[0]} lies in blocks 0..{start - 1}, which this forward "
                            "skips: it would not take effect",
                            "start from an earlier block: read_block_inputs(lm, ids, [first_block(lm, sites)])")
    output = block_input.output()
    shape = tuple(block_input.hidden.shape)

    def first_stub(*args, **kwargs):
        x = args[0] if args else kwargs.get("hidden_states")
        if isinstance(x, torch.Tensor) and tuple(x.shape) != shape:
            raise SaeforgeError(f"the forward's hidden states have shape {tuple(x.shape)} but the cached ones "
                                f"{shape}", "run the forward on the batch the block input was read from")
        return output

    def stub(*args, **kwargs):
        return output

    blocks = [lm._modules[lm._block_path(i)] for i in range(start)]
    saved = [b.__dict__.get("forward") for b in blocks]  # an instance-level forward (accelerate's) is put back
    try:
        for i, b in enumerate(blocks):
            b.forward = first_stub if i == 0 else stub
        yield
    finally:
        for b, forward in zip(blocks, saved):
            if forward is None:
                del b.forward
            else:
                b.forward = forward


@torch.inference_mode()
def logits_from(lm, block_input: BlockInput) -> torch.Tensor:
    """Logits ``[batch, seq, vocab]`` of ``block_input``'s batch, running only blocks ``start`` on; bit-identical
    to :meth:`~saeforge.models.language_model.LanguageModel.logits` (edits in force apply, see the module
    docstring)."""
    with skipping_blocks(lm, block_input):
        return lm.logits(block_input.input_ids, block_input.attention_mask)
