"""Generation for steering: cancellation, the steer command line, prompts under the run's token rules."""

import math
import threading

import pytest
import torch

from saeforge.cli import build_parser
from saeforge.errors import SaeforgeError
from saeforge.interventions.generate import SteeringCancelled, prompt_batch, run_steering, sample
from saeforge.interventions.steering import FeatureEdit, Steerer

SITE = "layers.1.resid_post"
PROMPTS = ["To be, or not to be", "Now is the winter of our discontent made glorious summer"]  # unequal lengths


@pytest.fixture(scope="module")
def steerer(tiny_run, tiny_llama):
    return Steerer.from_run(tiny_run, lm=tiny_llama)


def _cancel_at(lm, call: int):
    """An edit that sets the returned event during forward call ``call`` of its block, and the calls it saw."""
    event, calls = threading.Event(), []

    def watch(x, ctx):
        calls.append(ctx.call)
        if ctx.call == call:
            event.set()

    return event, calls, watch


def test_cancel_stops_run_steering_at_the_next_token(steerer):
    event, calls, watch = _cancel_at(steerer.lm, 3)
    with steerer.lm.edit({SITE: watch}):
        with pytest.raises(SteeringCancelled, match="cancelled"):
            run_steering(steerer, PROMPTS, [FeatureEdit(SITE, 3, "add", 1.0, "raw")], max_new_tokens=40,
                         cancel=event)
    assert calls == [0, 1, 2, 3]  # the prompt pass and three steps of the 40, then nothing more ran
    assert issubclass(SteeringCancelled, SaeforgeError)


def test_cancel_in_sample_and_before_any_work(steerer):
    lm = steerer.lm
    batch = prompt_batch(steerer, PROMPTS, 30)
    event, calls, watch = _cancel_at(lm, 5)
    with lm.edit({SITE: watch}), pytest.raises(SteeringCancelled):
        sample(lm, batch.input_ids, batch.attention_mask, max_new_tokens=30, temperature=0.0, seed=0, cancel=event)
    assert calls == [0, 1, 2, 3, 4, 5]
    calls.clear()
    with lm.edit({SITE: watch}), pytest.raises(SteeringCancelled):  # already set: no forward at all
        run_steering(steerer, PROMPTS, [FeatureEdit(SITE, 3, "add", 1.0, "raw")], max_new_tokens=4, cancel=event)
    assert calls == []
    new = sample(lm, batch.input_ids, batch.attention_mask, max_new_tokens=6, temperature=0.0, seed=0,
                 cancel=threading.Event())  # never set: the full continuation
    assert new.shape == (2, 6)


def test_repeated_prompt_and_feature_flags_accumulate():
    parser = build_parser()
    cfg = parser.parse_args(["steer", "run", "--prompt", "A b", "--prompt", "C", "--feature", "layers.1.resid_post:1",
                             "--feature", "layers.1.resid_post:2", "layers.2.resid_post:3"]).cfg
    assert cfg.prompt == ("A b", "C")
    assert cfg.feature == ("layers.1.resid_post:1", "layers.1.resid_post:2", "layers.2.resid_post:3")
    cfg = parser.parse_args(["steer", "run", "--prompt", "A", "B"]).cfg
    assert cfg.prompt == ("A", "B") and cfg.feature == ()
    assert parser.parse_args(["steer", "run"]).cfg.prompt == ()


