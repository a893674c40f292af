"""Shared pieces of the format tests: small saeforge SAEs with non-trivial parameters, random inputs, and the
foreign tools' documented encode formulas (written from formats.md, never imported from the tools)."""

from __future__ import annotations

import torch

from saeforge.saes import (
    BatchTopKConfig,
    GatedConfig,
    JumpReLUConfig,
    MatryoshkaConfig,
    ReLUConfig,
    TopKConfig,
    make_sae,
)

D_IN, D_SAE = 12, 32
VARIANTS = ["relu_april", "relu_classic", "topk", "batchtopk", "matryoshka", "gated", "jumprelu"]


def config_for(name: str, d_in: int = D_IN, d_sae: int = D_SAE, **kw):
    if name == "relu_april":
        return ReLUConfig(d_in=d_in, d_sae=d_sae, **kw)
    if name == "relu_classic":
        return ReLUConfig(d_in=d_in, d_sae=d_sae, variant="classic", **kw)
    if name == "topk":
        return TopKConfig(d_in=d_in, d_sae=d_sae, **{"k": 4, **kw})
    if name == "batchtopk":
        return BatchTopKConfig(d_in=d_in, d_sae=d_sae, **{"k": 4, **kw})
    if name == "matryoshka":
        return MatryoshkaConfig(d_in=d_in, d_sae=d_sae, **{"k": 4, "group_sizes": (4, 12, d_sae - 16), **kw})
    if name == "gated":
        return GatedConfig(d_in=d_in, d_sae=d_sae, **kw)
    if name == "jumprelu":
        return JumpReLUConfig(d_in=d_in, d_sae=d_sae, **kw)
    raise KeyError(name)


@torch.no_grad()
def build(name: str, seed: int = 0, **kw):
    """A saeforge SAE with random weights and non-zero biases / thresholds (fresh SAEs have zero biases)."""
    torch.manual_seed(seed)
    sae = make_sae(config_for(name, **kw))
    g = torch.Generator().manual_seed(seed)
    for pname, p in sae.named_parameters():
        if pname.startswith("b_") or pname == "r_mag":
            p.copy_((0.3 * torch.randn(p.shape, generator=g)).to(p.dtype))
    if hasattr(sae, "log_threshold"):
        sae.log_threshold.copy_(torch.log(0.2 + 0.3 * torch.rand(sae.cfg.d_sae, generator=g)))
    if sae.architecture in ("batchtopk", "matryoshka"):
        sae.threshold.fill_(0.4)
    return sae


def inputs(n: int = 64, d: int = D_IN, seed: int = 1, scale: float = 2.0) -> torch.Tensor:
    return scale * torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def topk_dense(pre: torch.Tensor, k: int) -> torch.Tensor:
    """ReLU then keep each row's k largest (sparsify / dictionary_learning / OpenAI TopK)."""
    post = torch.relu(pre)
    vals, idx = post.topk(k, dim=-1)
    return torch.zeros_like(post).scatter_(-1, idx, vals)


def assert_same_encodings(a, b, x=None) -> None:
    x = inputs() if x is None else x
    ea, eb = a.encode(x), b.encode(x)
    assert (ea > 0).any(), "test inputs activate nothing; the comparison would be vacuous"
    assert torch.equal(ea, eb), f"max |diff| {(ea - eb).abs().max().item()}"
