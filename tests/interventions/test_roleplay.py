"""SRPS role-play steering against hand-computed cases: the sensitivity score, the top-k vector, the rotation at the
last prompt position during prefill only."""

from types import SimpleNamespace

import pytest
import torch

from saeforge.errors import SaeforgeError
from saeforge.interventions.roleplay import (last_prompt_rotation, role_prompts, rotation_edit, sensitivity,
                                             srps_vector)

W3 = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
WITH = torch.tensor([[1.0, 0.0, 0.5], [0.5, 0.0, 0.0]])
WITHOUT = torch.tensor([[0.0, 0.0, 0.5], [0.0, 0.3, 0.0]])


def test_sensitivity_and_the_srps_vector_by_hand():
    # mean difference [0.75, −0.15, 0]; firing (> 0.2) rates with [1, 0, 0.5], without [0, 0.5, 0.5]
    s = sensitivity(WITH, WITHOUT, beta=3.0, tau=0.2)
    torch.testing.assert_close(s, torch.tensor([0.75 + 3.0, -0.15 - 1.5, 0.0]))
    torch.testing.assert_close(sensitivity(WITH, WITHOUT, beta=0.0), torch.tensor([0.75, -0.15, 0.0]))
    v, top = srps_vector(SimpleNamespace(W_dec=W3), WITH, WITHOUT, k=1)
    assert top.tolist() == [0]
    torch.testing.assert_close(v, 8 * 0.75 * W3[0])
    # k = 2: latents 0 and 2 (s = 0 beats −1.65); mean a^w of latent 2 is 0.25
    v, top = srps_vector(SimpleNamespace(W_dec=W3), WITH, WITHOUT, k=2, c=2.0)
    assert top.tolist() == [0, 2]
    torch.testing.assert_close(v, 2 * 0.75 * W3[0] + 2 * 0.25 * W3[2])
    with pytest.raises(SaeforgeError, match="2 role prompts for 1 plain"):
        sensitivity(WITH, WITHOUT[:1])
    with pytest.raises(SaeforgeError, match="switch on no SAE latent"):
        srps_vector(SimpleNamespace(W_dec=W3), torch.zeros(2, 3), torch.zeros(2, 3), k=2)
    assert role_prompts(["q1", "q2", "q3"], ("A.", "B.")) == ["A. q1", "B. q2", "A. q3"]


def test_the_rotation_moves_the_last_prompt_position_only_and_keeps_its_norm():
    x = torch.tensor([[[1.0, 0.0], [3.0, 4.0]], [[0.0, 2.0], [0.0, -2.0]]])  # [batch 2, seq 2, d 2]
    v = torch.tensor([5.0, 0.0])
    out = rotation_edit(v)(x, SimpleNamespace(is_generated=False))
    torch.testing.assert_close(out[:, 0], x[:, 0])  # earlier positions untouched
    # (3, 4) + (5, 0) = (8, 4), rescaled to norm 5; (0, −2) + (5, 0) = (5, −2), rescaled to norm 2
    torch.testing.assert_close(out[0, 1], torch.tensor([8.0, 4.0]) * 5 / 80 ** 0.5)
    torch.testing.assert_close(out[1, 1], torch.tensor([5.0, -2.0]) * 2 / 29 ** 0.5)
    assert rotation_edit(v)(x, SimpleNamespace(is_generated=True)) is None  # cached generation steps: no edit


def test_last_prompt_rotation_in_a_real_generation(tiny_llama):
    site = "layers.1.resid_post"
    ids = torch.tensor([[tiny_llama.bos_token_id()] + tiny_llama.tokenizer("To be or not", add_special_tokens=False)[
        "input_ids"]])
    seen = []

    def watch(x, ctx):
        seen.append((ctx.is_generated, x.shape[1]))

    plain = tiny_llama.model(input_ids=ids).logits
    with last_prompt_rotation(tiny_llama, site, torch.full((32,), 3.0)):
        steered = tiny_llama.model(input_ids=ids).logits
        with tiny_llama.edit({site: watch}):
            tiny_llama.model.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
    torch.testing.assert_close(steered[:, :-1], plain[:, :-1])  # causal: only the last position's output moves
    assert not torch.allclose(steered[:, -1], plain[:, -1], atol=1e-4)
    assert seen[0] == (False, ids.shape[1]) and all(g for g, _ in seen[1:])
