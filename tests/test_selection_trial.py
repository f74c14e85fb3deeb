"""Choosing among SAEs: every alternative selection, and the trial that keeps the one whose blocked run answers best."""

from __future__ import annotations

import copy
import dataclasses
import gc
import weakref

import pytest
import torch
from test_selection import D_SAE, FAST, LAYER, PLANTED, PROMPTS, BadWordJudge, planted_setup

from hf_blockem.selection import choose_by_trial, select_latents

SHIFT = 7  # the second SAE at LAYER holds the planted direction at latent (PLANTED + SHIFT) % D_SAE


@pytest.fixture(scope="module")
def three_saes():
    """Misalignment planted at LAYER - 1 (so it is read at LAYER - 1 and, carried by the residual stream, at LAYER);
    two SAEs at LAYER with the planted direction at different latents, one at LAYER - 1."""
    base, misaligned, tokenizer, sae, _ = planted_setup(layer=LAYER - 1)
    rolled = copy.deepcopy(sae)
    order = torch.roll(torch.arange(D_SAE), SHIFT)
    with torch.no_grad():
        rolled.W_enc.copy_(sae.W_enc[:, order])
        rolled.W_dec.copy_(sae.W_dec[order])
    saes = {"early": (sae, LAYER - 1), "late": (sae, LAYER), "late_rolled": (rolled, LAYER)}
    result = select_latents(
        base, misaligned, tokenizer, saes, BadWordJudge(), PROMPTS, config=FAST, choose="all", progress=False
    )
    return base, misaligned, tokenizer, result


def test_alternatives_are_every_combination_of_one_sae_per_layer(three_saes):
    *_, result = three_saes
    assert [r.plus for r in result.compared] == [[PLANTED], [PLANTED], [(PLANTED + SHIFT) % D_SAE]]
    alternatives = result.alternatives()
    assert [a.name for a in alternatives] == ["early+late", "early+late_rolled"]
    assert result.name in [a.name for a in alternatives]
    for alternative, late in zip(alternatives, ("late", "late_rolled"), strict=True):
        assert alternative.latent_set.layer_indices == [LAYER - 1, LAYER]
        assert alternative.latent_set.layer(LAYER).plus == next(r.plus for r in result.compared if r.name == late)
        assert alternative.latent_set.metadata["selection"]["saes"] == ["early", late]
        assert alternative.compared == result.compared and alternative.choose == "all"
    # Each alternative owns its set: writing one's metadata leaves the others and the SAE runs alone.
    alternatives[0].latent_set.metadata["note"] = "mine"
    assert "note" not in alternatives[1].latent_set.metadata
    assert all("note" not in r.latent_set.metadata for r in result.compared)
    # With choose="best", every SAE that selected something is an alternative on its own.
    best = dataclasses.replace(result, choose="best").alternatives()
    assert [a.name for a in best] == ["early", "late", "late_rolled"]
    assert [a.latent_set.layer_indices for a in best] == [[LAYER - 1], [LAYER], [LAYER]]


def test_trial_keeps_the_alternative_whose_run_answers_best(three_saes, tmp_path):
    base, misaligned, tokenizer, result = three_saes
    alternatives = result.alternatives()
    calls = []

    def fine_tune(name, latent_set):
        # Stands in for the blocked fine-tune: the second alternative's run comes out aligned, the first's does not.
        calls.append((name, latent_set.layer_indices))
        return base if name == "early+late_rolled" else misaligned

    index, trials = choose_by_trial(
        alternatives, fine_tune, tokenizer, BadWordJudge(), PROMPTS, n_samples=2, max_new_tokens=8
    )
    assert calls == [("early+late", [LAYER - 1, LAYER]), ("early+late_rolled", [LAYER - 1, LAYER])]
    assert [t.name for t in trials] == ["early+late", "early+late_rolled"] and index == 1
    assert trials[0].em_rate > 0.5 and trials[1].em_rate == 0.0
    assert trials[1].score == 1.0 - trials[1].incoherence_rate and trials[0].n == trials[1].n == 2 * len(PROMPTS)
    assert trials[1].to_dict()["score"] == trials[1].score
    # The caller marks the winner; its report then says how the SAEs were kept.
    kept = dataclasses.replace(alternatives[index], chosen_by="trial")
    report = (kept.save(tmp_path / "report") / "report.md").read_text()
    assert "Kept by a trial blocked fine-tune" in report and kept.to_dict()["chosen_by"] == "trial"
    assert "Kept by group repair" in (result.save(tmp_path / "plain") / "report.md").read_text()
    # Equal answers: the alternative listed first wins.
    index, _ = choose_by_trial(alternatives, lambda name, s: base, tokenizer, BadWordJudge(), PROMPTS, n_samples=2)
    assert index == 0


def test_each_trial_run_is_judged_and_released_before_the_next_trains(three_saes):
    # At 7B scale N fine-tuned models do not fit together: a run must be garbage once it has been judged.
    base, _, tokenizer, result = three_saes
    alive = []

    def fine_tune(name, latent_set):
        gc.collect()
        assert all(ref() is None for ref in alive), "an earlier trial's model is still held"
        model = type(base)(base.config)
        alive.append(weakref.ref(model))
        return model

    _, trials = choose_by_trial(result.alternatives(), fine_tune, tokenizer, BadWordJudge(), PROMPTS, n_samples=2)
    assert len(alive) == 2 and [t.name for t in trials] == ["early+late", "early+late_rolled"]


def test_trial_rejects_alternatives_without_latents(three_saes):
    *_, result = three_saes
    with pytest.raises(ValueError, match="at least one alternative"):
        choose_by_trial([], None, None, BadWordJudge(), PROMPTS)
    empty = dataclasses.replace(result, latent_set=None, layers=[])
    with pytest.raises(ValueError, match="hold none"):
        choose_by_trial([empty], None, None, BadWordJudge(), PROMPTS)
