"""The search's floor: a trial no better than always answering the most frequent label, at its second
evaluation or later, stops there (search/trial.py), whatever the pruner's rungs say."""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from sklearn.metrics import accuracy_score, f1_score

from hybridtune.search import run_search
from hybridtune.search.trial import PruningCallback
from hybridtune.strategy.plan import eval_interval
from hybridtune.tasks.baseline import constant_answer_score
from tests.conftest import sentiment_rows, write_csv
from tests.test_search import _space


def test_constant_answer_score_is_sklearns_on_a_constant_prediction():
    rng = random.Random(3)
    gold = rng.choices(["a", "b", "c"], weights=[5, 3, 2], k=200)
    majority = max(set(gold), key=gold.count)
    constant = [majority] * len(gold)
    assert constant_answer_score("accuracy", gold) == pytest.approx(accuracy_score(gold, constant))
    assert constant_answer_score("f1_macro", gold) == pytest.approx(
        f1_score(gold, constant, average="macro", zero_division=0)
    )
    assert constant_answer_score("loss", gold) is None and constant_answer_score("accuracy", []) is None


class _Trial:
    def __init__(self):
        self.reported = []

    def report(self, value, step):
        self.reported.append((step, value))

    def should_prune(self):
        return False  # the pruner's rungs never stop it: only the floor can


class _Pruner(_Trial):
    asked = 0

    def should_prune(self):
        self.asked += 1  # asking records the rung's value (Optuna's successive halving)
        return True  # the pruner's rungs would stop it at every evaluation


def _evaluate(callback, values, max_steps: int = 100) -> list[bool]:
    stops = []
    for step, value in enumerate(values, 1):
        control = SimpleNamespace(should_training_stop=False)
        state = SimpleNamespace(global_step=step, max_steps=max_steps)
        callback.on_evaluate(None, state, control, metrics={"eval_accuracy": value})
        stops.append(control.should_training_stop)
    return stops


def test_the_floor_stops_from_the_second_evaluation_on():
    at_chance = PruningCallback(_Trial(), "accuracy", prune=True, floor=0.5)
    assert _evaluate(at_chance, [0.5, 0.5]) == [False, True]  # the first evaluation is spared
    assert at_chance.pruned and "no better than always answering the most frequent label" in at_chance.why
    learning = PruningCallback(_Trial(), "accuracy", prune=True, floor=0.5)
    assert _evaluate(learning, [0.5, 0.62, 0.7, 0.75]) == [False] * 4 and learning.why is None
    relapsed = PruningCallback(_Trial(), "accuracy", prune=True, floor=0.5)
    assert _evaluate(relapsed, [0.4, 0.6, 0.49]) == [False, False, True]
    unpruned = PruningCallback(_Trial(), "accuracy", prune=False, floor=0.5)  # pruner: none
    assert _evaluate(unpruned, [0.5, 0.5, 0.5]) == [False] * 3


def test_the_runs_last_evaluation_never_stops_it():
    """At the run's last step there is nothing left to save: neither the pruner nor the floor marks
    the trial pruned there (it completes, with its value), though both stop it one step earlier."""
    pruned = PruningCallback(_Pruner(), "accuracy", prune=True)
    assert _evaluate(pruned, [0.7], max_steps=2) == [True] and pruned.pruned
    ended = PruningCallback(_Pruner(), "accuracy", prune=True)
    assert _evaluate(ended, [0.8], max_steps=1) == [False]
    assert not ended.pruned and ended.trial.reported == [(1, 0.8)]
    at_chance = PruningCallback(_Trial(), "accuracy", prune=True, floor=0.5)
    assert _evaluate(at_chance, [0.5, 0.5], max_steps=2) == [False, False]
    assert not at_chance.pruned and at_chance.why is None


def test_no_rung_stops_a_trial_at_chance_at_its_first_evaluation():
    """At its first evaluation a trial no better than the constant answer has not started to learn:
    the rungs do not stop it there; from its second evaluation they do, as they stop a trial above
    chance at its first. Without a floor (no label column) the rungs judge every evaluation."""
    at_chance = PruningCallback(_Pruner(), "accuracy", prune=True, floor=0.5)
    assert _evaluate(at_chance, [0.49, 0.7]) == [False, True]
    assert at_chance.pruned and at_chance.why is None  # the rungs stopped it, not the floor
    assert at_chance.trial.asked == 2  # the spared first evaluation still reached the rung
    learning = PruningCallback(_Pruner(), "accuracy", prune=True, floor=0.5)
    assert _evaluate(learning, [0.51]) == [True]
    no_floor = PruningCallback(_Pruner(), "accuracy", prune=True, floor=None)
    assert _evaluate(no_floor, [0.49]) == [True]


def test_a_search_stops_trials_at_the_constant_answers_score(tmp_path, tiny_bert):
    """A validation split of one label: the constant answer scores 100 %, so no trial can beat it and
    every trial stops at its second of 4 evaluations, saying why; without a floor they would all run on
    (`pruner: none`)."""
    rows = sentiment_rows(160)
    train = write_csv(tmp_path / "train.csv", rows[:120])
    positive = [r for r in rows[120:] if r[1] == "positive"]
    validation = write_csv(tmp_path / "validation.csv", positive)
    test = write_csv(tmp_path / "test.csv", rows[120:])
    space = _space(tmp_path / "space.yaml", tiny_bert, str(train), verdict={"top": 0})
    raw = yaml.safe_load(space.read_text())
    raw["base"]["data"] = {
        "train": str(train),
        "validation": str(validation),
        "test": str(test),
        "max_length": 48,
    }
    space.write_text(yaml.safe_dump(raw))
    out = run_search(
        str(space), ["families=[full]"], str(tmp_path / "out"), trials=2, threads=1, echo=lambda *_: None
    )
    trials = json.loads((Path(out) / "trials.json").read_text())["trials"]
    assert [t["state"] for t in trials] == ["pruned", "pruned"]
    assert [t["evaluations"] for t in trials] == [2, 2]
    assert all(
        "no better than always answering the most frequent label (1.0000)" in t["error"] for t in trials
    )


@pytest.mark.parametrize("steps", [1, 3, 5, 12, 13, 100, 642, 1283])
def test_the_evaluation_interval_gives_the_asked_validations_the_last_at_the_end(steps):
    """Trainer validates every `eval_steps` and once more at the end when the last step is off the
    interval: `evaluations` validations (4), the last at the end; where no interval gives that many
    (few steps), more, never fewer."""
    every = eval_interval(steps, 4)
    validated = sorted({s for s in range(1, steps + 1) if s % every == 0} | {steps})
    assert len(validated) == 4 if steps >= 12 else len(validated) >= min(4, steps)
    assert validated[-1] == steps
