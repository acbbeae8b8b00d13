"""Every recipe `hybridtune search` can draw on its default space (every family, every part that
declares `search`) runs again from its trial's run dir: the verdict, and the confirmation before it,
read each trial's recipe.yaml back and retrain it (search/verdict.py's `ranked` and `candidates`,
search/confirm.py's `fresh_run`). A real search's verdict once crashed there: an FGM trial's
recipe.yaml, which writes every default, PGD-only keys included, was refused as if they were given.

The trials are drawn as the search draws them (`trial_recipe`, which a Ray worker's `run_trial` calls
too: the family, its settings, the parts each trial's recipe can take) by an Optuna RandomSampler with a fixed seed, and told to the
study as a search tells them (`record`); nothing trains."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import optuna
import torch
import yaml

from hybridtune import strategy
from hybridtune.recipe import recipe_to_yaml
from hybridtune.search.families import FAMILIES
from hybridtune.search.study import prepare
from hybridtune.search.tracked import fresh_run
from hybridtune.search.trial import record, trial_recipe
from hybridtune.search.verdict import candidates, ranked
from hybridtune.train import run_files

N = 120  # seed 0 of the RandomSampler draws every choice asserted below by trial 106
SEED = 43  # the verdict's first seed (the search's 42 + 1)


def _drawable(ctx) -> dict[str, list]:
    """Each Optuna parameter the space can draw -> its choices (a range: [])."""
    out: dict[str, list] = {"family": list(ctx.space.chosen())}
    named = [(f"{family}.{k}", p) for family, s in ctx.space.chosen().items() for k, p in dict(s).items()]
    named += list(dict(ctx.space.train).items())
    named += [
        (f"parts.{key}.{path}", p) for key, params in ctx.space.parts.items() for path, p in params.items()
    ]
    for name, p in named:
        if p.choices is None:
            out[name] = []
        elif len(p.choices) > 1:  # a fixed value is no parameter
            out[name] = list(p.choices)
    return out


def _without_output(recipe) -> dict:
    dump = yaml.safe_load(recipe_to_yaml(recipe))
    dump.pop("output")
    return dump


def test_every_trial_of_the_default_space_runs_again_from_its_recipe_yaml(
    tiny_bert6, sentiment_csv, tmp_path
):
    # `hybridtune search --set base.model=... --set base.data.source=...`: no space file; six blocks,
    # so no default part is left out (LISA's smallest gamma draws one block of them)
    overrides = [f"base.model={tiny_bert6}", f"base.data.source={sentiment_csv}"]
    ctx, root, *_ = prepare(None, overrides, str(tmp_path / "search"), None, None)
    assert set(ctx.space.chosen()) == set(FAMILIES) and ctx.left_out == {}
    assert set(ctx.space.parts) == {k for k, p in strategy.PARTS.items() if p.search is not None}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    labels = SimpleNamespace(names=["negative", "positive"], values=["negative", "positive"])
    written, drawn = {}, {}
    for _ in range(N):
        trial = study.ask()
        recipe, family = trial_recipe(ctx, trial, root)  # validated, as the trial runs it
        strategy.model_check(recipe, ctx.facts)
        run = Path(recipe.output.dir) / recipe.output.name
        run.mkdir(parents=True)
        # recipe.yaml as a run dir holds it (run.json and params.json beside: a stand-in model's)
        run_files.begin(run, recipe, labels, torch.nn.Linear(1, 1), {})
        written[trial.number] = (run / "recipe.yaml").read_text()
        for name, value in trial.params.items():
            drawn.setdefault(name, set()).add(value)
        for key in ctx.space.parts:  # the part drawn on is in the recipe; off, absent
            assert (getattr(recipe, key) is not None) == trial.params.get(f"parts.{key}.use", False)
        info = {"number": trial.number, "family": family, "run_dir": str(run), "value": trial.number / N,
                "trainable_pct": 100.0, "evaluations": 1, "curve": [], "seconds": 0.0}  # fmt: skip
        record(study, trial, ctx, "complete", info, "", lambda *_: None, root)

    # every family, every part on and off, each choice of each setting drawn at least once
    for name, choices in _drawable(ctx).items():
        assert name in drawn, f"{name} never drawn in {N} trials"
        assert set(choices) <= drawn[name], f"{name}: {set(choices) - drawn[name]} never drawn"
    assert drawn["family"] == set(FAMILIES)
    # the crash's case among them: FGM trials, their recipe.yaml holding PGD's alpha and steps (defaults)
    fgm = [r["adversarial"] for r in map(yaml.safe_load, written.values()) if r["adversarial"] is not None]
    assert fgm and all(a["method"] == "fgm" and "alpha" in a and "steps" in a for a in fgm)

    distinct = ranked(study, ctx)  # the verdict reads every complete trial's recipe.yaml back
    assert len(distinct) == N
    for t, reloaded in distinct:
        assert recipe_to_yaml(reloaded) == written[t.number]  # dumped again: the same file
        strategy.model_check(reloaded, ctx.facts)
    # what the confirmation and the verdict retrain: the reloaded recipe with a seed of theirs
    for entry in candidates(study, ctx, N, distinct=distinct):
        again, _ = fresh_run(entry["raw"], SEED, tmp_path / "verdict" / f"{entry['name']}-s{SEED}")
        strategy.model_check(again, ctx.facts)
        saved = yaml.safe_load(written[entry["trial"]])
        saved.pop("output")
        saved["train"]["seed"] = SEED
        assert _without_output(again) == saved
