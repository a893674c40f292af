"""The dashboard's JSON endpoints and pages through FastAPI's test client (no browser, no network)."""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
import queue
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from saeforge.errors import SaeforgeError
from saeforge.features.inspect import inspect_prompt
from saeforge.features.store import FeatureStore
from .conftest import EXPLANATIONS, SAE


@pytest.fixture(scope="module")
def client(web_run, tiny_llama):
    from fastapi.testclient import TestClient

    from saeforge.web.app import create_app

    app = create_app(web_run[0], max_prompt_chars=2000)
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
def store(web_run):
    with FeatureStore(web_run[0] / "features.sqlite", readonly=True) as s:
        yield s


def test_overview_has_the_eval_metrics_and_serves_the_plots(client, web_run):
    ev = json.loads((web_run[0] / "eval.json").read_text())["saes"][SAE]
    body = client.get("/api/run").json()
    (sae,) = body["saes"]
    assert sae["name"] == SAE and sae["d_sae"] == 128 and sae["in_store"] and sae["n_explained"] == 4
    for key in ("fvu", "l0", "dead_fraction", "ce_recovered", "kl_div"):
        assert sae["metrics"][key] == ev[key]
    assert [m["key"] for m in sae["key_metrics"]][:3] == ["fvu", "explained_variance", "l0"]
    assert body["store"]["n_tokens"] == 64 * 16 and body["run"]["name"] == "run"
    names = sorted(url.rsplit("/", 1)[1] for url in sae["plots"])  # eval's three plots and harvest's heat map
    assert names == ["activation_heatmap.png", "activation_magnitudes.png", "feature_density.png", "l0_per_token.png"]
    for url in sae["plots"]:
        r = client.get(url)
        assert r.status_code == 200 and r.headers["content-type"] == "image/png" and r.content[:4] == b"\x89PNG"
    html = client.get("/").text
    assert f"{ev['fvu']:.4g}" in html and all(url in html for url in sae["plots"])
    # only the listed plot files are served: no way out of the plots folder
    assert client.get(f"/plots/{SAE}/..%2F..%2Frun.json").status_code == 404
    assert client.get(f"/plots/{SAE}/cfg.json").status_code == 404


def test_feature_search_by_explanation_and_by_token(client, web_run, store):
    _, roles = web_run
    r = client.get(f"/api/saes/{SAE}/features", params={"q": "punctuation"}).json()
    assert [f["idx"] for f in r["features"]] == [roles["busy"]]
    assert r["features"][0]["explanation"] == EXPLANATIONS["busy"]
    r = client.get(f"/api/saes/{SAE}/features", params={"q": "KINGS"}).json()  # case-insensitive
    assert [f["idx"] for f in r["features"]] == [roles["third"]]
    assert client.get(f"/api/saes/{SAE}/features", params={"q": "zebra"}).json()["features"] == []

    token = store.feature(SAE, roles["busy"], with_examples=False)["top_tokens"][0][0]
    r = client.get(f"/api/saes/{SAE}/features", params={"token": token, "limit": 500}).json()
    got = [f["idx"] for f in r["features"]]
    tops = {i: store.feature(SAE, i, with_examples=False)["top_tokens"] or [] for i in range(128)}
    expected = {i for i in range(128) if any(t == token for t, _ in tops[i])}  # the token exactly
    assert roles["busy"] in got and set(got) == expected and r["total"] == len(expected) and r["order"] == "relevance"
    # most relevant first: the token's share of each feature's strongest activations, shrunk for rare features
    relevance = [f["token_hits"] / (min(100, f["fire_count"]) + 10) for f in r["features"]]
    assert relevance == sorted(relevance, reverse=True)
    assert [f["token_relevance"] for f in r["features"]] == pytest.approx(relevance)
    assert [f["token_share"] for f in r["features"]] == pytest.approx(
        [f["token_hits"] / min(100, f["fire_count"]) for f in r["features"]])
    for f in r["features"]:
        assert f["token_hits"] == dict(map(tuple, tops[f["idx"]]))[token]
    # characters that LIKE or the JSON text would read as patterns match nothing here (no top token is one)
    for pattern in (",", "[", "]", "%", "_", '"', "\\"):
        hits = client.get(f"/api/saes/{SAE}/features", params={"token": pattern, "limit": 500}).json()
        assert {f["idx"] for f in hits["features"]} == {i for i in range(128) if any(
            t.strip(" ") == pattern for t, _ in tops[i])}

    page = client.get(f"/saes/{SAE}/features", params={"q": "punctuation"}).text
    assert f'href="/saes/{SAE}/features/{roles["busy"]}"' in page and EXPLANATIONS["busy"] in page


