"""The verdict: the best few recipes of the search and the reference (full fine-tuning, the default
recipe on the search's data) retrained with N fresh seeds and tested once, on the test split the
search never saw. A few-shot search (search/draws.py): every recipe on every (seed, draw), paired
by (seed, draw).

Seeds: the search's own seed + 1, + 2, ... : the trials all ran with the search's seed, and the best
of them were picked on that seed's validation score, so retraining with it would carry the
selection's luck into the verdict. Each candidate is paired with the reference by seed (same seed:
same data order and head initialisation), so the seed-to-seed noise they share cancels in the
difference; the 95 % interval of the mean paired difference is Student's t with n - 1 degrees of
freedom. Better / worse when the interval excludes zero, else "no difference detectable" (the
statistics: report/stats.py, which `hybridtune compare --reference` uses too).

Which recipes: with `verdict.confirm` (the default) the best trials are first retrained with more
seeds on validation (search/confirm.py) and ranked by the mean over seeds, so that a recipe stable
across seeds wins over one lucky seed; with `confirm: 0`, by the search seed's score alone.
"""

from __future__ import annotations

import copy
import shutil
import statistics
from pathlib import Path

from hybridtune import run as one_run
from hybridtune import rundir
from hybridtune.recipe import load_recipe, recipe_to_yaml
from hybridtune.report.stats import higher_is_better, paired, sentence
from hybridtune.search import draws
from hybridtune.search.confirm import light_enough, one_by_one, run_confirm
from hybridtune.search.setup import Context, finish
from hybridtune.search.tracked import fresh_run, tracker

__all__ = ["paired", "run_verdict"]


def ranked(study, ctx: Context) -> list[tuple]:
    """The complete trials, best first by the search seed's validation score, one (trial, recipe)
    per distinct recipe."""
    done = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    done.sort(key=lambda t: t.values[0], reverse=higher_is_better(ctx.metric))
    distinct, seen = [], set()
    for t in done:
        recipe = load_recipe(Path(t.user_attrs["run_dir"]) / "recipe.yaml")
        key = recipe_to_yaml(recipe.model_copy(update={"output": None, "name": "x"}))
        if key not in seen:
            seen.add(key)
            distinct.append((t, recipe))
    return distinct


def by_mean(distinct: list[tuple], means: dict[int, float | None], up: bool) -> list[tuple]:
    """The confirmed trials first, best mean first (search/confirm.py), then the unconfirmed ones in
    the search's order, then those whose confirmation failed (mean None): a recipe that did not
    train with a fresh seed is the least stable. Equal means keep the search's order."""

    def key(pair):
        mean = means.get(pair[0].number, 0.0)
        group = 2 if mean is None else 0 if pair[0].number in means else 1
        return group, (-mean if up else mean) if group == 0 else 0.0

    return sorted(distinct, key=key)


def candidates(
    study,
    ctx: Context,
    top: int,
    light: float | None = None,
    means: dict[int, float | None] | None = None,
    distinct: list[tuple] | None = None,
) -> list[dict]:
    """The `top` best complete trials by validation metric, one per distinct recipe; with `light`,
    also the best one training at most `light` % of the parameters, when the top ones hold none.
    With `means` (trial number -> mean over seeds, from the confirmation), the confirmed trials are
    ranked by it, ahead of the others (`by_mean`). `distinct`: `ranked(study, ctx)` when the caller
    has it already."""
    distinct = ranked(study, ctx) if distinct is None else distinct
    if means:
        distinct = by_mean(distinct, means, higher_is_better(ctx.metric))
    chosen = distinct[:top]
    if light is not None and top > 0:
        if not any(light_enough(t, light) for t, _ in chosen):
            chosen += [c for c in distinct if light_enough(c[0], light)][:1]
    out = []
    for t, recipe in chosen:
        raw = recipe.model_dump(mode="json", exclude_unset=False)
        raw.pop("output")
        out.append(
            {"name": f"trial-{t.number:04d}", "trial": t.number, "family": t.user_attrs["family"], "raw": raw}
        )
    return out


