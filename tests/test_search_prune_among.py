"""`prune_among: same_length` (search/study.py's `SameLength`, the default of successive halving and
median): a trial's rung is compared only with the trials planned to validate as often. With a decaying
lr, a 1-epoch trial has annealed by the rung where a 3-epoch one, after as much training, is still at
full lr; compared with all trials, every longer trial of a one-hour search was pruned there
(docs/search.md)."""

from __future__ import annotations

import optuna
import pytest
from pydantic import ValidationError

from hybridtune.search.setup import LENGTH
from hybridtune.search.space import Space
from hybridtune.search.study import SameLength

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _reported(study, length: int | None, values: list[float]):
    """A trial that validated `values`, asking the pruner after each as the search's callback does
    (the pruner records a trial's rungs as it is asked)."""
    trial = study.ask()
    if length is not None:
        trial.set_user_attr(LENGTH, length)
    for step, value in enumerate(values, 1):
        trial.report(value, step)
        if step < len(values):
            assert not trial.should_prune()
    return trial


def _halving():
    return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=2)


def _after_three_short_trials(pruner):
    """Three 1-epoch trials (4 validations) at 0.80 on their first rung, run to their end."""
    study = optuna.create_study(direction="maximize", pruner=pruner)
    for _ in range(3):
        short = _reported(study, 4, [0.80, 0.82, 0.83, 0.84])
        study.tell(short, 0.84)
    return study


def test_a_longer_trial_meets_only_the_trials_of_its_length():
    # a 3-epoch trial (12 validations), still at full lr: 0.70 at the first rung
    assert _reported(_after_three_short_trials(SameLength(_halving())), 12, [0.70]).should_prune() is False
    # compared with every trial (prune_among: all, Optuna's own pruner), the same trial stops there
    assert _reported(_after_three_short_trials(_halving()), 12, [0.70]).should_prune() is True


def test_within_a_length_the_weak_are_still_pruned():
    study = _after_three_short_trials(SameLength(_halving()))
    assert _reported(study, 12, [0.70]).should_prune() is False  # the first of its length: promoted
    assert _reported(study, 12, [0.60]).should_prune() is True  # below it: stopped
    assert _reported(study, 4, [0.75]).should_prune() is True  # a short one below the short ones
    assert _reported(study, 4, [0.81]).should_prune() is False


def test_a_trial_without_a_length_meets_every_trial():
    """A trial that never said its length (a study from before the key) is compared with all."""
    study = _after_three_short_trials(SameLength(_halving()))
    assert _reported(study, None, [0.70]).should_prune() is True


def test_the_default_and_its_refusal():
    assert Space().pruned_among() == "same_length"
    assert Space(pruner="median").pruned_among() == "same_length"
    assert Space(pruner="hyperband").pruned_among() == "all"  # Optuna's brackets: compared over all
    assert Space(prune_among="all").pruned_among() == "all"
    # the default stays out of the study's identity: a search dir made before the key resumes
    assert (
        "prune_among" not in Space().identity()
        and Space(prune_among="all").identity()["prune_among"] == "all"
    )
    for pruner in ("hyperband", "none"):
        with pytest.raises(ValidationError, match="prune_among: found same_length with pruner " + pruner):
            Space(pruner=pruner, prune_among="same_length")


def test_the_reduction_factor_sets_the_rungs_and_stays_out_of_old_identities():
    """`reduction_factor: f`: a rung keeps the best 1/f. Four trials of one length at the first rung:
    with f = 2 the second best passes, with f = 4 only the best does."""
    from types import SimpleNamespace

    from hybridtune.search.study import pruner_for

    for f, second_passes in ((2, True), (4, False)):
        ctx = SimpleNamespace(space=Space(reduction_factor=f), max_evaluations=4)
        study = optuna.create_study(direction="maximize", pruner=pruner_for(ctx))
        for value in (0.60, 0.70, 0.80):  # each the best so far: each passes
            study.tell(_reported(study, 4, [value, 0.8, 0.8, 0.8]), 0.8)
        assert _reported(study, 4, [0.75]).should_prune() is not second_passes
    assert "reduction_factor" not in Space().identity()  # a search dir made before the key resumes
    assert Space(reduction_factor=3).identity()["reduction_factor"] == 3
    with pytest.raises(ValidationError, match="reduction_factor: found 3 with pruner median"):
        Space(pruner="median", reduction_factor=3)
