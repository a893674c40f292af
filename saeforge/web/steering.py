"""The steering playground: baseline and steered continuations of a few prompts, with the measured effect.

One request generates twice (baseline and steered) for every prompt on the shared model, so it is bounded: at most
``MAX_STEER_PROMPTS`` prompts of ``MAX_STEER_PROMPT_TOKENS`` tokens and ``MAX_STEER_NEW_TOKENS`` new tokens, and the
server's ``--request-timeout`` (:mod:`saeforge.web.model`): when it passes, or the client leaves, or the server stops,
the generation stops at its next token (``run_steering(..., cancel=event)``).
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

from saeforge.errors import SaeforgeError
from saeforge.web.errors import WebError, check_text
from saeforge.web.model import ModelRequest
from saeforge.web.render import finite_json

if TYPE_CHECKING:
    from saeforge.web.data import RunData

MAX_STEER_PROMPTS = 8
MAX_STEER_EDITS = 8
MAX_STEER_NEW_TOKENS = 128
# Generation cost grows with the prompt: 8 prompts of this length, 128 new tokens, twice, plus three scoring passes
# take about a minute on a laptop CPU with the embedded model, inside the default request limit.
MAX_STEER_PROMPT_TOKENS = 256
MAX_STEER_TEMPERATURE = 5.0
MAX_STEER_SEED = 2**32 - 1


def steer_saes(data: "RunData") -> list[dict]:
    """The SAEs the playground can steer with: name and number of features (from the store, else cfg.json)."""
    from saeforge.saes import read_sae_config

    in_store = {s["name"]: s["d_sae"] for s in data.store().saes()} if data.has_store else {}
    out = []
    for name, folder in data.sae_folders.items():
        d_sae = in_store.get(name)
        if d_sae is None:
            try:
                d_sae = int(read_sae_config(folder).get("d_sae") or 0) or None
            except (SaeforgeError, TypeError, ValueError):
                d_sae = None
        out.append({"name": name, "d_sae": d_sae})
    return out


def _check_request(data: "RunData", prompts, edits, positions, max_new_tokens, temperature, seed) -> None:
    if not prompts:
        raise WebError(400, "no prompt given", "type a prompt (one per line for several)")
    if len(prompts) > MAX_STEER_PROMPTS:
        raise WebError(413, f"{len(prompts)} prompts; the limit is {MAX_STEER_PROMPTS} a request",
                       f"steer at most {MAX_STEER_PROMPTS} prompts at a time")
    for i, p in enumerate(prompts, 1):
        check_text(f"prompt {i}", p, data.max_prompt_chars)
        if not p.strip():
            raise WebError(400, f"prompt {i} is empty", "give every prompt some text")
    if not edits:
        raise WebError(400, "no feature to steer", "add a feature row: SAE, feature index, mode and strength")
    if len(edits) > MAX_STEER_EDITS:
        raise WebError(413, f"{len(edits)} feature edits; the limit is {MAX_STEER_EDITS} a request",
                       f"steer at most {MAX_STEER_EDITS} features at a time")
    if positions not in ("all", "generated"):
        raise WebError(400, f"unknown positions {positions!r}", "use all or generated")
    if not 1 <= max_new_tokens <= MAX_STEER_NEW_TOKENS:
        raise WebError(400, f"max_new_tokens {max_new_tokens} is out of range", f"use 1..{MAX_STEER_NEW_TOKENS}")
    if not (isinstance(temperature, (int, float)) and 0 <= temperature <= MAX_STEER_TEMPERATURE):
        raise WebError(400, f"temperature {temperature!r} is out of range",
                       f"use a number in 0..{MAX_STEER_TEMPERATURE:g} (0: greedy)")
    if not 0 <= seed <= MAX_STEER_SEED:
        raise WebError(400, f"seed {seed} is out of range", f"use 0..{MAX_STEER_SEED}")


def steer(data: "RunData", prompts: list[str], edits: list[dict], *, positions: str = "all",
          max_new_tokens: int = 32, temperature: float = 0.7, seed: int = 0,
          request: ModelRequest | None = None) -> dict:
    """Baseline and steered continuations of ``prompts`` under the feature ``edits`` (dicts with sae, feature, mode,
    strength, unit; sae defaults to the run's first SAE), as :func:`~saeforge.interventions.generate.run_steering`
    gives them, with the measured effect.

    404 for an unknown SAE or a feature index out of range; 413 for too many prompts or edits, or a prompt too long;
    400 for anything else out of range (a NaN or absurd strength, tokens, temperature, seed, mode...); 503 when the
    model stays busy; 504 when the request runs past the server's limit."""
    from saeforge.interventions import generate
    from saeforge.interventions.steering import MAX_STRENGTH, MODES, UNITS, FeatureEdit

    _check_request(data, prompts, edits, positions, max_new_tokens, temperature, seed)
    default = next(iter(data.sae_folders), None)
    if default is None:
        raise WebError(404, "this run has no SAEs to steer with")
    parsed = []
    for i, e in enumerate(edits, 1):
        mode, unit = e.get("mode") or "add", e.get("unit") or "max"
        if mode not in MODES:
            raise WebError(400, f"unknown steering mode {mode!r}", f"use one of {', '.join(MODES)}")
        if unit not in UNITS:
            raise WebError(400, f"unknown strength unit {unit!r}", f"use one of {', '.join(UNITS)}")
        if e.get("feature") is None:
            raise WebError(400, f"feature row {i} has no feature index", "type the feature's index")
        strength = e.get("strength")
        if strength is None:  # what a browser sends for an empty or non-numeric field (JSON has no NaN)
            strength = float("nan")
        parsed.append(FeatureEdit(e.get("sae") or default, int(e["feature"]), mode, strength, unit))

    request = request or ModelRequest("steering")
    t0 = time.perf_counter()
    with data.model.hold(request):
        steerer = data.model.steerer()
        for e in parsed:
            if e.sae not in steerer.saes:
                raise WebError(404, f"no SAE {e.sae!r} in this run", f"the run has: {', '.join(steerer.saes)}")
            d_sae = steerer.saes[e.sae][0].cfg.d_sae
            try:
                e.validate(d_sae)
            except SaeforgeError as err:  # the feature index (404) or the strength (400)
                raise WebError(404 if not 0 <= e.feature < d_sae else 400, err.problem, err.fix) from err
            if e.mode != "scale":
                try:
                    steerer.value(e)  # 'max' units need the feature's max activation
                except SaeforgeError as err:
                    raise WebError(400, err.problem, err.fix) from err
        for i, p in enumerate(prompts, 1):
            n = len(steerer.lm.tokenizer(p, add_special_tokens=False)["input_ids"])
            if n > MAX_STEER_PROMPT_TOKENS:
                raise WebError(413, f"prompt {i} has {n:,} tokens; the playground's limit is "
                                    f"{MAX_STEER_PROMPT_TOKENS} tokens a prompt",
                               f"shorten it (or steer long prompts from the command line: saeforge steer)")
        try:  # the generation stops at its next token once the request's cancel event is set
            run = generate.run_steering(steerer, prompts, parsed, positions=positions, max_new_tokens=max_new_tokens,
                                        temperature=float(temperature), seed=seed, cancel=request.cancel)
        except generate.SteeringCancelled as err:  # a SaeforgeError too: caught first
            raise data.model.cancelled(request) from err
        except SaeforgeError as err:  # a prompt too long for the model's context (413), or empty (400)
            status = 413 if "tokens" in err.problem and "context" in err.problem else 400
            raise WebError(status, err.problem, err.fix) from err
    seconds = time.perf_counter() - t0
    info: dict[str, dict[int, dict]] = {}
    if data.has_store:
        st = data.store()
        in_store = {s["name"] for s in st.saes()}
        for name in sorted({e.sae for e in parsed}):
            if name in in_store:
                info[name] = st.brief_features(name, {e.feature for e in parsed if e.sae == name})
    return finite_json({
        "prompts": run.prompts, "baseline": run.baseline, "steered": run.steered, "metrics": run.metrics,
        "edits": [{"sae": e.sae, "feature": e.feature, "mode": e.mode, "strength": e.strength, "unit": e.unit}
                  for e in parsed],
        "positions": positions, "max_new_tokens": max_new_tokens, "temperature": temperature, "seed": seed,
        "feature_info": info, "limits": {"max_strength": MAX_STRENGTH}, "seconds": round(seconds, 3)})
