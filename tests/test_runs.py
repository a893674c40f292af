import json

import pytest
import torch

from saeforge.errors import SaeforgeError
from saeforge.formats import save_as
from saeforge.runs import SiteBinding, check_site_order, load_run, site_position, split_model_site
from saeforge.saes import TopKConfig, make_sae, save_sae


def _sae(d_in=32, d_out=None, seed=0):
    torch.manual_seed(seed)
    return make_sae(TopKConfig(d_in=d_in, d_sae=64, k=4, d_out=d_out, apply_b_dec_to_input=False))


def test_binding_kinds_and_metadata_round_trip():
    sae = SiteBinding.single("layers.1.resid_post")
    assert sae.kind == "sae" and not sae.is_transcoder
    assert sae.to_metadata() == {"hook_name": "layers.1.resid_post", "reads": ["layers.1.resid_post"],
                                 "writes": ["layers.1.resid_post"]}
    # a residual -> residual transcoder is a transcoder: the sites differ even though the widths agree
    tc = SiteBinding.single("layers.1.resid_pre", "layers.1.resid_post")
    assert tc.kind == "transcoder" and tc.is_transcoder and tc.to_metadata()["hook_name_out"] == "layers.1.resid_post"
    clt = SiteBinding(("layers.0.resid_pre",), ("layers.0.mlp_out", "layers.1.mlp_out"))
    assert clt.kind == "clt" and clt.sites == ("layers.0.resid_pre", "layers.0.mlp_out", "layers.1.mlp_out")
    assert SiteBinding(("a", "b"), ("a", "b")).kind == "crosscoder"
    for b in (sae, tc, clt):
        assert SiteBinding.from_metadata(b.to_metadata()) == b
    # what older saeforge and SAELens wrote
    assert SiteBinding.from_metadata({"hook_name": "x"}) == SiteBinding.single("x")
    assert SiteBinding.from_metadata({"hook_name": "x", "hook_name_out": "y"}) == SiteBinding.single("x", "y")
    assert SiteBinding.from_metadata({}) is None
    with pytest.raises(SaeforgeError, match="must both be lists"):
        SiteBinding.from_metadata({"reads": ["x"]})
    with pytest.raises(SaeforgeError, match="twice"):
        SiteBinding(("x", "x"), ("y",))


def test_run_folders_old_and_new_load_with_their_sites(tiny_llama, tiny_llama_dir, tmp_path):
    meta = {"model_name": str(tiny_llama_dir), "context_size": 32}
    save_sae(_sae(), tmp_path / "run" / "saes" / "old", metadata={"hook_name": "layers.1.resid_post", **meta})
    save_sae(_sae(), tmp_path / "run" / "saes" / "tc",
             metadata={**SiteBinding.single("layers.0.resid_post", "layers.1.mlp_out").to_metadata(), **meta})
    run = load_run(tmp_path / "run", lm=tiny_llama)
    old, tc = run.saes["old"], run.saes["tc"]
    assert old.kind == "sae" and old.read_site.name == old.write_site.name == "layers.1.resid_post"
    assert tc.kind == "transcoder" and tc.read_site.name == "layers.0.resid_post"
    assert tc.write_site.name == "layers.1.mlp_out" and tc.write_site.d == 32
    assert run.sites == ["layers.0.resid_post", "layers.1.mlp_out", "layers.1.resid_post"]
    assert list(load_run(tmp_path / "run", lm=tiny_llama, names=["tc"]).saes) == ["tc"]


def test_a_saelens_folder_loads_as_a_run(tiny_llama, tiny_llama_dir, tmp_path):
    sae = _sae()
    save_as(sae, tmp_path / "lens", "saelens", metadata={"hook_name": "layers.1.resid_post",
                                                         "model_name": str(tiny_llama_dir)})
    assert "saeforge" not in json.loads((tmp_path / "lens" / "cfg.json").read_text())
    bound = load_run(tmp_path / "lens", lm=tiny_llama).saes["lens"]
    x = torch.randn(5, 32)
    assert torch.equal(bound.sae.encode(x), sae.encode(x))


