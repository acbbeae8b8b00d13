"""Confirmation before the verdict: the best trials retrained with more seeds and scored on the
validation split, so that the verdict retrains the recipes that hold up across seeds, not one lucky
seed's winner.

Why: every trial runs with the search's seed and is ranked on that seed's validation score. In the
one-hour search of docs/search.md the best trial (LoRA r 4 at lr 1.6e-3, the edge of stability)
scored 84.88 % there, and retrained by the verdict with seeds 43, 44, 45 it stayed at chance with one
of them (49.94 %).

Which trials (`to_confirm`): the `verdict.confirm` (K) best complete trials by the search seed's
score, one per distinct recipe, and with `verdict.light` also the K best of those training at most
that % of the parameters, so the light pick is confirmed too. Each is retrained with
`verdict.confirm_seeds` (M) seeds, the search's seed + 1000, + 1001, ...: neither the search's seed
nor a verdict seed (+ 1 ... + N, for N < 1000). A confirmation run is a trial's run
(`search_trial=True`: no checkpoints, no final/, no test pass -- the search never looks at the test
split to choose), and its score is the trial's own measure: the run's best validation metric
(report.json's `best_validation`). A trial's score is then the mean of its own value and its
confirmation values; a confirmation run that fails (a NaN loss) gives none, and its trial goes after
every other (verdict.candidates).

Resume, as the verdict: a run with its report.json is kept, a failed one (failed.json) too; one a
killed search left without either starts over. Runs: `<search>/confirm/trial-NNNN-s<seed>/`.
"""

from __future__ import annotations

import shutil
import statistics
from pathlib import Path

from hybridtune import run as one_run
from hybridtune import rundir
from hybridtune.errors import TrainingStopped, UserError
from hybridtune.search import draws
from hybridtune.search.setup import Context
from hybridtune.search.tracked import fresh_run, tracker

SEED_OFFSET = 1000  # above any verdict seed (the search's seed + 1 ... + N)


def seeds(ctx: Context, n: int) -> list[int]:
    return [ctx.seed + SEED_OFFSET + i for i in range(n)]


def light_enough(trial, light: float) -> bool:
    return trial.user_attrs.get("trainable_pct", 100.0) <= light


def to_confirm(distinct: list[tuple], k: int, light: float | None) -> list[tuple]:
    """The (trial, recipe) pairs to confirm, in the search's order (`distinct`: best first): the `k`
    best, and with `light` the `k` best that train at most `light` % of the parameters."""
    chosen = distinct[:k]
    if light is not None:
        chosen = chosen + [d for d in distinct if light_enough(d[0], light)][:k]
    numbers = {t.number for t, _ in chosen}
    return [d for d in distinct if d[0].number in numbers]


def score(raw: dict, seed: int, target: Path, tracked=None, echo=print) -> dict:
    """One confirmation run (resumed: a finished or failed one is kept): {"value"} -- its best
    validation metric -- or {"value": None, "error"}. `tracked(recipe, run_dir)`: its MLflow callback.
    A few-shot recipe is scored on each of its draws, draw d > 0 beneath `target` (search/draws.py):
    the value is their mean, and a failed draw fails the run."""
    results = [
        _score_one(draws.on_draw(raw, d), seed, draws.run_dir(target, d), tracked, echo, draw=d)
        for d in draws.scored(raw)
    ]
    failed = [r for r in results if r["value"] is None]
    if failed:
        return failed[0]
    return {"value": statistics.fmean(r["value"] for r in results)}


def _score_one(raw: dict, seed: int, target: Path, tracked=None, echo=print, draw: int | None = None) -> dict:
    report, failed = target / "report.json", target / rundir.FAILED
    error = None
    if not report.is_file() and not failed.is_file():
        recipe, tracking = fresh_run(raw, seed, target, tracked)
        name = target.name if not draw else f"{target.parent.parent.name}, draw {draw}"  # <run>/draws/d<i>
        echo(f"confirm: training {name}")
        try:
            one_run.train(recipe, callbacks=tracking, search_trial=True)
        except (UserError, TrainingStopped) as e:  # as a trial's: this recipe failed, the search goes on
            error = str(e)
        shutil.rmtree(target / "checkpoints", ignore_errors=True)  # Trainer's output dir: nothing saved
    if report.is_file():
        value = rundir.read_json(report).get("best_validation")
        return {"value": value} if value is not None else {"value": None, "error": "no validation score"}
    if failed.is_file():
        error = rundir.read_json(failed).get("error", error)
    return {"value": None, "error": error or "failed"}


def one_by_one(echo):
    """Run a list of jobs here, one after the other: `each(fn, jobs)` -> [fn(*job, echo=echo), ...]
    (the local backend's; the Ray backend's runs them side by side on the cluster: search/ray_tune.py)."""
    return lambda fn, jobs: [fn(*job, echo=echo) for job in jobs]


def run_confirm(root: Path, ctx: Context, distinct: list[tuple], echo=print, each=None) -> dict:
    """Confirm the trials `to_confirm` picks from `distinct` (the complete trials, one per distinct
    recipe, best first on the search's seed); per trial its seeds (the search's first), values, runs
    and mean (None when a run failed). `each(fn, jobs)` runs the confirmation runs (`one_by_one`
    by default)."""
    cfg = ctx.space.verdict
    extra = seeds(ctx, cfg.confirm_seeds)
    out = {"seeds": extra, "trials": []}
    picked = []  # (trial, raw recipe, name, family, its confirmation run dirs)
    for t, recipe in to_confirm(distinct, cfg.confirm, cfg.light):
        name, family = f"trial-{t.number:04d}", t.user_attrs["family"]
        raw = recipe.model_dump(mode="json", exclude_unset=False)
        raw.pop("output")
        picked.append((t, raw, name, family, [root / "confirm" / f"{name}-s{s}" for s in extra]))
    jobs = [
        (raw, s, r, tracker(ctx, root, {"confirm": name, "family": family, "seed": s}))
        for _, raw, name, family, runs in picked
        for s, r in zip(extra, runs, strict=True)
    ]
    results = iter((each or one_by_one(echo))(score, jobs))
    for t, _, name, family, runs in picked:
        mine = [next(results) for _ in runs]
        values = [t.values[0], *(r["value"] for r in mine)]
        errors = [r["error"] for r in mine if "error" in r]
        record = {
            "name": name,
            "trial": t.number,
            "family": family,
            "trainable_pct": t.user_attrs.get("trainable_pct"),
            "seeds": [ctx.seed, *extra],
            "values": values,
            "runs": [t.user_attrs["run_dir"], *map(str, runs)],
            "mean": None if errors else statistics.fmean(values),
        }
        if errors:
            record["error"] = errors[0]
        out["trials"].append(record)
        shown = ", ".join("failed" if v is None else f"{v:.4f}" for v in values)
        mean = "a run failed" if errors else f"mean {record['mean']:.4f}"
        echo(f"confirm: {name} ({family}): validation {ctx.metric} {shown}: {mean}")
    return out
