import random

import pytest

from saeforge.data.activation_cache import CacheConfig, build_cache

SITES = ("layers.1.resid_post", "layers.2.resid_post")


@pytest.fixture(scope="session")
def tiny_cache(tiny_llama, tiny_llama_dir, tmp_path_factory):
    """~12k activation vectors (d=32) of the tiny Llama at two sites."""
    from tests.conftest import TEXT

    folder = tmp_path_factory.mktemp("train_cache")
    words = TEXT.split()
    rng = random.Random(0)
    (folder / "t.txt").write_text(" ".join(rng.choice(words) for _ in range(9000)))
    cfg = CacheConfig(out=str(folder / "cache"), model=str(tiny_llama_dir), sites=SITES, tokens=12_000,
                      corpus=str(folder / "t.txt"), context_length=64, batch_size=8, shard_tokens=2000, device="cpu")
    return build_cache(cfg, lm=tiny_llama, progress=False)