def test_bindings_the_model_cannot_serve_are_named(tiny_llama, tmp_path):
    save_sae(_sae(), tmp_path / "a", metadata={"hook_name": "layers.7.resid_post"})
    with pytest.raises(SaeforgeError, match=r"SAE a .* bound to site 'layers.7.resid_post'.*layer 7 does not exist"):
        load_run(tmp_path / "a", lm=tiny_llama)
    save_sae(_sae(d_in=32, d_out=16), tmp_path / "b",
             metadata=SiteBinding.single("layers.0.resid_post", "layers.1.mlp_out").to_metadata())
    with pytest.raises(SaeforgeError, match="writes width 16 but site layers.1.mlp_out has width 32"):
        load_run(tmp_path / "b", lm=tiny_llama)
    save_sae(_sae(), tmp_path / "c", metadata={"model_name": "x"})
    with pytest.raises(SaeforgeError, match="does not say which site"):
        load_run(tmp_path / "c", lm=tiny_llama)


def test_bound_saes_describe_themselves_and_unpack_as_the_old_tuples(tiny_llama, tiny_llama_dir, tmp_path):
    meta = {"model_name": str(tiny_llama_dir)}
    save_sae(_sae(), tmp_path / "run" / "saes" / "sae", metadata={"hook_name": "layers.1.resid_post", **meta})
    save_sae(_sae(), tmp_path / "run" / "saes" / "tc",
             metadata={**SiteBinding.single("layers.0.resid_post", "layers.1.mlp_out").to_metadata(), **meta})
    run = load_run(tmp_path / "run", lm=tiny_llama)
    sae, tc = run.saes["sae"], run.saes["tc"]
    assert sae.describe() == "SAE at layers.1.resid_post"
    assert tc.describe() == "transcoder: reads layers.0.resid_post, writes layers.1.mlp_out"
    # (sae, site) as Inspector.saes held them: the site read
    dictionary, site = tc
    assert dictionary is tc.sae and site is tc.read_site and tc[0] is tc.sae and tc[1] is tc.read_site


def test_multi_site_kinds_and_forward_order():
    clt = SiteBinding(tuple(f"layers.{i}.mlp_in" for i in range(3)), tuple(f"layers.{i}.mlp_out" for i in range(3)))
    assert clt.kind == "clt" and clt.is_transcoder
    check_site_order(clt)
    two_models = ("a--layers.4.resid_post", "b--layers.4.resid_post")
    diff = SiteBinding(two_models, two_models)
    assert diff.kind == "crosscoder" and diff.models == ("a", "b") and clt.models == ()
    check_site_order(diff)  # the same layer of two models is no repeat
    assert split_model_site("b--layers.4.resid_post") == ("b", "layers.4.resid_post")
    assert split_model_site("model.layers.4.mlp") == (None, "model.layers.4.mlp")
    assert site_position("model.layers.3.post_attention_layernorm") == site_position("layers.3.mlp_in")
    assert site_position("transformer.h.2.mlp") == site_position("layers.2.mlp_out")
    assert site_position("lm_head") is None
    layers = ("layers.3.resid_post", "layers.1.resid_post")
    with pytest.raises(SaeforgeError, match="out of order or repeat a layer") as err:
        check_site_order(SiteBinding(layers, layers))
    assert "layers.1.resid_post, layers.3.resid_post" in err.value.fix
    with pytest.raises(SaeforgeError, match="computes before layers.2.mlp_out"):
        check_site_order(SiteBinding.single("layers.2.mlp_out", "layers.2.mlp_in"))
    with pytest.raises(SaeforgeError, match="computes before"):
        check_site_order(SiteBinding.single("model.layers.4.mlp", "layers.2.mlp_out"))
    with pytest.raises(SaeforgeError, match="reads 3 and writes 2"):
        check_site_order(SiteBinding(clt.reads, clt.writes[:2]))
    check_site_order(SiteBinding.single("layers.1.resid_pre", "layers.1.resid_post"))  # residual -> residual


def test_sites_the_model_lacks_are_refused_before_it_loads(tiny_run, tiny_llama_dir, tmp_path, monkeypatch):
    import shutil

    from saeforge.models.language_model import LanguageModel

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    cfg_path = next((run / "saes").iterdir()) / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["metadata"].update(reads=["layers.5.resid_post"], writes=["layers.5.resid_post"])
    cfg_path.write_text(json.dumps(cfg))

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before its sites were checked")

    monkeypatch.setattr(LanguageModel, "load", no_model)
    with pytest.raises(SaeforgeError, match="layer 5 does not exist, the model has 3 layers"):
        load_run(run, model=str(tiny_llama_dir))
