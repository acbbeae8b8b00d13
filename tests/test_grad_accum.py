"""Gradient accumulation is a bigger batch: batch 8 x grad_accum 2 takes the optimizer step that
batch 16 takes (same examples, same order, no dropout). transformers 5 gives a classifier's forward
**kwargs, and Trainer took that to mean the loss was already divided for the accumulation; the
classification loss is a per-batch mean, so the step's loss and gradient were grad_accum times too
big until the engine told Trainer otherwise (train/engine.py, TaskSpec.loss_over_tokens)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hybridtune import api
from hybridtune.recipe import load_recipe


def _run(tmp_path: Path, model: str, data: str, batch: int, accum: int, name: str) -> Path:
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(
        f"name: {name}\nmodel: {model}\ndata: {data}\n"
        f"train: {{max_steps: 1, batch_size: {batch}, grad_accum: {accum}, lr: 0.01, precision: fp32,"
        " logging_steps: 1, group_by_length: false, max_grad_norm: 100.0}\n"
        f"output: {{dir: {tmp_path / 'runs'}}}\n",
        encoding="utf-8",
    )
    return Path(api.train(load_recipe(recipe))["run_dir"])


def _loss(run: Path) -> float:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return next(r["loss"] for r in rows if "loss" in r)


def test_accumulated_micro_batches_take_the_big_batch_step(still_bert, sentiment_csv, tmp_path):
    big = _run(tmp_path, still_bert, sentiment_csv, 16, 1, "big")
    accumulated = _run(tmp_path, still_bert, sentiment_csv, 8, 2, "accumulated")
    assert _loss(accumulated) == pytest.approx(_loss(big), rel=1e-4)
    a = load_file(big / "final" / "model.safetensors")
    b = load_file(accumulated / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6, msg=key)
