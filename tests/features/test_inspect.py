import pytest
import torch

from saeforge.errors import SaeforgeError
from saeforge.features.inspect import Inspector, inspect_prompt
from saeforge.saes import load_sae

SITE = "layers.1.resid_post"


def test_each_token_lists_its_most_active_features(tiny_run, tiny_llama):
    text = "To be, or not to be, that is the question"
    rows = inspect_prompt(tiny_run, text, top=3, lm=tiny_llama)
    ids = tiny_llama.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(rows) == len(ids) + 1 and rows[0]["special"] and rows[0]["features"][SITE] == []
    sae = load_sae(tiny_run / "saes" / SITE)
    x = tiny_llama.read(torch.tensor([[tiny_llama.bos_token_id()] + ids]), [SITE])[SITE][0]
    with torch.no_grad():
        f = sae.encode(x)
    for t in range(1, len(rows)):
        feats = rows[t]["features"][SITE]
        vals, idx = f[t].topk(3)
        expected = [(int(i), float(v)) for v, i in zip(vals, idx) if v > 0]
        assert [(i, pytest.approx(a, rel=1e-6)) for i, a, _ in feats] == expected


def test_over_long_and_empty_prompts_are_refused(tiny_run, tiny_llama):
    inspector = Inspector(tiny_run, lm=tiny_llama)
    with pytest.raises(SaeforgeError, match=r"the prompt has \d+ tokens; the limit is 256"):
        inspector.inspect("word " * 600)
    with pytest.raises(SaeforgeError, match="empty"):
        inspector.inspect("   ")
