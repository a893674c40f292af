"""The steering bench: scorers, bad input, equal-norm sweeps, coherence, the judge failing part-way (partial rows
kept, a rerun resumes), the table, the plot and the command line."""

import contextlib
import json
import math

import pytest
import torch

from saeforge.cli import build_parser
from saeforge.errors import SaeforgeError
from saeforge.interventions import bench as B
from saeforge.interventions.steering import Steerer

ROYAL = [f"The king and the queen {w} the crown of the realm" for w in
         ("wore", "lost", "found", "kept", "gave", "took", "sold", "held", "saw", "wanted", "raised", "loved")]
PLAIN = [f"A fish swims {w} in the cold river under the bridge" for w in
         ("slowly", "quickly", "alone", "home", "far", "deep", "north", "south", "east", "west", "fast", "again")]
PROMPTS = ["To be, or not to be", "Now is the winter of our discontent", "Friends, Romans, countrymen"]


@pytest.fixture(scope="module")
def steerer(tiny_run, tiny_llama):
    return Steerer.from_run(tiny_run, lm=tiny_llama)


def _spy(monkeypatch, steerer):
    """Record the vectors every steering block adds."""
    seen = []
    original = steerer.steering

    @contextlib.contextmanager
    def steering(*args, vectors=None, **kw):
        seen.append({k: v.clone() for k, v in (vectors or {}).items()})
        with original(*args, vectors=vectors, **kw):
            yield

    monkeypatch.setattr(steerer, "steering", steering)
    return seen


def test_keyword_and_accuracy_scorers():
    k = B.make_scorer("keyword", keywords=["king", "crown"])
    assert k.score([""] * 3, ["The King is here", "a crowning moment", "crown."]) == [1.0, 0.0, 1.0]
    a = B.make_scorer("accuracy", answers=["12", "Paris", "-3"])
    # a number must be the first number generated; a word must appear as a whole word
    assert a.score([""] * 3, ["12 apples", "the capital is paris.", "3 or -3"]) == [1.0, 1.0, 0.0]
    assert a.score([""] * 3, ["It is 12.0", "Parisian", "x = -3, y = 4"]) == [1.0, 0.0, 1.0]
    with pytest.raises(SaeforgeError, match="2 answers for 3 prompts"):
        B.make_scorer("accuracy", answers=["1", "2"]).score([""] * 3, ["1", "2", "3"])


class FakeJudge:
    """Says yes when the continuation holds 'king'; fluent when it has no '#'; fails after ``fail_after`` calls."""

    def __init__(self, fail_after=None):
        self.calls, self.fail_after = 0, fail_after

    def generate(self, prompts, max_new_tokens):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise SaeforgeError("cannot reach the LLM endpoint http://x/v1 after 4 tries (URLError)", "start it")
        out = []
        for p in prompts:
            text = p[1]["content"]
            cont = text.split("Continuation: ", 1)[1].split("\n\n")[0]
            if "behaviour" in text:
                out.append("Yes." if "king" in cont else "No")
            else:
                out.append("no" if "#" in cont else "yes")
        return out


def test_judge_scorer_asks_behaviour_and_fluency():
    judge = B.make_scorer("judge", behaviour="speaks of kings", backend=FakeJudge())
    assert judge.score(["p", "q"], ["the king", "a fish"]) == [1.0, 0.0]
    assert judge.fluency(["p", "q"], ["fine", "##"]) == [1.0, 0.0]

    class Mumbler:
        def generate(self, prompts, n):
            return ["maybe"] * len(prompts)

    assert all(math.isnan(s) for s in B.make_scorer("judge", behaviour="b", backend=Mumbler()).score(["p"], ["x"]))