def test_prompts_follow_the_runs_token_rules_left_padded(steerer):
    lm = steerer.lm
    batch = prompt_batch(steerer, PROMPTS, 4)
    lengths = [len(lm.tokenizer(p, add_special_tokens=False)["input_ids"]) + 1 for p in PROMPTS]  # + BOS
    assert batch.lengths == lengths and batch.padding_side == "left"
    for i, p in enumerate(PROMPTS):
        row = batch.tokens(i).tolist()
        assert row == [lm.bos_token_id()] + lm.tokenizer(p, add_special_tokens=False)["input_ids"]
        assert batch.attention_mask[i, -1] == 1  # every row ends at the last column
    assert lengths[0] < lengths[1] and batch.attention_mask[0, : lengths[1] - lengths[0]].sum() == 0
    bos_columns = batch.input_ids == lm.bos_token_id()
    assert not (batch.keep & bos_columns).any() and not (batch.keep & (batch.attention_mask == 0)).any()
    no_bos = Steerer(lm, steerer.saes, steerer.max_acts, steerer.policy.__class__(prepend_bos=False))
    assert prompt_batch(no_bos, PROMPTS, 4).lengths == [n - 1 for n in lengths]


def test_generated_positions_in_a_teacher_forced_pass(steerer):
    lm = steerer.lm
    sae = steerer.saes[SITE][0]
    d = sae.W_dec[9].detach()
    batch = prompt_batch(steerer, PROMPTS, 4)
    ids, mask = batch.input_ids, batch.attention_mask
    full = torch.cat([ids, torch.randint(3, lm.vocab_size, (2, 4))], 1)
    full_mask = torch.cat([mask, torch.ones(2, 4, dtype=mask.dtype)], 1)
    plain = lm.read(full, [SITE], attention_mask=full_mask)[SITE]
    edit = [FeatureEdit(SITE, 9, "add", 7.0, "raw")]
    n = ids.shape[1]
    with steerer.steering(edit, "generated", prompt_length=n):
        seen = lm.read(full, [SITE], attention_mask=full_mask)[SITE]
    assert torch.equal(seen[:, :n], plain[:, :n])
    torch.testing.assert_close(seen[:, n:], plain[:, n:] + 7.0 * d)
    with steerer.steering(edit, "generated"):  # no prompt length: a pass from the start is all prompt
        assert torch.equal(lm.read(full, [SITE], attention_mask=full_mask)[SITE], plain)
    with steerer.steering(edit, "all"):  # padding and BOS columns are never edited
        seen = lm.read(full, [SITE], attention_mask=full_mask)[SITE]
    special = torch.isin(full, torch.tensor(lm.special_token_ids()))
    assert torch.equal(seen[special], plain[special]) and special.sum() >= 3  # two BOS and the padding of row 0


# ------------------------------------------------------------------------------------------------- the steer command
def _cfg(run, **kw):
    from saeforge.interventions.generate import SteerConfig

    base = dict(path=str(run), prompt=tuple(PROMPTS), feature=(f"{SITE}:9",), max_new_tokens=4, device="cpu")
    return SteerConfig(**{**base, **kw})


def test_a_sweep_writes_its_plot_and_json_to_out_only(tiny_run, tmp_path, capsys):
    from saeforge.interventions.generate import run_steer, sweep_points

    before = sorted(p.name for p in tiny_run.iterdir())
    report = run_steer(_cfg(tiny_run, sweep=(0.0, 1.0, 3.0), theme_words="the,to", out=str(tmp_path / "out")))
    printed = capsys.readouterr().out
    assert printed.startswith(f"loading the model {tiny_run.parent}") or "loading the model" in printed.splitlines()[0]
    assert "unit norm: mean ‖x‖ at layers.1.resid_post" in printed
    assert "| baseline |" in printed and "| S=3 |" in printed
    assert (tmp_path / "out" / "steering.json").is_file() and (tmp_path / "out" / "steering_sweep.png").is_file()
    assert sorted(p.name for p in tiny_run.iterdir()) == before  # the run folder is not written
    assert [r["strength"] for r in report["runs"]] == [1.0, 3.0]  # S = 0 of add is the baseline, measured once
    points = sweep_points(report)
    assert [p["label"] for p in points] == ["baseline", "S=1", "S=3"] and points[0]["strength"] == 0.0
    first = report["runs"][0]
    assert first["theme_words"] == ["the", "to"] and first["theme_source"] == "given"
    assert first["theme_rate_baseline"] == sum(first["theme_hits_baseline"]) / 2
    assert all(r["baseline"] == first["baseline"] for r in report["runs"])  # one baseline for the sweep
    assert points[0]["theme_rate"] == first["theme_rate_baseline"]


