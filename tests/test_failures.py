"""A failure after the run dir exists: one line, exit 3, the run marked failed (failed.json, no final/);
`hybridtune runs` lists it and `--clean failed` removes it; compare takes key=value overrides."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hybridtune.cli import DEBUG, app
from hybridtune.compare import load_suite, plan_runs
from hybridtune.train.engine import HybridTrainer

from .refusal import refused

RECIPES = Path(__file__).parent.parent / "recipes"


def _fail_at(monkeypatch, step: int, error: BaseException) -> None:
    """A library error inside training at optimizer step `step` (0-based count of training_step calls)."""
    original = HybridTrainer.training_step
    calls = {"n": 0}

    def training_step(self, *args, **kwargs):
        if calls["n"] == step:
            raise error
        calls["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(HybridTrainer, "training_step", training_step)


def _train(quick, *extra):
    return CliRunner().invoke(app, ["train", *quick(None, *extra)])


@pytest.mark.parametrize(
    "error, words",
    [
        (RuntimeError("device-side assert\ntriggered"), "RuntimeError: device-side assert triggered"),
        (MemoryError(), "MemoryError"),
    ],
)
def test_a_failure_mid_run_is_one_line_exit_3_and_a_failed_run(monkeypatch, quick, tmp_path, error, words):
    _fail_at(monkeypatch, 5, error)
    result = _train(quick, "train.max_steps=8", "train.eval_steps=2", "output.name=boom")
    assert result.exit_code == 3, result.stderr[-2000:]
    assert result.stderr.count("error:") == 1 and "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]  # above it: the progress bar
    line = line[line.index("error:") :]
    assert "training (step 5 of 8) failed" in line and words in line
    assert "hybridtune train --resume" in line
    run = tmp_path / "runs" / "boom"
    failed = json.loads((run / "failed.json").read_text())
    assert failed["step"] == "training (step 5 of 8)" and words in failed["error"]
    assert failed["last_checkpoint"] == "checkpoint-4"
    assert not (run / "final").exists() and not (run / "report.json").exists()
    assert not list(run.glob(".final*"))  # no half-written final/ under a temp name either


def test_debug_prints_the_traceback(monkeypatch, quick):
    _fail_at(monkeypatch, 1, RuntimeError("library bug"))
    monkeypatch.setitem(DEBUG, "on", True)
    result = _train(quick, "train.max_steps=3", "output.name=dbg")
    assert result.exit_code == 3
    assert "Traceback" in result.stderr and "RuntimeError: library bug" in result.stderr


def test_runs_lists_every_status_and_clean_removes_only_failed_runs(monkeypatch, quick, tmp_path):
    runs = tmp_path / "runs"
    assert _train(quick, "train.max_steps=2", "output.name=good").exit_code == 0
    _fail_at(monkeypatch, 3, RuntimeError("boom"))
    assert _train(quick, "train.max_steps=6", "train.eval_steps=2", "output.name=bad").exit_code == 3
    monkeypatch.undo()
    # a run killed before its first checkpoint, and one killed after it (no failed.json: a SIGKILL)
    (runs / "killed").mkdir()
    for f in ("run.json", "recipe.yaml"):
        (runs / "killed" / f).write_text((runs / "good" / f).read_text())
    import shutil

    shutil.copytree(runs / "bad", runs / "paused")
    (runs / "paused" / "failed.json").unlink()

    result = CliRunner().invoke(app, ["runs", str(runs), "--json"])
    assert result.exit_code == 0, result.output
    rows = {Path(r["run"]).name: r for r in json.loads(result.output)}
    assert {k: r["status"] for k, r in rows.items()} == {
        "bad": "failed",
        "good": "finished",
        "killed": "interrupted",
        "paused": "resumable",
    }
    assert rows["good"]["metric"] == "accuracy" and 0 <= rows["good"]["value"] <= 1
    assert "boom" in rows["bad"]["error"] and rows["bad"]["size_bytes"] > 0

    result = CliRunner().invoke(app, ["runs", str(runs), "--clean", "failed"])
    assert result.exit_code == 0, result.output
    assert "removed 1 failed run(s)" in result.output
    assert sorted(p.name for p in runs.iterdir()) == ["good", "killed", "paused"]


def test_a_failed_run_resumes_to_its_end_and_is_no_longer_failed(monkeypatch, quick, tmp_path):
    _fail_at(monkeypatch, 3, RuntimeError("boom"))
    assert _train(quick, "train.max_steps=6", "train.eval_steps=2", "output.name=r").exit_code == 3
    monkeypatch.undo()
    run = tmp_path / "runs" / "r"
    result = CliRunner().invoke(app, ["train", "--resume", str(run)])
    assert result.exit_code == 0, result.output
    assert (run / "report.json").is_file() and not (run / "failed.json").exists()


def test_bad_runs_arguments_exit_2(tmp_path):
    result = CliRunner().invoke(app, ["runs", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "no such directory" in result.stderr
    result = CliRunner().invoke(app, ["runs", str(tmp_path), "--clean", "finished"])
    assert result.exit_code == 2 and "--clean" in result.stderr


def test_compare_overrides_apply_to_every_strategy_after_the_suite_s_own():
    suite, base = load_suite(None, overrides=["train.precision=fp32", "train.max_steps=3"])
    runs = plan_runs(suite, base)
    assert len(runs) == 11
    for entry in runs:
        assert entry["overrides"][-3:-1] == ["train.precision=fp32", "train.max_steps=3"]


@pytest.mark.parametrize(
    "override, words",
    [
        ("train.epochs=zero", "train.epochs"),
        ("train.nope=1", "unknown key 'nope'"),
        ("=1", "override '=1'"),
    ],
)
def test_a_bad_compare_override_exits_2_in_one_line_and_writes_nothing(tmp_path, override, words):
    out = tmp_path / "cmp"
    refused(["compare", override, "--out", str(out)], out, words, absent=True)