def test_bad_scorers_sets_and_sweeps():
    with pytest.raises(SaeforgeError, match="unknown scorer 'vibes'"):
        B.make_scorer("vibes")
    with pytest.raises(SaeforgeError, match="needs keywords"):
        B.make_scorer("keyword")
    with pytest.raises(SaeforgeError, match="needs the expected answers"):
        B.make_scorer("accuracy")
    with pytest.raises(SaeforgeError, match="needs a judge model"):
        B.make_scorer("judge", behaviour="x")
    kw = B.KeywordScorer(["king"])
    with pytest.raises(SaeforgeError, match="the negative set holds 0 text"):
        B.check_behaviour(B.Behaviour(ROYAL, [], PROMPTS, kw))
    with pytest.raises(SaeforgeError, match="the positive set holds 1 text"):
        B.check_behaviour(B.Behaviour(ROYAL[:1], PLAIN, PROMPTS, kw))
    with pytest.raises(SaeforgeError, match="no prompt to steer"):
        B.check_behaviour(B.Behaviour(ROYAL, PLAIN, [], kw))
    with pytest.raises(SaeforgeError, match="3 pair prompts for 12 positive"):
        B.check_behaviour(B.Behaviour(ROYAL, PLAIN, PROMPTS, kw, pair_prompts=PROMPTS))
    with pytest.raises(SaeforgeError, match="the strength sweep is empty"):
        B.check_sweep(["caa"], [])
    B.check_sweep(["prompting"], [])  # prompting alone has no strength
    with pytest.raises(SaeforgeError, match="unknown method.*steer_harder"):
        B.check_sweep(["caa", "steer_harder"], [1.0])
    with pytest.raises(SaeforgeError, match=r"not in \(0, 1000\]"):
        B.check_sweep(["caa"], [1.0, -2.0])


def test_bench_sweeps_every_method_at_equal_norm(steerer, monkeypatch, tmp_path):
    seen = _spy(monkeypatch, steerer)
    behaviour = B.Behaviour(ROYAL, PLAIN, PROMPTS, B.KeywordScorer(["king", "crown"]))
    methods = ["caa", "sta", "refined_caa", "sae_rsv", "random", "prompting"]
    report = B.run_bench(steerer, behaviour, methods, [1.0, 4.0], inputs={"instruction": "Speak of kings."},
                         max_new_tokens=4, out=str(tmp_path), progress=False)
    built = [m for m in methods if m not in report["method_errors"]]
    assert report["method_errors"] == {} and built == methods  # the royal texts do light up their own latents
    rows = report["rows"]
    expected = [("none", 0.0)] + [(m, a) for m in built if m != "prompting" for a in (1.0, 4.0)] + [("prompting", 0.0)]
    assert [(r["method"], r["multiplier"]) for r in rows] == expected
    # each vector row added one vector of norm α·‖v_CAA‖ at the SAE's site (the random baseline too)
    vectors = [v for v in seen if v]
    assert len(vectors) == len(expected) - 2
    for (method, alpha), added in zip(expected[1:-1], vectors):
        (site, v), = added.items()
        assert site == "layers.1.resid_post"
        assert float(v.norm()) == pytest.approx(alpha * report["caa_norm"], rel=1e-5)
    caa_row = next(r for r in rows if r["method"] == "caa" and r["multiplier"] == 1.0)
    assert report["methods"]["caa"]["cos_caa"] == pytest.approx(1.0)
    assert abs(report["methods"]["random"]["cos_caa"]) < 0.9
    # coherence and the product, from the rows' own numbers
    base = rows[0]
    assert base["coherence"] == 1.0
    assert caa_row["coherence"] == pytest.approx(min(1.0, base["perplexity"] / caa_row["perplexity"]))
    assert caa_row["behaviour_x_coherence"] == pytest.approx(caa_row["behaviour"] * caa_row["coherence"])
    for r in rows:
        assert 0.0 <= r["behaviour"] <= 1.0 and r["perplexity"] > 1.0 and len(r["samples"]) == 3
    saved = json.loads((tmp_path / B.RESULT_FILE).read_text())
    assert saved["rows"] == json.loads(json.dumps(rows))
    assert (tmp_path / B.PLOT_FILE).stat().st_size > 1000
    table = B.format_bench(report)
    assert table.count("\n| ") == len(rows) + 1 and "| prompting | — |" in table


def test_prompting_writes_the_instruction_before_each_prompt(steerer, monkeypatch):
    made = []
    from saeforge.interventions import generate

    class Recording(generate.Continuations):
        def __init__(self, s, prompts, **kw):
            made.append(list(prompts))
            super().__init__(s, prompts, **kw)

    monkeypatch.setattr(generate, "Continuations", Recording)
    behaviour = B.Behaviour(ROYAL, PLAIN, PROMPTS, B.KeywordScorer(["king"]))
    report = B.run_bench(steerer, behaviour, ["prompting"], [], inputs={"instruction": "Speak of kings."},
                         max_new_tokens=3, progress=False)
    assert made == [PROMPTS, [f"Speak of kings. {p}" for p in PROMPTS]]
    assert [r["method"] for r in report["rows"]] == ["none", "prompting"]
    report = B.run_bench(steerer, behaviour, ["caa", "prompting"], [1.0], max_new_tokens=3, progress=False)
    assert "needs an instruction" in report["method_errors"]["prompting"]  # no instruction: no prompting row
    assert [r["method"] for r in report["rows"]] == ["none", "caa"]


