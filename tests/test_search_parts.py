"""`parts:` of a search space (search/parts.py): any part that declares `search` settings can be
added to a trial's family, on or off per trial, its settings checked by the part's own config
before anything runs. Shown with the toy loss part of tests/head_l2.py, given search settings."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import optuna
import pytest
import yaml

from hybridtune import strategy
from hybridtune.errors import UserError
from hybridtune.recipe import load_recipe
from hybridtune.search import run_search
from hybridtune.search.parts import default_parts, parse_parts, sample_parts
from hybridtune.search.space import Space

from . import head_l2

SEARCH = {"alpha": {"low": 0.01, "high": 1.0, "log": True}}


@pytest.fixture
def registered():
    part = dataclasses.replace(head_l2.PART, search=SEARCH)
    strategy.register(part)
    try:
        yield part
    finally:
        strategy.unregister(part.key)


def test_the_default_space_has_every_part_that_declares_search(registered):
    assert default_parts()["head_l2"] == SEARCH
    assert set(default_parts()) == {k for k, p in strategy.PARTS.items() if p.search is not None}
    assert "head_l2" in Space().parts


def test_a_part_is_on_or_off_and_its_settings_exist_only_when_on(registered):
    parts = parse_parts({"head_l2": SEARCH})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(30):
        trial = study.ask()
        sections = sample_parts(parts, trial)
        on = trial.params["parts.head_l2.use"]
        seen.add(on)
        assert ("parts.head_l2.alpha" in trial.params) == on == ("head_l2" in sections)
        if on:
            assert sections["head_l2"] == {"alpha": trial.params["parts.head_l2.alpha"]}
            assert 0.01 <= sections["head_l2"]["alpha"] <= 1.0
        study.tell(trial, 0.5)
    assert seen == {True, False}
    always = parse_parts({"head_l2": {"use": True, "alpha": 0.5}})
    trial = optuna.create_study().ask()
    assert (
        sample_parts(always, trial) == {"head_l2": {"alpha": 0.5}} and "parts.head_l2.use" not in trial.params
    )
    assert parse_parts({"head_l2": None}) == {} and parse_parts({"head_l2": {"use": False}}) == {}


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            {"head_l3": {}},
            "parts.head_l3: found an unknown part; expected a part key (did you mean 'head_l2'?)",
        ),
        ({"head_l2": {"alpah": 0.1}}, "parts.head_l2.alpah: found setting 'alpah'"),
        (
            {"head_l2": {"alpha": {"low": -1.0, "high": 1.0}}},
            "parts.head_l2.alpha: found -1.0; Input should be",
        ),
        ({"head_l2": {"alpha": ["a", "b"]}}, "parts.head_l2.alpha: found 'a' (str); expected a float"),
        ({"head_l2": [1]}, "parts.head_l2: found [1]; expected a mapping"),
    ],
)
def test_a_bad_part_setting_names_its_key_path(registered, raw, message):
    with pytest.raises(ValueError) as e:
        parse_parts(raw)
    assert message in str(e.value)


def _space(tmp_path: Path, tiny_bert: str, data: str, parts: dict, **base) -> Path:
    space = {
        "name": "parts",
        "base": {
            "model": tiny_bert,
            "data": {"source": data, "max_length": 48},
            "train": {"precision": "fp32", "logging_steps": 5, "early_stopping": {"patience": None}},
            **base,
        },
        "families": {"full": {"lr": 0.005}},
        "parts": parts,
        "train": {"epochs": 1.0, "batch_size": 16, "warmup": 0.0, "weight_decay": 0.0, "schedule": "linear"},
        "evaluations": 2,
        "pruner": "none",
        "enqueue": [{"parts.head_l2.use": True, "parts.head_l2.alpha": 0.5}, {"parts.head_l2.use": False}],
        "verdict": {"top": 0},
    }
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


def test_a_search_adds_the_part_to_the_trials_that_draw_it(registered, tiny_bert, sentiment_csv, tmp_path):
    space = _space(tmp_path, tiny_bert, sentiment_csv, {"head_l2": SEARCH})
    root = run_search(str(space), [], str(tmp_path / "out"), trials=2, threads=1, echo=lambda *_: None)
    trials = json.loads((root / "trials.json").read_text())["trials"]
    assert [t["state"] for t in trials] == ["complete", "complete"]
    on, off = (load_recipe(Path(t["run_dir"]) / "recipe.yaml") for t in trials)
    assert on.head_l2.alpha == 0.5 and off.head_l2 is None
    rows = [json.loads(x) for x in (Path(trials[0]["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert any("loss_head_l2" in r for r in rows)  # the part trained in the trial that drew it


def test_a_part_in_the_base_and_the_space_is_a_contradiction(registered, tiny_bert, sentiment_csv, tmp_path):
    space = _space(tmp_path, tiny_bert, sentiment_csv, {"head_l2": SEARCH}, head_l2={"alpha": 0.1})
    with pytest.raises(UserError) as e:
        run_search(str(space), [], str(tmp_path / "out"), trials=1, threads=1, echo=lambda *_: None)
    assert "base.head_l2" in str(e.value)
    assert not (tmp_path / "out").exists()
