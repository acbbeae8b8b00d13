"""The study: Optuna storage in the search dir, sampler, pruner, the loop and its budget, resume.

    hybridtune search [SPACE.yaml] [key=value ...] --budget 60m | --trials N [--out DIR]

The study lives in `<out>/study.journal` (Optuna's JournalStorage, a file backend: appends only,
so a search killed at any point reopens with every finished trial). On reopening, a trial the
killed process left running is marked failed ("interrupted") and its parameters are queued again,
so it runs once more, whole; finished trials are never rerun. `--trials N` counts every finished
trial of the study (earlier runs included); `--budget` counts the trials' own time and the lr range
tests' (lr_range.py), earlier runs included: the search starts no trial once the time left is below
the shortest trial so far.
"""

from __future__ import annotations

import math
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import optuna

from hybridtune import rundir
from hybridtune.data import long_texts
from hybridtune.errors import UserError
from hybridtune.rundir import CACHE_DIR_ENV
from hybridtune.search import lr_range
from hybridtune.search.budget import cheapest_trial_seconds, parse_budget, stop_line
from hybridtune.search.setup import LENGTH, Context, load_space, resolve
from hybridtune.search.space import start_trials

JOURNAL = "study.journal"
MANIFEST = "search.json"


def sampler_for(ctx: Context, parallel: bool = False):
    """TPE for one objective (Bergstra et al. 2011; multivariate + group: the family's settings are
    modelled together, and only in that family's trials), NSGA-II for several (Deb et al. 2002).
    `parallel` (trials running side by side, the Ray backend): TPE's constant liar, which counts a
    running trial as a bad one so that parallel asks do not all pick the same point (Optuna's
    advice for distributed TPE)."""
    space = ctx.space
    kind = space.sampler
    if kind == "auto":
        kind = "tpe" if len(space.objectives) == 1 else "nsga2"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if kind == "tpe":
            return optuna.samplers.TPESampler(
                seed=space.seed, multivariate=True, group=True, n_startup_trials=8, constant_liar=parallel
            )
        if kind == "nsga2":
            return optuna.samplers.NSGAIISampler(seed=space.seed, population_size=16)
        return optuna.samplers.RandomSampler(seed=space.seed)


def pruner_for(ctx: Context):
    """Successive halving (ASHA, Li et al. 2020; the default) or Hyperband (Li et al. 2018) over the
    trial's evaluations, which come after the same amount of training in every trial (`finish`):
    rungs at evaluations 1, f, f², ... (f = `reduction_factor`), each keeping the best 1/f.
    Hyperband splits the trials into log_f(evaluations) + 1 brackets, and its last bracket never
    prunes: with the few trials a CPU budget allows, a trial learning nothing ran to its end there.
    `prune_among: same_length` (the default of successive halving and median): a trial is compared
    only with trials planned to validate as often as it (`SameLength`)."""
    n, f = ctx.max_evaluations, ctx.space.reduction_factor
    kind = ctx.space.pruner
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=n, reduction_factor=f)
    if kind == "successive_halving":
        pruner = optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=f)
    elif kind == "median":
        pruner = optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1)
    else:
        return optuna.pruners.NopPruner()
    return SameLength(pruner) if ctx.space.pruned_among() == "same_length" else pruner


class SameLength(optuna.pruners.BasePruner):
    """A pruner that compares a trial only with the trials of its length: those planned to validate
    as many times (`LENGTH`), i.e. of the same epochs. With a decaying lr schedule, a 1-epoch trial
    has annealed by its second validation, where a 3-epoch trial, after as much training, is still at
    full lr and scores lower: compared together, every longer trial was pruned at its first rungs
    (docs/search.md, "the pruner's short-horizon bias"). The wrapped Optuna pruner sees the study
    through `_OfLength`, whose `get_trials` keeps the trials of that length only."""

    def __init__(self, pruner):
        self.pruner = pruner

    def prune(self, study, trial) -> bool:
        length = trial.user_attrs.get(LENGTH)
        return self.pruner.prune(study if length is None else _OfLength(study, length), trial)


class _OfLength:
    def __init__(self, study, length: int):
        self._study, self._length = study, length

    def get_trials(self, deepcopy: bool = True, states=None):
        trials = self._study.get_trials(deepcopy=deepcopy, states=states)
        return [t for t in trials if t.user_attrs.get(LENGTH) == self._length]

    def __getattr__(self, name: str):
        return getattr(self._study, name)


