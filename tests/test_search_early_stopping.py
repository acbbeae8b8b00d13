"""A search trial stops early as its recipe says, as `hybridtune train` on that recipe does: the
search runs no checkpoints and loads no best model at the end, and until 2026-12-06 that had turned
the recipe's early stopping off in every trial (run.py adds it to a trial's callbacks)."""

from __future__ import annotations

import json
from pathlib import Path

from hybridtune import api
from hybridtune.recipe import load_recipe
from hybridtune.search import run_search
from tests.test_search import _space


def test_a_trial_stops_early_where_its_recipe_alone_does(tmp_path, tiny_bert, sentiment_csv):
    base = {
        "model": tiny_bert,
        "data": {"source": sentiment_csv, "max_length": 48},
        # 4 validations; an lr too small to move the predictions: the metric is flat from the first
        # validation, so patience 1 stops the run at the second
        "train": {"precision": "fp32", "logging_steps": 5, "early_stopping": {"patience": 1}},
    }
    space = _space(
        tmp_path / "space.yaml",
        tiny_bert,
        sentiment_csv,
        base=base,
        families={"full": {"lr": {"low": 1e-12, "high": 2e-12, "log": True}}},
        pruner="none",  # neither the rungs nor the floor: only early stopping can end it
        verdict={"top": 0},
    )
    root = run_search(str(space), [], str(tmp_path / "out"), trials=1, threads=1, echo=lambda *_: None)
    (row,) = json.loads((root / "trials.json").read_text())["trials"]
    trial = json.loads((Path(row["run_dir"]) / "trial.json").read_text())
    assert trial["state"] == "complete" and trial["validations_planned"] == 4
    assert trial["evaluations"] == 2 and len({v for _, v in trial["curve"]}) == 1

    alone = api.train(
        load_recipe(Path(trial["run_dir"]) / "recipe.yaml", [f"output.dir={tmp_path / 'alone'}"])
    )
    assert alone["steps"] == trial["steps"] < 12 and alone["best_validation"] == trial["value"]
