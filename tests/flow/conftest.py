import pytest
import torch

from tests.flow.helpers import noisy, unit, write_suite


@pytest.fixture(scope="session")
def tiny_suite(tiny_llama_dir, tmp_path_factory):
    """A suite trained on layers 1-2 of the tiny Llama (and layer 0's residual): 7 TopK SAEs, d_sae 64, k 4."""
    from saeforge.flow.suite import SuiteConfig, train_suite
    from tests.conftest import TEXT

    root = tmp_path_factory.mktemp("tiny_suite")
    corpus = root / "corpus.txt"
    corpus.write_text(TEXT * 40)
    train_suite(SuiteConfig(out=str(root / "suite"), model=str(tiny_llama_dir), corpus=str(corpus), layers="1-2",
                            tokens=256 * 8, batch_size=256, d_sae=64, k=4, context_length=32, device="cpu",
                            progress=False))
    return root / "suite", corpus


D, N = 512, 40  # wide enough that random directions stay far below the module threshold


@pytest.fixture(scope="session")
def planted(tmp_path_factory):
    """Layers 1-3; the chain R1:20 → R2:9 → R3:5 (cosines ≈ 0.9), M3:11 and A2:3 feeding it (≈ 0.55)."""
    g = torch.Generator().manual_seed(0)
    w = {f"layers.{L}.{k}": unit(N, D, g) for L in (1, 2, 3) for k in ("resid_post", "mlp_out", "attn_out")}
    w["layers.2.resid_post"][9] = noisy(w["layers.1.resid_post"][20:21], 0.45, g)[0]
    w["layers.3.resid_post"][5] = noisy(w["layers.2.resid_post"][9:10], 0.45, g)[0]
    w["layers.3.mlp_out"][11] = noisy(w["layers.3.resid_post"][5:6], 1.5, g)[0]
    w["layers.2.attn_out"][3] = noisy(w["layers.2.resid_post"][9:10], 1.5, g)[0]
    return write_suite(tmp_path_factory.mktemp("planted"), w)
