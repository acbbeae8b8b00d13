"""Resume from what a kill or a damaged disk left: a damaged newest checkpoint (corrupt
trainer_state.json, truncated weights) is skipped for the previous complete one, in one line; a
checkpoint without its optimizer state is refused unless --resume-weights-only; a checkpoint of an
earlier version (no complete.json) is still read. And the checkpoint writer killed at each of its
points (before its rename, before rotation, inside a removal, before report.json) resumes to the
uninterrupted run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from hybridtune.cli import app
from tests.test_resume import _killed, _metrics, _steps, _train

from .refusal import assert_refused, snapshot


def _args(tiny_bert, sentiment_csv, out: Path) -> list[str]:
    # 12 steps, a checkpoint every 2, the last 3 (and the best) kept
    return [
        f"model={tiny_bert}",
        f"data.source={sentiment_csv}",
        "train.max_steps=12",
        "train.eval_steps=2",
        "train.logging_steps=1",
        "train.batch_size=16",
        "train.lr=0.005",
        "train.precision=fp32",
        "train.early_stopping.metric=loss",
        "train.early_stopping.patience=null",
        "output.keep_checkpoints=3",
        f"output.dir={out}",
    ]


@pytest.fixture(scope="module")
def killed(tmp_path_factory, tiny_bert, sentiment_csv) -> Path:
    """A run killed after step 7: checkpoints 2, 4, 6."""
    out = tmp_path_factory.mktemp("killed")
    _killed([*_args(tiny_bert, sentiment_csv, out), "output.name=k"], "step:7")
    return out / "k"


@pytest.fixture
def run(killed, tmp_path) -> Path:
    return Path(shutil.copytree(killed, tmp_path / "k"))


def _resume(run: Path, *extra: str):
    return CliRunner().invoke(
        app, ["train", "--resume", str(run), *extra], env={"HYBRIDTUNE_TEST_KILL_AT": None}
    )


@pytest.mark.parametrize(
    "damage, why",
    [
        (lambda c: (c / "trainer_state.json").write_text('{"global_step": 6, "log_hi'), "trainer_state.json"),
        (
            lambda c: (c / "model.safetensors").write_bytes((c / "model.safetensors").read_bytes()[:5000]),
            "model.safetensors",
        ),
        (
            lambda c: (c / "complete.json").unlink() or (c / "trainer_state.json").unlink(),
            "not written whole",
        ),
    ],
    ids=["corrupt-trainer-state", "truncated-weights", "half-removed"],
)
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(run, damage, why):
    from hybridtune.train.resume import prepare_resume

    damage(run / "checkpoints" / "checkpoint-6")
    checkpoint, lock = prepare_resume(run)
    lock.release()
    assert checkpoint.name == "checkpoint-4"


def test_resume_after_a_damaged_checkpoint_says_so_once_and_finishes(run):
    (run / "checkpoints" / "checkpoint-6" / "trainer_state.json").write_text("{not json")
    result = _resume(run)
    assert result.exit_code == 0, (result.output[-2000:], result.exception)
    warnings = [line for line in result.stderr.splitlines() if "damaged" in line]
    assert len(warnings) == 1, result.stderr
    assert warnings[0].startswith("warning: checkpoint-6 (trainer_state.json ")
    assert warnings[0].endswith(") damaged, skipped; resuming from checkpoint-4")
    assert json.loads((run / "report.json").read_text())["steps"] == 12


def test_a_checkpoint_without_its_optimizer_state_is_refused(run):
    (run / "checkpoints" / "checkpoint-6" / "optimizer.pt").unlink()
    (run / "checkpoints" / "checkpoint-6" / "complete.json").unlink()  # as an earlier version wrote it
    (run / ".lock").unlink(missing_ok=True)  # the killed process's stale lock (a refusal removes it)
    before = snapshot(run)
    result = _resume(run)
    # nothing changed, no lock left
    assert_refused(result, run, "checkpoint-6/optimizer.pt missing", "--resume-weights-only", before=before)


def test_resume_weights_only_goes_on_and_says_so_loudly(run):
    (run / "checkpoints" / "checkpoint-6" / "optimizer.pt").unlink()
    (run / "checkpoints" / "checkpoint-6" / "complete.json").unlink()
    result = _resume(run, "--resume-weights-only")
    assert result.exit_code == 0, (result.output[-2000:], result.exception)
    assert "WARNING: resuming from the weights of checkpoint-6 only" in result.stderr
    assert json.loads((run / "report.json").read_text())["steps"] == 12


def test_checkpoints_of_an_earlier_version_without_the_marker_are_resumed_from(run):
    from hybridtune.train.resume import prepare_resume

    for marker in (run / "checkpoints").glob("checkpoint-*/complete.json"):
        marker.unlink()
    checkpoint, lock = prepare_resume(run)
    lock.release()
    assert checkpoint.name == "checkpoint-6"


def test_the_checkpoint_writer_killed_at_each_point_resumes_to_the_uninterrupted_run(
    tmp_path, tiny_bert, sentiment_csv
):
    args = _args(tiny_bert, sentiment_csv, tmp_path / "runs")
    _train([*args, "output.name=straight"])
    run, straight = tmp_path / "runs" / "k", tmp_path / "runs" / "straight"
    # checkpoint-4 renamed into place, rotation not yet run
    _killed([*args, "output.name=k"], "rotate:4")
    assert _steps(run) == [2, 4]
    # the first checkpoint the rotation removes (the oldest the uninterrupted run did not keep; the
    # best is kept): renamed away, killed before it is deleted
    first = min(set(range(2, 13, 2)) - set(_steps(straight)))
    _killed(["--resume", str(run)], f"remove:checkpoint-{first}")
    assert first not in _steps(run) and list((run / "checkpoints").glob(f".checkpoint-{first}.*.del"))
    # the last step trained, final/ written, killed before report.json's rename
    _killed(["--resume", str(run)], "write:report.json")
    assert (run / "final").is_dir() and not (run / "report.json").exists()
    _train(["--resume", str(run)])  # replaces final/ (an exchange) and finishes

    assert not [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]  # no temp, no lock left
    assert _steps(run) == _steps(straight)
    for where in (f"checkpoints/checkpoint-{_steps(run)[-1]}", "final"):
        ours, theirs = (
            load_file(run / where / "model.safetensors"),
            load_file(straight / where / "model.safetensors"),
        )
        assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) <= 1e-6, where
    assert _metrics(run) == _metrics(straight)
    assert json.loads((run / "eval.json").read_text()) == json.loads((straight / "eval.json").read_text())
