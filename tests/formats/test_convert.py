"""``saeforge convert`` (ConvertConfig + run_convert): the command line, chains of conversions, refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from simple_parsing import ArgumentParser, DashVariant

from saeforge.errors import SaeforgeError
from saeforge.formats import load_any, save_as
from saeforge.formats.convert import ConvertConfig, run_convert

from .helpers import D_IN, D_SAE, assert_same_encodings, build


def parse(argv: list[str]) -> ConvertConfig:
    p = ArgumentParser(prog="saeforge convert", add_option_string_dash_variants=DashVariant.DASH)
    p.add_arguments(ConvertConfig, dest="cfg")
    return p.parse_args(argv).cfg


def test_command_line_fields():
    cfg = parse(["some/sae", "--out", "o", "--to", "saelens", "--from-format", "gemmascope", "--d-in", "5",
                 "--orientation", "x_at_W", "--scaling-factor", "0.5", "--hook-name", "layers.1.resid_post",
                 "--model", "m", "--overwrite", "true", "--check", "false", "--architecture", "topk"])
    assert cfg == ConvertConfig(source="some/sae", out="o", to="saelens", from_format="gemmascope", d_in=5,
                                orientation="x_at_W", scaling_factor=0.5, hook_name="layers.1.resid_post", model="m",
                                overwrite=True, check=False, architecture="topk")
    assert parse([]).source == "" and parse([]).to == "saeforge"


def test_chain_saelens_sparsify_saeforge(tmp_path, capsys):
    sae = build("topk")
    save_as(sae, tmp_path / "lens", "saelens", metadata={"hook_name": "layers.5.resid_post", "model_name": "m"})
    run_convert(ConvertConfig(source=str(tmp_path / "lens"), out=str(tmp_path / "sp"), to="sparsify"))
    run_convert(ConvertConfig(source=str(tmp_path / "sp"), out=str(tmp_path / "sf"), to="saeforge",
                              hook_name="layers.5.resid_post", model="HuggingFaceTB/SmolLM2-135M"))
    text = capsys.readouterr().out
    assert "read saelens SAE" in text and "wrote sparsify SAE" in text and "encodings on 512 random inputs identical" in text
    meta = json.loads((tmp_path / "sf" / "cfg.json").read_text())["metadata"]
    assert meta["hook_name"] == "layers.5.resid_post" and meta["model_name"] == "HuggingFaceTB/SmolLM2-135M"
    assert_same_encodings(sae, load_any(tmp_path / "sf"))


def test_gemmascope_to_saelens(tmp_path, capsys):
    g = torch.Generator().manual_seed(0)
    p = {"W_enc": torch.randn(D_IN, D_SAE, generator=g), "W_dec": torch.randn(D_SAE, D_IN, generator=g),
         "b_enc": torch.randn(D_SAE, generator=g), "b_dec": torch.randn(D_IN, generator=g),
         "threshold": 0.1 + torch.rand(D_SAE, generator=g)}
    (tmp_path / "gs").mkdir()
    np.savez(tmp_path / "gs" / "params.npz", **{k: v.numpy() for k, v in p.items()})
    run_convert(ConvertConfig(source=str(tmp_path / "gs" / "params.npz"), out=str(tmp_path / "out"), to="saelens"))
    assert "identical" in capsys.readouterr().out
    cfg = json.loads((tmp_path / "out" / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu" and cfg["apply_b_dec_to_input"] is False


def test_refusals(tmp_path):
    save_as(build("batchtopk"), tmp_path / "b", "saeforge")
    with pytest.raises(SaeforgeError, match="no batchtopk sparse coder"):
        run_convert(ConvertConfig(source=str(tmp_path / "b"), out=str(tmp_path / "o"), to="sparsify"))
    with pytest.raises(SaeforgeError, match="--out"):
        run_convert(ConvertConfig(source=str(tmp_path / "b")))
    with pytest.raises(SaeforgeError, match="no SAE given"):
        run_convert(ConvertConfig(out=str(tmp_path / "o")))
    with pytest.raises(SaeforgeError, match="unknown output format"):
        run_convert(ConvertConfig(source=str(tmp_path / "b"), out=str(tmp_path / "o"), to="onnx"))
    with pytest.raises(SaeforgeError, match="unknown input format"):
        run_convert(ConvertConfig(source=str(tmp_path / "b"), out=str(tmp_path / "o"), from_format="npz"))
    with pytest.raises(SaeforgeError, match="is the source folder"):
        run_convert(ConvertConfig(source=str(tmp_path / "b"), out=str(tmp_path / "b"), to="saelens"))
    run_convert(ConvertConfig(source=str(tmp_path / "b"), out=str(tmp_path / "o"), to="saelens"))
    with pytest.raises(SaeforgeError, match="already holds SAE files"):
        run_convert(ConvertConfig(source=str(tmp_path / "b"), out=str(tmp_path / "o"), to="saelens"))
    run_convert(ConvertConfig(source=str(tmp_path / "b"), out=str(tmp_path / "o"), to="saeforge", overwrite=True))
    assert load_any(tmp_path / "o").architecture == "batchtopk"


def test_a_clt_converts_to_gemma_scope_2_and_circuit_tracer(tmp_path, capsys):
    """saeforge -> Gemma Scope 2 CLT -> circuit-tracer CLT, each checked by read-back encodings."""
    from saeforge.saes import save_sae
    from tests.formats.test_circuit_tracer import jump_clt

    sae = jump_clt()
    meta = {"reads": [f"layers.{i}.mlp_in" for i in range(3)], "writes": [f"layers.{i}.mlp_out" for i in range(3)]}
    save_sae(sae, tmp_path / "native", metadata=meta)
    run_convert(ConvertConfig(source=str(tmp_path / "native"), out=str(tmp_path / "gs2"), to="gemmascope2_clt"))
    run_convert(ConvertConfig(source=str(tmp_path / "gs2"), out=str(tmp_path / "ct"), to="circuit_tracer_clt"))
    out = capsys.readouterr().out
    assert out.count("encodings on 512 random inputs identical") == 2
    back = load_any(tmp_path / "ct")
    x = torch.randn(20, sae.cfg.d_in)
    assert torch.equal(back.encode(x), sae.encode(x))


def test_an_out_folder_holding_something_else_is_refused_before_anything_is_written(tmp_path):
    save_as(build("batchtopk"), tmp_path / "b", "saeforge")
    out = tmp_path / "o"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(SaeforgeError, match=r"--out .* is not empty and holds no SAE \(notes.txt\)"):
            run_convert(ConvertConfig(source=str(tmp_path / "b"), out=str(out), to="saelens", overwrite=overwrite))
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    (tmp_path / "empty").mkdir()  # an empty folder is fine
    run_convert(ConvertConfig(source=str(tmp_path / "b"), out=str(tmp_path / "empty"), to="saelens"))
    assert load_any(tmp_path / "empty").architecture == "jumprelu"  # SAELens holds BatchTopK as its JumpReLU form
