"""Facts to edit and facts to keep: the built-in offline fact set of the embedded model, user fact files, and the
check that a target is a token sequence the tokenizer forms after the prompt.

An **edit request** (:class:`Fact`) is a prompt, the new answer (``target``), paraphrases of the prompt (the edit
should carry over to them: generalisation) and the answer the model knew before (``original``, for the record). A
**locality fact** (:class:`KnownFact`) is a prompt with an answer the model gives before any edit; an edit should
leave it alone.

The built-in set (:func:`builtin_facts`) is written out here, offline: countries with their capitals and official
languages (three phrasings each) and short common-knowledge prompts. Edit requests are counterfactual rewrites of
real subjects (the capital of France becomes another country's capital, as CounterFact does; Meng et al., arXiv
2202.05262). The locality set is whatever the model answers correctly among the facts that are never edited, so it
is measured on the model (:func:`known_facts`), never assumed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from saeforge.errors import SaeforgeError

__all__ = ["EncodedFact", "Fact", "KnownFact", "builtin_facts", "encode_answer", "neighbour_prompts", "read_facts",
           "read_known_facts"]


@dataclass(frozen=True)
class Fact:
    """One edit request: after the edit the model should continue ``prompt`` (and each paraphrase) with ``target``."""

    prompt: str
    target: str
    paraphrases: tuple[str, ...] = ()
    original: str = ""
    """The answer before the edit (informative only)."""
    relation: str = ""


@dataclass(frozen=True)
class KnownFact:
    """A prompt whose answer the model should keep giving."""

    prompt: str
    answer: str
    relation: str = ""


@dataclass(frozen=True)
class EncodedFact:
    """A prompt and an answer as token ids: ``ids`` = prompt (BOS first) + answer[:-1], the answer's tokens
    predicted at ``positions``."""

    prompt_ids: tuple[int, ...]
    answer_ids: tuple[int, ...]

    @property
    def ids(self) -> list[int]:
        return list(self.prompt_ids) + list(self.answer_ids[:-1])

    @property
    def positions(self) -> list[int]:
        """The positions whose next-token prediction is one of the answer's tokens."""
        start = len(self.prompt_ids) - 1
        return list(range(start, start + len(self.answer_ids)))


def encode_answer(lm, encoder, prompt: str, answer: str, *, what: str = "target") -> EncodedFact:
    """``prompt`` and ``answer`` as ids, refused unless ``answer`` is a token sequence the tokenizer forms after
    ``prompt``: non-empty, decoding back to itself, and not merged with the prompt's last token (tokenizing
    prompt + answer gives the prompt's tokens followed by the answer's)."""
    tok = lm.tokenizer
    if not isinstance(answer, str) or not answer.strip():
        raise SaeforgeError(f"the {what} for prompt {prompt!r} is empty",
                            f"give a {what} with text, e.g. --target ' Rome' (a leading space starts a new word)")
    prompt_ids = encoder.ids(prompt)
    answer_ids = [int(i) for i in tok(answer, add_special_tokens=False)["input_ids"]]
    unk = getattr(tok, "unk_token_id", None)
    decoded = tok.decode(answer_ids)
    if not answer_ids or (unk is not None and unk in answer_ids) or decoded != answer:
        raise SaeforgeError(f"the {what} {answer!r} is not a token sequence this tokenizer forms (it reads back "
                            f"as {decoded!r})", f"write the {what} as the model would (plain text it can tokenize, "
                            "e.g. ' Rome')")
    joint = [int(i) for i in tok(prompt + answer, add_special_tokens=False)["input_ids"]]
    prompt_text_ids = [int(i) for i in tok(prompt, add_special_tokens=False)["input_ids"]]
    if joint != prompt_text_ids + answer_ids:
        hint = " Rome" if not answer.startswith(" ") else answer.strip()
        raise SaeforgeError(f"the {what} {answer!r} does not form its own tokens after the prompt {prompt!r}: the "
                            "tokenizer merges it with the prompt's end, so the model would never predict it as "
                            "written", f"start the {what} at a token boundary, e.g. {hint!r} (prompts end before "
                            "the space that starts the answer)")
    if len(answer_ids) > 16:
        raise SaeforgeError(f"the {what} {answer!r} has {len(answer_ids)} tokens", f"use a short {what} (at most 16 "
                            "tokens), the answer to the prompt, not a sentence")
    return EncodedFact(tuple(prompt_ids), tuple(answer_ids))


