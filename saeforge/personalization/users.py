"""Users for latent personalization: the user file (JSON lines), synthetic users with measurable styles, and the
style-match score.

The user file holds one user per line::

    {"user_id": "u00",
     "history": [{"item": "i07", "prompt": "<the item, as shown to the model>", "text": "<what the user wrote>"}, ...],
     "queries": [{"item": "i12", "prompt": "...", "target": "<what the user wrote>", "split": "train"}, ...],
     "style": {"voice": "archaic", ...}}

``history`` is oldest first. ``queries`` are what the model learns to write (``split`` "train", the default) or is
scored on ("test"). ``style`` is optional: synthetic users carry their traits there, and the style-match score needs
it. Peers are the other users whose history holds the same ``item``.

Synthetic users (:func:`synthetic_users`) comment on lines of the embedded Shakespeare corpus. Each has four binary
traits, each visible in a comment through words or punctuation that :func:`detect_style` reads back:

- ``voice``: archaic ("Methinks ... doth ...") or plain ("Honestly, ... really ...");
- ``mark``: exclaim (sentences end with "!") or calm (".");
- ``focus``: words (the comment is about the verse and its sound) or story (about the scene and what happens);
- ``length``: long (a second sentence) or short (one).

Every comment also names the two longest words of the line, so it depends on the item as well as on the user (what
ROUGE rewards). The 16 trait combinations are spread evenly over the users; the phrasing is drawn at random among a
few variants of each trait, so no two comments of a user are copies.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from saeforge.errors import SaeforgeError

__all__ = ["HistoryItem", "Query", "STYLE_TRAITS", "User", "detect_style", "read_users", "style_match",
           "synthetic_users", "write_users"]

USER_FIX = ("give every line \"user_id\", \"history\" (a list of {\"item\", \"prompt\", \"text\"}) and \"queries\" (a "
            "list of {\"item\", \"prompt\", \"target\"}); `saeforge personalize users --out users.jsonl` writes an "
            "example")


@dataclass(frozen=True)
class HistoryItem:
    item: str
    """Identifier of the item; users whose history holds the same item are peers on it."""
    prompt: str
    """The item as the model is shown it."""
    text: str
    """What the user wrote about it."""


@dataclass(frozen=True)
class Query:
    item: str
    prompt: str
    target: str
    """What the user wrote (the reference the generation is trained on or scored against)."""
    split: str = "train"
    """train (learnt from) or test (scored)."""


@dataclass(frozen=True)
class User:
    user_id: str
    history: tuple[HistoryItem, ...]
    """Oldest first."""
    queries: tuple[Query, ...] = ()
    style: dict[str, str] = field(default_factory=dict)
    """Trait name → value, for the style-match score (synthetic users have one)."""

    def to_json(self) -> dict:
        out = {"user_id": self.user_id,
               "history": [{"item": h.item, "prompt": h.prompt, "text": h.text} for h in self.history],
               "queries": [{"item": q.item, "prompt": q.prompt, "target": q.target, "split": q.split}
                           for q in self.queries]}
        if self.style:
            out["style"] = dict(self.style)
        return out


# ------------------------------------------------------------------------------------------------- the user file
def _field(obj: dict, name: str, where: str, kind: type = str):
    if not isinstance(obj, dict):
        raise SaeforgeError(f"{where} is not a JSON object", USER_FIX)
    if name not in obj:
        raise SaeforgeError(f"{where} has no {name!r} field", USER_FIX)
    value = obj[name]
    if kind is str and not (isinstance(value, str) and value.strip()):
        raise SaeforgeError(f"{where}: {name!r} must be a non-empty string, got {value!r}", USER_FIX)
    if kind is list and not isinstance(value, list):
        raise SaeforgeError(f"{where}: {name!r} must be a list, got {type(value).__name__}", USER_FIX)
    return value


def _parse_user(obj, where: str) -> User:
    user_id = str(_field(obj, "user_id", where))
    where = f"{where} (user {user_id})"
    history = []
    for k, h in enumerate(_field(obj, "history", where, list)):
        at = f"{where}, history item {k}"
        history.append(HistoryItem(str(_field(h, "item", at)), _field(h, "prompt", at), _field(h, "text", at)))
    if not history:
        raise SaeforgeError(f"{where} has an empty history", "give every user at least one history item")
    queries = []
    for k, q in enumerate(_field(obj, "queries", where, list)):
        at = f"{where}, query {k}"
        split = q.get("split", "train") if isinstance(q, dict) else "train"
        if split not in ("train", "test"):
            raise SaeforgeError(f"{at}: 'split' must be train or test, got {split!r}", "set \"split\": \"test\" on "
                                "the queries to score, \"train\" (or nothing) on the others")
        queries.append(Query(str(_field(q, "item", at)), _field(q, "prompt", at), _field(q, "target", at), split))
    style = obj.get("style") or {}
    if not isinstance(style, dict):
        raise SaeforgeError(f"{where}: 'style' must be an object of trait: value", "remove it or write e.g. "
                            "\"style\": {\"mark\": \"exclaim\"}")
    return User(user_id, tuple(history), tuple(queries), {str(k): str(v) for k, v in style.items()})


def read_users(path: str | Path) -> list[User]:
    """Read and check a user file (JSON lines, one user a line); every missing field is named with its line."""
    path = Path(path)
    if not path.is_file():
        raise SaeforgeError(f"user file {path} does not exist",
                            f"pass an existing .jsonl file, or write synthetic users with "
                            f"`saeforge personalize users --out {path}`")
    users: list[User] = []
    seen: set[str] = set()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise SaeforgeError(f"user file {path} is not UTF-8 text ({err.reason})", "pass a UTF-8 .jsonl file") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise SaeforgeError(f"{path} line {n} is not JSON ({err.msg})", USER_FIX) from None
        user = _parse_user(obj, f"{path} line {n}")
        if user.user_id in seen:
            raise SaeforgeError(f"{path} line {n}: user {user.user_id!r} appears twice", "merge the two lines")
        seen.add(user.user_id)
        users.append(user)
    if len(users) < 2:
        raise SaeforgeError(f"{path} holds {len(users)} user(s); peers need at least two",
                            "add users (peers are users whose history shares an item)")
    return users


def write_users(path: str | Path, users: Iterable[User]) -> Path:
    from saeforge.utils.atomic import atomic_write_text

    return atomic_write_text(path, "".join(json.dumps(u.to_json(), ensure_ascii=False) + "\n" for u in users))


# ------------------------------------------------------------------------------------------------ synthetic users
STYLE_TRAITS: dict[str, tuple[str, str]] = {
    "voice": ("archaic", "plain"),
    "mark": ("exclaim", "calm"),
    "focus": ("words", "story"),
    "length": ("long", "short"),
}

# The words each trait value is recognised by (lower case, whole words), and the phrasings it is written with.
_MARKERS = {
    "archaic": {"methinks", "forsooth", "verily", "doth", "thou", "wilt", "prithee", "hence", "hath", "thee"},
    "plain": {"honestly", "honest", "really", "basically", "think", "keep", "should", "pretty", "totally", "makes"},
    "words": {"verse", "sound", "sing", "sings", "wording", "language", "music", "rhythm"},
    "story": {"scene", "story", "tale", "tell", "tells", "plot", "happens", "moment"},
}
_OPENERS = {"archaic": ("Methinks", "Forsooth,", "Verily,"), "plain": ("Honestly,", "I think", "To be honest,")}
_BODIES = {
    ("archaic", "words"): ("the verse doth sing of {a} and {b}", "the sound of {a} and {b} hath music",
                           "the language of {a} and {b} doth ring"),
    ("archaic", "story"): ("this scene doth tell of {a} and {b}", "the tale of {a} and {b} hath begun",
                           "this moment doth turn on {a} and {b}"),
    ("plain", "words"): ("the wording makes {a} and {b} sound great", "the rhythm of {a} and {b} is really nice",
                         "the language around {a} and {b} is pretty musical"),
    ("plain", "story"): ("the story here is about {a} and {b}", "this scene is really about {a} and {b}",
                         "the plot basically happens around {a} and {b}"),
}
_SECOND = {"archaic": ("Thou wilt remember {a} long hence", "I prithee read it twice for {a}",
                       "Verily {a} hath stayed with me"),
           "plain": ("I keep thinking about {a} afterwards", "You should totally read it twice for {a}",
                     "Honestly {a} really stayed with me")}
LONG_WORDS = 14
"""A comment of at least this many words counts as long."""


def _content_words(line: str) -> tuple[str, str]:
    words = sorted({w.lower() for w in re.findall(r"[A-Za-z]+", line) if len(w) >= 4}, key=lambda w: (-len(w), w))
    words = words + ["this", "line"]
    return words[0], words[1]


def style_comment(passage: str, style: dict[str, str], rng: random.Random) -> str:
    """A comment on ``passage`` in ``style`` (the four traits of :data:`STYLE_TRAITS`)."""
    a, b = _content_words(passage)
    end = "!" if style["mark"] == "exclaim" else "."
    voice = style["voice"]
    text = f"{rng.choice(_OPENERS[voice])} {rng.choice(_BODIES[voice, style['focus']]).format(a=a, b=b)}{end}"
    if style["length"] == "long":
        text += f" {rng.choice(_SECOND[voice]).format(a=a)}{end}"
    return text


def corpus_lines(n: int, seed: int = 0, split: str = "train") -> list[str]:
    """``n`` distinct verse lines of 7 to 12 words from the embedded corpus (stage directions and names left out)."""
    from saeforge.data.corpus import corpus_files

    files = corpus_files(split)
    if not files:
        raise SaeforgeError("the embedded corpus is not fetched", "run `saeforge fetch`")
    pool: list[str] = []
    for path in files:
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            line = line.strip()
            words = line.split()
            if (7 <= len(words) <= 12 and line[:1].isupper() and not re.search(r"[\[\]_*]|[A-Z]{3,}", line)
                    and len(_content_words(line)[1]) >= 4):
                pool.append(line)
    pool = sorted(set(pool))
    if len(pool) < n:
        raise SaeforgeError(f"the corpus has only {len(pool)} usable lines", f"ask for at most {len(pool)} items")
    return random.Random(f"lines:{seed}").sample(pool, n)


def prompt_for(passage: str) -> str:
    return f"Line: {passage}\nComment:"


def synthetic_users(n_users: int = 40, n_items: int = 60, history: int = 10, train_queries: int = 6,
                    test_queries: int = 2, seed: int = 0, passages: Sequence[str] | None = None,
                    styles: Sequence[dict[str, str]] | None = None) -> list[User]:
    """Users who comment on lines of verse, each in a style of four binary traits (see the module's docstring).

    Each user comments on ``history + train_queries + test_queries`` distinct items drawn from ``n_items`` shared
    ones (lines of the embedded corpus, or ``passages``). ``styles`` fixes the users' traits (one per user);
    by default the 16 combinations are dealt out evenly in a seeded order."""
    import itertools

    per_user = history + train_queries + test_queries
    if passages is None:
        passages = corpus_lines(n_items, seed)
    passages = list(passages)
    if per_user > len(passages) or history < 1 or n_users < 2:
        raise SaeforgeError(f"{n_users} users with {per_user} comments each over {len(passages)} items cannot be "
                            "built", "pass at least 2 users, a history of at least 1, and more items than comments "
                            "per user")
    rng = random.Random(f"users:{seed}")
    if styles is None:
        combos = [dict(zip(STYLE_TRAITS, values)) for values in itertools.product(*STYLE_TRAITS.values())]
        rng.shuffle(combos)
        styles = [combos[i % len(combos)] for i in range(n_users)]
    if len(styles) != n_users:
        raise SaeforgeError(f"{len(styles)} styles for {n_users} users", "give one style per user")
    users = []
    for u, style in enumerate(styles):
        items = rng.sample(range(len(passages)), per_user)
        comments = [(f"i{i:03d}", prompt_for(passages[i]), style_comment(passages[i], style, rng)) for i in items]
        hist = tuple(HistoryItem(*c) for c in comments[:history])
        queries = tuple(Query(*c, split="train") for c in comments[history:history + train_queries]) + tuple(
            Query(*c, split="test") for c in comments[history + train_queries:])
        users.append(User(f"u{u:03d}", hist, queries, dict(style)))
    return users


# --------------------------------------------------------------------------------------------------- style match
def detect_style(text: str) -> dict[str, str | None]:
    """The trait values a text shows: for each trait the value whose markers outnumber the other's (None on a tie),
    and ``length`` by the word count."""
    words = re.findall(r"[a-z]+", text.lower())
    out: dict[str, str | None] = {}
    for trait, (first, second) in STYLE_TRAITS.items():
        if trait == "length":
            out[trait] = first if len(text.split()) >= LONG_WORDS else second
            continue
        if trait == "mark":
            count_a, count_b = text.count("!"), text.count(".")
        else:
            count_a = sum(w in _MARKERS[first] for w in words)
            count_b = sum(w in _MARKERS[second] for w in words)
        out[trait] = first if count_a > count_b else second if count_b > count_a else None
    return out


def style_match(text: str, style: dict[str, str]) -> dict[str, float]:
    """Per trait of ``style``, 1.0 when ``text`` shows the user's value of it, else 0.0; ``mean`` over traits."""
    shown = detect_style(text)
    scores = {t: float(shown.get(t) == v) for t, v in style.items() if t in STYLE_TRAITS}
    scores["mean"] = sum(scores.values()) / max(len(scores), 1)
    return scores