def test_feature_list_orders_and_pages(client):
    first = client.get(f"/api/saes/{SAE}/features", params={"order": "index", "limit": 50}).json()
    assert [f["idx"] for f in first["features"]] == list(range(50)) and first["has_more"]
    last = client.get(f"/api/saes/{SAE}/features", params={"order": "index", "offset": 100, "limit": 50}).json()
    assert [f["idx"] for f in last["features"]] == list(range(100, 128)) and not last["has_more"]
    dens = [f["density"] for f in client.get(f"/api/saes/{SAE}/features").json()["features"]]
    assert dens == sorted(dens, reverse=True)
    for params in ({"order": "random"}, {"limit": 0}, {"limit": 10_000}, {"offset": -1}):
        r = client.get(f"/api/saes/{SAE}/features", params=params)
        assert r.status_code == 400 and r.json()["error"]


def test_feature_json_and_page_match_the_store(client, web_run, store):
    idx = web_run[1]["busy"]
    rec = store.feature(SAE, idx)
    got = client.get(f"/api/saes/{SAE}/features/{idx}").json()
    for key in ("density", "fire_count", "max_act", "mean_act", "quantiles", "histogram", "top_tokens", "promoted",
                "suppressed", "explanation", "score"):
        assert got[key] == rec[key], key
    assert got["explanation"] == EXPLANATIONS["busy"]
    for kind in ("top", "quantile", "random"):
        assert [(e["tokens"], e["acts"]) for e in got["examples"][kind]] == \
               [(e["tokens"], e["acts"]) for e in rec["examples"][kind]]
    assert len(got["examples"]["top"]) > 0
    assert [(n["idx"], n["cosine"]) for n in got["neighbors"]] == [tuple(n) for n in rec["neighbors"]]
    assert all("top_tokens" in n and "explanation" in n for n in got["neighbors"])

    html = client.get(f"/saes/{SAE}/features/{idx}").text
    shown = [e for k in ("top", "quantile", "random") for e in rec["examples"][k]]
    n_on = sum(1 for e in shown for a in e["acts"] if a > 0)
    assert html.count('class="t on') == n_on > 0  # every firing token highlighted, and only those
    assert html.count(" peak") >= len(rec["examples"]["top"])
    assert all(f'href="/saes/{SAE}/features/{n[0]}"' in html for n in rec["neighbors"])
    assert 'id="promoted"' in html and 'id="suppressed"' in html and "<svg" in html


@pytest.mark.parametrize("path", [f"/api/saes/{SAE}/features/128", f"/api/saes/{SAE}/features/-1",
                                  f"/api/saes/{SAE}/features/99999999", f"/saes/{SAE}/features/128"])
def test_out_of_range_feature_is_a_404_with_a_json_error(client, path):
    r = client.get(path)
    assert r.status_code == 404 and r.headers["content-type"] == "application/json"
    assert "out of range" in r.json()["error"] and "0..127" in r.json()["error"] and r.json()["fix"]


