"""LLM back ends for automatic interpretation.

Both take a list of prompts (chat messages) and return one reply per prompt, in order:

- :class:`LocalHFBackend`: a local Hugging Face causal LM (default: the embedded SmolLM2-135M-Instruct, a weak
  explainer), batched greedy generation with the chat template, or a plain-text prompt when the tokenizer has none;
- :class:`OpenAICompatibleBackend`: any OpenAI-compatible ``/chat/completions`` endpoint (OpenAI, vLLM, Ollama, ...)
  over HTTP with the standard library. Prompts are sent as concurrent requests (``batch_size`` at a time; the chat
  API takes one conversation per request), retried with exponential back-off on connection errors, timeouts, 429
  and 5xx; an endpoint still unreachable after the retries raises a :class:`SaeforgeError`.
"""

from __future__ import annotations

import json
import os
import random
import socket
import time
import urllib.error
import urllib.request
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol, Sequence

from saeforge.errors import SaeforgeError
from saeforge.features.autointerp.prompts import Prompt, render_plain

BASE_URL_VARS = ("SAEFORGE_LLM_BASE_URL", "OPENAI_BASE_URL")
API_KEY_VARS = ("SAEFORGE_LLM_API_KEY", "OPENAI_API_KEY")
DEFAULT_BASE_URL = "https://api.openai.com/v1"
RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class Backend(Protocol):
    name: str
    """Identifies the explainer in the store, e.g. ``local:embedded`` or ``openai:gpt-4o-mini``."""

    def generate(self, prompts: Sequence[Prompt], max_new_tokens: int) -> list[str]:
        """One reply per prompt, in order."""


def _env(names: Sequence[str]) -> str:
    for n in names:
        v = os.environ.get(n, "").strip()
        if v:
            return v
    return ""


