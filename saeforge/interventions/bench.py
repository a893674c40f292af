"""``saeforge bench-steering``: one bench that judges steering methods on one behaviour.

A **behaviour** is two sets of texts (texts that show it, texts that do not; or, with ``pair_prompts``, answers to
the same prompts, of which only the answer tokens are read), the prompts to steer, and a **scorer** that says, per
generation, whether it shows the behaviour:

- ``keyword``: the generation contains one of the keywords (whole word, any case);
- ``accuracy``: the generation answers its prompt correctly (one expected answer per prompt: a number must be the
  first number generated, a word must appear as a whole word);
- ``judge``: an LLM behind an OpenAI-compatible endpoint answers yes or no to "does this continuation show <the
  behaviour>?" (it also judges fluency). An endpoint that does not answer raises a clear error after its retries;
  the rows finished before are kept and a rerun resumes after them.

A **method** returns an :class:`Intervention`: a direction added at the SAE's site at every non-special position, at
norm α × ‖v_CAA‖ for each α of the strength sweep (all methods at equal norm), or a prompt prefix (prompting, no
strength). Methods: ``caa``, ``sta`` (arXiv 2505.20322), ``refined_caa`` (SAE-RSV's statistical selection),
``sae_rsv_denoise``, ``sae_rsv_augment``, ``sae_rsv`` (both stages; arXiv 2509.23799), and the baselines ``random``
(a random direction at the same norm) and ``prompting`` (the instruction written before each prompt); on request
``srps`` (role-play steering, arXiv 2506.07335: the latents a role prompt switches on, injected as a rotation at the
last prompt position during prefill; :mod:`saeforge.interventions.roleplay`) with its controls ``srps_diffmeans``
(the role/plain mean difference, injected the same way) and ``roleplay_prompting`` (the role written before each
prompt). SRPS's contrast questions are the pair prompts when given, else the prompts to steer. With an AlignSAE
(arXiv 2512.02004) as the bench's SAE, ``alignsae`` steers along the decoder row of the latent supervised to
``--concept``.

Every generation is sampled with the same seed and read back by the plain model. Scores per row: **behaviour** (mean
of the scorer), **perplexity** of the continuations under the plain model (pooled), **coherence** = min(1, baseline
perplexity / perplexity), and **behaviour × coherence**, which penalises a method that buys the behaviour with
gibberish (in the spirit of AxBench's aggregate of concept and fluency scores, arXiv 2501.17148).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, field as dc_field
from pathlib import Path
from typing import Callable, Protocol, Sequence

import torch
from simple_parsing.helpers import field

from saeforge.errors import SaeforgeError

SCORERS = ("keyword", "accuracy", "judge")
METHODS = ("caa", "sta", "refined_caa", "sae_rsv_denoise", "sae_rsv_augment", "sae_rsv", "random", "prompting",
           "srps", "srps_diffmeans", "roleplay_prompting", "alignsae")
DEFAULT_METHODS = METHODS[:8]
RESULT_FILE = "bench_steering.json"
PLOT_FILE = "bench_steering.png"


# ------------------------------------------------------------------------------------------------------ scorers
class Scorer(Protocol):
    name: str

    def score(self, prompts: Sequence[str], generations: Sequence[str]) -> list[float]:
        """Per generation: 1 when it shows the behaviour, 0 when not, NaN when it cannot be told."""


@dataclass
class KeywordScorer:
    words: list[str]
    name: str = "keyword"

    def score(self, prompts, generations):
        from saeforge.interventions.selection import theme_hits

        return [float(h) for h in theme_hits(list(generations), self.words)]


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


@dataclass
class AccuracyScorer:
    """Per prompt the expected answer: a number is right when it is the first number generated, a word when it
    appears as a whole word (any case)."""

    answers: list[str]
    name: str = "accuracy"

    def score(self, prompts, generations):
        if len(self.answers) != len(generations):
            raise SaeforgeError(f"{len(self.answers)} answers for {len(generations)} prompts",
                                "give one expected answer per prompt (--answers-file, one per line)")
        out = []
        for answer, text in zip(self.answers, generations):
            answer = answer.strip()
            if _NUMBER.fullmatch(answer):
                first = _NUMBER.search(text)
                out.append(float(first is not None and float(first.group()) == float(answer)))
            else:
                out.append(float(re.search(r"\b" + re.escape(answer) + r"\b", text, re.I) is not None))
        return out


JUDGE_SYSTEM = "You grade short text continuations. Answer with one word: yes or no."


@dataclass
class JudgeScorer:
    """An LLM judge (any :class:`~saeforge.features.autointerp.backends.Backend`): behaviour and fluency."""

    backend: object
    behaviour: str
    name: str = "judge"

    def _ask(self, question: str, prompts, generations) -> list[float]:
        from saeforge.features.autointerp.prompts import parse_yes_no

        asks = [[{"role": "system", "content": JUDGE_SYSTEM},
                 {"role": "user", "content": f"Prompt: {p}\nContinuation: {g}\n\n{question} Answer yes or no."}]
                for p, g in zip(prompts, generations)]
        verdicts = [parse_yes_no(r) for r in self.backend.generate(asks, 3)]
        return [float("nan") if v is None else float(v) for v in verdicts]

    def score(self, prompts, generations):
        return self._ask(f"Does the continuation show this behaviour: {self.behaviour}?", prompts, generations)

    def fluency(self, prompts, generations):
        return self._ask("Is the continuation fluent, grammatical English?", prompts, generations)


def make_scorer(kind: str, *, keywords: Sequence[str] = (), answers: Sequence[str] = (), behaviour: str = "",
                backend=None) -> Scorer:
    """A scorer by name, its inputs checked (no slow work)."""
    if kind == "keyword":
        if not keywords:
            raise SaeforgeError("the keyword scorer needs keywords", "add --keywords love,heart,dear")
        return KeywordScorer(list(keywords))
    if kind == "accuracy":
        if not answers:
            raise SaeforgeError("the accuracy scorer needs the expected answers",
                                "add --answers-file answers.txt (one per prompt)")
        return AccuracyScorer(list(answers))
    if kind == "judge":
        if backend is None or not behaviour:
            raise SaeforgeError("the judge scorer needs a judge model and a description of the behaviour",
                                "add --judge-model MODEL --behaviour 'speaks of love' (endpoint from "
                                "SAEFORGE_LLM_BASE_URL)")
        return JudgeScorer(backend, behaviour)
    raise SaeforgeError(f"unknown scorer {kind!r}", f"use --scorer {' or '.join(SCORERS)}")


# ------------------------------------------------------------------------------------------------------ methods
@dataclass
class Intervention:
    """What a method does: add ``vector`` (a direction; the bench sets its norm) at the site, or write ``prefix``
    before each prompt."""

    vector: torch.Tensor | None = None
    prefix: str = ""
    info: dict = dc_field(default_factory=dict)
    where: str = "all"
    """``all`` non-special positions, or ``last_prompt`` (the last prompt position during prefill, norm kept)."""


@dataclass
class BenchInputs:
    """What the methods build from."""

    sae: object
    pos: object  # TextActivations
    neg: object
    caa: torch.Tensor
    instruction: str = ""
    trim: float = 0.35
    fdr: float = 0.05
    rsv_candidates: int = 32
    rsv_augment: int = 8
    rsv_alphas: tuple[float, float, float] = (1.0, 0.5, 0.5)
    seed: int = 0
    lm: object = None
    site: str = ""
    policy: object = None
    questions: list[str] = dc_field(default_factory=list)
    roles: tuple[str, ...] = ()
    srps_k: int = 15
    srps_beta: float = 3.0
    srps_tau: float = 0.2
    concept: str = ""
    _role_acts: tuple | None = None

    def role_contrast(self):
        """(with role, without) :class:`TextActivations` of the SRPS questions, read once."""
        if self._role_acts is None:
            from saeforge.interventions.roleplay import role_prompts
            from saeforge.interventions.vectors import collect

            if len(self.questions) < 2:
                raise SaeforgeError("SRPS needs at least 2 questions to contrast", "give --pair-prompts FILE")
            self._role_acts = (collect(self.lm, self.sae, self.site, role_prompts(self.questions, self.roles),
                                       self.policy),
                               collect(self.lm, self.sae, self.site, self.questions, self.policy))
        return self._role_acts


def _caa(x: BenchInputs) -> Intervention:
    return Intervention(x.caa)


def _sta(x: BenchInputs) -> Intervention:
    from saeforge.interventions.vectors import sta_vector

    v, atoms = sta_vector(x.sae, x.pos, x.neg, x.caa, x.trim)
    return Intervention(v, info={"atoms": atoms.tolist()})


def _refined(x: BenchInputs) -> Intervention:
    from saeforge.interventions.vectors import refined_caa_vector

    v, relevant = refined_caa_vector(x.sae, x.pos, x.neg, x.caa, x.fdr)
    return Intervention(v, info={"relevant": relevant.tolist()})


def _rsv(denoise: bool, augment: bool) -> Callable[[BenchInputs], Intervention]:
    def build(x: BenchInputs) -> Intervention:
        from saeforge.interventions.vectors import sae_rsv_vector

        v, info = sae_rsv_vector(x.sae, x.pos, x.neg, x.caa, fdr=x.fdr, denoise=denoise, augment=augment,
                                 candidates=x.rsv_candidates, n_augment=x.rsv_augment, alphas=x.rsv_alphas)
        return Intervention(v, info=info)

    return build


def _random(x: BenchInputs) -> Intervention:
    g = torch.Generator().manual_seed(x.seed)
    return Intervention(torch.randn(x.caa.shape[0], generator=g), info={"seed": x.seed})


def _prompting(x: BenchInputs) -> Intervention:
    if not x.instruction.strip():
        raise SaeforgeError("the prompting baseline needs an instruction", "add --instruction 'Write about love.'")
    return Intervention(prefix=x.instruction)


def _srps(x: BenchInputs) -> Intervention:
    from saeforge.interventions.roleplay import srps_vector

    with_role, without = x.role_contrast()
    v, top = srps_vector(x.sae, with_role.feats, without.feats, k=x.srps_k, beta=x.srps_beta, tau=x.srps_tau)
    return Intervention(v, info={"latents": top.tolist()}, where="last_prompt")


def _srps_diffmeans(x: BenchInputs) -> Intervention:
    with_role, without = x.role_contrast()
    return Intervention(with_role.acts.mean(0) - without.acts.mean(0), where="last_prompt")


def _roleplay_prompting(x: BenchInputs) -> Intervention:
    return Intervention(prefix=x.roles[0])


def _alignsae(x: BenchInputs) -> Intervention:
    if not hasattr(x.sae, "concept_index"):
        raise SaeforgeError(f"the alignsae method needs an AlignSAE, and this SAE is a {x.sae.cfg.architecture}",
                            "bench an AlignSAE's folder (saeforge train --architecture alignsae)")
    if not x.concept:
        raise SaeforgeError("the alignsae method needs the concept to steer towards",
                            f"add --concept, one of {', '.join(x.sae.cfg.concepts)}")
    i = x.sae.concept_index(x.concept)
    return Intervention(x.sae.W_dec[i].detach().float().cpu(), info={"concept": x.concept, "latent": i})


BUILDERS: dict[str, Callable[[BenchInputs], Intervention]] = {
    "caa": _caa, "sta": _sta, "refined_caa": _refined, "sae_rsv_denoise": _rsv(True, False),
    "sae_rsv_augment": _rsv(False, True), "sae_rsv": _rsv(True, True), "random": _random, "prompting": _prompting,
    "srps": _srps, "srps_diffmeans": _srps_diffmeans, "roleplay_prompting": _roleplay_prompting,
    "alignsae": _alignsae}
PREFIX_METHODS = ("prompting", "roleplay_prompting")


# ------------------------------------------------------------------------------------------------------ config
@dataclass(frozen=True)
class BenchSteeringConfig:
    """Judge steering methods (CAA, STA, SAE-RSV stages) against baselines (random vector, prompting) on one
    behaviour: a strength sweep, behaviour and coherence scores, a table and a plot."""

    path: str = field(default="", positional=True)
    """A run directory with one SAE (or an SAE folder)."""
    positive: str = ""
    """Texts showing the behaviour (.txt, one per line, or .jsonl); with --pair-prompts, the answers showing it."""
    negative: str = ""
    """Texts not showing it; with --pair-prompts, the answers not showing it."""
    pair_prompts: str = ""
    """Optional: the prompts the positive and negative answers reply to (line i for answer i in both files); only
    the answer tokens are read, as STA does."""
    prompts_file: str = ""
    """Prompts to steer, one per line."""
    scorer: str = "keyword"
    """keyword (a generation containing a keyword shows the behaviour), accuracy (right answer to the prompt,
    --answers-file) or judge (an LLM through an OpenAI-compatible endpoint, --judge-model)."""
    keywords: tuple[str, ...] = ()
    """keyword scorer: the words (case-insensitive, whole words), e.g. love,heart,dear."""
    answers_file: str = ""
    """accuracy scorer: the expected answer to each prompt, one per line."""
    behaviour: str = ""
    """judge scorer: the behaviour in words, e.g. 'speaks of love'."""
    judge_model: str = ""
    """judge scorer: the served model name; the endpoint is SAEFORGE_LLM_BASE_URL (else OPENAI_BASE_URL), the key
    SAEFORGE_LLM_API_KEY (else OPENAI_API_KEY)."""
    judge_retries: int = 3
    """judge scorer: retries per request before the bench stops (finished rows are kept)."""
    judge_timeout: float = 60.0
    """judge scorer: seconds to wait for one answer."""
    instruction: str = ""
    """The prompting baseline's instruction, written before each prompt (e.g. 'Write about love.'); empty: no
    prompting row."""
    methods: tuple[str, ...] = DEFAULT_METHODS
    """Methods to bench: caa, sta, refined_caa, sae_rsv_denoise, sae_rsv_augment, sae_rsv, random, prompting; and on
    request srps, srps_diffmeans, roleplay_prompting (role-play steering and its controls) and alignsae (an
    AlignSAE's concept latent, --concept)."""
    multipliers: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0)
    """The strength sweep: vector norms as multiples of the unit (every vector method at each)."""
    unit: str = "caa"
    """What a strength multiplies: caa (‖v_CAA‖) or residual (the mean ‖x‖ at the site; use it when the two sets
    differ in a few tokens only and v_CAA is short)."""
    trim: float = 0.35
    """STA: top fraction of sign-consistent atoms kept."""
    fdr: float = 0.05
    """refined CAA and SAE-RSV: false-discovery rate of the relevant features."""
    rsv_candidates: int = 32
    """SAE-RSV denoising: the latents most active on the positive texts that are checked for noise."""
    rsv_augment: int = 8
    """SAE-RSV augmentation: latents added (unseen in the positives, closest to the relevant ones)."""
    rsv_alphas: tuple[float, float, float] = (1.0, 0.5, 0.5)
    """SAE-RSV: α1 (CAA), α2 (noise removed), α3 (features added), the last two as fractions of ‖v_CAA‖."""
    roles: tuple[str, ...] = ()
    """SRPS: the role prompts (taken in turn); empty: five mathematics-teacher roles."""
    srps_k: int = 15
    """SRPS: latents kept (top k by sensitivity)."""
    srps_beta: float = 3.0
    """SRPS: weight β of the firing-rate difference in the sensitivity score."""
    srps_tau: float = 0.2
    """SRPS: activation above which a latent counts as firing."""
    concept: str = ""
    """alignsae method: the concept (of the AlignSAE's --sae-options concepts) whose supervised latent's decoder row
    is the steering vector."""
    max_new_tokens: int = 32
    """Tokens generated per prompt."""
    temperature: float = 0.7
    """Sampling temperature (0: greedy)."""
    seed: int = 0
    """Sampling seed (the same for every row) and the random baseline's seed."""
    out: str = ""
    """Folder for bench_steering.json and bench_steering.png; a rerun with the same settings resumes there. Empty:
    print only."""
    model: str = ""
    """Model; empty: the one the SAE was trained on."""
    device: str = "auto"
    """auto, cpu or cuda."""


