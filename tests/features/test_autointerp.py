"""Automatic interpretation: prompts, scorers, the OpenAI-compatible client against a local fake server, resumability,
and the local back end end to end on a tiny model."""

from __future__ import annotations

import dataclasses
import json
import random
import re
import shutil
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from saeforge.errors import SaeforgeError
from saeforge.features.autointerp import ExplainConfig, explain, parse_features
from saeforge.features.autointerp import prompts as P
from saeforge.features.autointerp import scoring as S
from saeforge.features.autointerp.backends import OpenAICompatibleBackend
from saeforge.features.harvest import HarvestConfig, harvest
from saeforge.features.store import FeatureStore

SITE = "layers.1.resid_post"


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def harvested_store(tiny_run, tmp_path_factory):
    """A small feature store of the tiny run (harvested on held-out text, like test_harvest)."""
    from tests.conftest import TEXT

    folder = tmp_path_factory.mktemp("autointerp")
    run = folder / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("features.sqlite*"))
    rng = random.Random(1)
    words = TEXT.split()
    text = folder / "heldout.txt"
    text.write_text(" ".join(rng.choice(words) for _ in range(3000)))
    harvest(HarvestConfig(path=str(run), corpus=str(text), tokens=64 * 24, batch_size=8, top_examples=5,
                          quantile_bins=4, examples_per_bin=2, random_examples=3, window_before=6, window_after=2,
                          n_logits=3, n_neighbors=2, device="cpu", progress=False))
    return run


