"""The run dir: what one training run leaves behind, written so that nothing is ever half-written.

    runs/<name>/
      recipe.yaml     the resolved recipe (every default filled in)
      run.json        task, labels, base model, format of final/ ("model" or "peft")
      params.json     per-layer trainable-parameter table
      metrics.jsonl   every train / eval log line (and stage changes)
      tensorboard/    the same, as TensorBoard event files
      checkpoints/    Trainer checkpoints (the last N and the best)
      final/          the result in standard HF / PEFT format, with its tokenizer
      eval.json       test-split metrics: accuracy, macro-F1, per-class report, confusion matrix
      report.json     summary: metrics, parameters, time, throughput
      failed.json     only in a run that failed after its dir was written: step, error, last checkpoint

Files are written to a temporary name and renamed into place; a directory likewise.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hybridtune.errors import UserError


def run_dir_path(out_dir: str, name: str | None, recipe_name: str) -> Path:
    return Path(out_dir) / (name or f"{recipe_name}-{time.strftime('%Y%m%d-%H%M%S')}")


def new_run_dir(run: Path) -> Path:
    """Create the run dir (checked: writable, not an existing run)."""
    root = run.parent
    if run.exists():
        raise UserError(
            "output.name", f"'{run}', which already exists", "a new run name (or remove the old run)"
        )
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
        run.mkdir()
    except OSError as e:
        raise UserError(
            "output.dir", f"'{root}' that cannot be written ({e.strerror})", "a writable directory"
        ) from None
    return run


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
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno in DISK_ERRORS:
            raise disk_error(e, path) from None
        raise


def publish_dir(entry: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` into a temp dir of its own beside `entry`, then rename it to `entry`; when another
    process published `entry` first, theirs is kept and ours dropped. For shared caches, whose
    entries are only ever whole: unlike `save_dir_atomically`, an existing entry is never replaced.
    An OSError of `write` (or of a rename that lost no race) propagates; no temp dir is left."""
    tmp = entry.with_name(f".{entry.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.mkdir(parents=True)
        write(tmp)
        try:
            os.rename(tmp, entry)
        except OSError:
            if not entry.is_dir():  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_dir_atomically(target: Path, save) -> None:
    """Call `save(tmp_dir)` then rename the finished dir to `target` (replacing an older one)."""
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        save(tmp)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno in DISK_ERRORS:
            raise disk_error(e, target) from None
        raise
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


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
    if not (run / "run.json").is_file() or not (run / "final").is_dir():
        raise UserError(
            str(path),
            "no finished run (run.json and final/ missing)",
            "a run dir written by `hybridtune train`",
        )
    return run


# --------------------------------------------------------------------------------------------------
# status of a run dir: finished / failed / resumable / interrupted

FAILED = "failed.json"
STATUSES = ("finished", "failed", "resumable", "interrupted")


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


def last_checkpoint(run: Path) -> Path | None:
    from hybridtune.train.checkpoints import checkpoints

    root = run / "checkpoints"
    found = checkpoints(root) if root.is_dir() else []
    return found[-1] if found else None


def status(run: Path) -> str:
    """finished (report.json), failed (failed.json), resumable (a complete checkpoint to go on from,
    `hybridtune train --resume`), interrupted (killed before its first checkpoint: start it over)."""
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
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def describe(run: Path) -> dict:
    """One row of `hybridtune runs`: status, headline metric, size, why it failed."""
    row: dict[str, Any] = {"run": str(run), "status": status(run), "size_bytes": dir_size(run)}
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
