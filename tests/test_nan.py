"""A NaN / inf training loss: train.on_nan=stop ends the run with one line and exit code 3, the last
good checkpoint kept; train.on_nan=skip skips those batches and finishes with finite weights."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from hybridtune import api, run
from hybridtune.cli import app


@pytest.fixture
def poisoned(monkeypatch):
    """The model's training loss becomes `value` at the given training forward passes (= steps)."""

    def make(steps: set[int], value: float):
        prepare, calls = run.prepare, {"n": 0}

        def hook(module, inputs, output):
            if module.training:
                calls["n"] += 1
                if calls["n"] in steps:
                    output.loss = output.loss * value
            return output

        def wrapped(recipe):
            prep = prepare(recipe)
            prep.model.register_forward_hook(hook)
            return prep

        monkeypatch.setattr(run, "prepare", wrapped)  # the one-run pipeline (api is its facade)

    return make


@pytest.mark.parametrize("value, word", [(math.nan, "nan"), (math.inf, "inf")])
def test_stop_names_the_step_and_keeps_the_last_good_checkpoint(poisoned, quick, tmp_path, value, word):
    poisoned({7}, value)
    result = CliRunner().invoke(
        app, ["train", *quick(None, "output.name=r", "train.eval_steps=4", "train.max_steps=8")]
    )
    message = result.stderr.strip().splitlines()[-1]  # above it: the progress bar
    assert result.exit_code == 3, (result.exit_code, result.stderr[-2000:], result.exception)
    assert result.stderr.count("error:") == 1 and "Traceback" not in result.stderr
    assert f"step 7: the loss is {word}" in message and "checkpoint-4" in message, message
    run = tmp_path / "runs" / "r"
    kept = run / "checkpoints" / "checkpoint-4"
    assert (kept / "trainer_state.json").is_file() and (kept / "model.safetensors").is_file()
    assert all(torch.isfinite(t).all() for t in load_file(kept / "model.safetensors").values())
    assert not (run / "final").exists() and not (run / "report.json").exists()


def test_skip_trains_on_with_finite_weights(poisoned, quick, tmp_path):
    poisoned({3, 5}, math.nan)
    summary = api.train(
        api.load_recipe(None, quick(None, "output.name=r", "train.on_nan=skip", "train.max_steps=8"))
    )
    run = Path(summary["run_dir"])
    weights = load_file(run / "final" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())
    logs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(r.get("skipped_batches", 0) for r in logs) == 2
    assert all(math.isfinite(r["loss"]) for r in logs if "loss" in r)