@pytest.fixture
def run_copy(harvested_store, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(harvested_store, run)
    return run


def _alive(run, n):
    """``n`` features with held-out activating examples and non-activating ones to score against."""
    with FeatureStore(run / "features.sqlite", readonly=True) as s:
        rows = s.con.execute(
            "SELECT idx FROM examples GROUP BY idx HAVING SUM(kind = 'random') > 0 AND SUM(kind != 'random') >= 4 "
            "ORDER BY idx LIMIT ?", (n,)).fetchall()
    assert len(rows) == n
    return [r[0] for r in rows]


def _alive_showing(run, n, word):
    """Like :func:`_alive`, among features whose excerpts shown to the explainer hold ``word`` (so that "the word
    <word>" names something they contain and is not rejected as saying nothing about them)."""
    out = []
    with FeatureStore(run / "features.sqlite", readonly=True) as s:
        for idx in _alive(run, 40):
            rec = s.feature(SITE, idx)
            examples = {k: [P.drop_special_tokens(e) for e in v] for k, v in rec["examples"].items()}
            shown = S.split_examples(examples).shown
            if word in re.findall(r"\w+", " ".join("".join(e["tokens"]).lower() for e in shown)):
                out.append(idx)
    assert len(out) >= n
    return out[:n]


def _explanations(run) -> dict[int, tuple]:
    with FeatureStore(run / "features.sqlite", readonly=True) as s:
        rows = s.con.execute("SELECT idx, explanation, score, explainer, explained_at FROM features "
                             "WHERE explanation IS NOT NULL").fetchall()
        return {r[0]: tuple(r[1:]) for r in rows}


class FakeServer:
    """An OpenAI-compatible /v1/chat/completions on 127.0.0.1 (a thread; shuts itself down after ``lifetime`` s).
    Replies "yes" when the user message contains ``keyword``, else "no"; explainer prompts get ``explanation``.
    ``fail_first`` requests get HTTP 500."""

    def __init__(self, keyword="the", explanation="words like the", fail_first=0, delay=0.0, lifetime=60.0):
        self.keyword, self.explanation, self.fail_first, self.delay = keyword, explanation, fail_first, delay
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.active = self.max_active = 0
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    n = len(outer.requests)
                    outer.requests.append(body)
                    outer.headers.append(dict(self.headers))
                    outer.active += 1
                    outer.max_active = max(outer.max_active, outer.active)
                try:
                    time.sleep(outer.delay)
                    if self.path != "/v1/chat/completions":
                        code, reply = 404, {"error": "not found"}
                    elif n < outer.fail_first:
                        code, reply = 500, {"error": "overloaded"}
                    else:
                        user = body["messages"][-1]["content"]
                        if "Excerpts:" in user:
                            content = f"Explanation: {outer.explanation}"
                        else:
                            text = user.split("Text: ", 1)[1].rsplit("\n\n", 1)[0]
                            content = "Yes." if outer.keyword in text.lower() else "No."
                        code, reply = 200, {"choices": [{"message": {"role": "assistant", "content": content}}]}
                finally:
                    # before the reply goes out: once the client has it, it may send its next request at once
                    with outer.lock:
                        outer.active -= 1
                self._send(code, reply)

            def _send(self, code, obj):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.timer = threading.Timer(lifetime, self.httpd.shutdown)
        self.timer.daemon = True

    def __enter__(self):
        self.thread.start()
        self.timer.start()
        return self

    def __exit__(self, *exc):
        self.timer.cancel()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------ prompts
def test_prompt_marks_exactly_the_activating_tokens():
    tokens = ["The", " cat", " sat", " on", " the", "\n", " mat", "."]
    acts = [0.0, 2.0, 3.0, 0.0, 0.0, 0.5, 1.0, 0.0]
    assert P.mark_tokens(tokens, P.active_positions(acts)) == "The<< cat sat>> on the<<\\n mat>>."
    text = P.format_example(tokens, acts, max_act=4.0, show_activations=False)
    assert P.marked_spans(text) == [" cat sat", "\\n mat"]
    # a threshold (fraction of the maximum, as ExplainConfig.mark_threshold) leaves weak tokens unmarked
    assert P.marked_spans(P.format_example(tokens, acts, 4.0, threshold=0.6, show_activations=False)) == [
        " cat sat", " mat"]
    # activations on a 0-10 scale: ceil(10 a / max)
    assert text + "\n   activations: 'cat' 5, 'sat' 8, '\\\\n' 2, 'mat' 3" == P.format_example(tokens, acts, 4.0)
    # over random examples: the marked spans are exactly the maximal runs of activating tokens
    rng = np.random.default_rng(0)
    words = ["a", "b", "c", " d", "e!"]
    for _ in range(50):
        toks = rng.choice(words, size=12).tolist()
        a = (rng.random(12) < 0.3) * rng.random(12)
        runs, cur = [], ""
        for t, v in zip(toks, a):
            if v > 0:
                cur += t
            elif cur:
                runs.append(cur)
                cur = ""
        runs += [cur] if cur else []
        formatted = P.format_example(toks, a.tolist(), 1.0, show_activations=False)
        assert P.marked_spans(formatted) == runs
        assert formatted.replace(P.OPEN, "").replace(P.CLOSE, "") == "".join(toks)


def test_explainer_prompt_holds_the_shown_examples_only_and_drops_control_tokens():
    def ex(kind, rank, word, act):
        return {"kind": kind, "rank": rank, "context": 0, "start": 0, "max_act": act,
                "tokens": ["<|im_start|>", "x", word, "y"], "acts": [0.0, 0.0, act, 0.0]}

    examples = {"top": [ex("top", r, f"T{r}", 10.0 - r) for r in range(6)],
                "quantile": [ex("quantile", b, f"Q{b}{j}", 1.0 + b + j / 10) for b in range(4) for j in range(2)],
                "random": [ex("random", r, f"R{r}", 0.0) for r in range(5)]}
    examples = {k: [P.drop_special_tokens(e) for e in v] for k, v in examples.items()}
    split = S.split_examples(examples, n_top=4, n_quantile=3, n_score=10)
    shown = {e["tokens"][1] for e in split.shown}
    held = {e["tokens"][1] for e in split.held_out}
    assert {"T0", "T1", "T2", "T3"} <= shown and len(shown) == 7 and not shown & held
    assert held == {f"T{r}" for r in (4, 5)} | ({f"Q{b}{j}" for b in range(4) for j in range(2)} - shown)
    assert len(split.negatives) == 5
    prompt = P.explainer_prompt(split.shown, 10.0)
    user = prompt[-1]["content"]
    assert all(f"<<{w}>>" in user for w in shown) and not any(w in user for w in held)
    assert "<|im_start|>" not in user and user.count("\n1. x<<") == 1


def test_parsing_answers_and_features():
    assert P.parse_yes_no("Yes, it does") is True and P.parse_yes_no(" no.") is False
    assert P.parse_yes_no("The explanation is") is None
    assert P.parse_explanation('Explanation: "the word Hamlet"\nmore') == "the word Hamlet"
    assert P.parse_explanation("blah\n[EXPLANATION]: names of people") == "names of people"
    assert parse_features(("0-3", "7,9", "2")) == [0, 1, 2, 3, 7, 9]
    with pytest.raises(SaeforgeError, match="runs backwards"):
        parse_features(["5-2"])
    with pytest.raises(SaeforgeError, match="cannot read"):
        parse_features(["x"])


# ------------------------------------------------------------------------------------------------ scorers
class KeywordBackend:
    """Scripted: says yes iff the explanation's keyword occurs in the text (detection) or inside the marks
    (fuzzing); prompts counted."""

    name = "fake:keyword"

    def __init__(self, explanation="the word cat", unparseable=()):
        self.explanation, self.unparseable, self.calls = explanation, set(unparseable), []

    def generate(self, prompts, max_new_tokens):
        self.calls.append(len(prompts))
        out = []
        for p in prompts:
            user = p[-1]["content"]
            if any("Excerpts:" in m["content"] for m in p):  # a first or second try
                out.append(self.explanation)
                continue
            keyword = re.search(r"Explanation: the word (\w+)", user).group(1)
            text = user.split("Text: ", 1)[1].rsplit("\n\n", 1)[0]
            if text in self.unparseable:
                out.append("I am not sure.")
            elif "<<" in text:
                out.append("yes" if any(keyword in s for s in P.marked_spans(text)) else "no")
            else:
                out.append("yes" if keyword in text else "no")
        return out


def _example(kind, rank, words, acts):
    return {"kind": kind, "rank": rank, "context": hash((kind, rank)) % 10_000, "start": 0,
            "max_act": max(acts), "tokens": words, "acts": acts}


def test_detection_and_fuzzing_balanced_accuracy_are_exact():
    # 5 held-out activating excerpts, 4 containing "cat" (on the activating token); 4 non-activating, 1 with "cat"
    pos = [_example("quantile", i, ["a", " cat" if i < 4 else " dog", " b"], [0.0, 1.0 + i, 0.0]) for i in range(5)]
    neg = [_example("random", i, ["x", " cat" if i == 0 else " cow", " y"], [0.0, 0.0, 0.0]) for i in range(4)]
    split = S.Split(shown=[], held_out=pos, negatives=neg)
    backend = KeywordBackend()
    det = S.detection_samples("the word cat", split)
    res = S.score(det, backend.generate([s.prompt for s in det], 3))
    assert (res["tpr"], res["tnr"]) == (0.8, 0.75) and res["balanced_accuracy"] == pytest.approx(0.775)
    # an answer that is neither yes nor no is wrong whatever the label
    backend = KeywordBackend(unparseable={"x cat y", "a dog b"})
    res = S.score(det, backend.generate([s.prompt for s in det], 3))
    assert res["unparsed"] == 2 and (res["tpr"], res["tnr"]) == (0.8, 0.75)  # both were wrong anyway
    backend = KeywordBackend(unparseable={"a cat b"})
    res = S.score(det, backend.generate([s.prompt for s in det], 3))
    assert res["tpr"] == 0.0 and res["balanced_accuracy"] == pytest.approx(0.375)
    # fuzzing: 4 of 5 correctly marked excerpts have "cat" marked; the random marks (1 token each: ceil(mean 1))
    # on non-activating excerpts can hit " cat" in the first one, so the expected TNR follows the drawn marks
    fz = S.fuzzing_samples("the word cat", split, np.random.default_rng(0))
    assert [s.label for s in fz] == [True] * 5 + [False] * 4
    assert all(len(P.marked_spans(s.text)) == 1 for s in fz)
    hit = sum(" cat" in P.marked_spans(s.text)[0] for s in fz[5:])
    res = S.score(fz, KeywordBackend().generate([s.prompt for s in fz], 3))
    assert res["tpr"] == 0.8 and res["tnr"] == (4 - hit) / 4
    assert res["balanced_accuracy"] == pytest.approx((0.8 + (4 - hit) / 4) / 2)
    # without non-activating excerpts, detection cannot be scored; fuzzing marks inactive tokens of activating ones
    split = S.Split(shown=[], held_out=pos, negatives=[])
    assert S.balanced_accuracy(*zip(*[(s.label, True) for s in S.detection_samples("x", split)]))[
        "balanced_accuracy"] is None
    fz = S.fuzzing_samples("the word cat", split, np.random.default_rng(0))
    assert all(" cat" not in P.marked_spans(s.text)[0] and " dog" not in P.marked_spans(s.text)[0]
               for s in fz if not s.label)


def test_explain_with_a_scripted_backend_writes_scores(run_copy):
    feats = _alive_showing(run_copy, 3, "the")
    backend = KeywordBackend(explanation="the word the")
    res = explain(ExplainConfig(path=str(run_copy), features=tuple(map(str, feats)), fuzzing=True, progress=False,
                                batch_size=8), backend=backend)
    assert backend.calls[0] == 3  # one batched explainer round for the chunk, then one scoring round
    assert len(backend.calls) == 2
    stored = _explanations(run_copy)
    assert sorted(stored) == feats
    with FeatureStore(run_copy / "features.sqlite", readonly=True) as store:
        for idx in feats:
            r = res["explained"][SITE][idx]
            assert stored[idx][0] == "the word the"
            assert stored[idx][1] == r["detection"]["balanced_accuracy"]
            assert stored[idx][2].startswith("fake:keyword | detection=") and "fuzzing=" in stored[idx][2]
            # detection recomputed by hand from the store's examples
            rec = store.feature(SITE, idx)
            split = S.split_examples(rec["examples"])
            tp = sum("the" in P.plain_text(e["tokens"]) for e in split.held_out)
            tn = sum("the" not in P.plain_text(e["tokens"]) for e in split.negatives)
            assert r["detection"]["tpr"] == tp / len(split.held_out)
            assert r["detection"]["tnr"] == tn / len(split.negatives)


# ------------------------------------------------------------------------------------------------ openai client
def test_openai_client_batches_concurrently_and_sends_model_and_key(monkeypatch):
    monkeypatch.setenv("SAEFORGE_LLM_API_KEY", "sk-test")
    with FakeServer(keyword="cat", delay=0.2) as srv:
        monkeypatch.setenv("SAEFORGE_LLM_BASE_URL", srv.url)
        client = OpenAICompatibleBackend("tiny-judge", batch_size=4, retries=0)
        prompts = [P.detection_prompt("cats", "a cat" if i % 2 else "a dog") for i in range(8)]
        replies = client.generate(prompts, 3)
    assert replies == ["No.", "Yes."] * 4  # in order
    assert len(srv.requests) == 8 and 2 <= srv.max_active <= 4  # concurrent, at most batch_size at a time
    assert {r["model"] for r in srv.requests} == {"tiny-judge"} and srv.requests[0]["max_tokens"] == 3
    assert srv.requests[0]["temperature"] == 0
    assert all(h.get("Authorization") == "Bearer sk-test" for h in srv.headers)


def test_openai_client_retries_after_two_500s(monkeypatch):
    with FakeServer(keyword="cat", fail_first=2) as srv:
        client = OpenAICompatibleBackend("m", base_url=srv.url, api_key="", batch_size=1, retries=3,
                                         retry_delay=0.01)
        assert client.generate([P.detection_prompt("cats", "a cat")], 3) == ["Yes."]
        assert len(srv.requests) == 3
        # with fewer retries than failures the error is clear
    with FakeServer(fail_first=10) as srv:
        client = OpenAICompatibleBackend("m", base_url=srv.url, api_key="", retries=1, retry_delay=0.01)
        with pytest.raises(SaeforgeError, match=r"after 2 tries \(HTTP 500"):
            client.generate([P.detection_prompt("x", "y")], 3)
    with FakeServer() as srv:
        client = OpenAICompatibleBackend("m", base_url=srv.url + "/wrong", api_key="", retries=3)
        with pytest.raises(SaeforgeError, match="404") as err:  # not retried
            client.generate([P.detection_prompt("x", "y")], 3)
        assert "SAEFORGE_LLM_BASE_URL" in err.value.fix and len(srv.requests) == 1


def test_unreachable_endpoint_is_a_clear_error_and_writes_nothing(run_copy, monkeypatch):
    monkeypatch.setenv("SAEFORGE_LLM_BASE_URL", f"http://127.0.0.1:{_free_port()}/v1")
    before = (run_copy / "features.sqlite").read_bytes()
    cfg = ExplainConfig(path=str(run_copy), features=tuple(map(str, _alive(run_copy, 4))), backend="openai",
                        model="m", retries=2, retry_delay=0.01, progress=False)
    t0 = time.time()
    with pytest.raises(SaeforgeError, match="cannot reach the LLM endpoint .* after 3 tries") as err:
        explain(cfg)
    assert time.time() - t0 < 10 and "re-running resumes" in err.value.fix
    assert _explanations(run_copy) == {}
    with FeatureStore(run_copy / "features.sqlite") as store:  # still a readable, unchanged store
        assert store.explained(SITE) == set()
    assert (run_copy / "features.sqlite").read_bytes() == before


def test_rerun_skips_explained_features(run_copy, monkeypatch):
    feats = _alive_showing(run_copy, 6, "the")
    with FakeServer(explanation="the word the") as srv:
        monkeypatch.setenv("SAEFORGE_LLM_BASE_URL", srv.url)
        cfg = ExplainConfig(path=str(run_copy), features=tuple(map(str, feats[:4])), backend="openai", model="m",
                            batch_size=2, retries=0, progress=False)
        res = explain(cfg)
        first = _explanations(run_copy)
        assert sorted(first) == feats[:4] and sorted(res["explained"][SITE]) == feats[:4]
        n = len(srv.requests)
        # the same command again: nothing to do, no request
        res = explain(cfg)
        assert res["explained"] == {} and len(res["skipped"]) == 4 and len(srv.requests) == n
        # a wider list: only the new features are explained (one explainer request each)
        res = explain(dataclasses.replace(cfg, features=tuple(map(str, feats))))
        assert sorted(res["explained"][SITE]) == feats[4:] and len(res["skipped"]) == 4
        explainer_calls = [r for r in srv.requests[n:] if "Excerpts:" in r["messages"][-1]["content"]]
        assert len(explainer_calls) == 2
        after = _explanations(run_copy)
        assert all(after[i] == first[i] for i in feats[:4])  # untouched, timestamps included
        # --overwrite redoes them
        res = explain(dataclasses.replace(cfg, overwrite=True))
        assert sorted(res["explained"][SITE]) == feats[:4]


# ------------------------------------------------------------------------------------------------ local backend
def test_local_backend_end_to_end_on_a_tiny_model(run_copy, tiny_llama_dir):
    feats = _alive(run_copy, 2)
    cfg = ExplainConfig(path=str(run_copy), features=tuple(map(str, feats)), backend="local",
                        model=str(tiny_llama_dir), device="cpu", batch_size=4, fuzzing=True, explanation_tokens=8,
                        progress=False)
    with pytest.warns(UserWarning, match="cut to the model's limit"):  # the tiny model has a 256-token context
        res = explain(cfg)
    stored = _explanations(run_copy)
    assert sorted(stored) == feats
    for idx in feats:
        text, score, explainer, _ = stored[idx]
        r = res["explained"][SITE][idx]
        assert text and text == r["explanation"]
        assert explainer.startswith(f"local:{tiny_llama_dir} | detection=") and "fuzzing=" in explainer
        assert score is None or 0.0 <= score <= 1.0
        assert r["detection"]["unparsed"] == 0  # constrained yes/no decoding always answers
        assert score == r["detection"]["balanced_accuracy"]
    # no chat template: the plain prompt was used
    from saeforge.features.autointerp.backends import LocalHFBackend
    from saeforge.models.language_model import LanguageModel

    backend = LocalHFBackend(lm=LanguageModel.load(str(tiny_llama_dir), device="cpu"))
    assert not backend.chat and backend.render(P.detection_prompt("e", "t")).endswith("Answer:")
    assert len(backend.generate([P.detection_prompt("e", "t")] * 3, 4)) == 3


# ------------------------------------------------------------------------------------------------ degenerate replies
ROYAL = [{"tokens": ["Long", " live", " the", " king", ",", " and", " the", " queen"],
          "acts": [0.0, 0.0, 0.0, 3.0, 0.0, 0.0, 0.0, 2.5]},
         {"tokens": ["The", " crown", " of", " England"], "acts": [0.0, 1.0, 0.0, 0.0]}]


@pytest.mark.parametrize("text, reason", [
    ("The feature responds to the feature by responding to the feature's own feature.", "repeats 'feature' 4 times"),
    ("The feature responds to the marked tokens.", "says nothing about the text"),
    ("It fires on tokens in the text.", "says nothing about the text"),
    ("Work out what the marked tokens and their context have in common.", "says nothing"),  # the instructions
    ("", "empty"),
    ("...", "empty"),
    ("1. Long live the <<king>>", "copies an excerpt"),
    ("king, king, king", "repeats 'king' 3 times"),
    ("the crown of the crown of", "repeats 'the crown of'"),
    # what the embedded SmolLM2-135M wrote for a layer-15 TopK SAE
    ("The feature responds to itself.", "talks about the feature itself"),
    ("The feature responds to the question of when the feature fires.", "talks about the feature itself"),
    ("The feature responds to the \"Addition\" in the excerpt.", "says nothing"),  # no "Addition" in the excerpts
])
def test_degenerate_explanations_are_recognised(text, reason):
    from saeforge.features.autointerp.quality import degeneracy

    assert reason in degeneracy(text, ROYAL)


@pytest.mark.parametrize("text", [
    "names of kings and queens", "royal titles", "king",  # the token it fires on may be the whole explanation
    "the word the",  # names a string (even a function word, and even one it does not fire on)
    "tokens like 'and'", 'the token " of"', "punctuation closing a clause", "the particle 'to' before a verb",
    "words about monarchy", "Nouns for rulers, e.g. king, queen",
    'The feature responds to "Long live" in the excerpt.',  # a string the excerpts hold
])
def test_real_explanations_are_kept(text):
    from saeforge.features.autointerp.quality import degeneracy

    assert degeneracy(text, ROYAL) is None


def test_top_token_label_quotes_tokens_and_leaves_out_control_tokens():
    from saeforge.features.autointerp.quality import top_token_label

    assert top_token_label([[" king", 9], ["<|im_start|>", 5], [" queen", 3], ["\n", 2]]) == \
        'tokens: " king", " queen", "\\n"'
    assert top_token_label([["<|endoftext|>", 4]]) is None and top_token_label(None) is None


class ScriptedBackend:
    """Explainer replies scripted per round (a list of replies per call to ``generate`` with explainer prompts); the
    judge says yes when the text holds ``keyword``. Every explainer round's prompts are kept."""

    name = "fake:script"

    def __init__(self, rounds, keyword="the"):
        self.rounds, self.keyword, self.explainer_rounds = list(rounds), keyword, []

    def generate(self, prompts, max_new_tokens):
        if "Excerpts:" in prompts[0][1]["content"]:
            self.explainer_rounds.append(prompts)
            replies = self.rounds.pop(0)
            assert len(replies) == len(prompts)
            return replies
        return ["yes" if self.keyword in p[-1]["content"].split("Text: ", 1)[1].lower() else "no" for p in prompts]


def test_a_degenerate_reply_is_retried_once_then_replaced_by_a_top_token_label(run_copy):
    feats = _alive(run_copy, 3)
    junk = "The feature responds to the feature by responding to the feature's own feature."
    backend = ScriptedBackend([["slings and arrows of fortune", junk, "It fires on tokens."],  # one usable reply
                               ["names of places and people", "The feature responds to the marked tokens."]])
    res = explain(ExplainConfig(path=str(run_copy), features=tuple(map(str, feats)), progress=False, batch_size=8),
                  backend=backend)
    assert [len(r) for r in backend.explainer_rounds] == [3, 2]  # the two unusable replies were asked again, once
    retry = backend.explainer_rounds[1][0]
    assert retry[:2] == backend.explainer_rounds[0][1] and retry[2] == {"role": "assistant", "content": junk}
    assert "repeats 'feature' 4 times" in retry[3]["content"]
    got = res["explained"][SITE]
    assert [got[i]["source"] for i in feats] == ["llm", "llm-retry", "top-tokens"]
    assert got[feats[0]]["rejected"] == [] and len(got[feats[2]]["rejected"]) == 2
    with FeatureStore(run_copy / "features.sqlite", readonly=True) as store:
        recs = [store.feature(SITE, i, with_examples=False) for i in feats]
    from saeforge.features.autointerp.quality import top_token_label

    assert [r["explanation"] for r in recs] == ["slings and arrows of fortune", "names of places and people",
                                                top_token_label(recs[2]["top_tokens"])]
    assert recs[2]["explanation"].startswith('tokens: "')
    for r, i in zip(recs, feats):
        assert r["explanation_source"] == got[i]["source"] and r["explainer_model"] == "fake:script"
        det = got[i]["detection"]
        assert r["score"] == det["balanced_accuracy"] and r["score_chance"] == 0.5
        assert r["score_detail"]["chance_sd"] == pytest.approx(0.25 * (1 / det["n_pos"] + 1 / det["n_neg"]) ** 0.5)
        assert r["score_detail"]["detection"]["n_pos"] == det["n_pos"]
        assert r["score_detail"]["rejected"] == got[i]["rejected"]
