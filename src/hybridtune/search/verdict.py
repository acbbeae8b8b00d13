"""The verdict: the best few recipes of the search and the reference (full fine-tuning, the default
recipe on the search's data) retrained with N fresh seeds and tested once, on the test split the
search never saw.

Seeds: the search's own seed + 1, + 2, ... : the trials all ran with the search's seed, and the best
of them were picked on that seed's validation score, so retraining with it would carry the
selection's luck into the verdict. Each candidate is paired with the reference by seed (same seed:
same data order and head initialisation), so the seed-to-seed noise they share cancels in the
difference; the 95 % interval of the mean paired difference is Student's t with n - 1 degrees of
freedom. Better / worse when the interval excludes zero, else "no difference detectable" (the
statistics: report/stats.py, which `hybridtune compare --reference` uses too).
"""

from __future__ import annotations

import copy
import shutil
import statistics
from pathlib import Path

from hybridtune import run as one_run
from hybridtune import rundir
from hybridtune.recipe import load_recipe, recipe_to_yaml, validate_recipe
from hybridtune.report.stats import higher_is_better, paired, sentence
from hybridtune.search.setup import Context, finish

__all__ = ["paired", "run_verdict"]


def candidates(study, ctx: Context, top: int, light: float | None = None) -> list[dict]:
    """The `top` best complete trials by validation metric, one per distinct recipe; with `light`,
    also the best one training at most `light` % of the parameters, when the top ones hold none."""
    done = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    done.sort(key=lambda t: t.values[0], reverse=higher_is_better(ctx.metric))
    distinct, seen = [], set()
    for t in done:
        recipe = load_recipe(Path(t.user_attrs["run_dir"]) / "recipe.yaml")
        key = recipe_to_yaml(recipe.model_copy(update={"output": None, "name": "x"}))
        if key not in seen:
            seen.add(key)
            distinct.append((t, recipe))
    chosen = distinct[:top]
    if light is not None and top > 0:

        def is_light(pair):
            return pair[0].user_attrs.get("trainable_pct", 100.0) <= light

        if not any(is_light(c) for c in chosen):
            chosen += [c for c in distinct if is_light(c)][:1]
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


def _train(raw: dict, seed: int, target: Path, echo, tracked=None) -> dict:
    """One verdict run (resumed: a finished one is kept); its test metrics from its own eval.json.
    `tracked(recipe, run_dir)`: its MLflow callback, in the search's experiment."""
    if not (target / "report.json").is_file():
        shutil.rmtree(target, ignore_errors=True)  # an unfinished run of ours: start it over
        run = copy.deepcopy(raw)
        run.setdefault("train", {})["seed"] = seed
        run["output"] = {"dir": str(target.parent), "name": target.name}
        echo(f"verdict: training {target.name}")
        recipe = validate_recipe(run, str(target))
        tracking = [tracked(recipe, target)] if tracked and "mlflow" in recipe.train.report_to else []
        one_run.train(recipe, callbacks=tracking)
        shutil.rmtree(target / "checkpoints", ignore_errors=True)  # the best model is in final/
    return rundir.read_json(target / "eval.json")


def _tracked(root: Path, ctx: Context, entry: dict, seed: int):
    from hybridtune.search.trial import mlflow_callback

    tags = {"verdict": entry["name"], "family": entry["family"], "seed": seed}
    return lambda recipe, run: mlflow_callback(ctx, root, recipe, run, tags)


def run_verdict(root: Path, study, ctx: Context, echo=print) -> dict:
    verdict_cfg = ctx.space.verdict
    seeds = [ctx.seed + 1 + i for i in range(verdict_cfg.seeds)]
    metric = ctx.metric
    up = higher_is_better(metric)
    entries = [{"name": "reference", "trial": None, "family": "full (reference)", "raw": reference(ctx)}]
    entries += candidates(study, ctx, verdict_cfg.top, verdict_cfg.light)
    for entry in entries:
        runs = [root / "verdict" / f"{entry['name']}-s{seed}" for seed in seeds]
        entry["runs"] = [str(r) for r in runs]
        entry["values"] = [
            _train(entry["raw"], s, r, echo, _tracked(root, ctx, entry, s))[metric]
            for s, r in zip(seeds, runs, strict=True)
        ]
        entry["mean"] = statistics.fmean(entry["values"])
        entry["sd"] = statistics.stdev(entry["values"]) if len(seeds) > 1 else 0.0
    ref = entries[0]
    sentences = []
    for entry in entries[1:]:
        entry["paired"] = p = paired(entry["values"], ref["values"], up)
        entry["verdict"] = p["verdict"]
        name = f"{entry['name']} ({entry['family']})"
        sentences.append(sentence(name, p, "full fine-tuning", metric, len(seeds)))
    out = {
        "metric": metric,
        "seeds": seeds,
        "candidates": [{k: v for k, v in e.items() if k != "raw"} for e in entries],
        "sentences": sentences,
    }
    rundir.write_json(root / "verdict.json", out)
    for s in sentences:
        echo(s)
    return out
