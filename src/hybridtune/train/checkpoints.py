"""Crash-safe checkpoints and exact resume.

transformers' Trainer writes `checkpoint-N/` in place: a run killed mid-write leaves a directory
that `get_last_checkpoint` would happily resume from. Here a checkpoint is written into
`.checkpoint-N.tmp/` and renamed into place only when complete (model, optimizer, scheduler, RNG
states, trainer state with the stateful callbacks, the strategy parts' own weights). Rotation
(the last `output.keep_checkpoints` and the best) is Trainer's own `rotate_checkpoints`.

Resume (`hybridtune train --resume RUN_DIR`) is Trainer's `train(resume_from_checkpoint=...)`,
which restores model, optimizer, scheduler, RNG states and data order; `prepare_resume` picks the
last complete checkpoint, removes what a killed write left behind, and cuts `metrics.jsonl` back to
the checkpoint's step so that the steps redone after resume are not logged twice.

`HYBRIDTUNE_TEST_KILL_AT` is a test-only hook: `step:K` (after optimizer step K), `save:K` (while
writing checkpoint K, before its rename) or `stage:S` (when stage S begins) make the process
SIGKILL itself there, so tests can show that a resumed run ends where an uninterrupted one does.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from hybridtune.errors import UserError
from hybridtune.rundir import DISK_ERRORS, disk_error

KILL_ENV = "HYBRIDTUNE_TEST_KILL_AT"
CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def maybe_kill(point: str, value: int) -> None:
    """SIGKILL this process when HYBRIDTUNE_TEST_KILL_AT names this point (tests only; a no-op otherwise)."""
    if os.environ.get(KILL_ENV) == f"{point}:{value}":
        os.kill(os.getpid(), signal.SIGKILL)


class KillAt(TrainerCallback):
    """The `step:K` and `stage:S` points of the test hook (added only while HYBRIDTUNE_TEST_KILL_AT is
    set, after strategy/stages.py's StageCallback: `stage:S` fires once stage S has been entered, at
    the optimizer step it begins, as `starts` (the stage plan's) says)."""

    def __init__(self, starts: list[int] | None = None):
        self.starts = starts or []

    def on_step_begin(self, args, state, control, **kwargs):
        # the stage StageCallback enters at this step: the last one that begins here
        begins = [k for k, start in enumerate(self.starts) if start == state.global_step]
        if begins:
            maybe_kill("stage", begins[-1])

    def on_step_end(self, args, state, control, **kwargs):
        maybe_kill("step", state.global_step)


def save_checkpoint(trainer, model) -> None:
    """Trainer._save_checkpoint for one process, written to a temp dir and renamed when complete.

    The same steps as transformers 5's `_save_checkpoint`, in the same order; what differs is the
    directory they write into and the rename at the end. Parts' own weights (`save_into` of a
    callback, e.g. strategy.CheckpointExtras) are written before the rename, inside the same
    atomic write."""
    state, args = trainer.state, trainer.args
    trainer.store_flos()
    root = Path(trainer._get_output_dir(trial=None))
    name = f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
    final, tmp = root / name, root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        _write(trainer, tmp, root)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)  # a full disk leaves no partial checkpoint behind
        if isinstance(e, OSError) and e.errno in DISK_ERRORS:
            raise disk_error(e, final) from None
        raise
    maybe_kill("save", state.global_step)
    if final.exists():  # the same step saved again (a resumed run re-saving): replace it whole
        shutil.rmtree(final)
    os.replace(tmp, final)
    rotate_checkpoints(
        output_dir=str(root),
        save_total_limit=args.save_total_limit,
        best_model_checkpoint=state.best_model_checkpoint,
        use_mtime=False,
    )


def _write(trainer, tmp: Path, root: Path) -> None:
    """What transformers' `_save_checkpoint` writes, into `tmp`."""
    state, args = trainer.state, trainer.args
    trainer.save_model(str(tmp), _internal_call=True)
    if state.best_global_step:
        best = root / f"{PREFIX_CHECKPOINT_DIR}-{state.best_global_step}"
        if best.exists() or state.best_global_step == state.global_step:
            state.best_model_checkpoint = str(best)
    if not args.save_only_model:
        trainer._save_optimizer_and_scheduler(str(tmp))
        trainer._save_scaler(str(tmp))
        trainer._save_rng_state(str(tmp))
    callbacks = trainer.callback_handler.callbacks
    for cb in [c for c in [*callbacks, trainer.control] if isinstance(c, ExportableState)]:
        stored = state.stateful_callbacks.get(cb.__class__.__name__)
        if isinstance(stored, list):  # as Trainer does for several callbacks of one class
            stored.append(cb.state())
        else:
            state.stateful_callbacks[cb.__class__.__name__] = cb.state()
    state.save_to_json(str(tmp / "trainer_state.json"))
    for cb in callbacks:
        if hasattr(cb, "save_into"):
            cb.save_into(tmp)


def checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first (a temp dir of a killed write is not one)."""
    found = [
        (int(m[1]), p) for p in root.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if (m := CHECKPOINT.match(p.name))
    ]
    return [p for _, p in sorted(found) if p.is_dir() and (p / "trainer_state.json").is_file()]


def prepare_resume(run: Path) -> Path:
    """The checkpoint to resume `run` from; also removes what a killed write left behind and cuts
    metrics.jsonl back to that checkpoint's step. Refuses a finished run or one with no checkpoint."""
    if not (run / "recipe.yaml").is_file() or not (run / "run.json").is_file():
        raise UserError(
            f"--resume {run}", "no run dir (recipe.yaml, run.json missing)", "a run dir to resume"
        )
    if (run / "report.json").is_file():
        raise UserError(f"--resume {run}", "a finished run (report.json present)", "an interrupted run")
    root = run / "checkpoints"
    found = checkpoints(root) if root.is_dir() else []
    if not found:
        raise UserError(
            f"--resume {run}", "no checkpoint to resume from", "a run interrupted after its first save"
        )
    for stale in root.glob(f".{PREFIX_CHECKPOINT_DIR}-*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    last = found[-1]
    truncate_metrics(run / "metrics.jsonl", int(CHECKPOINT.match(last.name)[1]))
    return last


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the log lines written up to checkpoint `step`: those of earlier steps, and step `step`'s
    train / eval lines (logged before the save). A stage change at `step` is logged after the save
    (when the next step begins), so the resumed run logs it again; it is dropped here."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by the kill
            continue
        at = record.get("step", 0)
        if at < step or (at == step and "stage" not in record):
            kept.append(line)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)
