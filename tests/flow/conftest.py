import pytest


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