# ------------------------------------------------------------------------------------------------------ the bench
class BenchInterrupted(SaeforgeError):
    """The bench stopped part-way (the judge endpoint gave up); ``report`` holds the rows finished before."""

    def __init__(self, problem: str, fix: str, report: dict):
        super().__init__(problem, fix)
        self.report = report


@dataclass
class Behaviour:
    positives: list[str]
    negatives: list[str]
    prompts: list[str]
    scorer: Scorer
    pair_prompts: list[str] | None = None


def check_behaviour(b: Behaviour) -> None:
    """Bad input before any slow work: empty or one-sided sets, pairs that do not line up."""
    for name, texts in (("positive", b.positives), ("negative", b.negatives)):
        if len(texts) < 2:
            raise SaeforgeError(f"the {name} set holds {len(texts)} text(s): a behaviour needs both sides, at least "
                                f"2 texts each", f"give --{name} FILE with 2 or more texts, one per line")
    if not b.prompts:
        raise SaeforgeError("no prompt to steer", "give --prompts-file FILE, one prompt per line")
    if b.pair_prompts is not None and not len(b.pair_prompts) == len(b.positives) == len(b.negatives):
        raise SaeforgeError(f"{len(b.pair_prompts)} pair prompts for {len(b.positives)} positive and "
                            f"{len(b.negatives)} negative answers", "give one positive and one negative answer per "
                            "pair prompt (line i of each file)")


