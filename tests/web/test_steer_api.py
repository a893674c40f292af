"""The steering playground's endpoint (``POST /api/steer``) and page through FastAPI's test client: the result is
exactly :func:`run_steering`'s, and every bad request gets a clear ``{"error", "fix", "status"}`` with its status."""

from __future__ import annotations

import pytest

from saeforge.interventions.generate import run_steering
from saeforge.interventions.steering import FeatureEdit, Steerer
from saeforge.web.steering import MAX_STEER_EDITS, MAX_STEER_NEW_TOKENS, MAX_STEER_PROMPTS
from .conftest import NEVER_FIRES, SAE

PROMPTS = ["To be, or not to be", "Now is the winter of"]


@pytest.fixture(scope="module")
def client(web_run, tiny_llama):
    from fastapi.testclient import TestClient

    from saeforge.web.app import create_app

    app = create_app(web_run[0], max_prompt_chars=2000)
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
def steerer(web_run, tiny_llama):
    return Steerer.from_run(web_run[0], lm=tiny_llama)


def _steer(client, edits, prompts=PROMPTS, **settings):
    return client.post("/api/steer", json={"prompts": prompts, "edits": edits, "max_new_tokens": 4, **settings})


def test_steer_equals_run_steering_with_the_same_arguments_and_seed(client, steerer, web_run):
    roles = web_run[1]
    edits = [FeatureEdit(SAE, roles["busy"], "add", 3.0, "max"), FeatureEdit(SAE, roles["third"], "clamp", 0.02, "raw")]
    settings = {"positions": "all", "max_new_tokens": 6, "temperature": 0.9, "seed": 11}
    r = client.post("/api/steer", json={"prompts": PROMPTS, "edits": [e.__dict__ for e in edits], **settings})
    assert r.status_code == 200, r.text
    body = r.json()
    want = run_steering(steerer, PROMPTS, edits, **settings)
    assert body["prompts"] == want.prompts
    assert body["baseline"] == want.baseline and body["steered"] == want.steered
    got, exp = body["metrics"], want.metrics
    for key in ("perplexity_baseline", "perplexity_steered"):
        assert got[key] == pytest.approx(exp[key], rel=1e-5)
    assert got["kl_prompt"] == pytest.approx(exp["kl_prompt"], rel=1e-4, abs=1e-7) and got["kl_prompt"] > 0
    assert len(got["edits"]) == 2
    for g, e in zip(got["edits"], exp["edits"]):
        assert {k: g[k] for k in ("sae", "feature", "mode", "strength", "unit")} == \
               {k: e[k] for k in ("sae", "feature", "mode", "strength", "unit")}
        for k in ("activation_value", "target_activation_baseline", "target_activation_steered"):
            assert g[k] == pytest.approx(e[k], rel=1e-5, abs=1e-6), k
    add = got["edits"][0]
    assert add["target_activation_steered"] > add["target_activation_baseline"]  # it moved as asked
    assert body["edits"][0] == {"sae": SAE, "feature": roles["busy"], "mode": "add", "strength": 3.0, "unit": "max"}
    assert {body[k] for k in ("positions", "max_new_tokens", "temperature", "seed")} == {"all", 6, 0.9, 11}
    assert set(map(int, body["feature_info"][SAE])) == {roles["busy"], roles["third"]}

    # the same request again: the same text (one seed for both columns, every time); generated positions only
    # leave the prompt's predictions alone (KL 0); the SAE defaults to the run's first
    again = client.post("/api/steer", json={"prompts": PROMPTS, "edits": [e.__dict__ for e in edits], **settings})
    assert again.json()["steered"] == body["steered"]
    r = _steer(client, [{"feature": roles["busy"], "strength": 3}], prompts=PROMPTS[:1], positions="generated")
    assert r.status_code == 200 and r.json()["metrics"]["kl_prompt"] == 0.0 and r.json()["edits"][0]["sae"] == SAE


