"""The Ray backend: the same trials, many at a time, on Ray Tune (`--backend ray`).

    hybridtune search SPACE.yaml --trials 64 --backend ray [--address ADDR]
                                 [--cpus-per-trial N] [--gpus-per-trial N]

Ray Tune runs the trials; Optuna still chooses them: `OptunaSearch` with the space as an Optuna
define-by-run function (`setup.sample_trial`, the same conditional space as the local backend), the
search's own sampler (TPE with the constant liar, so parallel asks spread out) and the search's own
journal storage, so the study file, the trials table, the fronts, the verdict and resume are the
local backend's. `ASHAScheduler` (asynchronous successive halving, Li et al. 2020) prunes on the
validation metric each trial reports after each evaluation (`tune.report` from the Trainer callback
of search/trial.py); rungs are evaluations (after the same training in every trial), as with the
local pruners. A multi-objective study is
not pruned (one metric per scheduler), like the local one.

Each trial gets one slot: `--cpus-per-trial` CPUs (its torch threads; default 1) and
`--gpus-per-trial` GPUs (default 1 where the cluster has GPUs, else 0). Ray starts as many trials at
once as slots fit. Ray is started here (`ray.init(num_cpus=--threads or every CPU)`) and shut down
at the end, or joined at `--address` (a cluster from `ray start --head`; the search dir and the
data must then be on a file system every node sees, and hybridtune installed on every node).

The confirmation's and the verdict's runs go out on the same cluster, one slot each, as Ray tasks
(`on_cluster`: the same list of runs the local backend trains one after the other).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from hybridtune.errors import UserError
from hybridtune.search.budget import stop_line
from hybridtune.search.setup import Context

INSTALL = "pip install 'hybridtune[ray]'"


def check_options(backend: str, address: str | None, cpus: int | None, gpus: float | None) -> None:
    """The backend flags, before anything is read or written."""
    if backend not in ("local", "ray"):
        raise UserError("--backend", repr(backend), "local or ray")
    flags = {"--address": address, "--cpus-per-trial": cpus, "--gpus-per-trial": gpus}
    if backend == "local":
        for flag, value in flags.items():
            if value is not None:
                raise UserError(
                    flag, f"{value} with the local backend", "--backend ray with it (or no " + flag + ")"
                )
        return
    if cpus is not None and cpus < 1:
        raise UserError("--cpus-per-trial", str(cpus), "a number of CPUs >= 1")
    if gpus is not None and gpus < 0:
        raise UserError("--gpus-per-trial", str(gpus), "a number of GPUs >= 0 (0.5: two trials per GPU)")
    if importlib.util.find_spec("ray") is None:
        raise UserError(
            "--backend", "ray, which is not installed here", f"{INSTALL} first, or --backend local"
        )


@dataclass
class Cluster:
    """The Ray this search runs on and each trial's slot."""

    cpus: int
    gpus: float
    slots: int
    started: bool  # by this search: shut down at its end

    def close(self) -> None:
        import ray

        if self.started and ray.is_initialized():
            ray.shutdown()