def check_sweep(methods: Sequence[str], multipliers: Sequence[float]) -> None:
    unknown = [m for m in methods if m not in BUILDERS]
    if unknown:
        raise SaeforgeError(f"unknown method(s) {', '.join(unknown)}", f"use any of {' '.join(METHODS)}")
    if not methods:
        raise SaeforgeError("no method to bench", f"give --methods, any of {' '.join(METHODS)}")
    if any(m not in PREFIX_METHODS for m in methods) and not multipliers:
        raise SaeforgeError("the strength sweep is empty", "give --multipliers, e.g. --multipliers 1 2 4 8")
    bad = [m for m in multipliers if not (math.isfinite(m) and 0 < m <= 1000)]
    if bad:
        raise SaeforgeError(f"strengths {bad} are not in (0, 1000]", "give positive multiples of ‖v_CAA‖, e.g. 1 2 4")


UNITS = ("caa", "residual")


def check_unit(unit: str) -> None:
    if unit not in UNITS:
        raise SaeforgeError(f"unknown strength unit {unit!r}", f"use --unit {' or '.join(UNITS)}")


def _fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _load_partial(out: str, fingerprint: str) -> list[dict]:
    if not out:
        return []
    path = Path(out) / RESULT_FILE
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    return old.get("rows", []) if old.get("fingerprint") == fingerprint else []


