"""The search's pure parts, without a search: the default space's conditional sampling, the Pareto
set, the verdict's paired interval and words, the report's validation note and plot labels."""

from __future__ import annotations

import optuna
import pytest

from hybridtune.recipe import validate_recipe
from hybridtune.search.report import non_dominated, validation_note
from hybridtune.search.space import FAMILIES, Space, recipe_dict
from hybridtune.search.verdict import paired


def test_the_validation_note():
    assert validation_note(500, "accuracy") == (
        " The validation split has 500 texts: between two recipes that disagree on a tenth of them,"
        " about 1.4 pt (one standard error) is the draw of the texts alone."
    )
    assert validation_note(853, "accuracy").count("about 1.1 pt") == 1
    assert validation_note(300, "f1") == " The validation split has 300 texts."  # no accuracy, no formula
    assert validation_note(0, "accuracy") == ""


def test_non_dominated_by_hand():
    points = [(0.8, 10), (0.8, 10), (0.9, 20), (0.7, 5), (0.7, 30), (0.85, 10)]
    # (0.8, 10) twice: both dominated by (0.85, 10); (0.7, 30) by everything with fewer params
    assert non_dominated(points, [True, False]) == [2, 3, 5]


def test_paired_interval_and_words():
    from scipy import stats

    out = paired([0.80, 0.82, 0.84], [0.78, 0.79, 0.80])
    diffs = [0.02, 0.03, 0.04]
    half = stats.t.ppf(0.975, 2) * 0.01 / 3**0.5
    assert out["mean"] == pytest.approx(0.03) and out["low"] == pytest.approx(0.03 - half)
    assert out["diffs"] == pytest.approx(diffs) and out["verdict"] == "better"
    assert paired([0.7, 0.7, 0.7], [0.8, 0.81, 0.79])["verdict"] == "worse"
    assert paired([0.8, 0.7, 0.9], [0.8, 0.8, 0.8])["verdict"] == "no difference detectable"
    assert paired([0.5, 0.5, 0.5], [0.7, 0.72, 0.71], higher_is_better=False)["verdict"] == "better"  # a loss


def test_every_family_samples_a_valid_conditional_recipe():
    from hybridtune import strategy
    from hybridtune.model.facts import ModelFacts
    from hybridtune.search.setup import Context, finish, sample_trial

    space = Space()  # the default space: every family and every part declaring `search`
    linear = ("attention.self.query", "attention.self.value", "intermediate.dense", "output.dense")
    facts = ModelFacts(
        blocks=6, linear=linear, dropout=0.1, head_linear=("bert.pooler.dense",)
    )  # MiniLM-like
    ctx = Context(space, "default space", {}, "classification", "accuracy", facts, 1000, 42, False)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen, parts = set(), set()
    wanted = {("full", "layer_sampling"), ("full", "mixout")}
    # at least 60 random draws, then on until every family and the wanted parts have come up (the cap
    # only bounds the loop): the test does not depend on one seed's exact draw order
    for i in range(400):
        if i >= 60 and seen == set(FAMILIES) and wanted <= parts:
            break
        trial = study.ask()
        family, values, shared = sample_trial(ctx, trial)
        seen.add(family)
        parts |= {(family, key) for key in shared["parts"]}
        # a family's settings exist only in its own trials (a part's: `parts.<key>.*`)
        assert {k.split(".")[0] for k in trial.params if "." in k and not k.startswith("parts.")} == {family}
        # every trial's recipe passes the checks the run makes before it trains: no part its family
        # (layer sampling with staged) or the model refuses is drawn
        recipe = validate_recipe(finish(ctx, recipe_dict({}, family, values, shared, 6, list(linear))))
        strategy.model_check(recipe, facts)
        study.tell(trial, 0.5)
    assert seen == set(FAMILIES)
    assert wanted <= parts and ("staged", "layer_sampling") not in parts
    assert not {("lora", "mixout"), ("adapters", "mixout")} & parts


def test_plot_labels_never_overlap():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hybridtune.report.labels import boxes_overlap, place_labels

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [1, 1.02, 1.04, 1.06, 2, 2.01, 3, 3, 3]
    ys = [0.5, 0.51, 0.5, 0.52, 0.7, 0.7, 0.9, 0.9, 0.91]
    ax.scatter(xs, ys)
    fig.tight_layout()
    left = place_labels(ax, xs, ys, [f"#{i} a long label" for i in range(len(xs))])
    assert boxes_overlap(ax) == []
    assert len(ax.texts) + len(left) == len(xs)
    plt.close(fig)
