"""The run dir: what one training run leaves behind, written so that nothing is ever half-written.

    runs/<name>/
      recipe.yaml     the resolved recipe (every default filled in)
      run.json        task, labels, base model, format of final/ ("model" or "peft")
      params.json     per-layer trainable-parameter table
      metrics.jsonl   every train / eval log line (and stage changes, layer-sampling draws)
      tensorboard/    the same, as TensorBoard event files
      mlflow.json     with train.report_to: [mlflow]: its MLflow store, experiment and run id (the
                      store itself is <output.dir>/mlruns/, next to the run dirs: train/tracking.py)
      checkpoints/    Trainer checkpoints (the last N and the best), each ending with complete.json
      final/          the result in standard HF / PEFT format, with its tokenizer
      eval.json       test-split metrics: accuracy, macro-F1, per-class report, confusion matrix
      report.json     summary: metrics, parameters, time, throughput
      failed.json     only in a run that failed after its dir was written: step, error, last checkpoint
      .lock           while a process writes the run (its pid); a killed one's is taken over

Files are written to a unique temporary name, fsync'd and renamed into place (the directory fsync'd
after); a directory likewise, replacing an older one in one atomic exchange (durable.py). One process
writes a run dir at a time: it holds the dir's `.lock` (durable.lock_dir) while it trains.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hybridtune import durable
from hybridtune.errors import UserError

# the dir runs share their caches through (frozen trunks: train/trunk_store.py; tokenized splits:
# data/token_cache.py); compare and search set it for their runs, a user's own value wins
CACHE_DIR_ENV = "HYBRIDTUNE_CACHE_DIR"


def shared_dir() -> Path | None:
    value = os.environ.get(CACHE_DIR_ENV)
    return Path(value) if value else None


def run_dir_path(out_dir: str, name: str | None, recipe_name: str) -> Path:
    """`output.name`, or by default `<recipe name>-<date>-<time>`: with `-2`, `-3`, ... after it when a
    run of that second is already there (runs started one after the other within a second)."""
    if name:
        return Path(out_dir) / name
    stem = Path(out_dir) / f"{recipe_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run, n = stem, 1
    while run.exists():
        n += 1
        run = stem.with_name(f"{stem.name}-{n}")
    return run


def new_run_dir(run: Path) -> durable.DirLock:
    """Create the run dir (checked: writable, not an existing run) and hold its lock."""
    root = run.parent
    if run.exists():
        raise UserError("output.name", f"'{run}', which already exists", what_to_do(run))
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = durable.temp_name(root / "write-test")
        probe.write_text("")
        probe.unlink()
        run.mkdir()  # atomic: of two runs of one name, one gets it
    except FileExistsError:
        raise UserError("output.name", f"'{run}', which already exists", what_to_do(run)) from None
    except OSError as e:
        raise UserError(
            "output.dir", f"'{root}' that cannot be written ({e.strerror})", "a writable directory"
        ) from None
    lock = durable.lock_dir(run, "output.name")
    durable.fsync_dir(root)
    return lock


def what_to_do(run: Path) -> str:
    """What a user can do with an existing dir in the way of a new run, by its status."""
    state = status(run) if is_run_dir(run) else None
    if state == "resumable":
        return f"a new run name, or continue it: hybridtune train --resume {run}"
    if state == "running":
        return f"a new run name (it is being written by process {durable.lock_holder(run)})"
    if state in ("interrupted", "failed"):
        return (
            f"a new run name, or remove it (it is {state}: `hybridtune runs {run.parent}` lists such "
            f"runs, `--clean {state}` removes them)"
        )
    return "a new run name (or remove the old run)"


# what the machine, not the code, can do to a write: a full disk, a quota, a read-only mount, rights
DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR}


def disk_error(e: OSError, path: Path) -> UserError:
    """The UserError of a write the machine refused (disk full, read-only, no rights)."""
    return UserError(
        "output.dir",
        f"'{path}' that could not be written ({e.strerror or e})",
        "a writable directory with free space",
        "nothing half-written was kept; an interrupted run continues with `hybridtune train --resume RUN_DIR`",
    )


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def write_text(path: Path, text: str) -> None:
    """Durably: a unique temp file, fsync'd, renamed over `path`, the dir fsync'd (durable.py)."""
    try:
        durable.write_bytes(path, text.encode("utf-8"))
    except OSError as e:
        if e.errno in DISK_ERRORS:
            raise disk_error(e, path) from None
        raise


def publish_dir(entry: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` into a temp dir of its own beside `entry`, then rename it to `entry`; when another
    process published `entry` first, theirs is kept and ours dropped. For shared caches, whose
    entries are only ever whole: unlike `save_dir_atomically`, an existing entry is never replaced.
    An OSError of `write` (or of a rename that lost no race) propagates; no temp dir is left."""
    tmp = durable.temp_name(entry)
    try:
        tmp.mkdir(parents=True)
        write(tmp)
        durable.fsync_tree(tmp)
        try:
            os.rename(tmp, entry)
            durable.fsync_dir(entry.parent)
        except OSError:
            if not entry.is_dir():  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_dir_atomically(target: Path, save: Callable[[Path], None]) -> None:
    """Call `save(tmp_dir)`, fsync it, then put the finished dir at `target`: renamed, or exchanged
    with an older one in one step and the older one removed after (durable.replace_dir)."""
    durable.recover_dir(target)
    tmp = durable.temp_name(target)
    try:
        tmp.mkdir(parents=True)
        save(tmp)
        durable.fsync_tree(tmp)
        durable.maybe_kill("dir", target.name)
        durable.replace_dir(tmp, target)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno in DISK_ERRORS:
            raise disk_error(e, target) from None
        raise


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def read_meta(path: Path, required: dict[str, type | tuple[type, ...]] | None = None) -> dict:
    """A metadata file of a run / export / ensemble dir (run.json, export.json, ensemble.json,
    trainer_state.json) that a user hands us: a JSON object holding each `required` key with a value
    of its type, else a UserError naming the file (a hand-edited or truncated file is bad input,
    not a bug)."""
    expected = "a JSON object" + (
        " with " + ", ".join(f"'{k}' ({_type_name(t)})" for k, t in required.items()) if required else ""
    )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(str(path), "no such file", expected) from None
    except OSError as e:
        raise UserError(str(path), f"a file that cannot be read ({e.strerror})", expected) from None
    except UnicodeDecodeError:
        raise UserError(str(path), "bytes that are not UTF-8", expected) from None
    except ValueError as e:  # JSONDecodeError; also a number too long to convert
        where = f"{path}:line {e.lineno}" if isinstance(e, json.JSONDecodeError) else str(path)
        raise UserError(where, f"invalid JSON ({getattr(e, 'msg', e)})", expected) from None
    except RecursionError:
        raise UserError(str(path), "JSON nested too deep", expected) from None
    if not isinstance(data, dict):
        raise UserError(str(path), f"a JSON {type(data).__name__}", expected)
    for key, kind in (required or {}).items():
        if key not in data:
            raise UserError(str(path), f"no '{key}'", expected)
        value = data[key]
        if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _types(kind)):
            raise UserError(str(path), f"'{key}' of type {type(value).__name__}", expected)
    return data


