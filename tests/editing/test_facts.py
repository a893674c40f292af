import json

import pytest

from saeforge.data.prompts import PromptEncoder
from saeforge.editing.facts import builtin_facts, encode_answer, neighbour_prompts, read_facts, read_known_facts
from saeforge.errors import SaeforgeError


def test_builtin_facts_are_counterfactual_with_paraphrases_and_disjoint_locality():
    edits, candidates = builtin_facts(100)
    assert len(edits) == 100 and len({f.prompt for f in edits}) == 100
    assert all(f.target != f.original and len(f.paraphrases) == 2 for f in edits)
    assert {f.relation for f in edits[:8]} == {"capital", "language"}
    assert not {c.prompt for c in candidates} & {f.prompt for f in edits}
    assert sum(c.relation == "common" for c in candidates) == 40
    measured = {c.prompt for c in candidates} | {p for f in edits for p in (f.prompt, *f.paraphrases)}
    neighbours = neighbour_prompts()
    assert len(neighbours) == 192 and not set(neighbours) & measured
    with pytest.raises(SaeforgeError, match="--edits between 1 and"):
        builtin_facts(1000)


def test_encode_answer_positions_and_refusals(tiny_llama):
    enc = PromptEncoder(tiny_llama)
    e = encode_answer(tiny_llama, enc, "To be, or not to be,", " sea")
    assert e.prompt_ids[0] == tiny_llama.bos_token_id() and len(e.answer_ids) == 2
    assert e.ids == list(e.prompt_ids) + [e.answer_ids[0]]
    assert e.positions == [len(e.prompt_ids) - 1, len(e.prompt_ids)]
    with pytest.raises(SaeforgeError, match="merges it with the prompt") as err:
        encode_answer(tiny_llama, enc, "To be, or not to be, ", "sea")
    assert "token boundary" in err.value.fix
    with pytest.raises(SaeforgeError, match="is empty"):
        encode_answer(tiny_llama, enc, "To be,", "")
    with pytest.raises(SaeforgeError, match=r"has \d\d+ tokens"):
        encode_answer(tiny_llama, enc, "To be,", " " + " ".join(["sea"] * 40))


def test_a_target_the_tokenizer_does_not_read_back_is_refused(tiny_tokenizer):
    """A tokenizer that normalises its input (here: lower-cases it) cannot form " Sea": the model could never be
    made to say it, so the edit is refused with what the tokenizer reads instead."""
    from types import SimpleNamespace

    from tokenizers import normalizers
    from transformers import PreTrainedTokenizerFast

    inner = tiny_tokenizer.backend_tokenizer.__class__.from_str(tiny_tokenizer.backend_tokenizer.to_str())
    inner.normalizer = normalizers.Lowercase()
    tok = PreTrainedTokenizerFast(tokenizer_object=inner, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    lm = SimpleNamespace(tokenizer=tok)
    encoder = SimpleNamespace(ids=lambda text: [0] + tok(text, add_special_tokens=False)["input_ids"])
    assert encode_answer(lm, encoder, "To be, or not to be,", " sea").answer_ids
    with pytest.raises(SaeforgeError, match="not a token sequence this tokenizer forms") as err:
        encode_answer(lm, encoder, "To be, or not to be,", " Sea")
    assert "' sea'" in err.value.problem and "--target" not in err.value.problem


def test_fact_files(tmp_path):
    good = tmp_path / "f.jsonl"
    good.write_text(json.dumps({"prompt": "A", "target": " b", "paraphrases": ["C"]}) + "\n\n")
    assert read_facts(good)[0].paraphrases == ("C",)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "A"}) + "\n")
    with pytest.raises(SaeforgeError, match="line 1 lacks target"):
        read_facts(bad)
    with pytest.raises(SaeforgeError, match="lacks answer"):
        read_known_facts(good)
    bad.write_text("{oops\n")
    with pytest.raises(SaeforgeError, match="not JSON"):
        read_facts(bad)
    with pytest.raises(SaeforgeError, match="does not exist"):
        read_facts(tmp_path / "missing.jsonl")
