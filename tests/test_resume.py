"""Crash-safe runs: a training process SIGKILLed mid-epoch, at a stage change and while writing a
checkpoint, resumed each time with `hybridtune train --resume`, ends with the weights and metrics of
an uninterrupted run. Also: atomic checkpoints, rotation, and what --resume refuses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from hybridtune.cli import app

from .refusal import refused

SRC = str(Path(__file__).resolve().parents[1] / "src")
# 192 training rows / batch 16 = 12 steps per epoch, 2 epochs = 24 steps; a checkpoint every 4 steps
# (the last 2 and the best kept); stage 1 (everything trains) begins at step 8, a checkpoint step
STAGED = """\
name: staged
model: {model}
data: {data}
stages:
  - {{steps: 8, train: [head, {{top_k: 1}}]}}
  - {{train: [all], lr_scale: 0.5}}
train: {{epochs: 2, batch_size: 16, lr: 0.005, precision: fp32, eval_steps: 4, logging_steps: 2,
        early_stopping: {{metric: loss, patience: 3}}}}
output: {{dir: {out}, keep_checkpoints: 2}}
"""
VARYING = {"time_s", "eval_runtime", "eval_samples_per_second", "eval_steps_per_second"}


def _killed(args: list[str], at: str) -> None:
    """`hybridtune train ARGS` in a process of its own that SIGKILLs itself at `at` (the test hook), so
    no clean-up of its own can run."""
    env = {**os.environ, "PYTHONPATH": SRC, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["HYBRIDTUNE_TEST_KILL_AT"] = at
    proc = subprocess.run(
        [sys.executable, "-m", "hybridtune", "train", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]


def _train(args: list[str]) -> None:
    """`hybridtune train ARGS` to the end, in this process: what needs no kill needs no new interpreter
    (the state of a killed run is on disk only, so a resume here reads what a new process would)."""
    result = CliRunner().invoke(app, ["train", *args], env={"HYBRIDTUNE_TEST_KILL_AT": None})
    assert result.exit_code == 0, (result.output[-2000:], result.exception)


def _metrics(run: Path) -> list[dict]:
    """Every metrics.jsonl line but the train summary, without the wall-clock fields."""
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in VARYING} for r in lines if "train_runtime" not in r]


def _steps(run: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("checkpoint-*"))


@pytest.fixture
def recipe(tmp_path, tiny_bert, sentiment_csv) -> Path:
    path = tmp_path / "staged.yaml"
    path.write_text(STAGED.format(model=tiny_bert, data=sentiment_csv, out=tmp_path / "runs"))
    return path


def test_killed_four_times_and_resumed_ends_like_an_uninterrupted_run(recipe, tmp_path):
    _train([str(recipe), "output.name=straight"])
    straight = tmp_path / "runs" / "straight"
    assert json.loads((straight / "report.json").read_text())["steps"] == 24  # no early stop before the kills

    run = tmp_path / "runs" / "killed"
    # 1. mid-epoch, after step 6 (last checkpoint: 4)
    _killed([str(recipe), "output.name=killed"], "step:6")
    assert _steps(run) == [4] and not (run / "final").exists()
    # 2. resumed from 4, killed when stage 1 begins (step 8, just after checkpoint-8 was written)
    _killed(["--resume", str(run)], "stage:1")
    assert _steps(run)[-1] == 8
    # 3. resumed from 8 (in stage 0; stage 1 begins again), killed while writing checkpoint-12
    _killed(["--resume", str(run)], "save:12")
    assert _steps(run)[-1] == 8, "a half-written checkpoint-12 was renamed into place"
    assert [p.is_dir() for p in (run / "checkpoints").glob(".checkpoint-12.*.tmp")] == [True]
    # 4. resumed from 8, killed mid-epoch 2 after step 14 (checkpoint-12 now written whole)
    _killed(["--resume", str(run)], "step:14")
    assert _steps(run)[-1] == 12
    # 5. resumed from 12, inside stage 1 (its optimizer state kept, not reset) at an epoch start, to the end
    _train(["--resume", str(run)])

    assert not list((run / "checkpoints").glob(".checkpoint-12.*"))  # the killed write's temp dir removed
    assert _steps(run) == _steps(straight)  # rotation kept the same checkpoints (last 2 + best)
    last = f"checkpoints/checkpoint-{_steps(run)[-1]}"
    for weights in ("final/model.safetensors", f"{last}/model.safetensors"):  # the best, and the last
        ours, theirs = load_file(run / weights), load_file(straight / weights)
        assert ours.keys() == theirs.keys()
        diff = max((ours[k] - theirs[k]).abs().max().item() for k in ours)
        assert diff <= 1e-6, (weights, diff)
    assert _metrics(run) == _metrics(straight)  # no line lost or doubled, every value the same
    a, b = (json.loads((r / "report.json").read_text()) for r in (run, straight))
    assert (a["test"], a["best_validation"], a["steps"]) == (b["test"], b["best_validation"], b["steps"])
    assert Path(a["best_checkpoint"]).name == Path(b["best_checkpoint"]).name
    assert json.loads((run / "eval.json").read_text()) == json.loads((straight / "eval.json").read_text())


def test_lora_with_a_soft_prompt_resumes_exactly(tmp_path, tiny_bert, sentiment_csv):
    """A peft model with a part's own weights (the soft prompt, saved by CheckpointExtras inside the
    checkpoint's atomic write) is restored from the checkpoint on resume, not left as initialised."""
    args = [
        f"model={tiny_bert}",
        f"data.source={sentiment_csv}",
        "peft.method=lora",
        "soft_prompt.num_virtual_tokens=4",
        "data.max_length=64",
        "train.max_steps=10",
        "train.eval_steps=4",
        "train.batch_size=16",
        "train.lr=0.005",
        "train.precision=fp32",
        "train.early_stopping.metric=loss",
        f"output.dir={tmp_path / 'runs'}",
    ]
    _train([*args, "output.name=straight"])
    _killed([*args, "output.name=killed"], "step:6")
    run, straight = tmp_path / "runs" / "killed", tmp_path / "runs" / "straight"
    assert (run / "checkpoints" / "checkpoint-4" / "soft_prompt.safetensors").is_file()
    _train(["--resume", str(run)])
    last = f"checkpoints/checkpoint-{_steps(run)[-1]}"
    for weights in ("adapter_model.safetensors", "soft_prompt.safetensors"):
        for where in ("final", last):
            ours, theirs = load_file(run / where / weights), load_file(straight / where / weights)
            diff = max((ours[k] - theirs[k]).abs().max().item() for k in ours)
            assert diff <= 1e-6, (where, weights, diff)
    assert _metrics(run) == _metrics(straight)