# --------------------------------------------------------------------------------------------------- local
class LocalHFBackend:
    """Greedy batched generation with a local Hugging Face causal LM (loaded by :class:`LanguageModel`)."""

    def __init__(self, model: str = "embedded", *, device: str = "auto", batch_size: int = 8, lm=None):
        if lm is None:
            from saeforge.models.language_model import LanguageModel

            lm = LanguageModel.load(model or "embedded", device=device)
        self.lm = lm
        self.tok = lm.tokenizer
        self.name = f"local:{model or lm.name}"
        self.batch_size = max(1, int(batch_size))
        self.chat = bool(getattr(self.tok, "chat_template", None))
        self.max_context = int(lm.max_context or 2048)
        self._warned = False

    def render(self, messages: Prompt) -> str:
        if self.chat:
            return self.tok.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        return render_plain(messages)

    def encode(self, messages: Prompt) -> list[int]:
        # a chat template writes its own special tokens; a plain prompt gets the tokenizer's usual BOS
        return list(self.tok(self.render(messages), add_special_tokens=not self.chat)["input_ids"])

    def count_tokens(self, messages: Prompt) -> int:
        return len(self.encode(messages))

    def prompt_budget(self, max_new_tokens: int) -> int:
        return self.max_context - max_new_tokens

    def _pad_id(self) -> int:
        pad = self.tok.pad_token_id
        if pad is None:
            pad = self.tok.eos_token_id if self.tok.eos_token_id is not None else 0
        return int(pad)

    def _batches(self, prompts: Sequence[Prompt], max_new_tokens: int):
        """Yield (prompt indices, left-padded ids, attention mask), prompts of similar length batched together."""
        import torch

        encoded = [self.encode(p) for p in prompts]
        budget = max(8, self.prompt_budget(max_new_tokens))
        for i, ids in enumerate(encoded):
            if len(ids) > budget:  # keep the end (the question); only reached when examples could not be trimmed
                if not self._warned:
                    warnings.warn(f"a prompt of {len(ids)} tokens is cut to the model's limit of {budget}",
                                  stacklevel=3)
                    self._warned = True
                encoded[i] = ids[-budget:]
        pad = self._pad_id()
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        for s in range(0, len(order), self.batch_size):
            idx = order[s:s + self.batch_size]
            width = max(len(encoded[i]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for r, i in enumerate(idx):  # left padding, so every row continues from its last column
                ids[r, width - len(encoded[i]):] = torch.tensor(encoded[i])
                mask[r, width - len(encoded[i]):] = 1
            yield idx, ids.to(self.lm.device), mask.to(self.lm.device)

    def generate(self, prompts: Sequence[Prompt], max_new_tokens: int) -> list[str]:
        import torch

        stop = [t for t in {self.tok.eos_token_id, *self._end_of_turn_ids()} if t is not None]
        out: list[str] = [""] * len(prompts)
        for idx, ids, mask in self._batches(prompts, max_new_tokens):
            with torch.inference_mode():
                gen = self.lm.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                             do_sample=False, num_beams=1, temperature=None, top_p=None,
                                             top_k=None, pad_token_id=self._pad_id(), eos_token_id=stop or None)
            for r, i in enumerate(idx):
                out[i] = self.tok.decode(gen[r, ids.shape[1]:].tolist(), skip_special_tokens=True).strip()
        return out

    def _answer_ids(self) -> tuple[list[int], list[int]]:
        """First token ids of the usual spellings of yes and of no (each spelling's first token)."""
        sets = []
        for words in (("yes", "Yes", "YES"), ("no", "No", "NO")):
            ids = set()
            for w in words:
                for v in (w, " " + w):
                    toks = self.tok(v, add_special_tokens=False)["input_ids"]
                    if toks:
                        ids.add(int(toks[0]))
            sets.append(ids)
        yes, no = sets
        return sorted(yes - no), sorted(no - yes)

    def yes_no(self, prompts: Sequence[Prompt]) -> list[bool | None]:
        """Yes/no answers by one forward pass: the first answer token restricted to yes or no (greedy decoding
        constrained to the two answers; a small model's free text often says neither). None when this tokenizer
        cannot tell the two apart by their first token."""
        import torch

        yes, no = self._answer_ids()
        if not yes or not no:
            return [None] * len(prompts)
        out: list[bool | None] = [None] * len(prompts)
        for idx, ids, mask in self._batches(prompts, 1):
            pos = (mask.cumsum(-1) - 1).clamp_min(0)  # positions count from each row's first real token
            with torch.inference_mode():
                logits = self.lm.model(input_ids=ids, attention_mask=mask, position_ids=pos,
                                       use_cache=False).logits[:, -1].float()
            y = logits[:, yes].max(-1).values
            n = logits[:, no].max(-1).values
            for r, i in enumerate(idx):
                out[i] = bool(y[r] > n[r])
        return out

    def _end_of_turn_ids(self) -> list[int]:
        ids = []
        for t in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>"):
            v = self.tok.convert_tokens_to_ids(t) if t in self.tok.get_vocab() else None
            if v is not None:
                ids.append(int(v))
        return ids


# --------------------------------------------------------------------------------------------------- openai
class OpenAICompatibleBackend:
    """An OpenAI-compatible chat endpoint. Base URL: ``SAEFORGE_LLM_BASE_URL`` (else ``OPENAI_BASE_URL``, else
    OpenAI's); key: ``SAEFORGE_LLM_API_KEY`` (else ``OPENAI_API_KEY``; local servers need none)."""

    def __init__(self, model: str, *, base_url: str | None = None, api_key: str | None = None,
                 batch_size: int = 8, retries: int = 5, retry_delay: float = 1.0, timeout: float = 120.0,
                 max_retry_delay: float = 60.0):
        if not model:
            raise SaeforgeError("--backend openai needs a model name",
                                "pass --model, e.g. --model gpt-4o-mini (OpenAI), the served model name (vLLM) or "
                                "llama3.1 (Ollama)")
        base = (base_url if base_url is not None else _env(BASE_URL_VARS)) or DEFAULT_BASE_URL
        base = base.rstrip("/")
        self.url = base if base.endswith("/chat/completions") else base + "/chat/completions"
        self.api_key = api_key if api_key is not None else _env(API_KEY_VARS)
        self.model = model
        self.name = f"openai:{model}"
        self.batch_size = max(1, int(batch_size))
        self.retries = max(0, int(retries))
        self.retry_delay = float(retry_delay)
        self.max_retry_delay = float(max_retry_delay)
        self.timeout = float(timeout)

    def _request(self, messages: Prompt, max_new_tokens: int) -> str:
        body = json.dumps({"model": self.model, "messages": list(messages), "max_tokens": int(max_new_tokens),
                           "temperature": 0}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = ""
        for attempt in range(self.retries + 1):
            wait = min(self.max_retry_delay, self.retry_delay * 2 ** attempt)
            try:
                req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    payload = resp.read()
                return self._content(payload)
            except urllib.error.HTTPError as err:
                detail = err.read()[:300].decode("utf-8", "replace")
                if err.code not in RETRY_STATUS:
                    raise self._http_error(err.code, detail) from None
                last = f"HTTP {err.code}: {detail.strip()}"
                retry_after = err.headers.get("Retry-After") if err.headers else None
                if retry_after:
                    try:
                        wait = min(self.max_retry_delay, max(wait, float(retry_after)))
                    except ValueError:
                        pass
            except (urllib.error.URLError, ConnectionError, socket.timeout, TimeoutError) as err:
                reason = getattr(err, "reason", err)
                last = f"{type(reason).__name__}: {reason}"
            if attempt < self.retries:
                time.sleep(wait * (1 + 0.1 * random.random()))  # jitter keeps concurrent retries apart
        raise SaeforgeError(
            f"cannot reach the LLM endpoint {self.url} after {self.retries + 1} tries ({last})",
            "start the server or point SAEFORGE_LLM_BASE_URL at it (vLLM: http://localhost:8000/v1, Ollama: "
            "http://localhost:11434/v1); features explained so far are saved and re-running resumes")

    def _content(self, payload: bytes) -> str:
        try:
            data = json.loads(payload)
            content = data["choices"][0]["message"].get("content")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise SaeforgeError(f"{self.url} did not answer like an OpenAI chat endpoint: "
                                f"{payload[:200].decode('utf-8', 'replace')!r}",
                                "check SAEFORGE_LLM_BASE_URL (it should end in /v1)") from None
        return (content or "").strip()

    def _http_error(self, code: int, detail: str) -> SaeforgeError:
        if code in (401, 403):
            return SaeforgeError(f"the LLM endpoint {self.url} refused the request (HTTP {code}): {detail}",
                                 "set SAEFORGE_LLM_API_KEY (or OPENAI_API_KEY) to a valid key")
        if code == 404:
            return SaeforgeError(f"the LLM endpoint {self.url} answered 404: {detail}",
                                 f"check SAEFORGE_LLM_BASE_URL (it should end in /v1) and that the server serves "
                                 f"the model {self.model!r}")
        return SaeforgeError(f"the LLM endpoint {self.url} rejected the request (HTTP {code}): {detail}",
                             "check --model and the server's limits")

    def generate(self, prompts: Sequence[Prompt], max_new_tokens: int) -> list[str]:
        if not prompts:
            return []
        pool = ThreadPoolExecutor(max_workers=min(self.batch_size, len(prompts)))
        try:
            futures = [pool.submit(self._request, p, max_new_tokens) for p in prompts]
            return [f.result() for f in futures]
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def make_backend(kind: str, model: str = "", *, device: str = "auto", batch_size: int = 8, retries: int = 5,
                 retry_delay: float = 1.0, timeout: float = 120.0) -> Backend:
    if kind == "local":
        return LocalHFBackend(model or "embedded", device=device, batch_size=batch_size)
    if kind == "openai":
        return OpenAICompatibleBackend(model, batch_size=batch_size, retries=retries, retry_delay=retry_delay,
                                       timeout=timeout)
    raise SaeforgeError(f"unknown back end {kind!r}", "use --backend local or --backend openai")
