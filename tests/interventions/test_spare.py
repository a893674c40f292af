"""SpARE against hand-computed cases: mutual information, the MI-mass selection and its sign split, the functional
vectors, the edit in both directions, the conflict set and the answer labels."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from saeforge.errors import SaeforgeError
from saeforge.interventions.spare import (Fact, answer_of, conflict_set, mutual_information, select, spare_edit,
                                          SpareSelection)


def test_mutual_information_by_hand():
    y = np.array([1, 1, 0, 0])
    z = np.array([[1.0, 0.0, 1.0], [2.0, 0.0, 0.0], [0.0, 0.0, 3.0], [0.0, 0.0, 0.0]])
    # column 0 fires exactly on label 1: MI = H(y) = ln 2; column 1 never fires; column 2 fires on one of each
    mi = mutual_information(z, y, bins=1)
    np.testing.assert_allclose(mi, [math.log(2), 0.0, 0.0], atol=1e-12)
    # with bins, the non-zero values split further, but a column silent on one label keeps MI = ln 2
    np.testing.assert_allclose(mutual_information(z, y, bins=4)[0], math.log(2))
    with pytest.raises(SaeforgeError, match="labels must be 0 or 1"):
        mutual_information(z, np.array([0, 1, 2, 0]))


def _z():
    """8 prompts, labels 1,1,1,1,0,0,0,0: latent 0 fires on the context group (2,2,4,4), latent 1 on the memory group
    (3 each), latent 2 on half of each, latent 3 never."""
    z = torch.zeros(8, 4)
    z[:4, 0] = torch.tensor([2.0, 2.0, 4.0, 4.0])
    z[4:, 1] = 3.0
    z[[0, 1, 4, 5], 2] = 1.0
    return z, [1, 1, 1, 1, 0, 0, 0, 0]


def test_selection_by_mutual_information_mass_and_sign():
    z, y = _z()
    # MI: latents 0 and 1 ln 2 each, 2 and 3 zero. Half the mass (ln 2) needs a cumulative sum above it: both.
    sel = select(z, y, proportion=0.5, degree=2.0)
    assert sel.context.tolist() == [0] and sel.memory.tolist() == [1]
    torch.testing.assert_close(sel.v_context, torch.tensor([2 * 3.0]))  # 2 × mean(2, 2, 4, 4)
    torch.testing.assert_close(sel.v_memory, torch.tensor([2 * 3.0]))
    sel = select(z, y, proportion=0.07)  # the paper's share: the single top latent
    assert sel.context.tolist() == [0] and sel.memory.tolist() == []
    with pytest.raises(SaeforgeError, match="needs both behaviours: 7 context and 1 memory"):
        select(z, [1, 1, 1, 1, 1, 1, 1, 0])
    with pytest.raises(SaeforgeError, match="proportion 0 is not in"):
        select(z, y, proportion=0)


def test_the_edit_in_both_directions_by_hand():
    sae = SimpleNamespace(W_dec=torch.eye(3), encode=lambda h: h.clamp_min(0))
    sel = SpareSelection(torch.tensor([0]), torch.tensor([1]), torch.tensor([2.0]), torch.tensor([1.0]),
                         np.zeros(3))
    x = torch.tensor([[[9.0, 9.0, 9.0], [0.5, 3.0, 1.0]]])  # [batch 1, seq 2, d 3]
    # to context: latent 0 rises to v_C = 2 (adds 1.5); latent 1 loses min(v_P, 3) = 1
    out = spare_edit(sae, sel, "context")(x, None)
    torch.testing.assert_close(out[0, 1], torch.tensor([2.0, 2.0, 1.0]))
    torch.testing.assert_close(out[0, 0], x[0, 0])  # only the last position
    # to memory: latent 1 already above v_P (nothing added); latent 0 loses min(v_C, 0.5) = 0.5
    out = spare_edit(sae, sel, "memory")(x, None)
    torch.testing.assert_close(out[0, 1], torch.tensor([0.0, 3.0, 1.0]))
    with pytest.raises(SaeforgeError, match="unknown direction"):
        spare_edit(sae, sel, "sideways")


def test_conflict_set_and_answer_labels():
    facts = conflict_set()
    assert len(facts) == 3 * len({f.country for f in facts}) >= 90 and all(f.substitute != f.memory for f in facts)
    f = Fact("France", "Paris", "Tokyo")
    assert "The capital city of France is Tokyo." in f.conflict() and f.conflict().endswith(f.closed_book())
    assert answer_of(" Tokyo, of course", f) == "context"
    assert answer_of(" Paris.\nQuestion: Tokyo", f) == "memory"  # the first line only
    assert answer_of(" Paris, not Tokyo", f) == "memory"  # the first named
    assert answer_of(" Lyon", f) == "other"


def test_run_spare_refuses_a_model_that_knows_no_fact(tiny_run, tiny_llama):
    from saeforge.interventions.spare import run_spare
    from saeforge.interventions.steering import Steerer

    with pytest.raises(SaeforgeError, match=r"the model knows only \d of the 39 facts"):
        run_spare(Steerer.from_run(tiny_run, lm=tiny_llama), max_new_tokens=2)
