"""Exact resume: `hybridtune train --resume RUN_DIR`.

Resume is Trainer's `train(resume_from_checkpoint=...)`, which restores model, optimizer, scheduler
and RNG states and skips the batches already trained; the data order of every epoch comes from
(seed, epoch) (accelerate's SeedableRandomSampler for the random order, `EpochSeededLengthGroupedSampler`
below for the length-grouped one), so a checkpoint inside any epoch continues the same order. What
this module adds:

- `prepare_resume` takes the run dir's lock, picks the newest *complete* checkpoint (rundir.problem:
  marker, sizes, trainer_state.json and weights readable), saying in one line which newer ones are
  damaged and skipped; refuses one without its optimizer state unless `weights_only`, and a
  hand-edited or truncated trainer_state.json / run.json; removes what killed writes left behind
  and cuts `metrics.jsonl` back to the checkpoint's step, so the steps redone after resume are not
  logged twice.
- `RestoreLoggingWindow` puts back the train loss summed since the last log line (saved in the
  checkpoint), so the first train-loss line after a resume averages the same steps as in an
  uninterrupted run, also when checkpoints and logging steps do not coincide.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_pt_utils import LengthGroupedSampler

from hybridtune import durable, rundir
from hybridtune.data.lines import text_lines
from hybridtune.errors import UserError
from hybridtune.train.checkpoints import LOGGING_STATE, clean, has_optimizer


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def prepare_resume(
    run: Path, weights_only: bool = False, main: bool = True
) -> tuple[Path, durable.DirLock | None]:
    """(the checkpoint to resume `run` from, the run dir's lock, held: None when not `main`).
    Refuses a dir that is no run, a finished run, a run with no complete checkpoint, (unless
    `weights_only`) a checkpoint without its optimizer state, and a checkpoint state or run.json
    that does not read (bad input, exit 2, found before the model loads); the lock is released on
    refusal."""
    where = f"--resume {run}"
    if not (run / "recipe.yaml").is_file() or not (run / "run.json").is_file():
        raise UserError(where, "no run dir (recipe.yaml, run.json missing)", "a run dir to resume")
    lock = durable.lock_dir(run, where) if main else None
    try:
        checkpoint = _pick(run, where, weights_only, main)
        # a hand-edited or truncated state is bad input (exit 2), found before the model loads
        rundir.read_meta(
            checkpoint / "trainer_state.json",
            {"epoch": (int, float), "global_step": int, "log_history": list},
        )
        rundir.read_meta(run / "run.json", {"task": str})
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return checkpoint, lock


def _pick(run: Path, where: str, weights_only: bool, main: bool) -> Path:
    if (run / "report.json").is_file():
        raise UserError(where, "a finished run (report.json present)", "an interrupted run")
    root = run / "checkpoints"
    if main and root.is_dir():
        clean(root)
        durable.clean_temp(run)
    found = rundir.candidates(root) if root.is_dir() else []
    damaged = []
    for checkpoint in reversed(found):
        why = rundir.problem(checkpoint)
        if why is None:
            break
        damaged.append(f"{checkpoint.name} ({why})")
    else:
        checkpoint = None
    if checkpoint is None:
        seen = f" (damaged: {', '.join(damaged)})" if damaged else ""
        raise UserError(
            where,
            f"no complete checkpoint to resume from{seen}",
            "a run interrupted after its first checkpoint",
            f"this one was interrupted before it: remove it (rm -r {run}) and train again; "
            f"`hybridtune runs {run.parent}` lists such runs and `--clean interrupted` removes them",
        )
    if damaged:
        say(f"warning: {', '.join(damaged)} damaged, skipped; resuming from {checkpoint.name}")
    if not has_optimizer(checkpoint):
        if not weights_only:
            raise UserError(
                where,
                f"{checkpoint / 'optimizer.pt'} missing",
                "a checkpoint with its optimizer state",
                "--resume-weights-only goes on from the weights with a fresh optimizer: not the "
                "run an uninterrupted training gives",
            )
        say(
            f"WARNING: resuming from the weights of {checkpoint.name} only: optimizer.pt is missing, "
            "the optimizer starts fresh (--resume-weights-only); the result will differ from an "
            "uninterrupted run"
        )
    if main:
        truncate_metrics(run / "metrics.jsonl", rundir.step_of(checkpoint))
    return checkpoint


# the keys of the lines a switch of what trains writes when a step begins: stages, layer_sampling
SWITCHES = {"stage", "layer_sampling"}


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the log lines written up to checkpoint `step`: those of earlier steps, and step `step`'s
    train / eval lines (logged before the save). A stage change or a layer-sampling draw at `step`
    is logged after the save (when the next step begins), so the resumed run logs it again; it is
    dropped here."""
    if not path.is_file():
        return
    kept = []
    for line in text_lines(path.read_text(encoding="utf-8")):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by the kill
            continue
        at = record.get("step", 0)
        if at < step or (at == step and not SWITCHES & record.keys()):
            kept.append(line)
    rundir.write_text(path, "".join(line + "\n" for line in kept))


class RestoreLoggingWindow(TrainerCallback):
    """On resume, the train loss summed since the last log line, as the checkpoint saved it (Trainer
    starts it at 0 at `train()`, after loading the checkpoint and before `on_train_begin`)."""

    def __init__(self, trainer, checkpoint: Path):
        self.trainer, self.checkpoint = trainer, checkpoint

    def on_train_begin(self, args, state, control, **kwargs):
        path = self.checkpoint / LOGGING_STATE
        if not path.is_file():  # a checkpoint of an earlier version: the window starts at the checkpoint
            return
        window = json.loads(path.read_text(encoding="utf-8"))
        self.trainer._tr_loss.fill_(window["tr_loss"])
        self.trainer._globalstep_last_logged = window["last_logged_step"]


class EpochSeededLengthGroupedSampler(LengthGroupedSampler):
    """transformers' LengthGroupedSampler with its order drawn from a generator seeded with
    seed + epoch, as accelerate's SeedableRandomSampler does for the random order. Trainer builds the
    length-grouped sampler without a generator, so each epoch's order came from the global random
    state at the epoch's start; a run resumed inside epoch 2 or later has the checkpoint's state
    there instead (restored after the skipped batches), so its order, and everything after it,
    differed from the uninterrupted run's. Trainer calls `set_epoch` before each epoch (through
    accelerate's DataLoaderShard, also under `skip_first_batches`), so the resumed epoch is drawn
    from the same seed as it was the first time."""

    def __init__(self, batch_size: int, lengths: list[int], seed: int):
        super().__init__(batch_size, lengths=lengths, generator=torch.Generator())
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        self.generator.manual_seed(self.seed + self.epoch)
        return super().__iter__()
