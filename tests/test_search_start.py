"""The search's start (`start: families`): after the enqueued trials, one trial per family at its
typical settings, the fewest epochs and no added part; `start: none` leaves every draw to the sampler."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from hybridtune.search import run_search
from hybridtune.search.space import Space, start_trials

from .test_search import _space


def test_start_trials_one_per_family_typical_fewest_epochs_parts_off():
    space = Space(
        families={"lora": {"r": [8, 16], "lr": {"low": 1e-4, "high": 1e-2, "log": True}}, "full": {}},
        train={"epochs": [2.0, 1.0, 3.0], "batch_size": [32, 16], "warmup": {"low": 0.0, "high": 0.2}},
        parts={
            "rdrop": {"alpha": {"low": 0.5, "high": 2.0}},
            "label_loss": {"use": True, "smoothing": [0.1]},
        },
    )
    full, lora = start_trials(space)
    assert full["family"] == "full" and lora["family"] == "lora"  # the order of FAMILIES, full first
    assert lora["lora.r"] == 8 and lora["lora.lr"] == pytest.approx(1e-3)  # first choice, geometric middle
    assert full["full.lr"] == pytest.approx(math.sqrt(1e-5 * 1e-4))  # the default range's middle
    for t in (full, lora):
        assert t["epochs"] == 1.0 and t["batch_size"] == 32 and t["warmup"] == pytest.approx(0.1)
        assert t["parts.rdrop.use"] is False
        assert "parts.label_loss.use" not in t  # `use: true`: the space keeps it on in every trial
    assert "full.r" not in full and "lora.r" not in full  # a family's settings only in its own trial
    assert start_trials(space.model_copy(update={"start": "none"})) == []


def _params(root: Path) -> list[dict]:
    return [t["params"] for t in json.loads((root / "trials.json").read_text())["trials"]]


def test_search_runs_enqueued_then_start_trials(tmp_path, tiny_bert, sentiment_csv):
    space = _space(
        tmp_path / "space.yaml", tiny_bert, sentiment_csv, start="families", verdict={"top": 0},
        train={"epochs": [1.0, 2.0], "batch_size": 16, "warmup": 0.0, "weight_decay": 0.0, "schedule": "linear"},
        enqueue=[{"family": "lora", "lora.r": 4}],
    )  # fmt: skip
    root = run_search(str(space), [], str(tmp_path / "out"), trials=3, threads=1, echo=lambda *_: None)
    lora, full, freeze_top = _params(root)
    assert lora["family"] == "lora" and lora["lora.r"] == 4  # the enqueued trial first
    assert full["family"] == "full" and full["full.lr"] == pytest.approx(math.sqrt(1e-3 * 1e-2))
    assert freeze_top["family"] == "freeze_top"  # then the space's next family in FAMILIES' order
    assert full["epochs"] == freeze_top["epochs"] == 1.0


def test_start_none_leaves_the_first_trial_to_the_sampler(tmp_path, tiny_bert, sentiment_csv):
    """With `start: none` the first trial is TPE's own draw, as before the start existed: with these
    families and seed 42 its lr is not a family's typical one."""
    space = _space(tmp_path / "space.yaml", tiny_bert, sentiment_csv, start="none", verdict={"top": 0})
    root = run_search(str(space), [], str(tmp_path / "out"), trials=1, threads=1, echo=lambda *_: None)
    (first,) = _params(root)
    typical = {"full": math.sqrt(1e-3 * 1e-2), "lora": math.sqrt(3e-3 * 3e-2)}
    typical |= {"bitfit": typical["lora"], "freeze_top": typical["full"]}
    assert first[f"{first['family']}.lr"] != pytest.approx(typical[first["family"]])


def test_identity_a_search_dir_from_before_the_start_resumes():
    """`start` at its default is left out of the study's identity (search.json), so a search dir made
    before the key existed still resumes; `start: none` is another study."""
    assert "start" not in Space().identity()
    assert Space(start="none").identity()["start"] == "none"