def test_other_bad_requests_are_clear(client):
    r = client.get("/api/saes/nope/features/1")
    assert r.status_code == 404 and "no SAE named 'nope'" in r.json()["error"] and SAE in r.json()["fix"]
    r = client.get(f"/api/saes/{SAE}/features/abc")
    assert r.status_code == 422 and "integer" in r.json()["error"]
    r = client.get("/no/such/page")
    assert r.status_code == 404 and r.json()["error"] == "no such page"
    # a browser asking for a page gets an HTML error page with the same status and message
    r = client.get(f"/saes/{SAE}/features/500", headers={"accept": "text/html"})
    assert r.status_code == 404 and "text/html" in r.headers["content-type"] and "out of range" in r.text


def test_inspect_endpoint_matches_inspect_prompt_and_refuses_long_prompts(client, web_run, tiny_llama):
    text = "To be, or not to be, that is the question"
    r = client.post("/api/inspect", json={"text": text, "top": 3})
    assert r.status_code == 200
    body = r.json()
    direct = inspect_prompt(web_run[0], text, top=3, lm=tiny_llama)
    assert [t["token"] for t in body["tokens"]] == [t["token"] for t in direct]
    for got, want in zip(body["tokens"], direct):
        assert [(i, e) for i, _, e in got["features"][SAE]] == [(i, e) for i, _, e in want["features"][SAE]]
        assert [a for _, a, _ in got["features"][SAE]] == pytest.approx([a for _, a, _ in want["features"][SAE]],
                                                                         rel=1e-5)
    shown = {f[0] for t in body["tokens"] for f in t["features"][SAE]}
    assert shown and set(map(int, body["feature_info"][SAE])) == shown

    r = client.post("/api/inspect", json={"text": "word " * 300})  # 301 tokens; the tiny model's limit is 256
    assert r.status_code == 413 and re.search(r"the prompt has \d+ tokens; the limit is 256", r.json()["error"])
    r = client.post("/api/inspect", json={"text": "x" * 2001})  # this app's character limit
    assert r.status_code == 413 and "the limit is 2,000" in r.json()["error"]
    r = client.post("/api/inspect", json={"text": "   "})
    assert r.status_code == 400 and "empty" in r.json()["error"]
    r = client.post("/api/inspect", json={"top": 3})
    assert r.status_code == 422 and "text" in r.json()["error"]
    r = client.post("/api/inspect", json={"text": "to be", "top": 0})
    assert r.status_code == 400


def _set_schema_version(path, version):
    con = sqlite3.connect(path)
    con.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (json.dumps(version),))
    con.commit()
    con.close()


def test_a_store_from_another_schema_is_refused_with_a_message(web_run, tmp_path):
    from saeforge.web.app import create_app
    from saeforge.web.serve import ServeConfig, run_serve

    run = tmp_path / "run"
    shutil.copytree(web_run[0], run)
    _set_schema_version(run / "features.sqlite", 0)
    with pytest.raises(SaeforgeError, match="schema version 0 is older") as err:
        create_app(run)
    assert "harvest again" in err.value.fix
    with pytest.raises(SaeforgeError, match="older"):
        run_serve(ServeConfig(path=str(run), port=0))
    _set_schema_version(run / "features.sqlite", 99)
    with pytest.raises(SaeforgeError, match="newer than this saeforge reads"):
        create_app(run)
    (run / "features.sqlite").write_bytes(b"not a database at all" * 100)
    for p in run.glob("features.sqlite-*"):
        p.unlink()
    with pytest.raises(SaeforgeError, match="not a readable feature store"):
        create_app(run)


def test_a_run_without_a_store_still_has_its_overview(web_run, tmp_path):
    from fastapi.testclient import TestClient

    from saeforge.web.app import create_app

    run = tmp_path / "run"
    shutil.copytree(web_run[0], run, ignore=shutil.ignore_patterns("features.sqlite*"))
    with TestClient(create_app(run)) as c:
        body = c.get("/api/run").json()
        assert body["store"] is None and body["saes"][0]["metrics"]["fvu"] > 0
        assert "saeforge harvest" in c.get("/").text
        r = c.get(f"/api/saes/{SAE}/features/1")
        assert r.status_code == 404 and "no feature store" in r.json()["error"] and "harvest" in r.json()["fix"]
    with pytest.raises(SaeforgeError, match="holds no run"):
        create_app(tmp_path)


