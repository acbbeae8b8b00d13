"""One trial, in this process: the trial's recipe through the one-run pipeline (`run.train` with
`search_trial=True`: validation only, no checkpoints, no final/), with a pruning callback.

Trials run one after the other in the search's own long-lived process, so the interpreter, torch,
transformers and the tokenized splits (data/token_cache.py keeps them in the process; on disk under
HYBRIDTUNE_CACHE_DIR) are loaded once, and the frozen-trunk caches of equal frozen depths are shared
through the same dir (train/trunk_store.py). Each trial's run dir `<search>/trials/trial-NNNN/` is an
ordinary run dir (recipe.yaml, run.json, params.json, metrics.jsonl, tensorboard/, report.json) plus
`trial.json`: its state (complete | pruned | failed), values and what it cost. With
`train.report_to: [mlflow]` in the base, each trial is an MLflow run in the search's store and an
experiment named after the search, tagged with its number, family and state.
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path
from typing import Any

import optuna
from transformers import TrainerCallback

from hybridtune import rundir
from hybridtune.errors import TrainingStopped, UserError
from hybridtune.search import draws
from hybridtune.search.setup import LENGTH, Context, finish, planned_validations, sample_trial
from hybridtune.search.space import recipe_dict
from hybridtune.search.tracked import end_tracked, fresh_run, mlflow_callback, tracker
from hybridtune.train.checkpoints import maybe_kill


class PruningCallback(TrainerCallback):
    """Reports the validation metric to Optuna after each evaluation (the step is the evaluation's
    number: the rungs of successive halving / Hyperband, Li et al. 2018); when the pruner says so,
    training stops at once, cleanly (Trainer's own stop: callbacks end, the event file closes), and
    `trial.py` marks the trial pruned. A multi-objective study cannot prune (Optuna has no
    intermediate values for several objectives): there it only counts. `on_evaluation(value, n)`,
    when given, hears each evaluation too (the Ray backend reports it to Ray Tune's scheduler).
    `floor`: the constant answer's score (search/setup.py); from the second evaluation on, a trial no
    better than it stops whatever the pruner says, and `why` says so. The run's last evaluation never
    stops it: the run has ended (a one-hour search lost 5 of 27 trials two steps before their end)."""

    def __init__(
        self, trial: optuna.Trial, metric: str, prune: bool, on_evaluation=None, floor: float | None = None
    ):
        self.trial, self.key, self.prune = trial, f"eval_{metric}", prune
        self.evaluations, self.pruned, self.curve = 0, False, []
        self.on_evaluation = on_evaluation
        self.metric, self.floor, self.why = metric, floor, None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 2:
            maybe_kill("trial", self.trial.number)  # the test hook: SIGKILL in the middle of trial N

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if not metrics or self.key not in metrics:
            return
        self.evaluations += 1
        value = float(metrics[self.key])
        self.curve.append((state.global_step, value))
        if self.on_evaluation is not None:
            self.on_evaluation(value, self.evaluations)
        if not self.prune:
            return
        self.trial.report(value, self.evaluations)
        if state.global_step >= state.max_steps:
            return  # the run's last evaluation: stopping now saves nothing and would throw the run away
        # at chance: no better than the constant answer
        at_chance = self.floor is not None and value <= self.floor + 1e-9
        if at_chance and self.evaluations >= 2:
            self.why = (
                f"stopped at evaluation {self.evaluations}: validation {self.metric} {value:.4f} is no "
                f"better than always answering the most frequent label ({self.floor:.4f})"
            )
        # should_prune() first, always: it records this rung's value for the trials after this one.
        # A first evaluation at chance is no evidence either way, for the rungs as for the floor: the
        # trial has not started to learn yet (warm-up, a staged run's head), and a rung would rank it
        # against others at chance on one or two texts. So no rung stops it there; the floor judges it
        # from its second evaluation on, the rungs from their next rung (in a search on 2,000 IMDB
        # reviews, the full fine-tuning that ended at 82.4 % was at chance at its first, as were the 14
        # of 26 trials the rungs stopped there; docs/search.md).
        unjudged = at_chance and self.evaluations == 1
        if self.why or (self.trial.should_prune() and not unjudged):
            self.pruned = True
            control.should_training_stop = True


def trial_recipe(ctx: Context, trial: Any, out: Path):
    """The trial's recipe (validated) and its family; written to run as is by `hybridtune train`."""
    from hybridtune.recipe import validate_recipe

    family, values, shared = sample_trial(ctx, trial)
    raw = finish(ctx, recipe_dict(ctx.base, family, values, shared, ctx.blocks, ctx.linear))
    raw["name"] = f"{family}"
    raw.setdefault("output", {}).update({"dir": str(out / "trials"), "name": f"trial-{trial.number:04d}"})
    return validate_recipe(raw, f"trial {trial.number}"), family


def peak_memory_start() -> None:
    """Reset the peak memory: CUDA's allocator statistics, or Linux's peak RSS (VmHWM) of this
    process, which writing 5 to /proc/self/clear_refs resets (proc(5))."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # not Linux: the peak since the process began


def peak_memory_mib() -> float | None:
    import resource

    import torch

    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def objective_values(ctx: Context, info: dict) -> list[float]:
    table = {
        "metric": info.get("value"),
        "params": info.get("trainable"),
        "time": info.get("train_seconds"),
        "memory": info.get("peak_memory_mib"),
    }
    return [float(table[o]) if table[o] is not None else math.nan for o in ctx.space.objectives]


def run_trial(ctx: Context, trial: optuna.Trial, out: Path, on_evaluation=None) -> tuple[str, dict]:
    """Train one trial; returns (state, info) with state complete | pruned | failed. The caller
    tells Optuna. A trial whose recipe the model cannot take (a UserError from prepare) or whose loss
    turned NaN fails alone; the search goes on. `on_evaluation(value, n, info)` hears each
    evaluation with what is known of the trial so far."""
    from hybridtune import run as one_run

    started = time.perf_counter()
    try:
        recipe, family = trial_recipe(ctx, trial, out)
    except UserError as e:  # a refusal no check before the draw foresaw (search/setup.py's `refusal`)
        info = {"number": trial.number, "family": trial.params.get("family", "?"), "error": str(e)}
        return "failed", info | {"state": "failed", "evaluations": 0, "curve": [], "seconds": 0.0}
    run = Path(recipe.output.dir) / recipe.output.name
    info: dict[str, Any] = {"number": trial.number, "family": family, "run_dir": str(run)}
    info[LENGTH] = planned_validations(recipe, ctx.n_train)
    trial.set_user_attr(LENGTH, info[LENGTH])  # before the first rung: study.py's SameLength reads it
    multi = len(ctx.space.objectives) > 1
    hook = None
    if on_evaluation is not None:

        def hook(value: float, n: int) -> None:
            so_far = {"evaluations": n, "curve": callback.curve, "seconds": time.perf_counter() - started}
            on_evaluation(value, n, info | so_far)

    callback = PruningCallback(
        trial, ctx.metric, prune=not multi and ctx.space.pruner != "none", on_evaluation=hook, floor=ctx.floor
    )
    callbacks = [callback]
    if "mlflow" in recipe.train.report_to:
        callbacks.append(mlflow_callback(ctx, out, recipe, run, {"trial": trial.number, "family": family}))
    peak_memory_start()
    try:
        summary = one_run.train(recipe, callbacks=callbacks, search_trial=True)
    except (UserError, TrainingStopped) as e:
        state, info["error"] = "failed", str(e)
    else:
        state = "pruned" if callback.pruned else "complete"
        if callback.why:
            info["error"] = callback.why  # the trials table's note: why it stopped
        info |= {
            "value": summary["best_validation"],
            "trainable": summary["trainable"],
            "trainable_pct": summary["trainable_pct"],
            "train_seconds": summary["train_seconds"],
            "steps": summary["steps"],
            "epochs": summary["epochs"],
        }
        if state == "complete" and ctx.draws > 1:
            rungs = trial if ctx.space.draw_rungs and not multi and isinstance(trial, optuna.Trial) else None
            state = other_draws(ctx, recipe, run, info, out, trial.number, family, rungs)
    info |= {
        "state": state,
        "evaluations": callback.evaluations,
        "curve": callback.curve,
        "peak_memory_mib": peak_memory_mib(),
        "seconds": round(time.perf_counter() - started, 2),
    }
    if run.is_dir():  # a recipe refused by prepare never made its run dir
        shutil.rmtree(run / "checkpoints", ignore_errors=True)  # Trainer's output dir: nothing saved there
        rundir.write_json(run / "trial.json", {**info, "params": trial.params})
    return state, info


def other_draws(
    ctx: Context, recipe, run: Path, info: dict, out: Path, number: int, family: str, rungs=None
) -> str:
    """A few-shot trial that completed draw 0 trains draws 1 .. n-1 (search/draws.py); `info` gets
    their best validation scores (`draw_values`) and their mean as the trial's value. With `rungs`
    (the Optuna trial, `draw_rungs: true`) a rung between draws may stop it (`draw_rung`): pruned.
    Returns the trial's state: failed when a draw failed (its error in `info`)."""
    from hybridtune import run as one_run

    values, seconds, state = [info["value"]], info["train_seconds"], "complete"
    raw = recipe.model_dump(mode="json", exclude_unset=False)
    for d in range(1, ctx.draws):
        why = draw_rung(ctx, rungs, values) if rungs is not None else None
        if why:
            info["error"], state = why, "pruned"
            break
        target = draws.run_dir(run, d)
        tags = {"trial": number, "family": family, "draw": d}
        drawn, callbacks = fresh_run(
            draws.on_draw(raw, d), recipe.train.seed, target, tracker(ctx, out, tags)
        )
        try:
            summary = one_run.train(drawn, callbacks=callbacks, search_trial=True)
        except (UserError, TrainingStopped) as e:
            info["error"] = f"draw {d}: {e}"
            return "failed"
        finally:
            shutil.rmtree(target / "checkpoints", ignore_errors=True)
        values.append(summary["best_validation"])
        seconds += summary["train_seconds"]
    if state == "complete" and rungs is not None:
        draw_rung(ctx, rungs, values)  # the trial's means after every draw, for the trials after it
    info |= {"draw_values": values, "value": sum(values) / len(values), "train_seconds": round(seconds, 2)}
    return state


DRAW_MEANS = "draw_means"  # a trial's user attribute: its mean validation score after 1, 2, ... draws


def draw_rung(ctx: Context, trial: optuna.Trial, values: list[float]) -> str | None:
    """After len(values) draws: the trial's means after 1 .. len(values) draws are recorded
    (`draw_means`); at a rung — 1, f, f², ... draws (f = reduction_factor), before the last draw —
    why the trial stops, or None.
    Successive halving's rule, as Optuna's SuccessiveHalvingPruner applies it at a rung within a run:
    among the means of every trial that reached this many draws, this one's included, it goes on when
    among the best len // f (the best one while fewer than f have)."""
    k, f = len(values), ctx.space.reduction_factor
    means = [sum(values[:i]) / i for i in range(1, k + 1)]
    trial.set_user_attr(DRAW_MEANS, means)
    if k >= ctx.draws or f ** round(math.log(k, f)) != k:
        return None
    others = [
        t.user_attrs[DRAW_MEANS][k - 1]
        for t in trial.study.get_trials(deepcopy=False)
        if t.number != trial.number and len(t.user_attrs.get(DRAW_MEANS, [])) >= k
    ]
    maximize = ctx.space.directions(ctx.metric)[0] == "maximize"
    competing = sorted([*others, means[-1]], reverse=maximize)
    bar = competing[max(len(competing) // f, 1) - 1]
    if (means[-1] >= bar) if maximize else (means[-1] <= bar):
        return None
    return (
        f"stopped after {k} of {ctx.draws} draws: mean validation {ctx.metric} {means[-1]:.4f}, not among "
        f"the best 1/{f} of {len(competing)} trials after as many draws (needed {bar:.4f}; draw_rungs)"
    )


def record(study, trial, ctx: Context, state: str, info: dict, count: str, echo, root: Path) -> None:
    """Tell the study how a trial ended (its info as user attributes: the trials table reads them),
    tag its MLflow run with it (`train.report_to: [mlflow]`) and say it in one line; both backends
    end their trials here."""
    from optuna.trial import TrialState

    if "mlflow" in ctx.report_to:
        end_tracked(ctx, root, trial.number, state)
    for key in info:
        if key not in ("number", "state"):
            trial.set_user_attr(key, info[key])
    values = objective_values(ctx, info)
    head = f"trial {trial.number} {count} {info['family']}"
    if state == "complete" and not any(math.isnan(v) for v in values):
        study.tell(trial, values)
        over = f" (mean of {len(info['draw_values'])} draws)" if "draw_values" in info else ""
        echo(
            f"{head}: validation {ctx.metric} {info['value']:.4f}{over} after {info['evaluations']} evaluations, {info['seconds']:.1f} s"
        )
    elif state == "pruned":
        study.tell(trial, state=TrialState.PRUNED)
        n = len(info.get("draw_values", []))  # stopped at a rung between draws (draw_rungs)
        at = f"after {n} draw{'s' * (n > 1)}" if n else f"at evaluation {info['evaluations']}"
        echo(f"{head}: pruned {at}, {info['seconds']:.1f} s")
    else:
        study.tell(trial, state=TrialState.FAIL)
        echo(f"{head}: failed ({info.get('error', 'no value')})")
