"""Durable writes (src/hybridtune/durable.py, rundir.py): a process SIGKILLed at each point of each
writer loses nothing: the file or dir is the old one or the new one, whole, never missing, and what
the kill left behind is hidden and cleaned up. Unique temp names: two writers never share one. A
lock per dir: a second writer is refused with the holder's pid."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from hybridtune import durable, rundir
from hybridtune.errors import UserError

SRC = str(Path(__file__).resolve().parents[1] / "src")

# a child process that writes the new version of each target over the old one
WRITER = """
import sys
from pathlib import Path
from hybridtune import durable, rundir
root = Path(sys.argv[1])
if sys.argv[2] == "no-exchange":  # a filesystem without renameat2 RENAME_EXCHANGE
    durable.exchange = lambda a, b: False
rundir.write_json(root / "report.json", {"version": "new"})
def save(tmp):
    (tmp / "model.bin").write_text("new" * 1000)
    (tmp / "config.json").write_text('{"version": "new"}')
rundir.save_dir_atomically(root / "final", save)
"""


def _old(root: Path) -> None:
    rundir.write_json(root / "report.json", {"version": "old"})

    def save(tmp: Path) -> None:
        (tmp / "model.bin").write_text("old" * 1000)
        (tmp / "config.json").write_text('{"version": "old"}')

    rundir.save_dir_atomically(root / "final", save)


def _write(root: Path, kill_at: str | None, mode: str = "exchange") -> int:
    env = {**os.environ, "PYTHONPATH": SRC}
    if kill_at:
        env[durable.KILL_ENV] = kill_at
    return subprocess.run([sys.executable, "-c", WRITER, str(root), mode], env=env, timeout=120).returncode


def _version(root: Path) -> tuple[str, str]:
    """(report.json's version, final/'s version); final/ must be whole: its two files agree."""
    final = json.loads((root / "final" / "config.json").read_text())["version"]
    assert (root / "final" / "model.bin").read_text() == final * 1000, "final/ is not whole"
    return json.loads((root / "report.json").read_text())["version"], final


@pytest.mark.parametrize(
    "kill_at, mode, expected",
    [
        ("write:report.json", "exchange", ("old", "old")),  # temp file written, not renamed
        ("dir:final", "exchange", ("new", "old")),  # new final/ written beside the old one
        ("exchanged:final", "exchange", ("new", "new")),  # swapped in one step, old not yet removed
        ("dir:final", "no-exchange", ("new", "old")),
        ("aside:final", "no-exchange", ("new", "old")),  # old renamed aside, new not yet in: recovered
        (None, "no-exchange", ("new", "new")),
        (None, "exchange", ("new", "new")),
    ],
)
def test_a_writer_killed_at_each_point_loses_nothing(tmp_path, kill_at, mode, expected):
    _old(tmp_path)
    code = _write(tmp_path, kill_at, mode)
    assert code == (-signal.SIGKILL if kill_at else 0)
    durable.recover_dir(tmp_path / "final")  # as check_run_dir does (next test)
    assert _version(tmp_path) == expected
    durable.clean_temp(tmp_path)  # what a resume does, holding the run's lock
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final", "report.json"]
    assert _write(tmp_path, None, mode) == 0 and _version(tmp_path) == ("new", "new")  # and writes on


def test_a_final_renamed_aside_is_put_back_by_its_reader(tmp_path):
    """check_run_dir (every reader of a finished run) recovers final/ left aside by a kill."""
    (tmp_path / "run.json").write_text("{}")
    _old(tmp_path)
    assert _write(tmp_path, "aside:final", "no-exchange") == -signal.SIGKILL
    assert not (tmp_path / "final").exists()
    rundir.check_run_dir(str(tmp_path))
    assert _version(tmp_path)[1] == "old"


def test_exchange_swaps_two_dirs_in_one_step(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "x").write_text("a"), (b / "x").write_text("b")
    if not durable.exchange(a, b):
        pytest.skip("this filesystem cannot exchange (the fallback is tested above)")
    assert (a / "x").read_text() == "b" and (b / "x").read_text() == "a"


def test_two_writers_of_one_file_never_share_a_temp_name(tmp_path):
    """Fixed temp names let two writers clobber each other's temp file; unique ones cannot."""
    target, errors = tmp_path / "measured.json", []

    def write(i: int) -> None:
        try:
            for _ in range(200):
                rundir.write_json(target, {"writer": i, "pad": "x" * 5000})
        except Exception as e:  # a shared temp name: FileNotFoundError on rename, or a torn file
            errors.append(e)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert json.loads(target.read_text())["writer"] in range(4)
    assert [p.name for p in tmp_path.iterdir()] == ["measured.json"]


