"""The prompt inspector: the strongest features of every token of a prompt, and one feature's activation across it.

Both are one forward pass over the prompt on the shared model (:mod:`saeforge.web.model`): the prompt is bounded by
the server's character limit and the inspector's token limit rather than cancelled half-way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from saeforge.errors import SaeforgeError
from saeforge.web.errors import WebError, check_text
from saeforge.web.model import ModelRequest

if TYPE_CHECKING:
    from saeforge.web.data import RunData

MAX_TOP = 50


def _tokenize_error(err: SaeforgeError) -> WebError:
    return WebError(413 if "limit" in err.problem else 400, err.problem, err.fix)


def max_prompt_tokens(data: "RunData") -> int:
    from saeforge.features.inspect import MAX_PROMPT_TOKENS

    inspector = data.model._inspector
    return inspector.max_tokens if inspector is not None else MAX_PROMPT_TOKENS


def inspect(data: "RunData", text: str, top: int = 5, request: ModelRequest | None = None) -> dict:
    check_text("the prompt", text, data.max_prompt_chars)
    if not 1 <= top <= MAX_TOP:
        raise WebError(400, f"top {top} is out of range", f"use 1..{MAX_TOP}")
    if not data.sae_folders:
        raise WebError(404, "this run has no SAEs to inspect a prompt with")
    with data.model.hold(request or ModelRequest("inspection")):
        inspector = data.model.inspector()
        try:
            tokens = inspector.inspect(text, top)
        except SaeforgeError as err:
            raise _tokenize_error(err) from err
    # top tokens and density of every feature shown, so unexplained ones still say something
    info: dict[str, dict[int, dict]] = {}
    if data.has_store:
        st = data.store()
        in_store = {s["name"] for s in st.saes()}
        for name in inspector.saes:
            if name in in_store:
                info[name] = st.brief_features(name, {f[0] for row in tokens for f in row["features"].get(name, [])})
    return {"text": text, "top": top, "max_tokens": inspector.max_tokens,
            "saes": list(inspector.saes), "tokens": tokens, "feature_info": info}


def feature_across(data: "RunData", text: str, sae: str, feature: int, request: ModelRequest | None = None) -> dict:
    """One feature's activation at every token of ``text`` (0 at control tokens, which are not SAE data), with the
    feature's largest activation on the harvested text to shade by."""
    import torch

    check_text("the prompt", text, data.max_prompt_chars)
    with data.model.hold(request or ModelRequest("inspection")):
        inspector = data.model.inspector()
        if sae not in inspector.saes:
            raise WebError(404, f"no SAE {sae!r} in this run", f"the run has: {', '.join(inspector.saes)}")
        bound = inspector.saes[sae]
        model = bound.sae
        d_sae = model.cfg.d_sae
        if not 0 <= feature < d_sae:
            raise WebError(404, f"feature {feature} is out of range: SAE {sae!r} has features 0..{d_sae - 1}",
                           f"pick an index below {d_sae}")
        try:
            batch = inspector.prompts.one(text)
        except SaeforgeError as err:
            raise _tokenize_error(err) from err
        ids = batch.input_ids
        lm = inspector.lm
        with torch.inference_mode():
            read = lm.read(ids, [s.name for s in bound.reads])  # a CLT or crosscoder reads several sites
            acts = model.encode(bound.input(read, 0).float())[:, feature].float().cpu()
        special = set(lm.special_token_ids())
        ids_list = [int(i) for i in ids[0]]
        tokens = [lm.tokenizer.decode([i]) for i in ids_list]
        keep = batch.keep[0].tolist()
    # positions outside the SAE's data (BOS, control tokens) show 0: the SAE was never trained on them
    values = [float(a) if k and i not in special else 0.0 for i, a, k in zip(ids_list, acts.tolist(), keep)]
    harvested = None
    if data.has_store:
        try:
            harvested = data.store().feature(sae, feature, with_examples=False)["max_act"]
        except SaeforgeError:
            harvested = None
    return {"sae": sae, "feature": feature, "tokens": tokens, "special": [i in special for i in ids_list],
            "acts": values, "max_act": max(values, default=0.0), "harvested_max_act": harvested}
