"""SNMF features in the feature store, and the dashboard's feature pages on them."""

from __future__ import annotations

import html

import pytest
import torch

from saeforge.features.store import FeatureStore
from saeforge.neurons.store import COARSE_SUFFIX, write_feature_store

SITE = "layers.1.mlp_hidden"


@pytest.fixture(scope="module")
def snmf_store(tiny_snmf, tiny_llama, text_path, tmp_path_factory):
    from saeforge.neurons.snmf import fit_hierarchy

    fit, x = tiny_snmf
    fit = fit_hierarchy(fit, 3)  # fine features as fitted, plus 3 coarse ones
    folder = tmp_path_factory.mktemp("snmf_store")
    fit.save(folder)
    path = write_feature_store(folder, fit, tiny_llama, site=SITE, corpus=text_path, tokens=64 * 12,
                               context_length=64, batch_size=4, top_examples=5, n_logits=5, n_neighbors=3,
                               progress=False)
    return folder, path, fit


def test_the_store_holds_every_feature_with_examples_that_match_the_encoding(snmf_store, tiny_llama):
    folder, path, fit = snmf_store
    with FeatureStore(path, readonly=True) as store:
        saes = {s["name"]: s for s in store.saes()}
        assert saes[SITE]["d_sae"] == fit.rank and saes[SITE]["architecture"] == "snmf"
        assert saes[SITE + COARSE_SUFFIX]["d_sae"] == 3
        firing = 0
        for i in range(fit.rank):
            rec = store.feature(SITE, i)
            assert len(rec["promoted"]) == 5 and len(rec["neighbors"]) == 3
            if not rec["fire_count"]:
                continue
            firing += 1
            top = rec["examples"]["top"]
            assert top and top[0]["max_act"] == pytest.approx(rec["max_act"], rel=1e-6)
            # the stored peak is what encoding the example's context gives at that token
            ex = top[0]
            ids = torch.tensor(store.context_ids(ex["context"]), dtype=torch.long)[None]
            x = tiny_llama.read(ids, [SITE])[SITE][0]
            acts = fit.activations(x[ex["peak"]][None])[0, i]
            assert float(acts) == pytest.approx(ex["max_act"], rel=1e-3)
            assert max(ex["acts"]) == pytest.approx(ex["max_act"], rel=2e-3)  # float16 in the window
        assert firing == fit.rank
        links = store.links_between("parent", SITE + COARSE_SUFFIX, SITE)
        assert {link["dst_idx"] for link in links} == set(range(fit.rank))
        assert store.meta("kind") == "snmf"


def test_the_dashboard_shows_snmf_features_like_sae_features(snmf_store):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from saeforge.web.app import create_app

    folder, _, fit = snmf_store
    with TestClient(create_app(folder)) as client:
        listing = client.get(f"/api/saes/{SITE}/features?limit=100").json()
        assert len(listing["features"]) == fit.rank
        body = client.get(f"/api/saes/{SITE}/features/0").json()
        assert body["examples"]["top"] and body["promoted"]
        page = client.get(f"/saes/{SITE}/features/0")
        assert page.status_code == 200
        assert html.escape(body["promoted"][0][0].strip()) in page.text  # the vocabulary projection is shown
        assert client.get(f"/saes/{SITE}/features/{fit.rank}").status_code == 404
        assert client.get(f"/saes/{SITE}{COARSE_SUFFIX}/features/2").status_code == 200
        assert client.get("/").status_code == 200