def run_bench(steerer, behaviour: Behaviour, methods: Sequence[str], multipliers: Sequence[float], *,
              inputs: dict | None = None, max_new_tokens: int = 32, temperature: float = 0.7, seed: int = 0,
              unit: str = "caa", out: str = "", settings: dict | None = None, progress: bool = True) -> dict:
    """Every method at every strength (prompting once) on ``behaviour``; the report (``rows``, ``methods``), saved
    after each row to ``out``/bench_steering.json when ``out`` is given (a rerun with the same settings resumes)."""
    from tqdm.auto import tqdm

    from saeforge.interventions.generate import Continuations, pooled_perplexity
    from saeforge.interventions.roleplay import ARITHMETIC_ROLES
    from saeforge.interventions.vectors import caa_vector, collect

    inputs = dict(inputs or {})
    check_behaviour(behaviour)
    check_sweep(methods, multipliers)
    check_unit(unit)
    if len(steerer.bound) != 1:
        raise SaeforgeError(f"the run has {len(steerer.bound)} SAEs; the bench uses one",
                            "pass one SAE folder (RUN_DIR/saes/NAME)")
    name, bound = next(iter(steerer.bound.items()))
    if bound.is_transcoder:
        raise SaeforgeError(f"{name} is a transcoder; steering vectors compare activations at one site",
                            "bench steering with an SAE (one that reads and writes one site)")
    settings = dict(settings or {}, methods=list(methods), multipliers=list(multipliers), seed=seed, unit=unit,
                    max_new_tokens=max_new_tokens, temperature=temperature, scorer=behaviour.scorer.name, sae=name)
    fingerprint = _fingerprint(settings)
    done = {(r["method"], r["multiplier"]): r for r in _load_partial(out, fingerprint)}

    sae, site, lm = bound.sae, bound.write_site, steerer.lm
    if "alignsae" in methods and hasattr(sae, "concept_index") and inputs.get("concept"):
        sae.concept_index(inputs["concept"])  # an unknown concept is refused before any text is read
    pairs = behaviour.pair_prompts
    pos = collect(lm, sae, site.name, behaviour.positives, steerer.policy, prompts=pairs)
    neg = collect(lm, sae, site.name, behaviour.negatives, steerer.policy, prompts=pairs)
    caa = caa_vector(pos, neg)
    norm = float(caa.norm()) if unit == "caa" else steerer.mean_norm(name)[0]
    inputs.setdefault("roles", ARITHMETIC_ROLES)
    inputs["roles"] = tuple(inputs["roles"]) or ARITHMETIC_ROLES
    x = BenchInputs(sae, pos, neg, caa, seed=seed, lm=lm, site=site.name, policy=steerer.policy,
                    questions=list(pairs or behaviour.prompts), **inputs)
    built: dict[str, Intervention] = {}
    errors: dict[str, str] = {}
    for m in methods:
        try:
            built[m] = BUILDERS[m](x)
        except SaeforgeError as err:  # a method with nothing to build from is a finding, not a crash
            errors[m] = err.problem

    report = {"sae": name, "site": site.name, "scorer": behaviour.scorer.name, "caa_norm": float(caa.norm()),
              "unit": unit, "unit_norm": norm,
              "n_prompts": len(behaviour.prompts), "n_positive": len(behaviour.positives),
              "n_negative": len(behaviour.negatives), "paired": pairs is not None, "settings": settings,
              "fingerprint": fingerprint, "methods": {m: {"info": i.info, "cos_caa": _cos(i.vector, caa)}
                                                      for m, i in built.items()},
              "method_errors": errors, "rows": []}
    judge_fluency = getattr(behaviour.scorer, "fluency", None)

    def measure(gen, new, prompts) -> dict:
        full, logits, _ = gen.read(new, [])
        texts = gen.decode(new)
        scores = behaviour.scorer.score(prompts, texts)
        valid = [s for s in scores if s == s]
        row = {"behaviour": sum(valid) / len(valid) if valid else float("nan"),
               "perplexity": pooled_perplexity(gen.perplexity(logits, full)), "samples": texts[:3]}
        if judge_fluency is not None:
            fl = [s for s in judge_fluency(prompts, texts) if s == s]
            row["fluency"] = sum(fl) / len(fl) if fl else float("nan")
        return row

    steered = [m for m in methods if m in built and m not in PREFIX_METHODS]
    by_prefix = [m for m in methods if m in built and m in PREFIX_METHODS]
    points = [("none", 0.0)] + [(m, float(a)) for m in steered for a in multipliers] + [(m, 0.0) for m in by_prefix]
    gen = Continuations(steerer, behaviour.prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                        seed=seed)
    bar = tqdm(points, desc="bench", unit="row", disable=not progress, leave=False)
    try:
        for method, alpha in bar:
            bar.set_postfix_str(f"{method} {alpha:g}")
            if (method, alpha) in done:
                row = done[(method, alpha)]
            elif method in PREFIX_METHODS:
                prefixed = [f"{built[method].prefix.strip()} {p}" for p in behaviour.prompts]
                pgen = Continuations(steerer, prefixed, max_new_tokens=max_new_tokens, temperature=temperature,
                                     seed=seed)
                row = {"method": method, "multiplier": alpha, **measure(pgen, pgen.sample(), behaviour.prompts)}
            else:
                if method == "none":
                    new = gen.sample()
                else:
                    v = built[method].vector
                    v = v * (alpha * norm / v.norm().clamp_min(1e-12))
                    if built[method].where == "last_prompt":
                        from saeforge.interventions.roleplay import last_prompt_rotation

                        with last_prompt_rotation(lm, site.name, v):
                            new = gen.sample()
                    else:
                        with steerer.steering(vectors={site.name: v}):
                            new = gen.sample()
                row = {"method": method, "multiplier": alpha, **measure(gen, new, behaviour.prompts)}
            report["rows"].append(row)
            _score_rows(report["rows"])
            _save(report, out)
    except SaeforgeError as err:
        if method == "none" or not report["rows"]:
            raise
        _save(report, out)
        where = f"saved in {Path(out) / RESULT_FILE}" if out else "in the error's report (add --out DIR to keep them)"
        raise BenchInterrupted(f"the bench stopped at {method} × {alpha:g}: {err.problem}; {len(report['rows'])} "
                               f"row(s) finished, {where}", (f"{err.fix}; then " if err.fix else "") +
                               "run the same command again: finished rows are kept", report) from err
    finally:
        bar.close()
    if out:
        report["plot"] = str(bench_plot(report, Path(out) / PLOT_FILE) or "")
        _save(report, out)
    return report