def test_serve_binds_to_localhost_by_default_and_answers(web_run):
    from saeforge.web.serve import ServeConfig

    assert ServeConfig().host == "127.0.0.1"
    code = ("import sys; from saeforge.web import ServeConfig, run_serve; "
            "run_serve(ServeConfig(path=sys.argv[1], port=0))")
    proc = subprocess.Popen([sys.executable, "-c", code, str(web_run[0])], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: lines.put(proc.stdout.readline()), daemon=True).start()
        line = lines.get(timeout=60)  # printed once the socket is bound
        m = re.search(r"at (http://127\.0\.0\.1:\d+)", line)
        assert m, line
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(m.group(1) + "/api/run", timeout=5) as r:
                    assert json.loads(r.read())["saes"][0]["name"] == SAE
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.1)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# ------------------------------------------------------------------------------------------------ hostile requests
@pytest.mark.parametrize("method, path, kwargs, status, error", [
    ("get", f"/api/saes/{SAE}/features", {"params": {"offset": "99999999999999999999"}}, 400,
     "offset 99999999999999999999 is out of range"),
    ("get", f"/api/saes/{SAE}/features", {"params": {"offset": "129"}}, 400, "out of range"),
    ("get", f"/api/saes/{SAE}/features", {"params": {"q": "x" * 60_000}}, 400,
     "the explanation search has 60,000 characters; the limit is 200"),
    ("get", f"/api/saes/{SAE}/features", {"params": {"token": "%" * 20_000}}, 400, "the limit is 200"),
    ("get", f"/saes/{SAE}/features", {"params": {"q": "x" * 60_000}}, 400, "the limit is 200"),
    ("get", f"/api/saes/{SAE}/features/99999999999999999999", {}, 404, "out of range"),
    ("post", "/api/inspect", {"json": {"text": "to be \ud800 or not"}}, 400, "U+D800 at character 6"),
    ("post", "/api/inspect/feature", {"json": {"text": "\udfff", "sae": SAE, "feature": 1}}, 400, "U+DFFF"),
    ("post", "/api/inspect/feature", {"json": {"text": "to be", "sae": SAE, "feature": 10**20}}, 404, "out of range"),
    ("post", "/api/inspect/feature", {"json": {"text": "to be", "sae": "nope", "feature": 1}}, 404, "no SAE 'nope'"),
    ("post", "/api/steer", {"json": {"prompts": ["a\ud800"], "edits": [{"feature": 1}]}}, 400, "prompt 1 holds U+D800"),
    ("post", "/api/inspect", {"json": {"text": "to be", "top": 10**20}}, 400, "out of range"),
])
def test_hostile_requests_get_a_4xx_json_error(client, method, path, kwargs, status, error):
    if "json" in kwargs:  # as a browser's JSON.stringify sends a lone surrogate: escaped, "\ud800"
        kwargs = {"content": json.dumps(kwargs["json"]).encode(), "headers": {"content-type": "application/json"}}
    r = getattr(client, method)(path, **kwargs)
    assert r.status_code == status, r.text[:300]
    assert r.headers["content-type"] == "application/json" and error in r.json()["error"]


def test_feature_list_orders_filters_and_counts(client, store):
    asc = client.get(f"/api/saes/{SAE}/features", params={"order": "density_asc", "limit": 500}).json()
    dens = [f["density"] for f in asc["features"]]
    assert dens == sorted(dens) and len(dens) == 128 and asc["total"] == 128
    n_dead = sum(1 for f in asc["features"] if f["fire_count"] == 0)
    assert asc["n_dead"] == n_dead
    alive = client.get(f"/api/saes/{SAE}/features", params={"order": "density_asc", "alive": "true",
                                                              "limit": 500}).json()
    assert [f["idx"] for f in alive["features"]] == [f["idx"] for f in asc["features"] if f["fire_count"] > 0]
    assert alive["total"] == 128 - n_dead
    html = client.get(f"/saes/{SAE}/features", params={"order": "density_asc", "alive": "true"}).text
    assert 'id="alive" value="true" checked' in html and f"{128 - n_dead} features match" in html
    assert '<option value="density_asc" selected>density, rarest first</option>' in html


