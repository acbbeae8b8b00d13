"""benchmarks/sh_ceiling.py's model of what successive halving saves, against Optuna's own pruner as
search/study.py builds it, on many simulated trials of one length."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import optuna
import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "sh_ceiling.py"


def load():
    spec = importlib.util.spec_from_file_location("sh_ceiling", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def simulated_cost(evaluations: int, factor: int, trials: int = 600) -> float:
    """Trials of `evaluations` validations, each with its own score at every validation (random
    order), under SuccessiveHalvingPruner(min_resource=1): the validations run, as a share of all."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    pruner = optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=factor)
    study = optuna.create_study(direction="maximize", pruner=pruner)
    rng, ran = random.Random(0), 0
    for _ in range(trials):
        trial, quality = study.ask(), rng.random()
        for step in range(1, evaluations + 1):
            ran += 1
            trial.report(quality, step)
            if step < evaluations and trial.should_prune():  # the last validation never prunes
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                break
        else:
            study.tell(trial, quality)
    return ran / (trials * evaluations)


def test_the_rungs():
    m = load()
    assert m.rungs(4, 2) == [1, 2] and m.rungs(4, 4) == [1] and m.rungs(12, 4) == [1, 4]
    assert m.cost(4, 4) == pytest.approx(1 / 4 + 3 / 4 * 1 / 4)  # 3/4 stop at the first of 4 validations


@pytest.mark.parametrize("evaluations,factor", [(4, 2), (4, 4), (8, 4), (12, 2)])
def test_the_model_is_optunas_pruner(evaluations, factor):
    m = load()
    # Optuna keeps floor(n / f) of the n trials at a rung, a little fewer than 1 / f: the simulation
    # costs up to ~7 % less than the model (the ceiling is a little higher than it says)
    simulated = simulated_cost(evaluations, factor)
    assert m.cost(evaluations, factor) * 0.9 < simulated <= m.cost(evaluations, factor)