def _cos(v, caa) -> float | None:
    if v is None:
        return None
    return float(torch.nn.functional.cosine_similarity(v.float(), caa.float(), dim=0))


def _score_rows(rows: list[dict]) -> None:
    """Coherence = min(1, baseline perplexity / perplexity), and behaviour × coherence."""
    base = next((r["perplexity"] for r in rows if r["method"] == "none"), None)
    for r in rows:
        r["coherence"] = min(1.0, base / r["perplexity"]) if base and r["perplexity"] > 0 else float("nan")
        r["behaviour_x_coherence"] = r["behaviour"] * r["coherence"]


def _save(report: dict, out: str) -> None:
    if not out:
        return
    from saeforge.utils.atomic import atomic_write_json

    atomic_write_json(Path(out) / RESULT_FILE, report)


def best_rows(report: dict) -> dict[str, dict]:
    """Each method's row with the highest behaviour × coherence."""
    best: dict[str, dict] = {}
    for r in report["rows"]:
        score = r["behaviour_x_coherence"]
        if score == score and (r["method"] not in best or score > best[r["method"]]["behaviour_x_coherence"]):
            best[r["method"]] = r
    return best


def format_bench(report: dict) -> str:
    fluency = any("fluency" in r for r in report["rows"])
    unit = "‖v_CAA‖" if report.get("unit", "caa") == "caa" else "mean ‖x‖"
    lines = [f"{report['sae']} ({report['site']}); scorer {report['scorer']}; ‖v_CAA‖ = {report['caa_norm']:.2f}; "
             + ("" if unit == "‖v_CAA‖" else f"mean ‖x‖ = {report['unit_norm']:.1f}; ") +
             f"{report['n_prompts']} prompts, {report['n_positive']}/{report['n_negative']} texts" +
             (" (answers to paired prompts)" if report["paired"] else "")]
    for m, err in report.get("method_errors", {}).items():
        lines.append(f"{m}: not built ({err})")
    lines += [f"| method | α (× {unit}) | behaviour | perplexity | coherence | behaviour × coherence |" +
              (" judge fluency |" if fluency else ""),
              "|---|---|---|---|---|---|" + ("---|" if fluency else "")]
    for r in report["rows"]:
        alpha = f"{r['multiplier']:g}" if r["method"] != "none" and r["method"] not in PREFIX_METHODS else "—"
        lines.append(f"| {r['method']} | {alpha} | {_pct(r['behaviour'])} | {r['perplexity']:.1f} | "
                     f"{r['coherence']:.2f} | {r['behaviour_x_coherence']:.3f} |" +
                     (f" {_pct(r.get('fluency', float('nan')))} |" if fluency else ""))
    return "\n".join(lines)