def _nan_json(client, feature):
    # JSON proper has no NaN, but Python's json (and so the server) reads the bare token
    body = ('{"prompts": ["to be"], "edits": [{"sae": "%s", "feature": %d, "strength": NaN}], "max_new_tokens": 2}'
            % (SAE, feature))
    return client.post("/api/steer", content=body, headers={"content-type": "application/json"})


@pytest.mark.parametrize("edit, status, error, fix", [
    ({"feature": 128}, 404, "feature 128 is out of range for SAE 'layers.1.resid_post' (0..127)", "below 128"),
    ({"feature": 10**9, "strength": None}, 404, "out of range", "below 128"),  # the index is checked first
    ({"sae": "nope", "feature": 1}, 404, "no SAE 'nope' in this run", SAE),
    ({"strength": 1e9}, 400, "steering strength 1000000000.0 is not allowed", "|strength| ≤ 1000 (unit max)"),
    ({"strength": -1001}, 400, "not allowed", "|strength| ≤ 1000 (unit max)"),
    ({"strength": 2e5, "unit": "raw"}, 400, "not allowed", "|strength| ≤ 100000 (unit raw)"),
    ({"strength": None}, 400, "steering strength nan is not allowed", "≤ 1000"),  # what a browser sends for NaN
    ({"mode": "boost"}, 400, "unknown steering mode 'boost'", "add, clamp, scale"),
    ({"unit": "sigma"}, 400, "unknown strength unit 'sigma'", "max, raw"),
    ({"feature": None}, 400, "feature row 1 has no feature index", "index"),
])
def test_bad_feature_edits_are_refused_with_the_reason(client, web_run, edit, status, error, fix):
    r = _steer(client, [{"sae": SAE, "feature": web_run[1]["busy"], "mode": "add", "strength": 2, **edit}])
    assert r.status_code == status and r.headers["content-type"] == "application/json", r.text
    body = r.json()
    assert error in body["error"] and fix in body["fix"] and body["status"] == status


