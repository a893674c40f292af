"""Contrastive tasks: the file format, the errors for bad input, the metric and the accuracy on the real model."""

import json

import pytest
import torch

from saeforge.circuits.tasks import (BUILTIN_TASKS, PromptPair, Task, encode_task, load_task,
                                     measure_task_accuracy, task_from_json)
from saeforge.errors import SaeforgeError


def _single_token_words(lm, n):
    """Words that are one token with a leading space for the tiny tokenizer."""
    words = []
    for w in "the and of to that is his my not with your be for".split():
        if len(lm.tokenizer(" " + w, add_special_tokens=False)["input_ids"]) == 1:
            words.append(w)
    assert len(words) >= n
    return words[:n]


def _task(lm):
    a, b, c, d = _single_token_words(lm, 4)
    return Task("t", (PromptPair(f"The {a} {b}", f"The {b} {b}", " " + c, " " + d),
                      PromptPair(f"{a} {a} {a} {c}", f"{a} {a} {a} {d}", " " + d, " " + c)))


def test_json_round_trip_and_file(tmp_path, tiny_llama):
    task = _task(tiny_llama)
    path = tmp_path / "task.json"
    path.write_text(json.dumps(task.to_json()))
    assert load_task(str(path)) == task
    assert load_task("country-capital").name == "country-capital"


@pytest.mark.parametrize("data, words", [
    ([], "not a JSON object"),
    ({"pairs": []}, "no 'name'"),
    ({"name": "x", "pairs": []}, "non-empty list"),
    ({"name": "x", "pairs": [{"clean": "a", "corrupt": "b", "clean_answer": " c"}]}, "'corrupt_answer'"),
    ({"name": "x", "pairs": [{"clean": "a", "corrupt": "b", "clean_answer": " c", "corrupt_answer": 3}]},
     "'corrupt_answer' must be a non-empty string"),
])
def test_task_files_with_missing_fields_are_refused(data, words):
    with pytest.raises(SaeforgeError, match=words):
        task_from_json(data)


def test_unknown_task_and_bad_json(tmp_path):
    with pytest.raises(SaeforgeError, match="no built-in task"):
        load_task("no-such-task")
    path = tmp_path / "bad.json"
    path.write_text("{")
    with pytest.raises(SaeforgeError, match="not valid JSON"):
        load_task(str(path))


def test_pairs_of_different_token_lengths_are_refused(tiny_llama):
    a, b, c, d = _single_token_words(tiny_llama, 4)
    task = Task("t", (PromptPair(f"The {a}", f"The {a} {b}", " " + c, " " + d),))
    with pytest.raises(SaeforgeError, match=r"pair 0: the clean prompt .* has (\d+) tokens and the corrupt "
                                            r"prompt .* has (?!\1)\d+"):
        encode_task(task, tiny_llama)


def test_multi_token_and_equal_answers_are_refused(tiny_llama):
    a, b, c, _ = _single_token_words(tiny_llama, 4)
    long = " zqxjkv"
    assert len(tiny_llama.tokenizer(long, add_special_tokens=False)["input_ids"]) > 1
    with pytest.raises(SaeforgeError, match="corrupt_answer ' zqxjkv' is .* tokens"):
        encode_task(Task("t", (PromptPair(f"The {a}", f"The {b}", " " + c, long),)), tiny_llama)
    with pytest.raises(SaeforgeError, match="same token"):
        encode_task(Task("t", (PromptPair(f"The {a}", f"The {b}", " " + c, " " + c),)), tiny_llama)


def test_metric_is_the_logit_difference_at_each_rows_last_token(tiny_llama):
    enc = encode_task(_task(tiny_llama), tiny_llama)
    assert not enc.aligned  # the two pairs have different lengths: padded on the right
    logits = tiny_llama.logits(enc.clean_ids, enc.attention_mask)
    for i in range(2):
        n = int(enc.attention_mask[i].sum())
        alone = tiny_llama.logits(enc.clean_ids[i:i + 1, :n])[0, -1]
        want = alone[enc.clean_answers[i]] - alone[enc.corrupt_answers[i]]
        assert torch.allclose(enc.metric(logits)[i], want, atol=1e-5)
    acc = measure_task_accuracy(tiny_llama, enc)
    clean = enc.metric(logits)
    corrupt = enc.metric(tiny_llama.logits(enc.corrupt_ids, enc.attention_mask))
    assert acc.accuracy == float(((clean > 0) & (corrupt < 0)).float().mean())
    assert acc.clean_logit_diff == pytest.approx(float(clean.mean()), abs=1e-5)
    assert acc.corrupt_logit_diff == pytest.approx(float(corrupt.mean()), abs=1e-5)


def test_builtin_tasks_are_well_formed():
    for name, make in BUILTIN_TASKS.items():
        task = make(32)
        assert task.name == name and len(task.pairs) == 32
        assert len(set(task.pairs)) == 32
        assert all(p.clean != p.corrupt and p.clean_answer != p.corrupt_answer for p in task.pairs)


@pytest.mark.embedded
@pytest.mark.slow
def test_the_embedded_model_solves_every_builtin_task(embedded_lm):
    for name, make in BUILTIN_TASKS.items():
        acc = measure_task_accuracy(embedded_lm, make(32))
        assert acc.solved, acc
        assert acc.clean_logit_diff > 0 > acc.corrupt_logit_diff