def _jsonl_rows(path: str | Path, required: tuple[str, ...], example: str) -> list[tuple[int, dict]]:
    path = Path(path)
    if not path.is_file():
        raise SaeforgeError(f"fact file {path} does not exist", f"pass a .jsonl file with one {example} per line")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise SaeforgeError(f"{path} is not UTF-8 text", f"pass a .jsonl file with one {example} per line") from err
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise SaeforgeError(f"{path} line {n} is not JSON: {err.msg}", f"write one object a line: {example}"
                                ) from err
        missing = [k for k in required if not isinstance(row, dict) or not isinstance(row.get(k), str)]
        if missing:
            raise SaeforgeError(f"{path} line {n} lacks {' and '.join(missing)} (a string each)",
                                f"write one object a line: {example}")
        rows.append((n, row))
    if not rows:
        raise SaeforgeError(f"{path} holds no facts", f"add lines like {example}")
    return rows


def read_facts(path: str | Path) -> list[Fact]:
    """Edit requests from a ``.jsonl`` file, one object a line: ``prompt``, ``target`` (required),
    ``paraphrases`` (a list), ``original`` (optional)."""
    facts = []
    for n, row in _jsonl_rows(path, ("prompt", "target"), '{"prompt": "The capital of France is", "target": " Rome"}'):
        paraphrases = row.get("paraphrases", [])
        if not isinstance(paraphrases, list) or not all(isinstance(p, str) for p in paraphrases):
            raise SaeforgeError(f"{path} line {n}: paraphrases must be a list of strings",
                                '"paraphrases": ["The capital city of France is"]')
        facts.append(Fact(row["prompt"], row["target"], tuple(paraphrases), str(row.get("original", ""))))
    return facts


def read_known_facts(path: str | Path) -> list[KnownFact]:
    """Locality candidates from a ``.jsonl`` file: ``prompt`` and ``answer`` a line."""
    return [KnownFact(row["prompt"], row["answer"], str(row.get("relation", "file")))
            for _, row in _jsonl_rows(path, ("prompt", "answer"),
                                      '{"prompt": "The capital of France is", "answer": " Paris"}')]