def connect(address: str | None, threads: int | None, cpus: int | None, gpus: float | None) -> Cluster:
    """Start a local Ray (or join the cluster at `address`) and check that one trial's slot fits."""
    import ray

    started = not ray.is_initialized()
    if started:
        quiet = {"include_dashboard": False, "logging_level": logging.WARNING, "log_to_driver": False}
        try:
            if address:
                ray.init(address=address, **quiet)
            else:
                ray.init(num_cpus=threads or len(os.sched_getaffinity(0)), **quiet)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise UserError(
                "--address",
                f"{address!r}, where no Ray cluster answers ({str(e).splitlines()[0][:200]})",
                "the address `ray start --head` printed (host:6379) or auto",
            ) from None
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    most_cpus = max((n.get("CPU", 0) for n in nodes), default=0)
    most_gpus = max((n.get("GPU", 0) for n in nodes), default=0)
    cpus = cpus or 1
    gpus = (1.0 if most_gpus >= 1 else 0.0) if gpus is None else float(gpus)
    cluster = Cluster(cpus=cpus, gpus=gpus, slots=0, started=started)
    if cpus > most_cpus or gpus > most_gpus:
        cluster.close()
        flag, want, has, what = (
            ("--cpus-per-trial", cpus, most_cpus, "CPUs")
            if cpus > most_cpus
            else ("--gpus-per-trial", gpus, most_gpus, "GPUs")
        )
        raise UserError(flag, f"{want:g}, more than any Ray node has ({has:g} {what})", f"at most {has:g}")
    total = ray.cluster_resources()
    slots = int(total.get("CPU", 0) // cpus)
    if gpus:
        slots = min(slots, int(total.get("GPU", 0) // gpus))
    cluster.slots = max(1, slots)
    return cluster


def _define(ctx: Context):
    """The space as an Optuna define-by-run function (what OptunaSearch samples with): the local
    backend's `sample_trial`, so a worker replaying the parameters takes the same path; the trial's
    number travels with its parameters to name its run dir."""

    def define(trial) -> dict:
        from hybridtune.search.setup import sample_trial

        sample_trial(ctx, trial)
        return {"trial_number": trial.number}

    return define


def _in_worker(threads: int, cwd: str, cache_dir: str | None) -> None:
    """A Ray worker set up as the search's process: its working dir (relative data paths in the
    base mean what they meant to the caller), its token cache dir, `threads` torch threads."""
    import torch

    from hybridtune.rundir import CACHE_DIR_ENV

    if Path(cwd).is_dir():
        os.chdir(cwd)
    if cache_dir:
        os.environ.setdefault(CACHE_DIR_ENV, cache_dir)
    torch.set_num_threads(threads)


def trainable(config: dict, ctx: Context, root: str, threads: int, cwd: str, cache_dir: str | None) -> None:
    """One trial in a Ray worker: the local backend's `run_trial`, reporting each evaluation (and,
    at the end, everything the trials table needs) to Ray Tune."""
    import optuna
    from ray import tune

    from hybridtune.search.trial import objective_values, run_trial

    _in_worker(threads, cwd, cache_dir)
    params = {k: v for k, v in config.items() if k != "trial_number"}
    trial = optuna.trial.FixedTrial(params, number=int(config["trial_number"]))
    others = {o: math.nan for o in ctx.space.objectives[1:]}

    def on_evaluation(value: float, n: int, info: dict) -> None:
        so_far = json.dumps({**info, "state": "running", "params": params})
        tune.report({"metric": value, **others, "evaluation": n, "hybridtune": so_far})

    state, info = run_trial(ctx, trial, Path(root), on_evaluation=on_evaluation)
    values = dict(zip(ctx.space.objectives, objective_values(ctx, info), strict=True))
    tune.report({**values, "hybridtune": json.dumps({**info, "state": state, "params": params})})


def _searcher_class():
    from ray.tune.search import Searcher
    from ray.tune.search.optuna import OptunaSearch

    class Search(OptunaSearch):
        """OptunaSearch that ends trials the way the local backend does (search/study.py's `record`:
        the trial's info as user attributes, complete | pruned | failed) and stops asking once the
        budget left is below the shortest trial so far."""

        def __init__(
            self, ctx: Context, root: Path, budget_left: float | None, done: list, total, echo, **kw
        ):
            super().__init__(**kw)
            self.ctx, self.root, self.echo, self.total = ctx, root, echo, total
            self.deadline = None if budget_left is None else time.monotonic() + budget_left
            self.durations = [t.user_attrs["seconds"] for t in done if "seconds" in t.user_attrs]
            self.count = len(done)

        def suggest(self, trial_id: str):
            if self.deadline == -math.inf:  # the budget's stop, said already
                return Searcher.FINISHED
            if self.deadline is not None:
                line = stop_line(self.deadline - time.monotonic(), self.durations, "no new trial")
                if line:
                    self.echo(line)
                    self.deadline = -math.inf  # said once
                    return Searcher.FINISHED
            return super().suggest(trial_id)

        def on_trial_result(self, trial_id: str, result: dict) -> None:
            if isinstance(self.metric, str) and "evaluation" in result:  # rungs are evaluations
                self._ot_trials[trial_id].report(result["metric"], result["evaluation"])

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            from hybridtune import rundir
            from hybridtune.search.trial import record

            if trial_id in self._completed_trials or trial_id not in self._ot_trials:
                return
            self._completed_trials.add(trial_id)
            ot_trial = self._ot_trials[trial_id]
            info = json.loads(result["hybridtune"]) if result and "hybridtune" in result else None
            if info is None:  # died before its first evaluation
                family = ot_trial.params.get("family") or next(iter(self.ctx.space.chosen()))
                run = self.root / "trials" / f"trial-{ot_trial.number:04d}"
                info = {"number": ot_trial.number, "family": family, "run_dir": str(run), "evaluations": 0,
                        "seconds": 0.0, "state": "failed"}  # fmt: skip
            state = info.pop("state")
            params = info.pop("params", dict(ot_trial.params))
            if state == "running":  # stopped by ASHA after an evaluation, or its worker died
                state = "failed" if error else "pruned"
            if state == "failed" and "error" not in info:
                info["error"] = f"its Ray worker failed (Ray's logs: {self.root / 'ray'})"
            self.count += 1
            self.durations.append(info["seconds"])
            record(
                self._ot_study,
                ot_trial,
                self.ctx,
                state,
                info,
                f"({self.count}{self.total})",
                self.echo,
                self.root,
            )
            run = Path(info["run_dir"])
            if state != "complete" and run.is_dir():  # the worker was stopped before it wrote these
                rundir.write_json(run / "trial.json", {**info, "state": state, "params": params})

        def save(self, checkpoint_path: str) -> None:
            """Nothing: the study is in the search's journal file, which resume reopens."""

        def restore(self, checkpoint_path: str) -> None:
            """Nothing (see save)."""

    return Search


def run_trials(
    cluster: Cluster, ctx: Context, root: Path, storage, sampler, seconds: float | None, spent: float,
    left: int | None, done: list, echo,
) -> None:  # fmt: skip
    """Up to `left` trials (every one the budget allows when None) on Ray Tune; each ends in the
    study through the searcher."""
    if left == 0:
        return
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from hybridtune.rundir import CACHE_DIR_ENV

    objectives = ctx.space.objectives
    modes = ["max" if d == "maximize" else "min" for d in ctx.space.directions(ctx.metric)]
    single = len(objectives) == 1
    searcher = _searcher_class()(
        ctx, root, None if seconds is None else seconds - spent, done, f"/{len(done) + left}" if left else "",
        echo, space=_define(ctx), metric="metric" if single else objectives,
        mode=modes[0] if single else modes, sampler=sampler, study_name=ctx.space.name, storage=storage,
    )  # fmt: skip
    if single and ctx.space.pruner != "none":
        # rungs at evaluations 1, f, f², ... below `evaluations` (f = reduction_factor, as the local
        # successive halving); a trial that reaches evaluation `evaluations` is not stopped by ASHA
        # (`stop_last_trials`): a trial of the fewest epochs ends there, and ASHA stopping a run at
        # its last validation would lose its final report (the local pruning callback never prunes
        # there); a longer trial runs on unpruned past it
        scheduler = ASHAScheduler(
            time_attr="evaluation", metric="metric", mode=modes[0], max_t=ctx.space.evaluations,
            grace_period=1, reduction_factor=ctx.space.reduction_factor, stop_last_trials=False,
        )  # fmt: skip
    else:
        scheduler = FIFOScheduler()
    run = tune.with_parameters(
        trainable, ctx=ctx, root=str(root), threads=cluster.cpus, cwd=os.getcwd(),
        cache_dir=os.environ.get(CACHE_DIR_ENV),
    )  # fmt: skip
    resources = {"cpu": cluster.cpus} | ({"gpu": cluster.gpus} if cluster.gpus else {})
    gpu = f", {cluster.gpus:g} GPU" if cluster.gpus else ""
    echo(f"ray: {cluster.slots} trial(s) at a time ({cluster.cpus} CPU{gpu} each)")
    tuner = tune.Tuner(
        tune.with_resources(run, resources),
        tune_config=tune.TuneConfig(
            search_alg=searcher, scheduler=scheduler, num_samples=left if left is not None else -1,
            trial_dirname_creator=lambda t: f"trial-{t.trial_id}",
        ),
        run_config=tune.RunConfig(name="ray", storage_path=str(root), verbose=0),
    )  # fmt: skip
    # Ray's newer console output prints its experiment box even at verbose=0; the older one is silent
    # and the per-trial lines come from `record`
    before = os.environ.get("RAY_AIR_NEW_OUTPUT")
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    try:
        tuner.fit()
    finally:
        if before is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = before


def _run_one(fn, job: tuple, threads: int, cwd: str, cache_dir: str | None):
    """One confirmation or verdict run in a Ray worker; what it says goes to the worker's log."""
    _in_worker(threads, cwd, cache_dir)
    return fn(*job, echo=print)


def on_cluster(cluster: Cluster, echo):
    """The verdict's and the confirmation's runs side by side on the cluster, one slot each (the
    trials' `--cpus-per-trial` / `--gpus-per-trial`): `each(fn, jobs)` -> [fn(*job), ...] in the
    order of the jobs (search/confirm.py's `one_by_one` is the local backend's). The first run that
    fails raises its own error here (a bad recipe stays exit 2, a NaN loss exit 3)."""

    def each(fn, jobs: list[tuple]) -> list:
        import ray

        from hybridtune.rundir import CACHE_DIR_ENV

        if not jobs:
            return []
        task = ray.remote(_run_one).options(num_cpus=cluster.cpus, num_gpus=cluster.gpus, max_retries=0)
        names = ", ".join(Path(job[2]).name for job in jobs)
        echo(f"ray: {len(jobs)} run(s), up to {min(cluster.slots, len(jobs))} at a time: {names}")
        cache = os.environ.get(CACHE_DIR_ENV)
        refs = [task.remote(fn, job, cluster.cpus, os.getcwd(), cache) for job in jobs]
        try:
            return ray.get(refs)
        except ray.exceptions.RayTaskError as e:
            # the other runs are not cancelled here: ray.cancel on a task whose reply is arriving
            # aborts this process in Ray 2.60 (task_manager.cc "Tried to complete task that was not
            # pending"; it took down a test worker). The search ends with this error; on a Ray it
            # started, cluster.close() (ray.shutdown) stops them, and a joined cluster stops a job's
            # tasks when its driver exits.
            if isinstance(e.cause, Exception):
                raise e.cause from None
            raise

    return each
