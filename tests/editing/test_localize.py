import torch

from saeforge.data.prompts import PromptEncoder
from saeforge.editing.facts import encode_answer
from saeforge.editing.localize import localize, retain_means
from tests.editing.helpers import PROMPT, SITE, TARGET, retain_ids, tiny_sae


def _setup(lm, sae):
    site = lm.site(SITE)
    acts = lm.read(retain_ids(lm), [site])[SITE][:, 1:].reshape(-1, lm.d_mlp).clone()
    return site, retain_means(sae, [acts]), encode_answer(lm, PromptEncoder(lm), PROMPT, TARGET)


def test_latents_map_to_their_largest_decoder_weights_and_skip_owned_neurons(tiny_llama):
    sae = tiny_sae()
    site, means, fact = _setup(tiny_llama, sae)
    loc = localize(tiny_llama, sae, site, fact, block=2, means=means, latents=3, neurons_per_latent=4)
    assert loc.source == "sae" and len(loc.latents) == 3
    assert list(loc.latent_scores) == sorted(loc.latent_scores, reverse=True) and loc.latent_scores[-1] > 0
    top = {i for j in loc.latents for i in sae.W_dec[j].abs().topk(4).indices.tolist()}
    assert set(loc.neurons) == top
    again = localize(tiny_llama, sae, site, fact, block=2, means=means, latents=3, neurons_per_latent=4,
                     avoid=loc.neurons)
    assert again.latents == loc.latents and not set(again.neurons) & set(loc.neurons)
    assert len(again.neurons) == len(top)


def test_no_active_latent_falls_back_to_neuron_attribution(tiny_llama):
    sae = tiny_sae()
    with torch.no_grad():
        sae.b_enc.fill_(-1e4)  # nothing fires
    site, means, fact = _setup(tiny_llama, sae)
    loc = localize(tiny_llama, sae, site, fact, block=2, means=means, latents=2, neurons_per_latent=3)
    assert loc.source == "attribution" and loc.latents == () and len(loc.neurons) == 6


def test_a_layer_with_every_neuron_owned_reuses_them_in_score_order(tiny_llama):
    sae = tiny_sae()
    site, means, fact = _setup(tiny_llama, sae)
    free = localize(tiny_llama, sae, site, fact, block=2, means=means, latents=3, neurons_per_latent=4)
    owned = set(range(tiny_llama.d_mlp)) - {free.neurons[0]}
    full = localize(tiny_llama, sae, site, fact, block=2, means=means, latents=3, neurons_per_latent=4, avoid=owned)
    assert len(full.neurons) == len(free.neurons) and free.neurons[0] in full.neurons  # full size, the free one in