# ------------------------------------------------------------------------------------------------ built-in set
CAPITALS: dict[str, str] = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "Russia": "Moscow", "Egypt": "Cairo", "Greece": "Athens",
    "Ireland": "Dublin", "Austria": "Vienna", "Hungary": "Budapest", "Poland": "Warsaw", "Norway": "Oslo",
    "Sweden": "Stockholm", "Finland": "Helsinki", "Denmark": "Copenhagen", "Belgium": "Brussels",
    "the Netherlands": "Amsterdam", "Switzerland": "Bern", "Turkey": "Ankara", "Iran": "Tehran", "Iraq": "Baghdad",
    "India": "New Delhi", "Thailand": "Bangkok", "Vietnam": "Hanoi", "South Korea": "Seoul", "Indonesia": "Jakarta",
    "the Philippines": "Manila", "Kenya": "Nairobi", "Nigeria": "Abuja", "Ethiopia": "Addis Ababa",
    "Argentina": "Buenos Aires", "Chile": "Santiago", "Peru": "Lima", "Colombia": "Bogota", "Venezuela": "Caracas",
    "Cuba": "Havana", "Mexico": "Mexico City", "Canada": "Ottawa", "Australia": "Canberra",
    "New Zealand": "Wellington", "the United Kingdom": "London", "Scotland": "Edinburgh", "Wales": "Cardiff",
    "Brazil": "Brasilia", "the Czech Republic": "Prague", "Romania": "Bucharest", "Bulgaria": "Sofia",
    "Serbia": "Belgrade", "Croatia": "Zagreb", "Ukraine": "Kyiv", "Belarus": "Minsk", "Lithuania": "Vilnius",
    "Latvia": "Riga", "Estonia": "Tallinn", "Iceland": "Reykjavik", "Saudi Arabia": "Riyadh", "Syria": "Damascus",
    "Lebanon": "Beirut", "Jordan": "Amman", "Afghanistan": "Kabul", "Pakistan": "Islamabad",
    "Bangladesh": "Dhaka", "Nepal": "Kathmandu", "Malaysia": "Kuala Lumpur", "Morocco": "Rabat",
    "Algeria": "Algiers", "Tunisia": "Tunis", "Libya": "Tripoli", "Sudan": "Khartoum", "Ghana": "Accra",
    "Senegal": "Dakar", "Uganda": "Kampala", "Zimbabwe": "Harare", "Qatar": "Doha", "Mongolia": "Ulaanbaatar",
    "North Korea": "Pyongyang", "Taiwan": "Taipei", "Uruguay": "Montevideo", "Bolivia": "La Paz",
    "Ecuador": "Quito", "Jamaica": "Kingston",
}
LANGUAGES: dict[str, str] = {
    "France": "French", "Germany": "German", "Italy": "Italian", "Spain": "Spanish", "Portugal": "Portuguese",
    "Japan": "Japanese", "China": "Chinese", "Russia": "Russian", "Greece": "Greek", "Brazil": "Portuguese",
    "Mexico": "Spanish", "Poland": "Polish", "Sweden": "Swedish", "Norway": "Norwegian", "Finland": "Finnish",
    "Denmark": "Danish", "Turkey": "Turkish", "South Korea": "Korean", "the Netherlands": "Dutch",
    "Hungary": "Hungarian", "Egypt": "Arabic", "Iran": "Persian", "Israel": "Hebrew", "Thailand": "Thai",
    "Vietnam": "Vietnamese", "Argentina": "Spanish", "Ukraine": "Ukrainian", "Romania": "Romanian",
    "the Czech Republic": "Czech", "Austria": "German", "Chile": "Spanish", "Peru": "Spanish",
    "Iceland": "Icelandic", "Indonesia": "Indonesian", "Saudi Arabia": "Arabic", "England": "English",
    "Australia": "English",
}
TEMPLATES: dict[str, tuple[str, ...]] = {
    # the first phrasing is the edit prompt, the others its paraphrases
    "capital": ("The capital of {s} is", "The capital city of {s} is", "{s}'s capital is"),
    "language": ("The official language of {s} is", "In {s}, people speak", "Most people in {s} speak"),
}
COMMON_KNOWLEDGE: tuple[tuple[str, str], ...] = (
    ("The opposite of hot is", " cold"), ("The opposite of up is", " down"), ("The color of the sky is", " blue"),
    ("The color of grass is", " green"), ("The sun rises in the", " east"), ("One, two, three, four,", " five"),
    ("Monday, Tuesday,", " Wednesday"), ("January, February,", " March"),
    ("The largest planet in the solar system is", " Jupiter"), ("Romeo and Juliet was written by William",
                                                                 " Shakespeare"),
    ("The Eiffel Tower is in", " Paris"), ("The Statue of Liberty is in New", " York"),
    ("A baby cat is called a", " kitten"), ("A baby dog is called a", " puppy"), ("Bees make", " honey"),
    ("Two plus two equals", " four"), ("The planet we live on is called", " Earth"),
    ("The Great Wall is in", " China"), ("The pyramids of Giza are in", " Egypt"),
    ("Tokyo is the capital of", " Japan"), ("Berlin is the capital of", " Germany"),
    ("Madrid is the capital of", " Spain"), ("Rome is the capital of", " Italy"),
    ("The currency of Japan is the", " yen"), ("Spiders have eight", " legs"), ("A triangle has three", " sides"),
    ("A square has four", " sides"), ("Christmas is celebrated in", " December"),
    ("The Mona Lisa was painted by Leonardo da", " Vinci"), ("The chemical symbol for gold is", " Au"),
    ("Water is made of hydrogen and", " oxygen"), ("The first man on the moon was Neil", " Armstrong"),
    ("The theory of relativity was developed by Albert", " Einstein"), ("Ice is frozen", " water"),
    ("The fastest land animal is the", " cheetah"), ("The largest ocean on Earth is the", " Pacific"),
    ("A year has twelve", " months"), ("A week has seven", " days"), ("Paris is the capital of", " France"),
    ("London is the capital of", " England"),
)