def test_a_judge_that_stops_answering_keeps_the_rows_and_a_rerun_resumes(steerer, monkeypatch, tmp_path):
    seen = _spy(monkeypatch, steerer)
    # each row asks twice (behaviour and fluency): rows none and caa×1 pass, caa×2 fails
    failing = B.JudgeScorer(FakeJudge(fail_after=4), "speaks of kings")
    behaviour = B.Behaviour(ROYAL, PLAIN, PROMPTS, failing)
    args = dict(max_new_tokens=3, out=str(tmp_path), progress=False, settings={"behaviour": "kings"})
    with pytest.raises(B.BenchInterrupted, match=r"stopped at caa × 2: cannot reach the LLM endpoint.*2 row\(s\) "
                       r"finished, saved in") as err:
        B.run_bench(steerer, behaviour, ["caa"], [1.0, 2.0, 4.0], **args)
    assert "run the same command again" in err.value.fix
    saved = json.loads((tmp_path / B.RESULT_FILE).read_text())
    assert [(r["method"], r["multiplier"]) for r in saved["rows"]] == [("none", 0.0), ("caa", 1.0)]
    assert err.value.report["rows"] == saved["rows"]
    assert all("fluency" in r for r in saved["rows"])
    n_steered = len(seen)
    # the rerun generates only the missing rows
    judge = FakeJudge()
    behaviour.scorer = B.JudgeScorer(judge, "speaks of kings")
    report = B.run_bench(steerer, behaviour, ["caa"], [1.0, 2.0, 4.0], **args)
    assert [(r["method"], r["multiplier"]) for r in report["rows"]] == [
        ("none", 0.0), ("caa", 1.0), ("caa", 2.0), ("caa", 4.0)]
    assert report["rows"][:2] == saved["rows"]
    assert judge.calls == 4 and len(seen) - n_steered == 2
    # other settings: nothing is reused
    judge = FakeJudge()
    behaviour.scorer = B.JudgeScorer(judge, "speaks of kings")
    B.run_bench(steerer, behaviour, ["caa"], [1.0, 2.0, 4.0], **{**args, "seed": 1})
    assert judge.calls == 8


def test_the_command_refuses_bad_input_before_loading(tmp_path):
    pos, neg, prompts = tmp_path / "p.txt", tmp_path / "n.txt", tmp_path / "q.txt"
    pos.write_text("\n".join(ROYAL))
    neg.write_text("\n".join(PLAIN))
    prompts.write_text("\n".join(PROMPTS))
    missing = str(tmp_path / "no-run")  # never loaded: every error comes first
    good = dict(positive=str(pos), negative=str(neg), prompts_file=str(prompts), keywords=("king",))
    cases = [(dict(good, negative=""), "needs both sides"),
             (dict(good, scorer="vibes"), "unknown scorer 'vibes'"),
             (dict(good, multipliers=()), "the strength sweep is empty"),
             (dict(good, scorer="judge"), "needs a judge model"),
             (dict(good, keywords=()), "needs keywords")]
    one = tmp_path / "one.txt"
    one.write_text("only one line\n")
    cases.append((dict(good, negative=str(one)), "the negative set holds 1 text"))
    for kw, message in cases:
        with pytest.raises(SaeforgeError, match=message):
            B.bench_steering(B.BenchSteeringConfig(path=missing, **kw))
    args = build_parser().parse_args(["bench-steering", "RUN", "--positive", "p.txt", "--negative", "n.txt",
                                      "--multipliers", "1", "3", "--methods", "caa", "random", "--scorer", "keyword",
                                      "--keywords", "king,crown", "--rsv-alphas", "1", "0.3", "0.2"])
    cfg = args.cfg
    assert cfg.multipliers == (1.0, 3.0) and cfg.methods == ("caa", "random")
    assert tuple(cfg.rsv_alphas) == (1.0, 0.3, 0.2)


def test_the_random_baseline_is_seeded_and_of_the_caa_size():
    x = B.BenchInputs(None, None, None, torch.tensor([3.0, 4.0, 0.0, 0.0]), seed=5)
    a, b = B.BUILDERS["random"](x).vector, B.BUILDERS["random"](x).vector
    torch.testing.assert_close(a, b)
    other = B.BUILDERS["random"](B.BenchInputs(None, None, None, x.caa, seed=6)).vector
    assert not torch.allclose(a, other)
    assert B.BUILDERS["caa"](x).vector.tolist() == [3.0, 4.0, 0.0, 0.0]