def test_one_run_prints_only_and_a_sweep_without_out_makes_a_new_folder(tiny_run, tmp_path, monkeypatch, capsys):
    from saeforge.interventions.generate import run_steer

    monkeypatch.chdir(tmp_path)
    report = run_steer(_cfg(tiny_run))
    assert list(tmp_path.iterdir()) == [] and "out" not in report
    assert "nothing written" in capsys.readouterr().out
    assert report["runs"][0]["strength"] == 0.25 and report["runs"][0]["edits"][0]["unit"] == "norm"  # the defaults
    report = run_steer(_cfg(tiny_run, sweep=(1.0,), mode="scale"))
    made = list(tmp_path.iterdir())
    assert len(made) == 1 and made[0].name.startswith("steering-") and (made[0] / "steering.json").is_file()
    assert report["runs"][0]["strength"] == 1.0


def test_bad_steer_options_fail_before_the_model_loads(tiny_run, monkeypatch):
    from saeforge.interventions import generate

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(generate.Steerer, "from_run", no_load)
    for kw, message in [(dict(unit="furlong"), "unknown strength unit"), (dict(mode="boost"), "unknown steering mode"),
                        (dict(feature=("layers.9.resid_post:1",)), "no SAE 'layers.9.resid_post'"),
                        (dict(prompt=()), "no prompt given"), (dict(theme_words="k1ng"), "must be words"),
                        (dict(sweep=(0.0,)), "only S = 0")]:
        with pytest.raises(SaeforgeError, match=message):
            generate.run_steer(_cfg(tiny_run, **kw))


def test_default_theme_words_are_the_steered_features_promoted_words(steerer):
    from saeforge.interventions.selection import promoted_words

    bound = steerer.bound[SITE]

    def words_of(i):  # the words among the tokens the edit promotes on the neutral prompts
        added = steerer.value(FeatureEdit(SITE, i, "add", 0.5, "norm")) * bound.sae.W_dec[i].detach()
        return promoted_words(steerer.lm, bound, i, vector=added, policy=steerer.policy, lens=steerer.lens)

    i = next(i for i in range(128) if words_of(i))
    words = {i: words_of(i)}
    run = run_steering(steerer, PROMPTS, [FeatureEdit(SITE, i, "add", 0.5, "norm")], max_new_tokens=4)
    m = run.metrics
    assert m["theme_words"] == words[i] and m["theme_source"] == f"promoted tokens of {SITE}:{i}"
    assert m["theme_rate_steered"] == sum(m["theme_hits_steered"]) / 2
    none = run_steering(steerer, PROMPTS, [FeatureEdit(SITE, 9, "scale", 0.0)], max_new_tokens=2)
    assert none.metrics["theme_words"] == [] and none.metrics["theme_rate_steered"] is None


def test_steer_flags_parse():
    cfg = build_parser().parse_args(["steer", "run", "--prompt", "A", "--feature", "x:1", "--theme-words",
                                     "king,queen", "--out", "o", "--sweep", "0", "0.5", "--unit", "max"]).cfg
    assert cfg.theme_words == "king,queen" and cfg.out == "o" and cfg.sweep == (0.0, 0.5) and cfg.unit == "max"
    assert cfg.strength is None
    assert build_parser().parse_args(["steer", "run", "--strength", "0.25"]).cfg.strength == 0.25


def test_pooled_perplexity_is_the_perplexity_of_all_tokens():
    from saeforge.interventions.generate import pooled_perplexity

    assert pooled_perplexity([2.0, 8.0]) == pytest.approx(4.0)  # exp((ln 2 + ln 8) / 2)
    assert pooled_perplexity([5.0]) == pytest.approx(5.0)
    assert math.isnan(pooled_perplexity([]))
