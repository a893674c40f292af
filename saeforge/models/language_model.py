"""LanguageModel: a causal LM with named sites to read and edit.

Reading stops the forward pass as soon as every requested site has been seen, so caching layer 6 of a 30-layer model
costs 7 layers. Editing goes through one mechanism, :meth:`LanguageModel.edit`, that every later feature uses
(splicing an SAE in for evals, steering, clamping, flow and circuit experiments); an edit receives an
:class:`EditContext` (token ids, positions, KV-cache length, call index) captured by one pre-hook on the model, so no
feature needs hooks of its own. :meth:`LanguageModel.spliced_forward` (``saeforge.models.gradients``) is the
grad-enabled forward with SAE latents and error terms as leaves.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from saeforge.errors import SaeforgeError
from saeforge.models.loading import (
    ModelSource,
    load_model_and_tokenizer,
    parse_dtype,
    resolve_device,
    resolve_model_source,
)
from saeforge.models.sites import Site, canonical_site_names, family_for, resolve_site



@dataclass(frozen=True)
class EditContext:
    """What an edit knows about the forward call it edits, beyond the activation itself.

    During cached generation (``model.generate``) the first call sees the whole prompt and every later call only the
    new token(s); ``past_length`` and ``positions`` say where those tokens sit in the sequence.
    """

    site: Site
    """The resolved site being edited."""
    input_ids: torch.Tensor | None
    """``[batch, seq]`` token ids of this forward call (the new token(s) only in a cached generation step); None
    when the model was given embeddings instead of ids."""
    attention_mask: torch.Tensor | None
    """``[batch, past_length + seq]``: the whole sequence so far (1 = token, 0 = padding), or None (no padding)."""
    past_length: int
    """Tokens already in the KV cache before this call; this call's tokens are the sequence's columns
    ``past_length .. past_length + seq - 1`` (padding columns included)."""
    positions: torch.Tensor
    """``[batch, seq]`` position of each of this call's tokens in its own sequence, padding not counted (the first
    real token is 0, also under left padding); -1 at padding columns."""
    call: int
    """Index of this forward call among those run inside the ``edit`` block: 0 is the first (the prompt pass of a
    generation). Each block counts from its own start, so nested blocks may disagree; -1 when a submodule runs on
    its own, outside a forward of the whole model."""

    @property
    def is_generated(self) -> bool:
        """A generation step: a forward with a non-empty KV cache."""
        return self.past_length > 0

    @property
    def is_prompt(self) -> bool:
        """A forward over a sequence from its start (a plain forward, or the prompt pass of a generation)."""
        return self.past_length == 0

    @property
    def columns(self) -> torch.Tensor:
        """``[seq]`` column of each of this call's tokens in the (padded) sequence."""
        seq = self.positions.shape[-1]
        return torch.arange(self.past_length, self.past_length + seq, device=self.positions.device)


EditFn = Callable[..., "torch.Tensor | None"]
"""An edit takes the activation at a site, ``[batch, seq, d]``, and the :class:`EditContext` (or the activation alone,
for a one-parameter function) and returns the tensor to use instead, or None to leave it unchanged."""


def takes_context(fn: Callable) -> bool:
    """Whether ``fn`` is called as ``fn(x, ctx)``: it has a second positional parameter without a default (or named
    ``ctx``), or ``*args``. A second parameter with a default is the closure idiom ``lambda x, v=v: x + v`` and
    does not receive the context."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # builtins without a signature take the activation alone
        return False
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return True
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 and (positional[1].default is inspect.Parameter.empty or positional[1].name == "ctx")


@dataclass(frozen=True)
class _ForwardCall:
    """The inputs of one forward call of the top-level model, captured by :meth:`LanguageModel._capture`."""

    index: int
    input_ids: torch.Tensor | None
    attention_mask: torch.Tensor | None
    past_length: int
    positions: torch.Tensor


class _StopForward(Exception):
    """Raised from a hook once every requested site has been read; never escapes :meth:`LanguageModel.read`."""


def _first_tensor(output):
    return output[0] if isinstance(output, tuple) else output


def _replace_first(output, new: torch.Tensor):
    if isinstance(output, tuple):
        return (new,) + tuple(output[1:])
    return new


def _checked_edit(site: Site, x: torch.Tensor, new) -> torch.Tensor:
    """The edit's result, refused when it cannot stand in for ``x`` (shape, device, a non-float dtype)."""
    if not isinstance(new, torch.Tensor):
        raise SaeforgeError(f"the edit at site {site.name!r} returned a {type(new).__name__}, not a tensor",
                            f"return a tensor of shape {tuple(x.shape)} (or None to leave the activation unchanged)")
    if new.shape != x.shape:
        raise SaeforgeError(f"the edit at site {site.name!r} returned shape {tuple(new.shape)}; "
                            f"expected {tuple(x.shape)} (batch, seq, d), the activation's shape",
                            "return a tensor shaped like the activation it received, e.g. x + v for a vector v")
    if new.device != x.device:
        raise SaeforgeError(f"the edit at site {site.name!r} returned a tensor on {new.device}; the activation is "
                            f"on {x.device}", "create the edit's tensors on the model's device (lm.device)")
    if new.dtype != x.dtype:
        if not new.is_floating_point():
            raise SaeforgeError(f"the edit at site {site.name!r} returned dtype {new.dtype}; the activation is "
                                f"{x.dtype}", "return a floating-point tensor")
        new = new.to(x.dtype)
    return new