def test_srps_and_its_controls_inject_at_the_last_prompt_position(steerer, monkeypatch):
    from saeforge.interventions import roleplay

    injected = []
    original = roleplay.last_prompt_rotation

    @contextlib.contextmanager
    def recording(lm, site, v):
        injected.append((site, float(v.norm())))
        with original(lm, site, v):
            yield

    monkeypatch.setattr(roleplay, "last_prompt_rotation", recording)
    seen = _spy(monkeypatch, steerer)
    questions = [f"Question: What is {a} plus {b}? Answer:" for a, b in [(2, 3), (4, 5), (7, 1), (6, 6), (9, 2)]]
    behaviour = B.Behaviour([" 5", " 9", " 8", " 12", " 11"], [" 6", " 8", " 9", " 13", " 10"], questions[:2],
                            B.AccuracyScorer(["5", "9"]), pair_prompts=questions)
    report = B.run_bench(steerer, behaviour, ["srps", "srps_diffmeans", "roleplay_prompting"], [2.0],
                         inputs={"roles": ("You are a mathematics teacher.",), "srps_k": 3}, max_new_tokens=3,
                         progress=False)
    assert report["method_errors"] == {}
    assert [(r["method"], r["multiplier"]) for r in report["rows"]] == [
        ("none", 0.0), ("srps", 2.0), ("srps_diffmeans", 2.0), ("roleplay_prompting", 0.0)]
    assert len(report["methods"]["srps"]["info"]["latents"]) == 3
    assert [s for s, _ in injected] == ["layers.1.resid_post"] * 2
    assert [n for _, n in injected] == pytest.approx([2.0 * report["caa_norm"]] * 2, rel=1e-5)
    assert not any(seen)  # nothing was added at every position


def test_strengths_in_residual_units(steerer, monkeypatch):
    seen = _spy(monkeypatch, steerer)
    behaviour = B.Behaviour(ROYAL, PLAIN, PROMPTS[:1], B.KeywordScorer(["king"]))
    report = B.run_bench(steerer, behaviour, ["caa", "random"], [0.5], unit="residual", max_new_tokens=2,
                         progress=False)
    mean_norm = steerer.mean_norm(report["sae"])[0]
    assert report["unit_norm"] == pytest.approx(mean_norm) and report["caa_norm"] != pytest.approx(mean_norm)
    assert [float(v.norm()) for added in seen if added for v in added.values()] == pytest.approx([0.5 * mean_norm] * 2)
    assert "| method | α (× mean ‖x‖) |" in B.format_bench(report)
    with pytest.raises(SaeforgeError, match="unknown strength unit 'volts'"):
        B.run_bench(steerer, behaviour, ["caa"], [1.0], unit="volts")