def test_early_stopping_counts_on_from_its_checkpoint(tmp_path, tiny_bert, sentiment_csv):
    """Patience 2 with a validation accuracy that cannot move (only the head trains, lr 1e-6):
    evaluations at 4 (best), 8 (1 without improvement), 12 (2: stop). Killed at step 10 and resumed
    from checkpoint-8, the run must still stop at 12: the count of 1 comes back with the checkpoint."""
    args = [
        f"model={tiny_bert}",
        f"data.source={sentiment_csv}",
        "freeze.trainable=[head]",
        "train.lr=1e-6",
        "train.epochs=2",
        "train.batch_size=16",
        "train.eval_steps=4",
        "train.precision=fp32",
        "train.early_stopping.patience=2",
        f"output.dir={tmp_path / 'runs'}",
    ]
    _train([*args, "output.name=straight"])
    _killed([*args, "output.name=killed"], "step:10")
    run = tmp_path / "runs" / "killed"
    _train(["--resume", str(run)])
    steps = [
        json.loads((r / "report.json").read_text())["steps"] for r in (run, tmp_path / "runs" / "straight")
    ]
    assert steps == [12, 12]


def _run_dir(tmp_path, *files: str) -> Path:
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    for name in files:
        (run / name).write_text("{}")
    return run


@pytest.mark.parametrize(
    "files, word",
    [
        ((), "no run dir"),
        (("recipe.yaml", "run.json"), "no complete checkpoint to resume from"),
        (("recipe.yaml", "run.json", "report.json"), "a finished run"),
    ],
)
def test_resume_refuses_what_it_cannot_continue(tmp_path, files, word):
    run = _run_dir(tmp_path, *files)
    refused(["train", "--resume", str(run)], run, word)


def test_resume_with_a_recipe_too_is_refused(tmp_path):
    refused(["train", "--resume", str(tmp_path), "train.epochs=1"], tmp_path, "--resume RUN_DIR alone")


def test_a_checkpoint_without_its_trainer_state_is_not_resumed_from(tmp_path):
    """Checkpoints of an earlier version (no complete.json): taken with trainer_state.json and
    readable weights, as before."""
    import torch
    from safetensors.torch import save_file

    from hybridtune.train.checkpoints import checkpoints

    for step in (4, 8, 12):
        (tmp_path / f"checkpoint-{step}").mkdir()
        save_file({"w": torch.zeros(2)}, tmp_path / f"checkpoint-{step}" / "model.safetensors")
        if step != 12:
            (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    (tmp_path / ".checkpoint-16.tmp").mkdir()
    assert [p.name for p in checkpoints(tmp_path)] == ["checkpoint-4", "checkpoint-8"]


def test_metrics_are_cut_back_to_the_checkpoint(tmp_path):
    from hybridtune.train.resume import truncate_metrics

    log = tmp_path / "metrics.jsonl"
    records = [{"step": 2, "loss": 1}, {"step": 4, "loss": 0.9}, {"step": 4, "eval_loss": 1.0}]
    records += [{"step": 4, "stage": 1}, {"step": 6, "loss": 0.5}]
    log.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 8, "lo')  # cut by a kill
    truncate_metrics(log, 4)
    assert [json.loads(line) for line in log.read_text().splitlines()] == records[:3]