def _pct(v: float) -> str:
    return "n/a" if v != v else f"{v:.0%}"


def bench_plot(report: dict, path: Path) -> Path | None:
    """Behaviour against perplexity, one line per method through its strengths (α annotated), the baseline and
    prompting as single points."""
    from saeforge.evals.plots import have_matplotlib

    if not have_matplotlib():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from saeforge.utils.atomic import atomic_write

    fig, ax = plt.subplots(figsize=(7, 4.5))
    by_method: dict[str, list[dict]] = {}
    for r in report["rows"]:
        by_method.setdefault(r["method"], []).append(r)
    for method, rows in by_method.items():
        xs, ys = [r["perplexity"] for r in rows], [100 * r["behaviour"] for r in rows]
        if method == "none" or method in PREFIX_METHODS:
            ax.scatter(xs, ys, marker="*" if method == "none" else "D", s=90, label=method, zorder=3,
                       color="black" if method == "none" else "#55a868")
            continue
        ax.plot(xs, ys, marker="o", label=method, lw=1.2, ms=4, ls="--" if method == "random" else "-")
        for r in rows:
            ax.annotate(f"{r['multiplier']:g}", (r["perplexity"], 100 * r["behaviour"]), textcoords="offset points",
                        xytext=(3, 3), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("perplexity of the continuations under the plain model (log)")
    ax.set_ylabel(f"behaviour, % ({report['scorer']} scorer)")
    unit = "‖v_CAA‖" if report.get("unit", "caa") == "caa" else "mean ‖x‖"
    ax.set_title(f"steering bench on {report['site']}: behaviour × coherence (numbers: α × {unit})", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------------ command
def bench_steering(cfg: BenchSteeringConfig, steerer=None) -> dict:
    from saeforge.data.texts import read_texts
    from saeforge.interventions.selection import parse_words
    from saeforge.interventions.steering import Steerer

    if not (cfg.positive and cfg.negative):
        raise SaeforgeError("a behaviour needs both sides: give --positive and --negative",
                            "saeforge bench-steering RUN --positive yes.txt --negative no.txt --prompts-file p.txt")
    if not cfg.prompts_file:
        raise SaeforgeError("no prompts to steer", "add --prompts-file prompts.txt (one per line)")
    check_sweep(cfg.methods, cfg.multipliers)
    check_unit(cfg.unit)
    if cfg.scorer not in SCORERS:
        raise SaeforgeError(f"unknown scorer {cfg.scorer!r}", f"use --scorer {' or '.join(SCORERS)}")
    prompts = read_texts(cfg.prompts_file)
    backend = None
    if cfg.scorer == "judge" and cfg.judge_model:
        from saeforge.features.autointerp.backends import OpenAICompatibleBackend

        backend = OpenAICompatibleBackend(cfg.judge_model, retries=cfg.judge_retries, timeout=cfg.judge_timeout)
    scorer = make_scorer(cfg.scorer, keywords=parse_words(cfg.keywords) if cfg.keywords else [],
                         answers=read_texts(cfg.answers_file) if cfg.answers_file else [],
                         behaviour=cfg.behaviour, backend=backend)
    behaviour = Behaviour(read_texts(cfg.positive), read_texts(cfg.negative), prompts, scorer,
                          read_texts(cfg.pair_prompts) if cfg.pair_prompts else None)
    check_behaviour(behaviour)
    if isinstance(scorer, AccuracyScorer) and len(scorer.answers) != len(prompts):
        raise SaeforgeError(f"{len(scorer.answers)} answers for {len(prompts)} prompts",
                            "give one expected answer per prompt (line i of --answers-file for line i of "
                            "--prompts-file)")
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("out", "device", "judge_retries", "judge_timeout")}
    inputs = dict(instruction=cfg.instruction, trim=cfg.trim, fdr=cfg.fdr, rsv_candidates=cfg.rsv_candidates,
                  rsv_augment=cfg.rsv_augment, rsv_alphas=tuple(cfg.rsv_alphas), roles=tuple(cfg.roles),
                  srps_k=cfg.srps_k, srps_beta=cfg.srps_beta, srps_tau=cfg.srps_tau, concept=cfg.concept)
    steerer = steerer or Steerer.from_run(cfg.path, model=cfg.model, device=cfg.device)
    run = lambda: run_bench(steerer, behaviour, cfg.methods, cfg.multipliers, inputs=inputs,  # noqa: E731
                            max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=cfg.seed,
                            unit=cfg.unit, out=cfg.out, settings=settings)
    if not cfg.out:
        return run()
    from saeforge.utils.locking import exclusive_lock

    with exclusive_lock(cfg.out, "saeforge bench-steering"):
        report = run()
    report["path"] = str(Path(cfg.out) / RESULT_FILE)
    return report


def run_bench_steering(cfg: BenchSteeringConfig) -> dict:
    from saeforge.interventions.steering import loading_message

    print(loading_message(cfg.path, cfg.model), flush=True)
    report = bench_steering(cfg)
    print(format_bench(report))
    print(f"written {report['path']} and the plot {report.get('plot') or '(no matplotlib)'}" if "path" in report
          else "(nothing written; add --out DIR to keep the JSON and the plot)")
    return report
