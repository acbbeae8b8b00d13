"""The pruners' rungs come after the same amount of training in every trial (search/setup.py
`finish`): a trial of the space's fewest epochs validates `evaluations` times, a longer one as often
per epoch, so evaluation r of a 1-epoch and of a 2-epoch trial stand at the same step."""

from __future__ import annotations

import json
from pathlib import Path

from hybridtune.recipe import load_recipe
from hybridtune.search import run_search

from .test_search import _space


def test_a_longer_trial_validates_as_often_per_epoch(tmp_path, tiny_bert, sentiment_csv):
    space = _space(
        tmp_path / "space.yaml", tiny_bert, sentiment_csv, start="none", pruner="none", verdict={"top": 0},
        train={"epochs": [1.0, 2.0], "batch_size": 16, "warmup": 0.0, "weight_decay": 0.0, "schedule": "linear"},
        enqueue=[{"family": "full", "full.lr": 5e-3, "epochs": e} for e in (1.0, 2.0)],
    )  # fmt: skip
    root = run_search(str(space), [], str(tmp_path / "out"), trials=2, threads=1, echo=lambda *_: None)
    one, two = json.loads((root / "trials.json").read_text())["trials"]
    assert (one["params"]["epochs"], two["params"]["epochs"]) == (1.0, 2.0)
    # the tiny data: 12 steps an epoch at batch 16, so a validation every 3 steps in both
    steps = {
        t["number"]: [
            json.loads(line)["step"]
            for line in (Path(t["run_dir"]) / "metrics.jsonl").read_text().splitlines()
            if "eval_accuracy" in line
        ]
        for t in (one, two)
    }
    assert steps[0] == [3, 6, 9, 12] and steps[1] == [3, 6, 9, 12, 15, 18, 21, 24]
    assert (one["evaluations"], two["evaluations"]) == (4, 8)
    for t in (one, two):  # the trial's recipe says so: `hybridtune train` retrains it as searched
        assert load_recipe(Path(t["run_dir"]) / "recipe.yaml").train.eval_steps == 3