class _Endpoint:
    """A local OpenAI-compatible chat endpoint in a thread: yes when the continuation holds 'king' (and to every
    fluency question); after ``answers`` requests it answers 503 to every one."""

    def __init__(self, answers=None):
        import http.server
        import threading

        self.requests, self.answers = [], answers
        endpoint = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                endpoint.requests.append((self.path, body))
                if endpoint.answers is not None and len(endpoint.requests) > endpoint.answers:
                    self.send_response(503)
                    self.end_headers()
                    self.wfile.write(b"overloaded")
                    return
                text = body["messages"][1]["content"]
                cont = text.split("Continuation: ", 1)[1].split("\n\n")[0]
                verdict = ("Yes" if "king" in cont else "No") if "behaviour" in text else "yes"
                payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": verdict}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_the_judge_scorer_goes_through_an_openai_compatible_endpoint(steerer, monkeypatch, tmp_path):
    """bench-steering --scorer judge against a real HTTP endpoint: the verdicts it gives become the behaviour and
    fluency columns; when it stops answering the bench stops after the retries with a clear error, keeps the
    finished rows, and a rerun resumes after them."""
    import saeforge.features.autointerp.backends as backends

    monkeypatch.setattr(backends.time, "sleep", lambda s: None)  # the retries' back-off
    for name, texts in (("p", ROYAL), ("n", PLAIN), ("q", PROMPTS)):
        (tmp_path / f"{name}.txt").write_text("\n".join(texts) + "\n")
    cfg = B.BenchSteeringConfig(path="unused", positive=str(tmp_path / "p.txt"), negative=str(tmp_path / "n.txt"),
                                prompts_file=str(tmp_path / "q.txt"), scorer="judge", behaviour="speaks of kings",
                                judge_model="fake-judge", judge_retries=1, methods=("caa",),
                                multipliers=(1.0, 2.0, 4.0), max_new_tokens=3, out=str(tmp_path / "out"))
    # each row asks 3 prompts × 2 questions: rows none and caa × 1 are answered, caa × 2 is not
    failing = _Endpoint(answers=12)
    monkeypatch.setenv("SAEFORGE_LLM_BASE_URL", failing.url)
    try:
        with pytest.raises(B.BenchInterrupted, match=r"stopped at caa × 2: cannot reach the LLM endpoint "
                           r"http://127\.0\.0\.1:\d+/v1/chat/completions after 2 tries \(HTTP 503: overloaded\); "
                           r"2 row\(s\) finished") as err:
            B.bench_steering(cfg, steerer=steerer)
    finally:
        failing.close()
    assert "run the same command again" in err.value.fix
    paths = {p for p, _ in failing.requests}
    assert paths == {"/v1/chat/completions"} and {b["model"] for _, b in failing.requests} == {"fake-judge"}
    saved = json.loads((tmp_path / "out" / B.RESULT_FILE).read_text())
    assert [(r["method"], r["multiplier"]) for r in saved["rows"]] == [("none", 0.0), ("caa", 1.0)]
    for row in saved["rows"]:  # the endpoint's verdicts, recomputed from the saved generations (all 3 kept)
        assert len(row["samples"]) == 3 and row["fluency"] == 1.0
        assert row["behaviour"] == pytest.approx(sum("king" in s for s in row["samples"]) / 3)
    healthy = _Endpoint()
    monkeypatch.setenv("SAEFORGE_LLM_BASE_URL", healthy.url)
    try:
        report = B.bench_steering(cfg, steerer=steerer)
    finally:
        healthy.close()
    assert [(r["method"], r["multiplier"]) for r in report["rows"]] == [
        ("none", 0.0), ("caa", 1.0), ("caa", 2.0), ("caa", 4.0)]
    assert report["rows"][:2] == saved["rows"]
    assert len(healthy.requests) == 2 * 3 * 2  # only the two missing rows were judged
    asked = [b["messages"][1]["content"] for _, b in healthy.requests]
    assert sum("speaks of kings" in a for a in asked) == 6 and sum("fluent" in a for a in asked) == 6


def test_alignsae_method_steers_along_the_concept_latent(tiny_run, tiny_llama, steerer, monkeypatch, tmp_path):
    from saeforge.saes import AlignSAEConfig, make_sae, save_sae

    behaviour = B.Behaviour(ROYAL, PLAIN, PROMPTS, B.KeywordScorer(["king", "crown"]))
    # the run's TopK SAE has no concept latents: a finding in the report, not a crash
    report = B.run_bench(steerer, behaviour, ["caa", "alignsae"], [1.0], inputs={"concept": "royalty"},
                         max_new_tokens=2, progress=False)
    assert "needs an AlignSAE" in report["method_errors"]["alignsae"]
    meta = json.loads((tiny_run / "saes" / "layers.1.resid_post" / "cfg.json").read_text())["metadata"]
    torch.manual_seed(0)
    sae = make_sae(AlignSAEConfig(d_in=32, d_sae=64, concepts=("royalty", "number")))
    save_sae(sae, tmp_path / "align", metadata=meta)
    aligned = Steerer.from_run(tmp_path / "align", lm=tiny_llama)
    seen = _spy(monkeypatch, aligned)
    report = B.run_bench(aligned, behaviour, ["alignsae"], [2.0], inputs={"concept": "royalty"}, max_new_tokens=2,
                         progress=False)
    assert report["methods"]["alignsae"]["info"] == {"concept": "royalty", "latent": 62}
    (v,) = [x["layers.1.resid_post"] for x in seen if x]
    assert float(torch.nn.functional.cosine_similarity(v, sae.W_dec[62].detach(), dim=0)) == pytest.approx(1.0)
    assert float(v.norm()) == pytest.approx(2.0 * report["caa_norm"], rel=1e-5)
    n = len(seen)
    with pytest.raises(SaeforgeError, match="unknown concept 'weather'"):
        B.run_bench(aligned, behaviour, ["alignsae"], [2.0], inputs={"concept": "weather"}, progress=False)
    with pytest.raises(SaeforgeError, match="needs the concept") as err:
        B._alignsae(B.BenchInputs(sae, None, None, torch.zeros(32)))
    assert "--concept" in err.value.fix and len(seen) == n