def test_a_second_writer_of_a_dir_is_refused_with_the_holders_pid(tmp_path):
    with durable.lock_dir(tmp_path, "output.name"):
        code = "from pathlib import Path; import sys; from hybridtune import durable; durable.lock_dir(Path(sys.argv[1]), 'output.name')"
        proc = subprocess.run(
            [sys.executable, "-c", code, str(tmp_path)],
            env={**os.environ, "PYTHONPATH": SRC},
            capture_output=True,
            text=True,
        )
        assert proc.returncode != 0 and f"in use by process {os.getpid()}" in proc.stderr
        assert durable.lock_holder(tmp_path) == os.getpid()
    assert durable.lock_holder(tmp_path) is None and not (tmp_path / durable.LOCK).exists()


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    code = "from pathlib import Path; import os, sys, signal; from hybridtune import durable; durable.lock_dir(Path(sys.argv[1]), 'x'); os.kill(os.getpid(), signal.SIGKILL)"
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env={**os.environ, "PYTHONPATH": SRC})
    assert proc.returncode == -signal.SIGKILL
    dead = int((tmp_path / durable.LOCK).read_text())  # the lock file stays, with the dead pid
    assert dead != os.getpid() and durable.lock_holder(tmp_path) is None
    with durable.lock_dir(tmp_path, "x"):
        assert int((tmp_path / durable.LOCK).read_text()) == os.getpid()


def test_a_run_dir_in_use_is_refused_by_resume_and_listed_as_running(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    for name in ("recipe.yaml", "run.json"):
        (run / name).write_text("{}")
    from hybridtune.train.resume import prepare_resume

    code = "from pathlib import Path; import sys; from hybridtune.train.resume import prepare_resume; prepare_resume(Path(sys.argv[1]))"
    with durable.lock_dir(run, "x"):
        proc = subprocess.run(
            [sys.executable, "-c", code, str(run)],
            env={**os.environ, "PYTHONPATH": SRC},
            capture_output=True,
            text=True,
        )
        assert f"in use by process {os.getpid()}" in proc.stderr.strip().splitlines()[-1]
        assert rundir.status(run) == "running" and rundir.describe(run)["pid"] == os.getpid()
    with pytest.raises(UserError, match="no complete checkpoint"):
        prepare_resume(run)  # free again: refused for what it is (no checkpoint), not for the lock
    assert rundir.status(run) == "interrupted"


def test_a_new_run_over_an_interrupted_one_says_what_to_do(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    for name in ("recipe.yaml", "run.json"):
        (run / name).write_text("{}")
    with pytest.raises(UserError) as e:
        rundir.new_run_dir(run)
    assert "interrupted" in str(e.value) and "--clean interrupted" in str(e.value)


def test_default_run_names_of_one_second_get_a_number(tmp_path, monkeypatch):
    monkeypatch.setattr(rundir.time, "strftime", lambda _: "20261205-093000")  # one second, three runs
    made = []
    for _ in range(3):
        run = rundir.run_dir_path(str(tmp_path), None, "full")
        rundir.new_run_dir(run).release()
        made.append(run.name)
    assert made == ["full-20261205-093000", "full-20261205-093000-2", "full-20261205-093000-3"]
    assert rundir.run_dir_path(str(tmp_path), "mine", "full") == tmp_path / "mine"  # a given name as is
    (tmp_path / "mine").mkdir()
    with pytest.raises(UserError, match="already exists"):  # and never renumbered
        rundir.new_run_dir(rundir.run_dir_path(str(tmp_path), "mine", "full"))