class LanguageModel:
    """A Hugging Face causal LM with sites. Build it with :meth:`load`."""

    def __init__(self, model: nn.Module, tokenizer, name: str, source: ModelSource | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.source = source
        cfg = model.config
        text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        self.model_type: str = getattr(text_cfg, "model_type", cfg.model_type)
        self.n_layers: int = int(getattr(text_cfg, "num_hidden_layers", None) or getattr(text_cfg, "n_layer"))
        self.d_model: int = int(getattr(text_cfg, "hidden_size", None) or getattr(text_cfg, "n_embd"))
        # The MLP's hidden width (the site mlp_hidden); GPT-2 leaves n_inner unset for 4 x d_model.
        self.d_mlp: int = int(getattr(text_cfg, "intermediate_size", None) or getattr(text_cfg, "n_inner", None)
                              or 4 * self.d_model)
        self.vocab_size: int = int(text_cfg.vocab_size)
        self.max_context: int | None = getattr(text_cfg, "max_position_embeddings", None) or getattr(
            text_cfg, "n_positions", None
        )
        self._modules = dict(model.named_modules())
        self._module_names = set(self._modules)
        self._forward_count = 0  # forward calls of the top-level model seen while an edit block was open
        self._forward: _ForwardCall | None = None
        self._capture_depth = 0
        self._capture_handle = None

    # ----------------------------------------------------------------------------------------------- loading
    @classmethod
    def load(cls, name: str = "embedded", *, dtype: str = "float32", device: str = "auto") -> "LanguageModel":
        """Load by name: ``embedded`` (SmolLM2-135M-Instruct), a hub id, a local HF folder or a ``.gguf`` file."""
        torch_dtype = parse_dtype(dtype)
        source = resolve_model_source(name)
        model, tokenizer = load_model_and_tokenizer(source, torch_dtype)
        model.to(device=resolve_device(device), dtype=torch_dtype)
        return cls(model, tokenizer, name, source)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def fingerprint(self, dtype: torch.dtype | None = None) -> str:
        """Identifies the weights, not the name: the converted embedded folder and the original GGUF agree.
        ``dtype``: the fingerprint the model would have if loaded in that (lower) precision."""
        h = hashlib.sha256()
        h.update(f"{self.model_type}|{self.n_layers}|{self.d_model}|{self.vocab_size}".encode())
        emb = self.model.get_input_embeddings().weight
        rounded = (lambda w: w.to(dtype)) if dtype is not None else (lambda w: w)
        h.update(rounded(emb[: min(64, emb.shape[0])].detach()).float().cpu().numpy().tobytes())
        last = self._modules.get(self._block_path(self.n_layers - 1)) if self.family else None
        if last is not None:
            for p in list(last.parameters())[:1]:
                h.update(rounded(p.detach().flatten()[:4096]).float().cpu().numpy().tobytes())
        return h.hexdigest()[:16]

    # ----------------------------------------------------------------------------------------------- sites
    @property
    def family(self):
        return family_for(self.model_type)

    def _block_path(self, layer: int) -> str:
        return f"{self.family.layers}.{layer}"

    def site(self, name: str) -> Site:
        site = resolve_site(name, model_type=self.model_type, n_layers=self.n_layers, d_model=self.d_model,
                            module_names=self._module_names)
        if site.module_path not in self._modules:
            raise SaeforgeError(
                f"site {name!r} resolves to module {site.module_path!r}, which this {self.model_type} model lacks",
                "pass a raw module path; `saeforge sites MODEL` lists the modules",
            )
        if site.d is None:
            d = self.d_mlp if site.kind == "mlp_hidden" else self._probe_width(site)
            site = Site(site.name, site.module_path, site.hook, site.kind, site.layer, d)
        return site

    def sites(self) -> list[Site]:
        """The canonical sites of this model (empty for families saeforge has no mapping for)."""
        if self.family is None:
            return []
        return [self.site(n) for n in canonical_site_names(self.n_layers)]

    def _probe_width(self, site: Site) -> int:
        ids = torch.zeros(1, 2, dtype=torch.long, device=self.device)
        return int(self.read(ids, [site])[site.name].shape[-1])

    def _resolve(self, sites: Sequence[str | Site]) -> list[Site]:
        return [s if isinstance(s, Site) else self.site(s) for s in sites]

    def check_context_length(self, context_length: int) -> None:
        if context_length < 2:
            raise SaeforgeError(f"context length {context_length} is too short", "use at least 2 tokens")
        if self.max_context is not None and context_length > self.max_context:
            raise SaeforgeError(
                f"context length {context_length} is above the model's maximum of {self.max_context} tokens",
                f"use --context-length {self.max_context} or less",
            )

    # ----------------------------------------------------------------------------------------------- hooks
    def _register(self, site: Site, fn: Callable[[torch.Tensor], torch.Tensor | None]):
        """Call ``fn`` with the site's activation; if it returns a tensor, that tensor replaces the activation."""
        module = self._modules[site.module_path]
        if site.hook == "input":

            def pre_hook(mod, args, kwargs):
                if args:
                    new = fn(args[0])
                    return None if new is None else ((new,) + tuple(args[1:]), kwargs)
                new = fn(kwargs["hidden_states"])
                return None if new is None else (args, {**kwargs, "hidden_states": new})

            return module.register_forward_pre_hook(pre_hook, with_kwargs=True)

        def hook(mod, args, output):
            new = fn(_first_tensor(output))
            return None if new is None else _replace_first(output, new)

        return module.register_forward_hook(hook)

    @contextlib.contextmanager
    def edit(self, edits: Mapping[str | Site, EditFn]) -> Iterator["LanguageModel"]:
        """Apply ``edits`` (site → function) to every forward pass inside the block, generation included.

        Each function is called as ``fn(x, ctx)`` with the activation ``x`` ``[batch, seq, d]`` and an
        :class:`EditContext`, or as ``fn(x)`` when it takes one parameter; it returns the tensor to use instead
        (same shape; a floating dtype other than the activation's is cast to it) or None to leave it unchanged.
        Edits nest: an inner ``edit`` on the same site sees the outer edit's result. Reads inside the block see
        the edited activations.
        """
        resolved = [(key if isinstance(key, Site) else self.site(key), fn) for key, fn in edits.items()]
        with self._capturing():
            first = self._forward_count
            handles = []
            try:
                for site, fn in resolved:
                    handles.append(self._register(site, self._edit_hook(site, fn, first)))
                yield self
            finally:
                for h in handles:
                    h.remove()

    def _edit_hook(self, site: Site, fn: EditFn, first_call: int) -> Callable[[torch.Tensor], torch.Tensor | None]:
        with_context = takes_context(fn)

        def run(x: torch.Tensor) -> torch.Tensor | None:
            new = fn(x, self._context(site, x, first_call)) if with_context else fn(x)
            return None if new is None else _checked_edit(site, x, new)

        return run

    def _context(self, site: Site, x: torch.Tensor, first_call: int) -> EditContext:
        call = self._forward
        if call is None:  # a submodule run on its own, outside a forward of the whole model
            positions = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
            return EditContext(site, None, None, 0, positions, -1)
        return EditContext(site, call.input_ids, call.attention_mask, call.past_length, call.positions,
                           call.index - first_call)

    @contextlib.contextmanager
    def _capturing(self) -> Iterator[None]:
        """Record the inputs of every forward call of the model while at least one edit block is open."""
        if self._capture_depth == 0:
            self._capture_handle = self.model.register_forward_pre_hook(self._capture, with_kwargs=True)
        self._capture_depth += 1
        try:
            yield
        finally:
            self._capture_depth -= 1
            if self._capture_depth == 0:
                self._capture_handle.remove()
                self._capture_handle = self._forward = None

    def _capture(self, module, args, kwargs) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        attention_mask = kwargs.get("attention_mask")
        cache = kwargs.get("past_key_values", kwargs.get("cache"))  # transformers 5 names it ``cache``
        past = int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0
        shaped = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        if shaped is None:
            self._forward = None
            return
        shape, device = shaped.shape[:2], shaped.device
        if attention_mask is not None and attention_mask.dim() == 2:
            real = attention_mask.to(device).long()
            positions = (real.cumsum(-1) - 1)[:, past:past + shape[1]]
            positions = positions.masked_fill(real[:, past:past + shape[1]] == 0, -1)
        else:
            attention_mask = None  # a prepared 4-D mask says nothing simple about padding
            positions = torch.arange(past, past + shape[1], device=device).expand(shape[0], -1)
        self._forward = _ForwardCall(self._forward_count, input_ids, attention_mask, past, positions)
        self._forward_count += 1

    @contextlib.contextmanager
    def record(self, sites: Sequence[str | Site]) -> Iterator[dict[str, torch.Tensor]]:
        """Record the activations at ``sites`` (after any edits in force) in every forward pass inside the block;
        unlike :meth:`read` the pass runs to the end. Yields the dict that fills up."""
        out: dict[str, torch.Tensor] = {}

        def record(act: torch.Tensor, ctx: EditContext) -> None:
            out[ctx.site.name] = act.detach()

        with self.edit({s: record for s in sites}):
            yield out

    # ----------------------------------------------------------------------------------------------- forward
    @torch.inference_mode()
    def read(self, input_ids: torch.Tensor, sites: Sequence[str | Site],
             attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Activations ``[batch, seq, d]`` at ``sites``; the forward pass stops once all of them are read."""
        resolved = self._resolve(sites)
        if not resolved:
            raise SaeforgeError("no sites to read", "pass at least one site, e.g. layers.5.resid_post")
        wanted = {s.name for s in resolved}
        out: dict[str, torch.Tensor] = {}
        handles = []

        def make_reader(name):
            def reader(act):
                if name not in out:
                    out[name] = act.detach()
                    if len(out) == len(wanted):
                        raise _StopForward
                return None

            return reader

        try:
            for site in resolved:
                handles.append(self._register(site, make_reader(site.name)))
            try:
                self._call(input_ids, attention_mask)
            except _StopForward:
                pass
        finally:
            for h in handles:
                h.remove()
        missing = wanted - set(out)
        if missing:
            raise SaeforgeError(f"sites {sorted(missing)} were never reached in the forward pass",
                                "check the module paths")
        return out

    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token logits ``[batch, seq, vocab]`` of a full forward pass (edits in force apply)."""
        return self._call(input_ids, attention_mask).logits

    def _call(self, input_ids, attention_mask):
        input_ids = input_ids.to(self.device)
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device)
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)

    def spliced_forward(self, input_ids: torch.Tensor, saes: Mapping, *, freeze: Sequence[str] = (),
                        attention_mask: torch.Tensor | None = None):
        """A forward with gradients through SAE latents and error terms at the given sites (attribution patching);
        see :func:`saeforge.models.gradients.spliced_forward`."""
        from saeforge.models.gradients import spliced_forward

        return spliced_forward(self, input_ids, saes, freeze=freeze, attention_mask=attention_mask)

    @torch.no_grad()
    def direction_logits(self, directions: torch.Tensor) -> torch.Tensor:
        """Direct effect of residual-stream directions ``[n, d_model]`` on the logits ``[n, vocab]``: through the
        final norm's scale (not its normalisation, which depends on the token) and the unembedding."""
        W_U = self.model.get_output_embeddings().weight
        d = directions.to(W_U.device, W_U.dtype)
        fam = self.family
        norm = self._modules.get(fam.final_norm) if fam else None
        if norm is not None and getattr(norm, "weight", None) is not None:
            d = d * (norm.weight + fam.norm_weight_offset)
        return d @ W_U.T

    # ----------------------------------------------------------------------------------------------- tokens
    def special_token_ids(self) -> list[int]:
        ids = set(getattr(self.tokenizer, "all_special_ids", []) or [])
        for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
            val = getattr(self.tokenizer, attr, None)
            if val is not None:
                ids.add(int(val))
        return sorted(ids)

    def bos_token_id(self) -> int | None:
        """The token that starts a context: BOS, or EOS for tokenizers without BOS (GPT-2 uses one token for both)."""
        for attr in ("bos_token_id", "eos_token_id"):
            val = getattr(self.tokenizer, attr, None)
            if val is not None:
                return int(val)
        return None
