"""``saeforge personalize eval`` on the tiny Llama: every condition generated and scored, the baseline's generation
equals transformers' own greedy decoding, and the control pairs each user with the most different one."""

from __future__ import annotations

import json

import pytest
import torch

from saeforge.errors import SaeforgeError
from saeforge.personalization.evaluate import (CONDITIONS, PersonalizeEvalConfig, _other_user, _stop_ids,
                                               evaluate_personalizer, score_table, trait_probe)
from saeforge.personalization.model import UserInputs
from saeforge.personalization.train import PersonalizeTrainConfig, train_personalizer
from saeforge.personalization.users import read_users, synthetic_users, write_users
from tests.personalization.conftest import tiny_passages


@pytest.fixture(scope="module")
def tiny_dep_run(tiny_llama_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("dep_eval")
    users = synthetic_users(4, history=5, train_queries=2, test_queries=2, passages=tiny_passages(20))
    write_users(folder / "users.jsonl", users)
    train_personalizer(PersonalizeTrainConfig(users=str(folder / "users.jsonl"), out=str(folder / "run"),
                                              model=str(tiny_llama_dir), slots=3, d_sae=16, steps=4, batch_size=2,
                                              device="cpu", threads=1, progress=False))
    return folder / "run", users


def test_eval_scores_every_condition(tiny_dep_run, tiny_llama):
    run, users = tiny_dep_run
    report = evaluate_personalizer(PersonalizeEvalConfig(run=str(run), max_new_tokens=6, batch_size=3,
                                                         device="cpu", threads=1, progress=False))
    assert report["queries"] == 8 and list(report["results"]) == list(CONDITIONS)
    for r in report["results"].values():
        assert r["n"] == 8 and 0 <= r["rouge1"] <= 1 and 0 <= r["rougeL"] <= r["rouge1"] + 1e-12
        assert r["style_mean"] == pytest.approx(sum(r[f"style_{t}"] for t in ("voice", "mark", "focus", "length"))
                                                / 4)
    rows = [json.loads(line) for line in (run / "eval_generations.jsonl").read_text().splitlines()]
    assert len(rows) == 32 and (run / "eval.md").read_text().startswith("| condition | ROUGE-1")
    assert set(report["trait_probe"]) == {"history", "difference"}
    # the no-history baseline is the model's own greedy continuation of BOS + prompt, cut at the first line break
    tok = tiny_llama.tokenizer
    first = next(r for r in rows if r["condition"] == "no history")
    query = next(q for u in users if u.user_id == first["user_id"] for q in u.queries if q.item == first["item"])
    ids = [tok.bos_token_id] + tok(query.prompt, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = tiny_llama.model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False)[0, len(ids):].tolist()
    stops = set(_stop_ids(tok))
    cut = next((i for i, t in enumerate(out) if t in stops), len(out))
    assert first["generation"] == tok.decode(out[:cut], skip_special_tokens=True).strip()


def test_the_control_user_differs_most():
    users = synthetic_users(16, history=2, train_queries=0, test_queries=1, passages=tiny_passages(10))
    other = _other_user(users)
    for i, j in enumerate(other):
        assert i != j and all(users[i].style[t] != users[j].style[t] for t in users[i].style)


def test_eval_refuses_bad_input(tiny_dep_run, tmp_path):
    run, users = tiny_dep_run
    with pytest.raises(SaeforgeError, match="no run folder"):
        evaluate_personalizer(PersonalizeEvalConfig())
    no_test = [u.__class__(u.user_id, u.history, tuple(q for q in u.queries if q.split == "train"), u.style)
               for u in users]
    write_users(tmp_path / "no_test.jsonl", no_test)
    with pytest.raises(SaeforgeError, match="has no test query"):
        evaluate_personalizer(PersonalizeEvalConfig(run=str(run), users=str(tmp_path / "no_test.jsonl"),
                                                    device="cpu", progress=False))
    assert read_users(tmp_path / "no_test.jsonl")[0].queries


def test_score_table_without_styles():
    table = score_table({"DEP": {"rouge1": 0.5, "rougeL": 0.25, "n": 2}})
    assert table.splitlines()[0] == "| condition | ROUGE-1 | ROUGE-L |" and "| DEP | 0.500 | 0.250 |" in table


def test_trait_probe_finds_a_trait_written_into_one_kind_of_embedding():
    users = synthetic_users(16, history=2, train_queries=0, test_queries=1, passages=tiny_passages(10))
    gen = torch.Generator().manual_seed(0)
    k, d = 2, 64
    x = torch.randn(16, 2 * k, d, generator=gen) * 0.1
    for i, u in enumerate(users):  # voice in the history slots, mark in the difference slots, one slot used
        x[i, 0, 0] += 1.0 if u.style["voice"] == "archaic" else -1.0
        x[i, k, 1] += 1.0 if u.style["mark"] == "exclaim" else -1.0
        x[i, 1], x[i, k + 1] = 100.0, -100.0  # an unused slot: must not count
    inputs = UserInputs([u.user_id for u in users], x, torch.ones(16, dtype=torch.long), [[0]] * 16)
    probe = trait_probe(inputs, users)
    assert probe["history"]["voice"] == 1.0 and probe["difference"]["mark"] == 1.0
    assert probe["history"]["mark"] < 0.8 and probe["difference"]["voice"] < 0.8