def test_feature_page_says_who_explained_it_and_what_chance_is(client, web_run):
    from .conftest import CHANCE_SD

    roles = web_run[1]
    html = client.get(f"/saes/{SAE}/features/{roles['third']}").text  # scored 0.55
    assert 'detection score <b id="score">0.55</b>' in html and 'chance <span id="chance">0.5</span>' in html
    assert f"± {CHANCE_SD:.2g}" in html and "not above chance" in html
    assert "telling 10 held-out excerpts where it fires from 10 where it does not" in html
    assert "written by <b>test:judge</b>" in html
    html = client.get(f"/saes/{SAE}/features/{roles['busy']}").text  # scored 0.9: above chance
    assert "not above chance" not in html and "chance" in html
    html = client.get(f"/saes/{SAE}/features/{roles['quiet']}").text
    assert "on its second try" in html
    body = client.get(f"/api/saes/{SAE}/features/{roles['label']}").json()
    assert body["explanation_source"] == "top-tokens" and body["explanation"].startswith("tokens: ")
    assert body["score_chance"] == 0.5 and body["explainer_model"] == "test:judge"
    html = client.get(f"/saes/{SAE}/features/{roles['label']}").text
    assert 'id="fallback-badge"' in html and "top-token label" in html


def test_feature_across_the_prompt_is_the_features_activation_at_every_token(client, web_run, tiny_llama):
    import torch

    from saeforge.saes import load_sae

    text = "To be, or not to be, that is the question"
    tokens = client.post("/api/inspect", json={"text": text, "top": 3}).json()["tokens"]
    idx = next(f[0] for t in tokens for f in t["features"][SAE])
    r = client.post("/api/inspect/feature", json={"text": text, "sae": SAE, "feature": idx})
    assert r.status_code == 200
    body = r.json()
    sae = load_sae(web_run[0] / "saes" / SAE)
    ids = torch.tensor([[tiny_llama.bos_token_id()] + tiny_llama.tokenizer(text, add_special_tokens=False)[
        "input_ids"]])
    with torch.no_grad():
        want = sae.encode(tiny_llama.read(ids, [SAE])[SAE][0].float())[:, idx]
    want[0] = 0.0  # BOS is not SAE data
    assert body["acts"] == pytest.approx(want.tolist(), rel=1e-5, abs=1e-6)
    assert [t["token"] for t in tokens] == body["tokens"] and body["special"][0] and not any(body["special"][1:])
    # where the feature is among a token's strongest, the inspector gave the same activation
    for t, a in zip(tokens, body["acts"]):
        for i, v, _ in t["features"][SAE]:
            if i == idx:
                assert v == pytest.approx(a, rel=1e-5)
    assert body["harvested_max_act"] == pytest.approx(client.get(f"/api/saes/{SAE}/features/{idx}").json()[
        "max_act"])
    r = client.post("/api/inspect/feature", json={"text": "word " * 300, "sae": SAE, "feature": idx})
    assert r.status_code == 413 and "the limit is 256" in r.json()["error"]


def test_favicon_and_overview_counts_agree(client, web_run):
    r = client.get("/favicon.ico")
    assert r.status_code == 200 and r.headers["content-type"].startswith("image/svg+xml") and b"<svg" in r.content
    assert '<link rel="icon" href="/static/favicon.svg"' in client.get("/").text
    ev = json.loads((web_run[0] / "eval.json").read_text())["saes"][SAE]
    dead = round(ev["dead_fraction"] * 128)
    from saeforge.web.render import share

    html = client.get("/").text
    assert re.search(r'data-metric="dead_fraction"><th>[^<]*</th><td>' + re.escape(share(dead, 128)), html)
    assert "(" in share(dead, 128) or dead == 0


