"""compare under kill: a SIGKILLed compare takes its training child with it; one compare per compare
dir; a run dir still held by a live process (an orphan training) is refused, not started over."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hybridtune.compare import MARKER as COMPARE_MARKER
from hybridtune.compare import compare
from hybridtune.errors import UserError

SRC = str(Path(__file__).resolve().parents[1] / "src")
RECIPES = Path(__file__).parent.parent / "recipes"


@pytest.fixture
def suite(tmp_path, tiny_bert, sentiment_csv) -> Path:
    path = tmp_path / "one.yaml"
    path.write_text(
        f"""name: one
overrides: ["model={tiny_bert}", "data.source={sentiment_csv}", "train.max_steps=100000",
            "train.eval_steps=100000", "train.precision=fp32"]
seeds: [1]
strategies: [{RECIPES / "head_only.yaml"}]
"""
    )
    return path


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": SRC, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _holder(path: Path) -> subprocess.Popen:
    """Another process that holds `path`'s lock (as an orphan training or a second compare would)."""
    code = (
        "import sys, time; from pathlib import Path; from hybridtune import durable; "
        f"durable.lock_dir(Path({str(path)!r}), 'x'); print('locked', flush=True); time.sleep(120)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], env=_env(), stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie (dead, not yet reaped by init) is not alive
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_a_killed_compare_takes_its_training_child_with_it(suite, tmp_path):
    out = tmp_path / "cmp"
    proc = subprocess.Popen(
        [sys.executable, "-m", "hybridtune", "compare", str(suite), "--out", str(out)],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    run = out / "runs" / "head_only-s1"
    deadline = time.time() + 240
    while not (run / "metrics.jsonl").is_file():  # the child trains (its first log line is written)
        assert proc.poll() is None and time.time() < deadline, "the compare ended or never trained"
        time.sleep(0.2)
    child = int((run / ".lock").read_text())
    assert child != proc.pid and _alive(child)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    from hybridtune import durable, rundir

    deadline = time.time() + 20  # a killed process's other threads end a moment after its main one
    while (_alive(child) or durable.lock_holder(run) is not None) and time.time() < deadline:
        time.sleep(0.1)
    if _alive(child):
        os.kill(child, signal.SIGKILL)  # the test fails; the orphan does not outlive it
        pytest.fail("the training child lives on after its compare was killed")
    assert durable.lock_holder(run) is None and rundir.status(run) == "interrupted"


def test_a_second_compare_of_one_dir_is_refused(suite, tmp_path):
    out = tmp_path / "cmp"
    out.mkdir()
    (out / COMPARE_MARKER).touch()  # an earlier compare's dir
    other = _holder(out)
    try:
        with pytest.raises(UserError, match=rf"--out: found '{out}' in use by process {other.pid}"):
            compare(str(suite), str(out), echo=lambda *_: None)
        assert not (out / "runs" / "head_only-s1").exists()
    finally:
        other.kill()
        other.wait()


def test_a_run_held_by_an_orphan_is_not_started_over(suite, tmp_path):
    run = tmp_path / "cmp" / "runs" / "head_only-s1"
    run.mkdir(parents=True)
    (tmp_path / "cmp" / COMPARE_MARKER).touch()  # an earlier compare's dir
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 0.7}\n')  # what the orphan writes
    orphan = _holder(run)
    try:
        with pytest.raises(UserError, match=rf"still being written by process {orphan.pid}"):
            compare(str(suite), str(tmp_path / "cmp"), echo=lambda *_: None)
        assert (run / "metrics.jsonl").read_text() == '{"step": 1, "loss": 0.7}\n'  # not removed
    finally:
        orphan.kill()
        orphan.wait()
    # the orphan gone, its lock is stale: the next compare takes the run over (no lock refuses it)
    from hybridtune import durable

    with durable.lock_dir(run, "x"):
        assert int((run / ".lock").read_text()) == os.getpid()
