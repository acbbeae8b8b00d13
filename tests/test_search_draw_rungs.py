"""`draw_rungs: true` (search/trial.py's `draw_rung`): in a few-shot search a trial costs n draws, and
a SetFit-like trial validates once per draw, so no rung inside a draw can stop it; rungs between
draws can — successive halving with draws as the resource, Optuna's promotion rule at each rung."""

from __future__ import annotations

from types import SimpleNamespace

import optuna
import pytest

from hybridtune.search.space import Space
from hybridtune.search.trial import DRAW_MEANS, draw_rung

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _ctx(f: int = 2, draws: int = 5, metric: str = "accuracy"):
    return SimpleNamespace(space=Space(draw_rungs=True, reduction_factor=f), draws=draws, metric=metric)


def _study(*means: list[float], direction: str = "maximize") -> optuna.Study:
    """Finished trials with their means after 1, 2, ... draws, as `draw_rung` records them."""
    study = optuna.create_study(direction=direction)
    for m in means:
        trial = study.ask()
        trial.set_user_attr(DRAW_MEANS, m)
        study.tell(trial, m[-1])
    return study


def test_a_trial_below_the_best_half_stops_at_a_rung_between_draws():
    study = _study([0.60] * 5, [0.70] * 5, [0.80] * 5)
    trial = study.ask()
    # after 1 draw: 0.75 among [0.80, 0.75, 0.70, 0.60], the best 2 go on
    assert draw_rung(_ctx(), trial, [0.75]) is None
    assert trial.user_attrs[DRAW_MEANS] == [0.75]
    # after 2 draws (a rung at f = 2): mean 0.65 among [0.80, 0.70, 0.65, 0.60]: stopped
    why = draw_rung(_ctx(), trial, [0.75, 0.55])
    assert why is not None and "after 2 of 5 draws" in why and "0.6500" in why and "needed 0.7000" in why
    assert trial.user_attrs[DRAW_MEANS] == [0.75, 0.65]


def test_rungs_come_at_1_f_f2_draws_and_never_at_the_last():
    study = _study([0.90] * 5, [0.90] * 5)
    stopped = {f: [k for k in (1, 2, 3, 4) if draw_rung(_ctx(f=f), study.ask(), [0.1] * k)] for f in (2, 4)}
    assert stopped == {2: [1, 2, 4], 4: [1, 4]}
    trial = study.ask()  # the draws of one trial, in turn, as other_draws asks after each
    assert [draw_rung(_ctx(f=4, draws=3), trial, [0.1] * k) is None for k in (1, 2, 3)] == [False, True, True]
    assert trial.user_attrs[DRAW_MEANS] == pytest.approx([0.1] * 3)  # recorded at every draw, rung or not


@pytest.mark.parametrize(("f", "goes_on"), [(2, True), (4, False)])
def test_a_rung_keeps_the_best_one_in_f(f, goes_on):
    study = _study([0.9], [0.8], [0.5])  # trials that stopped after their first draw still count there
    assert (draw_rung(_ctx(f=f), study.ask(), [0.85]) is None) is goes_on  # 2nd of 4


def test_the_first_trials_go_on_only_when_best_and_a_loss_is_minimised():
    assert draw_rung(_ctx(), _study().ask(), [0.2]) is None  # alone at its rung
    assert draw_rung(_ctx(), _study([0.5]).ask(), [0.4]) is not None  # 2 at the rung: the best goes on
    losses = _study([0.5], direction="minimize")
    assert draw_rung(_ctx(metric="loss"), losses.ask(), [0.4]) is None  # lower is better there


def test_draw_rungs_need_a_pruner_with_rungs():
    with pytest.raises(ValueError, match="draw_rungs: found true with pruner median"):
        Space(pruner="median", draw_rungs=True)
    assert "draw_rungs" not in Space().identity() and Space(draw_rungs=True).identity()["draw_rungs"]