def check_out_dir(root: Path, ctx: Context) -> bool:
    """True if `root` holds this same study (resume); a dir holding another study, or anything that
    is not a search dir, is refused."""
    manifest = root / MANIFEST
    if manifest.is_file():
        held = rundir.read_json(manifest)
        if held.get("space") != _jsonable(ctx.space.identity()) or held.get("base") != _jsonable(ctx.base):
            raise UserError(
                "--out",
                f"'{root}', which holds another study ({held.get('space', {}).get('name')}, a different space or base)",
                "a new dir, or the same space to resume it",
            )
        return True
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise UserError("--out", f"'{root}', a non-empty dir that is not a search dir", "a new or empty dir")
    return False


def _jsonable(value: Any) -> Any:
    import json

    return json.loads(json.dumps(value, default=str))


def journal(root: Path):
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(str(root / JOURNAL)))


def open_study(root: Path, ctx: Context, fresh: bool, storage=None):
    storage = storage or journal(root)
    study = optuna.create_study(
        study_name=ctx.space.name,
        storage=storage,
        directions=ctx.space.directions(ctx.metric),
        sampler=sampler_for(ctx),
        pruner=pruner_for(ctx),
        load_if_exists=True,
    )
    if fresh:
        for params in [*ctx.space.enqueue, *start_trials(ctx.space)]:
            study.enqueue_trial(params)
    return study


def recover(study, root: Path, echo, ctx: Context | None = None) -> None:
    """Trials a killed search left running: marked failed (interrupted), their run dirs removed,
    their parameters queued to run again, whole; their MLflow runs tagged interrupted."""
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(t.number, state=TrialState.FAIL)
        if ctx is not None and "mlflow" in ctx.report_to:
            from hybridtune.search.tracked import end_tracked

            end_tracked(ctx, root, t.number, "interrupted")
        study.set_user_attr(f"interrupted_{t.number}", True)
        shutil.rmtree(root / "trials" / f"trial-{t.number:04d}", ignore_errors=True)
        if t.params:
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
        echo(f"trial {t.number}: interrupted earlier, queued again")


def finished(study) -> list:
    from optuna.trial import TrialState

    interrupted = {k for k in study.user_attrs if k.startswith("interrupted_")}
    return [
        t
        for t in study.get_trials(deepcopy=False)
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
        and f"interrupted_{t.number}" not in interrupted
    ]


def prepare(
    space_path: str | None, overrides: list[str], out: str | None, budget: str | None, trials: int | None
):
    """Every check, nothing written: the context, the dir, the budget in seconds, the trial count."""
    if trials is not None and trials < 1:
        raise UserError("--trials", str(trials), "a number of trials >= 1")
    seconds = parse_budget(budget)
    space = load_space(space_path, overrides)
    ctx = resolve(space, space_path or "default space")
    lr_range.check(ctx)
    root = Path(out or Path("runs") / f"search-{space.name}")
    resuming = check_out_dir(root, ctx)
    if seconds is not None and not resuming:
        floor = cheapest_trial_seconds(ctx)
        if seconds < floor:
            raise UserError(
                "--budget",
                f"{budget} ({seconds:.0f} s), too small for one trial: the cheapest needs at least "
                f"{floor:.0f} s here (its steps x one forward pass, measured)",
                f"a budget of at least {math.ceil(floor)} s",
            )
    if trials is None and seconds is None:
        trials = 20
    return ctx, root, seconds, trials, resuming