def _types(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _type_name(kind: type | tuple[type, ...]) -> str:
    names = {str: "a string", list: "a list", dict: "an object", int: "an integer", float: "a number"}
    return " or ".join(names.get(k, "null" if k is type(None) else k.__name__) for k in _types(kind))


def check_run_dir(path: str) -> Path:
    run = Path(path)
    if run.is_dir() and not (run / "final").exists():  # a final/ a kill left renamed aside
        try:
            durable.recover_dir(run / "final")
        except OSError:
            pass
    if not (run / "run.json").is_file() or not (run / "final").is_dir():
        raise UserError(
            str(path),
            "no finished run (run.json and final/ missing)",
            "a run dir written by `hybridtune train`",
        )
    return run


# --------------------------------------------------------------------------------------------------
# status of a run dir: running / finished / failed / resumable / interrupted

FAILED = "failed.json"
STATUSES = ("running", "finished", "failed", "resumable", "interrupted")


def mark_failed(run: Path, step: str, error: str, last_checkpoint: str | None) -> None:
    """Record why a run stopped (best effort: a full disk may be the cause)."""
    try:
        write_json(
            run / FAILED,
            {
                "step": step,
                "error": error,
                "last_checkpoint": last_checkpoint,
                "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            },
        )
    except (OSError, UserError):
        pass


CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")  # transformers' PREFIX_CHECKPOINT_DIR
MARKER = "complete.json"
WEIGHTS = (
    "model.safetensors",
    "adapter_model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
)


# --------------------------------------------------------------------------------------------------
# which checkpoints are complete (train/checkpoints.py writes them)


def _weights_problem(path: Path) -> str | None:
    if path.name.endswith(".safetensors"):
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                f.keys()
        except Exception as e:  # safetensors checks the header against the file's length
            return f"{path.name} unreadable ({type(e).__name__})"
    elif path.name.endswith(".json"):
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return f"{path.name} is not JSON"
    return None


def problem(checkpoint: Path) -> str | None:
    """Why `checkpoint` cannot be resumed from (one phrase), or None when it is complete."""
    marker = checkpoint / MARKER
    if marker.is_file():
        try:
            listed = json.loads(marker.read_text(encoding="utf-8"))["files"]
        except (OSError, ValueError, KeyError, TypeError):
            return f"{MARKER} unreadable"
        for name, size in listed.items():
            path = checkpoint / name
            if not path.is_file():
                return f"{name} missing"
            if path.stat().st_size != size:
                return f"{name} has {path.stat().st_size} bytes, {size} written"
    elif not (checkpoint / "trainer_state.json").is_file():
        return f"no {MARKER} and no trainer_state.json (not written whole)"
    try:
        json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "trainer_state.json is not JSON"
    weights = [checkpoint / w for w in WEIGHTS if (checkpoint / w).is_file()]
    if not weights:
        return "no weights file (" + " / ".join(WEIGHTS[:2]) + ")"
    for path in weights:
        if (why := _weights_problem(path)) is not None:
            return why
    return None


def step_of(checkpoint: Path) -> int:
    return int(CHECKPOINT.match(checkpoint.name)[1])


def candidates(root: Path) -> list[Path]:
    """Every `checkpoint-N` dir under `root`, oldest first (complete or not)."""
    found = [(int(m[1]), p) for p in root.glob("checkpoint-*") if (m := CHECKPOINT.match(p.name))]
    return [p for _, p in sorted(found) if p.is_dir()]


def checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first (a temp dir of a killed write is not one)."""
    return [p for p in candidates(root) if problem(p) is None]


def last_checkpoint(run: Path) -> Path | None:
    """The newest complete checkpoint of `run` (the older ones are not read)."""
    root = run / "checkpoints"
    found = candidates(root) if root.is_dir() else []
    return next((p for p in reversed(found) if problem(p) is None), None)


def status(run: Path) -> str:
    """running (a live process holds its lock), finished (report.json), failed (failed.json),
    resumable (a complete checkpoint to go on from, `hybridtune train --resume`), interrupted (killed
    before its first checkpoint: start it over)."""
    if durable.lock_holder(run) is not None:
        return "running"
    if (run / "report.json").is_file():
        return "finished"
    if (run / FAILED).is_file():
        return "failed"
    return "resumable" if last_checkpoint(run) is not None else "interrupted"


def is_run_dir(path: Path) -> bool:
    return (path / "run.json").is_file() and (path / "recipe.yaml").is_file()


def find_runs(root: Path) -> list[Path]:
    """Run dirs under `root` (itself, its children, and compare / ensemble dirs' runs below)."""
    if is_run_dir(root):
        return [root]
    found = []
    for path in sorted(root.rglob("run.json")):
        run = path.parent
        if is_run_dir(run) and not any(p.startswith(".") for p in run.relative_to(root).parts):
            found.append(run)
    return found


def dir_size(path: Path) -> int:
    total = 0
    for here, _, files in os.walk(path):  # a running run's files may go while we look
        for name in files:
            try:
                total += os.lstat(os.path.join(here, name)).st_size
            except OSError:
                pass
    return total


def describe(run: Path) -> dict:
    """One row of `hybridtune runs`: status, headline metric, size, why it failed."""
    row: dict[str, Any] = {"run": str(run), "status": status(run), "size_bytes": dir_size(run)}
    if row["status"] == "running":
        row["pid"] = durable.lock_holder(run)
    try:
        if row["status"] == "finished":
            report = read_json(run / "report.json")
            metric = report.get("metric")
            row["metric"], row["value"] = metric, (report.get("test") or {}).get(metric)
        elif row["status"] == "failed":
            failed = read_json(run / FAILED)
            row["error"] = f"{failed.get('step')}: {failed.get('error')}"
            row["last_checkpoint"] = failed.get("last_checkpoint")
    except (OSError, ValueError, AttributeError):
        row["error"] = "unreadable report.json / failed.json"
    return row
