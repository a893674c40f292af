"""DEP's inputs and trainable parts on the tiny Llama: shapes, peer differences, and gradients that reach the
autoencoder and both alignment MLPs and nothing of the frozen model."""

from __future__ import annotations

import pytest
import torch

from saeforge.personalization.model import (DEPAdapter, embed_texts, generate_greedy, history_prompt, stack_rows,
                                            user_inputs)
from saeforge.personalization.train import PersonalizeTrainConfig, batch_loss, dep_rows, tokenize_examples
from saeforge.personalization.users import HistoryItem, User, synthetic_users
from tests.personalization.conftest import tiny_passages


@pytest.fixture(scope="module")
def users():
    return synthetic_users(6, history=5, train_queries=2, test_queries=1, passages=tiny_passages(20))


def test_embeddings_are_unit_mean_pooled_states(tiny_llama):
    texts = ["To be or not to be", "the slings and arrows", "a sea of troubles and by opposing end them"]
    emb = embed_texts(tiny_llama, texts, batch_size=2)
    assert emb.shape == (3, tiny_llama.d_model) and emb.dtype == torch.float32
    assert torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    # batching and padding do not change a text's embedding
    assert torch.allclose(embed_texts(tiny_llama, texts[2:], batch_size=1), emb[2:], atol=1e-5)
    assert not torch.allclose(embed_texts(tiny_llama, texts, layer=0), emb, atol=1e-3)


def test_user_inputs_hold_history_and_peer_differences(tiny_llama):
    def user(uid, items):
        return User(uid, tuple(HistoryItem(i, f"Line: {i}", f"{uid} wrote about {i}") for i in items))

    users = [user("a", ["x", "y", "solo"]), user("b", ["x"]), user("c", ["x", "y"])]
    inputs = user_inputs(tiny_llama, users, slots=4)
    assert inputs.x.shape == (3, 8, tiny_llama.d_model)
    assert inputs.slots.tolist() == [2, 1, 2]  # "solo" has no peer: left out
    assert inputs.history_index[0] == [1, 0]  # most recent first
    e = {(u.user_id, h.item): v for u in users for h, v in
         zip(u.history, embed_texts(tiny_llama, [h.text for h in u.history]))}
    # user b's only peer on item x... no: b's peers on x are a and c; its difference is a weighted mean of both
    diff_b = inputs.x[1, 4]
    for w in (0.0, 1.0):
        assert not torch.allclose(diff_b, e["b", "x"] - (w * e["a", "x"] + (1 - w) * e["c", "x"]), atol=1e-6)
    # a's second slot (item x) against peers b and c, weights from the softmax of normalised distances
    means = {u.user_id: torch.stack([e[u.user_id, h.item] for h in u.history]).mean(0) for u in users}
    dist = torch.stack([(means["a"] - means[r]).norm() for r in ("b", "c")])
    w = torch.softmax(dist / dist.sum(), 0)
    expected = w[0] * (e["a", "x"] - e["b", "x"]) + w[1] * (e["a", "x"] - e["c", "x"])
    assert torch.allclose(inputs.x[0, 4 + 1], expected, atol=1e-5)
    assert torch.allclose(inputs.x[0, 1], e["a", "x"], atol=1e-5)
    assert torch.count_nonzero(inputs.x[1, 1:4]) == 0 and torch.count_nonzero(inputs.x[1, 5:]) == 0


def test_adapter_shapes_and_rows(tiny_llama, users):
    inputs = user_inputs(tiny_llama, users, slots=3)
    adapter = DEPAdapter(tiny_llama.d_model, 16, tiny_llama.d_model, slots=3)
    soft, z, x_hat = adapter(inputs.x)
    assert soft.shape == (6, 6, tiny_llama.d_model) and z.shape == (6, 6, 16) and x_hat.shape == inputs.x.shape
    prompts = [[5, 6, 7], [8]]
    rows, _ = dep_rows(tiny_llama, adapter, inputs, [0, 1], prompts)
    used = inputs.slots.tolist()
    assert [r.shape[0] for r in rows] == [1 + 2 * used[0] + 3, 1 + 2 * used[1] + 1]
    embeds, mask = stack_rows(rows, left=True)
    width = max(r.shape[0] for r in rows)
    assert embeds.shape == (2, width, tiny_llama.d_model) and mask[1].sum() == rows[1].shape[0]
    assert mask[1, -1] == 1 and (mask[1, 0] == 0) == (rows[1].shape[0] < width)
    # the used slots' soft tokens sit right after BOS (history, then difference), the prompt's embeddings after them;
    # the reference runs the adapter on the same two users (a batch of another size may sum in another order)
    soft = adapter(inputs.x[[0, 1]])[0]
    n = used[1]
    assert torch.equal(rows[1][1:1 + n], soft[1, :n]) and torch.equal(rows[1][1 + n:1 + 2 * n], soft[1, 3:3 + n])
    assert torch.equal(rows[1][-1], tiny_llama.model.get_input_embeddings().weight[8])


def test_gradients_reach_only_the_trainable_parts(tiny_llama, users):
    cfg = PersonalizeTrainConfig(users="x", out="y", slots=3, d_sae=16)
    inputs = user_inputs(tiny_llama, users, slots=3)
    examples = tokenize_examples(tiny_llama, users, inputs, "train", 32, 16)
    assert len(examples) == 12 and all(e.target_ids[-1] == tiny_llama.tokenizer.eos_token_id for e in examples)
    for p in tiny_llama.model.parameters():
        p.requires_grad_(False)
    adapter = DEPAdapter(tiny_llama.d_model, 16, tiny_llama.d_model, slots=3)
    loss, parts = batch_loss(tiny_llama, adapter, inputs, examples[:4], cfg)
    loss.backward()
    assert all(p.grad is None for p in tiny_llama.model.parameters())
    for name, p in adapter.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert loss.item() == pytest.approx(parts["ce"] + 100 * (parts["recon"] + 1e-3 * parts["kl"]), rel=1e-5)
    # with no autoencoder loss, the alignment MLPs still get the cross-entropy's gradient through the encoder
    adapter.zero_grad()
    loss, _ = batch_loss(tiny_llama, adapter, inputs, examples[:4], PersonalizeTrainConfig(sae_weight=0.0, slots=3))
    loss.backward()
    assert adapter.sae.encoder.weight.grad.abs().sum() > 0 and not adapter.sae.decoder.weight.grad.any()


def test_greedy_generation_from_embeddings_matches_token_generation(tiny_llama):
    ids = tiny_llama.tokenizer("To be, or not to be", add_special_tokens=False)["input_ids"]
    embed = tiny_llama.model.get_input_embeddings()
    rows = [embed(torch.tensor(ids)), embed(torch.tensor(ids[2:]))]
    embeds, mask = stack_rows(rows, left=True)
    with torch.no_grad():
        got = generate_greedy(tiny_llama.model, embeds, mask, 6, stop_ids=[10_000])
        ref = tiny_llama.model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False)[0, len(ids):]
        ref2 = tiny_llama.model.generate(torch.tensor([ids[2:]]), max_new_tokens=6, do_sample=False)[0, len(ids) - 2:]
    assert got == [ref.tolist(), ref2.tolist()]  # left padding changes nothing


def test_history_prompt_writes_the_most_recent_texts(users):
    text = history_prompt(users[0], "Line: x\nComment:", 2)
    assert text.endswith("Line: x\nComment:")
    assert users[0].history[-1].text in text and users[0].history[-2].text in text
    assert users[0].history[-3].text not in text
