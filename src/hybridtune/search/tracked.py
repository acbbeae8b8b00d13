"""A search's own runs besides a trial's first: their recipe and their MLflow tracking.

Trials (a few-shot trial's draws 1 .. n-1), confirmation and verdict runs are each one `run.train`
of a recipe the search derived (a seed, a draw, a run dir); `fresh_run` builds that recipe and, when
it reports to MLflow, its callback in the search's experiment (`train.report_to: [mlflow]`), tagged
so that `end_tracked` and the report find it. One home for this, below trial.py, confirm.py and
verdict.py, so none of them imports another for it.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

from hybridtune.recipe import validate_recipe
from hybridtune.search.setup import Context


def tracking_target(ctx: Context, root: Path):
    """The search's MLflow store and experiment (named after the search): MLFLOW_TRACKING_URI, else
    `<search dir>/mlruns/mlflow.db` (train/tracking.py)."""
    from hybridtune.train.tracking import target

    return target(root, ctx.space.name)


def mlflow_callback(ctx: Context, root: Path, recipe, run: Path, tags: dict):
    """The MLflow run of one trial (or confirmation or verdict run) of a search with
    `train.report_to: [mlflow]`: in the search's experiment, named as its run dir, the recipe as its
    params, `tags` (+ the search and its dir, which `end_tracked` finds it by)."""
    from hybridtune.train.tracking import MLflowTracking, recipe_params

    tags = {**tags, "search": ctx.space.name, "search_dir": str(Path(root).resolve())}
    return MLflowTracking(tracking_target(ctx, root), run.name, recipe_params(recipe), tags, run)


def tracker(ctx: Context, root: Path, tags: dict):
    """`tracked(recipe, run_dir)` -> the MLflow callback of a run tagged `tags` (for `fresh_run`)."""
    return lambda recipe, run: mlflow_callback(ctx, root, recipe, run, tags)


def end_tracked(ctx: Context, root: Path, number: int, state: str) -> None:
    """Tag a trial's MLflow run with how it ended (complete | pruned | failed | interrupted); a run
    left RUNNING (a Ray worker stopped by ASHA, a killed search) is ended too."""
    from hybridtune.train.tracking import tag_runs

    where = {"trial": number, "search_dir": str(Path(root).resolve())}
    tag_runs(tracking_target(ctx, root), where, state)


def fresh_run(raw: dict, seed: int, target: Path, tracked=None) -> tuple:
    """A search run's recipe: `raw` with `seed`, into `target` (an unfinished run of ours there is
    removed: it starts over), and its MLflow callbacks (`tracked(recipe, run_dir)`, when the recipe
    reports to mlflow)."""
    shutil.rmtree(target, ignore_errors=True)
    run = copy.deepcopy(raw)
    run.setdefault("train", {})["seed"] = seed
    run["output"] = {"dir": str(target.parent), "name": target.name}
    recipe = validate_recipe(run, str(target))
    return recipe, [tracked(recipe, target)] if tracked and "mlflow" in recipe.train.report_to else []