def reference(ctx: Context) -> dict:
    """The default recipe (full fine-tuning) with the search's base and the verdict's reference keys,
    evaluated as often as the trials."""
    raw = copy.deepcopy(ctx.base)
    for key, value in ctx.space.verdict.reference.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    raw.setdefault("name", "reference")
    return finish(ctx, raw)


def _train(raw: dict, seed: int, target: Path, tracked=None, echo=print) -> dict:
    """One verdict run (resumed: a finished one is kept); its test metrics from its own eval.json.
    `tracked(recipe, run_dir)`: its MLflow callback, in the search's experiment."""
    if not (target / "report.json").is_file():
        recipe, tracking = fresh_run(raw, seed, target, tracked)
        echo(f"verdict: training {target.name}")
        one_run.train(recipe, callbacks=tracking)
        shutil.rmtree(target / "checkpoints", ignore_errors=True)  # the best model is in final/
    return rundir.read_json(target / "eval.json")


def run_verdict(root: Path, study, ctx: Context, echo=print, each=None) -> dict:
    """Confirm, pick, retrain and test; verdict.json. `each(fn, jobs)` runs the confirmation and
    verdict runs: one after the other here (`confirm.one_by_one`), or side by side on the Ray
    cluster of a `--backend ray` search (`ray_tune.on_cluster`)."""
    each = each or one_by_one(echo)
    verdict_cfg = ctx.space.verdict
    seeds = [ctx.seed + 1 + i for i in range(verdict_cfg.seeds)]
    metric = ctx.metric
    up = higher_is_better(metric)
    distinct = ranked(study, ctx)  # every complete trial's recipe.yaml read once
    confirmed = None  # first, before anything of the verdict trains: stable over lucky
    if verdict_cfg.confirm:
        confirmed = run_confirm(root, ctx, distinct, echo, each)
    means = {c["trial"]: c["mean"] for c in confirmed["trials"]} if confirmed else None
    entries = [{"name": "reference", "trial": None, "family": "full (reference)", "raw": reference(ctx)}]
    entries += candidates(study, ctx, verdict_cfg.top, verdict_cfg.light, means, distinct)
    if confirmed:
        picked = {e["trial"] for e in entries}
        for c in confirmed["trials"]:
            c["chosen"] = c["trial"] in picked
    runs = {e["name"]: draws.verdict_runs(e["name"], seeds, e["raw"]) for e in entries}
    for entry in entries:
        entry["runs"] = [str(root / "verdict" / name) for _, _, name in runs[entry["name"]]]
    jobs = [
        (
            draws.on_draw(entry["raw"], d),
            s,
            root / "verdict" / name,
            tracker(ctx, root, {"verdict": entry["name"], "family": entry["family"], "seed": s}),
        )  # fmt: skip
        for entry in entries
        for s, d, name in runs[entry["name"]]
    ]
    results = iter(each(_train, jobs))  # every run's eval.json, in the order of the jobs
    for entry in entries:  # one value per (seed, draw), in the same order for every entry: paired
        entry["values"] = [next(results)[metric] for _ in runs[entry["name"]]]
        entry["mean"] = statistics.fmean(entry["values"])
        entry["sd"] = statistics.stdev(entry["values"]) if len(entry["values"]) > 1 else 0.0
    ref = entries[0]
    sentences = []
    for entry in entries[1:]:
        entry["paired"] = p = paired(entry["values"], ref["values"], up)
        entry["verdict"] = p["verdict"]
        name = f"{entry['name']} ({entry['family']})"
        sentences.append(sentence(name, p, "full fine-tuning", metric, len(seeds), ctx.draws))
    out = {
        "metric": metric,
        "seeds": seeds,
        **({"draws": ctx.draws} if ctx.draws > 1 else {}),
        "candidates": [{k: v for k, v in e.items() if k != "raw"} for e in entries],
        "sentences": sentences,
        **({"confirm": confirmed} if confirmed else {}),
    }
    rundir.write_json(root / "verdict.json", out)
    for s in sentences:
        echo(s)
    return out
