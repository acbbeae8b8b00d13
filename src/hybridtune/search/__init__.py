"""`hybridtune search`: which strategy, with which settings, is best for this data within this budget.

    space.py    the space schema (families and their settings) and a trial's recipe
    params.py   one setting: fixed, choices or a range
    setup.py    every check before anything is written (space, base recipe, metric, data, budget)
    lr_range.py the optional lr range test per family before the first trial (its lr range)
    study.py    Optuna storage (a journal file in the search dir), sampler, pruner, the loop, resume
    trial.py    one trial in this process through run.train, with the pruning callback
    draws.py    few-shot bases (data.shots, data.draws): every recipe scored on every draw
    tracked.py  a search run's recipe (seed, draw, run dir) and its MLflow tracking
    report.py   trials table, Pareto fronts and their recipes, plots, report.html
    verdict.py  the best recipes and the reference retrained with fresh seeds, tested once

This package sits above the one-run pipeline (api), like compare.py; nothing below imports it.
"""

from hybridtune.search.study import run_search

__all__ = ["run_search"]