def test_the_overview_says_what_a_dictionary_reads_and_replaces(web_run, tmp_path):
    """A CLT's eval.json entry (as saeforge eval writes it): the overview names the sites read and replaced and
    shows each written site's figures."""
    import json

    from fastapi.testclient import TestClient

    from saeforge.web.app import create_app

    run = tmp_path / "run"
    shutil.copytree(web_run[0], run, ignore=shutil.ignore_patterns("features.sqlite*"))
    ev = json.loads((run / "eval.json").read_text())
    entry = ev["saes"][SAE]
    entry.update(kind="clt", reads="layers.0-1.mlp_in", writes="layers.0-1.mlp_out",
                 sites={"layers.0.mlp_out": {"fvu": 0.125, "explained_variance": 0.875, "l0": 7.5},
                        "layers.1.mlp_out": {"fvu": 0.25, "explained_variance": 0.75, "l0": 9.0}})
    (run / "eval.json").write_text(json.dumps(ev))
    with TestClient(create_app(run)) as c:
        sae = c.get("/api/run").json()["saes"][0]
        assert sae["binding"] == {"kind": "clt", "reads": "layers.0-1.mlp_in", "writes": "layers.0-1.mlp_out"}
        assert [r["site"] for r in sae["site_metrics"]] == ["layers.0.mlp_out", "layers.1.mlp_out"]
        assert sae["site_metrics"][1]["fvu"] == 0.25 and sae["site_metrics"][1]["alone_kl_div"] is None
        page = c.get("/").text
        assert "clt: reads <code>layers.0-1.mlp_in</code>, replaces <code>layers.0-1.mlp_out</code>" in page
        assert '<tr data-site="layers.1.mlp_out"><th><code>layers.1.mlp_out</code></th><td>0.25</td>' in page
    # an SAE's overview has no such line
    with TestClient(create_app(web_run[0])) as c:
        assert c.get("/api/run").json()["saes"][0]["binding"]["kind"] == "sae"
        assert 'class="binding' not in c.get("/").text


def test_feature_across_the_prompt_of_a_clt_encodes_every_layer_it_reads(web_run, tiny_llama, tiny_llama_dir, tmp_path):
    import torch
    from fastapi.testclient import TestClient

    from saeforge.runs import SiteBinding
    from saeforge.saes import TopKCLTConfig, make_sae, save_sae
    from saeforge.web.app import create_app

    run = tmp_path / "run"
    shutil.copytree(web_run[0], run, ignore=shutil.ignore_patterns("features.sqlite*"))
    reads, writes = tuple(f"layers.{i}.mlp_in" for i in range(2)), tuple(f"layers.{i}.mlp_out" for i in range(2))
    torch.manual_seed(0)
    clt = make_sae(TopKCLTConfig(d_in=64, d_sae=64, d_out=64, n_layers=2, k=4))
    save_sae(clt, run / "saes" / "clt", metadata={**SiteBinding(reads, writes).to_metadata(),
                                                  "model_name": str(tiny_llama_dir), "context_size": 64})
    text = "To be, or not to be, that is the question"
    ids = torch.tensor([[tiny_llama.bos_token_id()] + tiny_llama.tokenizer(text, add_special_tokens=False)[
        "input_ids"]])
    acts = tiny_llama.read(ids, list(reads))
    with torch.no_grad():
        f = clt.encode(torch.cat([acts[s][0] for s in reads], -1))
    idx = int(f[1:].sum(0).argmax())  # a layer-0 or layer-1 latent that fires on this prompt
    with TestClient(create_app(run)) as c:
        r = c.post("/api/inspect/feature", json={"text": text, "sae": "clt", "feature": idx})
        assert r.status_code == 200, r.text
        want = f[:, idx].clone()
        want[0] = 0.0  # BOS is not SAE data
        assert r.json()["acts"] == pytest.approx(want.tolist(), rel=1e-5, abs=1e-6) and max(r.json()["acts"]) > 0