def run_search(
    space_path: str | None = None,
    overrides: list[str] | None = None,
    out: str | None = None,
    budget: str | None = None,
    trials: int | None = None,
    threads: int | None = None,
    seeds: int | None = None,
    echo=print,
    backend: str = "local",
    address: str | None = None,
    cpus_per_trial: int | None = None,
    gpus_per_trial: float | None = None,
) -> Path:
    """Run (or resume) a search, then the verdict; returns the search dir. `backend="ray"` runs the
    trials on Ray Tune (search/ray_tune.py): a local Ray this call starts, or the cluster at
    `address`, `cpus_per_trial` / `gpus_per_trial` each."""
    import torch

    from hybridtune.search import ray_tune

    ray_tune.check_options(backend, address, cpus_per_trial, gpus_per_trial)
    ctx, root, seconds, n_trials, resuming = prepare(space_path, overrides or [], out, budget, trials)
    if backend == "ray" and ctx.space.prune_among == "same_length":
        raise UserError(
            f"{ctx.origin}: prune_among",
            "same_length with --backend ray",
            "prune_among: all (Ray's ASHA compares every trial at a rung) or --backend local",
        )
    if backend == "ray" and ctx.space.draw_rungs:
        raise UserError(
            f"{ctx.origin}: draw_rungs",
            "true with --backend ray",
            "draw_rungs: false (Ray's ASHA has rungs within a run only) or --backend local",
        )
    if seeds is not None:
        if seeds < 1:
            raise UserError("--seeds", str(seeds), "a number of seeds >= 1")
        ctx.space.verdict.seeds = seeds
    asked = threads  # ray: the local Ray's CPUs, every CPU unless given
    # default: OMP_NUM_THREADS when the user set it (as `hybridtune train` honours it), else every CPU
    threads = threads or int(os.environ.get("OMP_NUM_THREADS") or 0) or len(os.sched_getaffinity(0))
    if threads < 1:
        raise UserError("--threads", str(threads), "a number of threads >= 1")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    cluster = None
    if backend == "ray":  # started (or joined) before anything is written: a resource it lacks is bad input
        root = root.resolve()  # the paths Ray's workers are given do not depend on their cwd
        cluster = ray_tune.connect(address, asked, cpus_per_trial, gpus_per_trial)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        if cluster is not None:
            cluster.close()
        raise UserError(
            "--out", f"'{root}' that cannot be written ({e.strerror})", "a writable directory"
        ) from None
    rundir.write_json(
        root / MANIFEST,
        {"space": _jsonable(ctx.space.identity()), "base": _jsonable(ctx.base), "metric": ctx.metric,
         "objectives": ctx.space.objectives, "blocks": ctx.blocks, "n_train": ctx.n_train},
    )  # fmt: skip
    before = os.environ.get(CACHE_DIR_ENV), torch.get_num_threads()
    if before[0] is None:  # token + trunk caches shared by the trials (a user's own dir wins)
        os.environ[CACHE_DIR_ENV] = str(root / "cache")
    # one trial at a time, on every core it is given: trials never share cores (two 2-thread runs on
    # 2 cores were measured 8x slower each, docs/search.md)
    torch.set_num_threads(threads)
    try:
        with long_texts.said_once():  # what max_length cuts: said by the first trial, not by each
            _loop(ctx, root, seconds, n_trials, resuming, echo, cluster)
    finally:  # this process (a Python caller's) gets its settings back
        if cluster is not None:
            cluster.close()
        torch.set_num_threads(before[1])
        if before[0] is None:
            os.environ.pop(CACHE_DIR_ENV, None)
            shutil.rmtree(root / "cache", ignore_errors=True)
    return root


def _loop(
    ctx: Context, root: Path, seconds: float | None, n_trials: int | None, resuming: bool, echo, cluster=None
) -> None:
    """The trials (until N are finished or the budget is spent), the outputs, the verdict."""
    from hybridtune.search.report import write_outputs
    from hybridtune.search.trial import run_trial
    from hybridtune.search.verdict import run_verdict

    # before the first trial: each family's lr range from its lr range test (lr_range.json on resume)
    tests_seconds = lr_range.apply(ctx, root, echo)
    storage = journal(root)
    study = open_study(root, ctx, fresh=not resuming, storage=storage)
    if "mlflow" in ctx.report_to:  # the store and the experiment, made here before any trial (or Ray worker)
        from hybridtune.search.tracked import tracking_target
        from hybridtune.train.tracking import experiment_id

        experiment_id(tracking_target(ctx, root))
    recover(study, root, echo, ctx)
    for key, why in ctx.left_out.items():  # search/setup.py: a default part no family of this base takes
        echo(f"parts: {key} left out of the search: {why}")
    done = finished(study)
    if done:
        echo(f"{len(done)} trial(s) finished earlier, kept")
    spent = tests_seconds + sum(t.user_attrs.get("seconds", 0.0) for t in done)
    if cluster is not None:
        from hybridtune.search.ray_tune import run_trials

        left = None if n_trials is None else max(0, n_trials - len(done))
        run_trials(
            cluster, ctx, root, storage, sampler_for(ctx, parallel=True), seconds, spent, left, done, echo
        )
    while cluster is None:
        done = finished(study)
        if n_trials is not None and len(done) >= n_trials:
            break
        if seconds is not None:
            durations = [t.user_attrs["seconds"] for t in done if "seconds" in t.user_attrs]
            if line := stop_line(seconds - spent, durations, "stopping"):
                echo(line)
                break
        started = time.perf_counter()
        _one_trial(study, ctx, root, run_trial, len(done), n_trials, echo)
        spent += time.perf_counter() - started  # this process's wall time, asking and telling included
    write_outputs(root, study, ctx)
    if ctx.space.verdict.top:
        from hybridtune.search.ray_tune import on_cluster

        run_verdict(root, study, ctx, echo, on_cluster(cluster, echo) if cluster is not None else None)
        write_outputs(root, study, ctx)


def _one_trial(study, ctx: Context, root: Path, run_trial, index: int, total: int | None, echo) -> float:
    from hybridtune.search.trial import record

    trial = study.ask()
    state, info = run_trial(ctx, trial, root)
    record(study, trial, ctx, state, info, f"({index + 1}{f'/{total}' if total else ''})", echo, root)
    return info["seconds"]