# Subjects that appear in no edit request and no locality fact: their prompts (every template of every relation)
# are the neighbourhood an edit must leave alone while it is made (localisation's baseline and the locality term).
NEIGHBOUR_SUBJECTS: tuple[str, ...] = (
    "Kazakhstan", "Uzbekistan", "Armenia", "Georgia", "Cyprus", "Malta", "Luxembourg", "Slovakia", "Slovenia",
    "Albania", "Moldova", "Cambodia", "Laos", "Myanmar", "Sri Lanka", "Oman", "Yemen", "Kuwait", "Angola",
    "Namibia", "Botswana", "Zambia", "Mali", "Somalia", "Panama", "Honduras", "Guatemala", "Nicaragua",
    "Costa Rica", "Haiti", "Fiji", "Bhutan",
)


def neighbour_prompts() -> list[str]:
    """Prompts of the built-in relations about subjects that are never edited nor measured (see
    :data:`NEIGHBOUR_SUBJECTS`)."""
    return [t.format(s=s) for templates in TEMPLATES.values() for t in templates for s in NEIGHBOUR_SUBJECTS]


def builtin_facts(n_edits: int = 100) -> tuple[list[Fact], list[KnownFact]]:
    """The built-in edit requests (``n_edits`` counterfactual rewrites, capitals and languages interleaved) and the
    locality candidates: every capital/language fact not among the edits, and the common-knowledge prompts.

    A rewrite's target is the answer of the same relation for another subject (a fixed rotation through the table,
    skipping subjects that share the true answer), so targets are real words the model can say, never its answer."""
    requests: dict[str, list[Fact]] = {}
    candidates: list[KnownFact] = []
    for relation, table in (("capital", CAPITALS), ("language", LANGUAGES)):
        subjects = list(table)
        templates = TEMPLATES[relation]
        requests[relation] = []
        for i, s in enumerate(subjects):
            j = (i + 7) % len(subjects)
            while table[subjects[j]] == table[s]:
                j = (j + 1) % len(subjects)
            prompt, *paraphrases = (t.format(s=s) for t in templates)
            requests[relation].append(Fact(prompt, " " + table[subjects[j]], tuple(paraphrases), " " + table[s],
                                           relation))
    # interleave so that every prefix of the edit list mixes both relations, 3 capitals to 1 language
    ordered: list[Fact] = []
    caps, langs = list(requests["capital"]), list(requests["language"])
    while caps or langs:
        ordered.extend(caps[:3])
        del caps[:3]
        ordered.extend(langs[:1])
        del langs[:1]
    if not 1 <= n_edits <= len(ordered):
        raise SaeforgeError(f"the built-in fact set has {len(ordered)} edit requests; {n_edits} were asked for",
                            f"pass --edits between 1 and {len(ordered)}, or your own --facts FILE")
    edits = ordered[:n_edits]
    for fact in ordered[n_edits:]:
        candidates.append(KnownFact(fact.prompt, fact.original, fact.relation))
    candidates.extend(KnownFact(p, a, "common") for p, a in COMMON_KNOWLEDGE)
    return edits, candidates
