"""Exact resume from a checkpoint inside any epoch, not only the first: the data order of every epoch
comes from (seed, epoch), not from the global random state the checkpoint restores. A run killed
inside epoch 2 and again inside epoch 3 (checkpoints every 5 steps of 12-step epochs, so neither
resume starts at an epoch boundary), with and without length grouping, with dropout, stages and a
LoRA + soft prompt, ends with the last checkpoint's weights, every metrics.jsonl line and eval.json
of the uninterrupted run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.test_resume import _killed, _metrics, _steps, _train

# 192 training rows / batch 16 = 12 steps per epoch, 3 epochs = 36 steps; a checkpoint every 5 steps:
# killed after step 17 (epoch 2) resumes from checkpoint-15, after step 29 (epoch 3) from checkpoint-25
STAGED = """\
name: staged3
model: {model}
data: {data}
stages:
  - {{steps: 10, train: [head, {{top_k: 1}}]}}
  - {{train: [all], lr_scale: 0.5}}
train: {{epochs: 3, batch_size: 16, lr: 0.005, precision: fp32, eval_steps: 5, logging_steps: 5,
        group_by_length: {grouped}, early_stopping: {{metric: loss, patience: null}}}}
output: {{dir: {out}, keep_checkpoints: 2}}
"""


def _diff(a: Path, b: Path) -> float:
    ours, theirs = load_file(a), load_file(b)
    assert ours.keys() == theirs.keys()
    return max((ours[k] - theirs[k]).abs().max().item() for k in ours)


def _same_run(run: Path, straight: Path, weights: tuple[str, ...]) -> None:
    """The last checkpoint, final/, every metrics line and eval.json as in the uninterrupted run."""
    assert _steps(run) == _steps(straight)
    last = f"checkpoints/checkpoint-{_steps(run)[-1]}"
    for where in (last, "final"):
        for name in weights:
            diff = _diff(run / where / name, straight / where / name)
            assert diff <= 1e-6, (where, name, diff)
    assert _metrics(run) == _metrics(straight)  # every train and eval line, every value
    assert json.loads((run / "eval.json").read_text()) == json.loads((straight / "eval.json").read_text())


@pytest.mark.parametrize("grouped", [True, False], ids=["length-grouped", "random-order"])
def test_killed_inside_epochs_2_and_3_resumes_exactly(tmp_path, tiny_bert, sentiment_csv, grouped):
    recipe = tmp_path / "staged3.yaml"
    recipe.write_text(
        STAGED.format(
            model=tiny_bert, data=sentiment_csv, out=tmp_path / "runs", grouped=str(grouped).lower()
        )
    )
    _train([str(recipe), "output.name=straight"])
    run = tmp_path / "runs" / "killed"
    _killed([str(recipe), "output.name=killed"], "step:17")  # epoch 2, last checkpoint 15
    assert _steps(run)[-1] == 15
    _killed(["--resume", str(run)], "step:29")  # epoch 3, last checkpoint 25
    assert _steps(run)[-1] == 25
    _train(["--resume", str(run)])
    _same_run(run, tmp_path / "runs" / "straight", ("model.safetensors",))


def test_lora_with_a_soft_prompt_killed_inside_epoch_2_resumes_exactly(tmp_path, tiny_bert, sentiment_csv):
    """The MiniLM LoRA case the issue measured (killed at step 17), on the tiny model: the adapter,
    the soft prompt and every metric as in the uninterrupted run."""
    args = [
        f"model={tiny_bert}",
        f"data.source={sentiment_csv}",
        "peft.method=lora",
        "soft_prompt.num_virtual_tokens=4",
        "data.max_length=64",
        "train.epochs=2",
        "train.eval_steps=5",
        "train.batch_size=16",
        "train.lr=0.005",
        "train.precision=fp32",
        "train.early_stopping.metric=loss",
        "train.early_stopping.patience=null",
        f"output.dir={tmp_path / 'runs'}",
    ]
    _train([*args, "output.name=straight"])
    _killed([*args, "output.name=killed"], "step:17")
    run = tmp_path / "runs" / "killed"
    _train(["--resume", str(run)])
    _same_run(run, tmp_path / "runs" / "straight", ("adapter_model.safetensors", "soft_prompt.safetensors"))
