"""The pruners' rungs come after the same amount of training in every trial (search/setup.py
`finish`): a trial of the space's fewest epochs validates `evaluations` times, a longer one as often
per epoch, so evaluation r of a 1-epoch and of a 2-epoch trial stand at the same step."""

from __future__ import annotations

import json
from pathlib import Path

from hybridtune.recipe import load_recipe
from hybridtune.search import run_search
from hybridtune.search.setup import LENGTH

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
    # their lengths, by which `prune_among: same_length` groups the trials a rung compares
    planned = [json.loads((Path(t["run_dir"]) / "trial.json").read_text())[LENGTH] for t in (one, two)]
    assert planned == [4, 8]
    for t in (one, two):  # the trial's recipe says so: `hybridtune train` retrains it as searched
        assert load_recipe(Path(t["run_dir"]) / "recipe.yaml").train.eval_steps == 3


def test_patience_spans_the_same_share_of_a_longer_run():
    """A 3-epoch trial validates 3 times as often as a 1-epoch one; the recipe's patience (2 of 4
    validations: half the run) grows to 6 of its 12, never below the recipe's own."""
    from hybridtune.model.facts import ModelFacts
    from hybridtune.search.setup import Context, finish
    from hybridtune.search.space import Space

    space = Space(train={"epochs": [1.0, 3.0], "batch_size": [16]})
    ctx = Context(space, "space", {}, "classification", "accuracy", ModelFacts(blocks=6), 640, 42, False)
    assert ctx.max_evaluations == 13  # 4 per epoch over 3 epochs, + 1 for the rounding to steps

    def finished(epochs: float, patience: int | None = 2) -> dict:
        raw = {"train": {"epochs": epochs, "batch_size": 16, "early_stopping": {"patience": patience}}}
        return finish(ctx, raw)["train"]

    one, three = finished(1.0), finished(3.0)
    assert one["eval_steps"] == three["eval_steps"] == 10  # 40 steps an epoch, a quarter of one
    assert (one["early_stopping"]["patience"], three["early_stopping"]["patience"]) == (2, 6)
    assert finished(0.5)["early_stopping"]["patience"] == 2  # fewer validations: the recipe's own
    assert finished(3.0, None)["early_stopping"]["patience"] is None  # off stays off
