"""`saeforge hierarchy link | metrics` end to end on a small trained run, and their refusals."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from saeforge.cli import main
from saeforge.hierarchy import FeatureTree
from tests.conftest import TRAIN_SITES


def test_link_posthoc_and_matryoshka(hierarchy_run, tmp_path, capsys):
    saes = hierarchy_run / "saes"
    assert main(["hierarchy", "link", str(saes / "w16"), str(saes / "w64"), "--out", str(tmp_path / "t.json")]) == 0
    tree = FeatureTree.load(tmp_path / "t.json")
    assert tree.kind == "posthoc" and tree.widths == [16, 64]
    assert "posthoc tree, levels [16, 64]" in capsys.readouterr().out
    assert main(["hierarchy", "link", "--matryoshka", str(saes / "matryoshka"), "--out",
                 str(tmp_path / "m.json")]) == 0
    assert FeatureTree.load(tmp_path / "m.json").widths == [16, 64]


def test_link_by_coactivation_on_a_cache(hierarchy_run, tiny_cache, tmp_path, capsys):
    from saeforge.hierarchy.data import cache_batches
    from saeforge.hierarchy.posthoc import coactivation_scores
    from saeforge.saes import load_sae
    from saeforge.saes.hsae import assign_by_score

    saes = hierarchy_run / "saes"
    assert main(["hierarchy", "link", str(saes / "w16"), str(saes / "w64"), "--similarity", "coactivation",
                 "--out", str(tmp_path / "t.json")]) == 2
    assert "--cache TRAIN_CACHE" in capsys.readouterr().err
    assert main(["hierarchy", "link", str(saes / "w16"), str(saes / "w64"), "--similarity", "coactivation",
                 "--cache", str(tiny_cache.folder), "--tokens", "2000", "--out", str(tmp_path / "t.json")]) == 0
    tree = FeatureTree.load(tmp_path / "t.json")
    levels = [(load_sae(saes / "w16"), slice(0, 16)), (load_sae(saes / "w64"), slice(0, 64))]
    score = coactivation_scores(levels, cache_batches(tiny_cache.folder, TRAIN_SITES[0], 2000))[0]
    assert tree.info["similarity"] == "coactivation"
    assert tree.parents[0].tolist() == assign_by_score(score, 0.2)[0].tolist()
    # a Matryoshka's groups are levels of one SAE: each level's firing is its slice of the same codes
    assert main(["hierarchy", "link", "--matryoshka", str(saes / "matryoshka"), "--similarity", "coactivation",
                 "--cache", str(tiny_cache.folder), "--tokens", "2000", "--out", str(tmp_path / "m.json")]) == 0
    m = FeatureTree.load(tmp_path / "m.json")
    sae = load_sae(saes / "matryoshka")
    a, b = m.levels[0].latents, m.levels[1].latents
    batches = list(cache_batches(tiny_cache.folder, TRAIN_SITES[0], 2000))
    codes = torch.cat([sae.encode(x) > 0 for x in batches]).double()
    parent, child = codes[:, a[0]:a[1]], codes[:, b[0]:b[1]]
    fired = child.sum(0)[:, None]
    expected = torch.where(fired > 0, child.T @ parent / fired.clamp_min(1), torch.zeros(()))
    assert m.parents[0].tolist() == assign_by_score(expected.float(), 0.2)[0].tolist()
    capsys.readouterr()
    # a missing SAE folder is named as such, not as missing activations
    assert main(["hierarchy", "link", str(tmp_path / "nowhere"), str(saes / "w64"), "--similarity", "coactivation",
                 "--cache", str(tiny_cache.folder), "--out", str(tmp_path / "t2.json")]) == 2
    assert "is not an SAE folder" in capsys.readouterr().err


def test_metrics_of_three_trees_on_one_cache_and_on_text(hierarchy_run, tiny_cache, text_file, tmp_path, capsys):
    saes = hierarchy_run / "saes"
    main(["hierarchy", "link", str(saes / "w16"), str(saes / "w64"), "--out", str(tmp_path / "posthoc.json")])
    main(["hierarchy", "link", "--matryoshka", str(saes / "matryoshka"), "--out", str(tmp_path / "m.json")])
    capsys.readouterr()
    code = main(["hierarchy", "metrics", str(saes / "hsae"), str(tmp_path / "posthoc.json"), str(tmp_path / "m.json"),
                 "--names", "HSAE", "post-hoc", "Matryoshka", "--cache", str(tiny_cache.folder), "--tokens", "3000",
                 "--out", str(tmp_path / "all.json"), "--progress", "false"])
    assert code == 0
    table = capsys.readouterr().out
    assert "| HSAE | 16 / 64 |" in table and "| post-hoc |" in table and "| Matryoshka |" in table
    data = json.loads((tmp_path / "all.json").read_text())
    assert set(data["trees"]) == {"HSAE", "post-hoc", "Matryoshka"}
    for t in data["trees"].values():
        assert t["tokens"] == 3000 and 0 <= t["p_parent_given_child"] <= 1 and t["hamming_per_1k"] >= 0
    full = json.loads((saes / "hsae" / "tree.metrics.json").read_text())
    assert len(full["per_pair"][0]["children"]) == 64 - int(0.2 * 64)
    # held-out text through the model named in the SAEs' metadata
    assert main(["hierarchy", "metrics", str(tmp_path / "posthoc.json"), "--corpus", str(text_file), "--tokens",
                 "500", "--device", "cpu", "--progress", "false"]) == 0
    assert json.loads((tmp_path / "posthoc.metrics.json").read_text())["tokens"] == 500


def test_refusals(hierarchy_run, tiny_cache, tmp_path, capsys):
    saes = hierarchy_run / "saes"
    assert main(["hierarchy", "link", str(saes / "w64"), str(saes / "w16"), "--out", str(tmp_path / "t.json")]) == 2
    assert "level widths must grow" in capsys.readouterr().err
    assert main(["hierarchy", "link", str(saes / "w16"), "--matryoshka", str(saes / "matryoshka")]) == 2
    assert "not both" in capsys.readouterr().err
    # a tree whose SAEs changed since it was built
    main(["hierarchy", "link", str(saes / "w16"), str(saes / "w64"), "--out", str(tmp_path / "t.json")])
    data = json.loads((tmp_path / "t.json").read_text())
    data["levels"][1]["fingerprint"] = "0" * 16
    (tmp_path / "t.json").write_text(json.dumps(data))
    capsys.readouterr()
    assert main(["hierarchy", "metrics", str(tmp_path / "t.json"), "--cache", str(tiny_cache.folder)]) == 2
    err = capsys.readouterr().err
    assert "does not match the weights" in err and "fix:" in err
    assert main(["hierarchy", "metrics", str(tmp_path / "nothing.json")]) == 2
    assert "no tree file" in capsys.readouterr().err
    # a cache of another model (same site, same width) is refused before any measurement
    other = tmp_path / "other_cache"
    shutil.copytree(tiny_cache.folder, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["model_fingerprint"] = "f" * 16
    (other / "manifest.json").write_text(json.dumps(manifest))
    assert main(["hierarchy", "metrics", str(saes / "hsae"), "--cache", str(other)]) == 2
    err = capsys.readouterr().err
    assert "holds activations of model" in err and "saeforge cache --model" in err


def test_a_refused_hsae_setting_leaves_no_run_behind(tiny_cache, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--cache", str(tiny_cache.folder), "--sites", TRAIN_SITES[0], "--architecture", "hsae",
            "--tokens", "512", "--batch-size", "256", "--out", str(out), "--progress", "false"]
    assert main(argv + ["--sae-options", '{"level_sizes": [16, 64], "target_l0": [16, 8]}']) == 2
    err = capsys.readouterr().err
    assert "target L0 16 of level 0 is not below its width 16" in err and "fix:" in err
    assert not (out / "run.json").exists()
    assert main(argv + ["--sae-options", '{"level_sizes": [16, 64], "target_l0": [4, 8]}']) == 0  # same --out
    assert (out / "saes" / TRAIN_SITES[0] / "tree.json").is_file()


@pytest.mark.parametrize("argv", [["hierarchy", "--help"], ["hierarchy", "metrics", "--help"],
                                  ["hierarchy", "absorption", "--help"], ["modules", "build", "--help"]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0 and "usage: saeforge" in capsys.readouterr().out