def test_nan_and_infinite_strengths_name_the_allowed_range(client, web_run):
    r = _nan_json(client, web_run[1]["busy"])
    assert r.status_code == 400 and "nan is not allowed" in r.json()["error"] and "≤ 1000" in r.json()["fix"]
    body = '{"prompts": ["to be"], "edits": [{"feature": 1, "strength": Infinity, "unit": "raw"}]}'
    r = client.post("/api/steer", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400 and "inf is not allowed" in r.json()["error"] and "≤ 100000" in r.json()["fix"]


def test_a_feature_that_never_fired_has_no_max_unit(client, steerer):
    assert float(steerer.max_acts[SAE][NEVER_FIRES]) == 0  # the fixture silenced it
    r = _steer(client, [{"feature": NEVER_FIRES, "strength": 2, "unit": "max"}])
    assert r.status_code == 400 and "never fired" in r.json()["error"] and "raw" in r.json()["fix"]
    assert _steer(client, [{"feature": NEVER_FIRES, "strength": 2, "unit": "raw"}]).status_code == 200


@pytest.mark.parametrize("change, status, error, fix", [
    ({"prompts": []}, 400, "no prompt given", "one per line"),
    ({"prompts": ["to be", "   "]}, 400, "prompt 2 is empty", "some text"),
    ({"prompts": ["to be"] * (MAX_STEER_PROMPTS + 1)}, 413, f"{MAX_STEER_PROMPTS + 1} prompts; the limit is "
                                                           f"{MAX_STEER_PROMPTS}", "at most"),
    ({"prompts": ["x" * 2001]}, 413, "prompt 1 has 2,001 characters; the limit is 2,000", "shorten"),
    ({"prompts": ["word " * 300]}, 413, "tokens; the playground's limit is 256 tokens a prompt", "saeforge steer"),
    ({"prompts": ["word " * 60], "max_new_tokens": 100}, 413,
     "tokens; with 100 new tokens the model's context of 256 allows 156", "shorten"),
    ({"edits": []}, 400, "no feature to steer", "add a feature row"),
    ({"edits": [{"feature": 1, "unit": "raw"}] * (MAX_STEER_EDITS + 1)}, 413,
     f"{MAX_STEER_EDITS + 1} feature edits; the limit is {MAX_STEER_EDITS}", "at most"),
    ({"max_new_tokens": 0}, 400, "max_new_tokens 0 is out of range", f"1..{MAX_STEER_NEW_TOKENS}"),
    ({"max_new_tokens": MAX_STEER_NEW_TOKENS + 1}, 400, "out of range", f"1..{MAX_STEER_NEW_TOKENS}"),
    ({"temperature": -0.5}, 400, "temperature -0.5 is out of range", "0: greedy"),
    ({"temperature": 50}, 400, "out of range", "0..5"),
    ({"seed": -1}, 400, "seed -1 is out of range", "0..4294967295"),
    ({"positions": "prompt"}, 400, "unknown positions 'prompt'", "all or generated"),
])
def test_bad_requests_are_refused_with_the_reason(client, change, status, error, fix):
    body = {"prompts": ["to be"], "edits": [{"feature": 1, "strength": 2, "unit": "raw"}], "max_new_tokens": 4,
            **change}
    r = client.post("/api/steer", json=body)
    assert r.status_code == status, r.text
    got = r.json()
    assert error in got["error"] and fix in got["fix"] and got["status"] == status


def test_malformed_requests_are_422(client):
    r = client.post("/api/steer", json={"edits": [{"feature": 1}]})
    assert r.status_code == 422 and "prompts" in r.json()["error"]
    r = client.post("/api/steer", json={"prompts": ["to be"], "edits": [{"feature": "abc"}]})
    assert r.status_code == 422 and "edits.0.feature" in r.json()["error"]


def test_page_form_prefill_and_links(client, web_run):
    idx = web_run[1]["busy"]
    html = client.get("/steer").text
    assert 'id="steer-form"' in html and f'<option value="{SAE}" data-d-sae="128" selected>' in html
    assert 'id="nav-steer"' in html and "/static/steer.js" in html
    html = client.get("/steer", params={"sae": SAE, "feature": idx, "mode": "clamp", "strength": "1.5",
                                        "prompt": "Now is the winter"}).text
    assert f'class="edit-feature" min="0" step="1" value="{idx}"' in html
    assert "<option selected>clamp</option>" in html and 'value="1.5"' in html
    assert ">Now is the winter</textarea>" in html
    # nothing in the query is trusted: unknown values fall back, text is escaped
    html = client.get("/steer", params={"sae": "nope", "mode": "boost", "prompt": "<script>x</script>"}).text
    assert "<option selected>add</option>" in html and "&lt;script&gt;x&lt;/script&gt;" in html
    feature_page = client.get(f"/saes/{SAE}/features/{idx}").text
    assert f'href="/steer?sae={SAE}&amp;feature={idx}" id="steer-link"' in feature_page


def test_the_inspector_shares_the_steerers_model_and_sees_no_steering(client, web_run, tiny_llama):
    from saeforge.features.inspect import inspect_prompt

    assert _steer(client, [{"feature": web_run[1]["busy"], "strength": 50}], prompts=PROMPTS[:1]).status_code == 200
    text = "To be, or not to be, that is the question"
    got = client.post("/api/inspect", json={"text": text, "top": 3}).json()["tokens"]
    want = inspect_prompt(web_run[0], text, top=3, lm=tiny_llama)
    assert [[f[0] for f in t["features"][SAE]] for t in got] == [[f[0] for f in t["features"][SAE]] for t in want]
    host = client.app.state.data.model
    assert host._inspector.lm is host._steerer.lm  # one model in memory, behind one lock
