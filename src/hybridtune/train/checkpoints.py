"""Crash-safe checkpoints: written whole, durable, marked complete last, removed without remnants.

transformers' Trainer writes `checkpoint-N/` in place: a run killed mid-write leaves a directory
that `get_last_checkpoint` would happily resume from. Here a checkpoint is written into a temp dir
of its own (`.checkpoint-N.PID-RANDOM.tmp/`): model, optimizer, scheduler, RNG states, trainer
state with the stateful callbacks, the strategy parts' own weights, the logging window
(`logging_state.json`), and last the marker `complete.json` (the step and every file's size); then
every file and the dir are fsync'd and the dir is renamed into place (a re-saved step: exchanged
with the old one, durable.replace_dir). Rotation keeps Trainer's rule (the last
`output.keep_checkpoints` and the best; transformers' `rotate_checkpoints`) but removes a checkpoint
by renaming it away first, so a kill inside the delete never leaves a partial `checkpoint-N`.

A checkpoint is **complete** (`checkpoints`, `problem`) when its marker is there and every file it
lists has its recorded size, `trainer_state.json` reads, and the weights' header reads. A checkpoint
without a marker (written by hybridtune before 0.x, whose write was already temp dir + rename) is
still taken when its `trainer_state.json` and weights read: a run from an earlier version resumes.

`HYBRIDTUNE_TEST_KILL_AT` (durable.maybe_kill) points here: `step:K` (after optimizer step K),
`save:K` (checkpoint K written, before its rename), `rotate:K` (after checkpoint K's rename, before
the rotation); durable.py adds `exchanged:NAME` and `remove:NAME`, stages.py `stage:S`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from hybridtune import durable
from hybridtune.durable import KILL_ENV, maybe_kill  # noqa: F401  (the hook's home for train/)
from hybridtune.rundir import CHECKPOINT, DISK_ERRORS, MARKER, checkpoints, disk_error, problem, step_of  # noqa: F401

LOGGING_STATE = "logging_state.json"


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
    """Trainer._save_checkpoint for one process, written to a temp dir, marked, fsync'd and renamed.

    The same steps as transformers 5's `_save_checkpoint`, in the same order; what differs is the
    directory they write into, the logging window and the marker, and the rename at the end. Parts'
    own weights (`save_into` of a callback, e.g. strategy.CheckpointExtras) are inside the same
    atomic write."""
    state, args = trainer.state, trainer.args
    trainer.store_flos()
    root = Path(trainer._get_output_dir(trial=None))
    final = root / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
    tmp = durable.temp_name(final)
    try:
        tmp.mkdir(parents=True)
        _write(trainer, tmp, root)
        _mark(tmp, state.global_step)  # last: a checkpoint without it is not complete
        durable.fsync_tree(tmp)
        maybe_kill("save", state.global_step)
        durable.replace_dir(tmp, final)  # the same step saved again: exchanged whole
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)  # a full disk leaves no partial checkpoint behind
        if isinstance(e, OSError) and e.errno in DISK_ERRORS:
            raise disk_error(e, final) from None
        raise
    maybe_kill("rotate", state.global_step)
    rotate(root, args.save_total_limit, state.best_model_checkpoint)


def _write(trainer, tmp: Path, root: Path) -> None:
    """What transformers' `_save_checkpoint` writes, into `tmp`, and the logging window."""
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
    # the train loss summed since the last log line: Trainer starts it at 0 on resume, so a log line
    # after a checkpoint that falls between two logging steps would average fewer steps (train/resume.py)
    window = {"tr_loss": float(trainer._tr_loss), "last_logged_step": trainer._globalstep_last_logged}
    (tmp / LOGGING_STATE).write_text(json.dumps(window), encoding="utf-8")


def _mark(tmp: Path, step: int) -> None:
    files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
    (tmp / MARKER).write_text(json.dumps({"step": step, "files": files}, indent=1), encoding="utf-8")


def rotate(root: Path, limit: int | None, best: str | None) -> None:
    """transformers' `rotate_checkpoints` rule (keep the last `limit`, always the newest and the best),
    each doomed checkpoint renamed away before it is deleted (durable.remove_dir)."""
    if not limit or limit <= 0:
        return
    from hybridtune.rundir import candidates

    paths = candidates(root)
    if len(paths) <= limit:
        return
    protected = {paths[-1].name} | ({Path(best).name} if best else set())
    keep, remaining = max(limit, len(protected)), len(paths)
    for path in paths:
        if remaining <= keep:
            break
        if path.name not in protected:
            durable.remove_dir(path)
            remaining -= 1


def has_optimizer(checkpoint: Path) -> bool:
    return (checkpoint / "optimizer.pt").is_file() or any(checkpoint.glob("optimizer*.bin"))


def clean(root: Path) -> None:
    """What killed writes left under `checkpoints/` (temp dirs of this and of earlier versions)."""
    durable.clean_temp(root)
    for stale in root.glob(f".{PREFIX_CHECKPOINT_DIR}-*.tmp"):  # an earlier version's fixed name
        shutil.rmtree(stale, ignore_errors=True)
