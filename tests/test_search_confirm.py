"""`verdict.confirm` (search/confirm.py): before the verdict, the best trials are retrained with
more seeds on the validation split, and the verdict takes the best by the mean over seeds -- real
runs with the expected seeds and their own validation scores, the choice by the mean (not the
search seed's score), resume without retraining, `confirm: 0` as before."""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest

from hybridtune.recipe import load_recipe
from hybridtune.search import confirm, run_search, verdict
from hybridtune.search.setup import load_space, resolve
from hybridtune.search.study import journal

from .test_search import _space


def _search_space(tmp: Path, tiny_bert: str, data: str) -> Path:
    # no pruning (nor the floor): all 3 trials complete; the verdict retrains the best one, 1 seed
    verdict_cfg = {"top": 1, "seeds": 1, "confirm": 2, "reference": {"train": {"epochs": 1, "lr": 0.005}}}
    return _space(tmp / "space.yaml", tiny_bert, data, pruner="none", verdict=verdict_cfg)


@pytest.fixture(scope="module")
def confirmed(tmp_path_factory, tiny_bert, sentiment_csv) -> Path:
    """3 trials, the 2 best confirmed with seed 1042, the best by the mean retrained by the verdict."""
    tmp = tmp_path_factory.mktemp("search-confirm")
    space = _search_space(tmp, tiny_bert, sentiment_csv)
    return run_search(str(space), [], str(tmp / "out"), trials=3, threads=1, echo=lambda *_: None)


def _evals(run: Path) -> list[float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x)["eval_accuracy"] for x in lines if "eval_accuracy" in x]


def test_confirmation_runs_rescore_the_best_trials_on_validation(confirmed):
    out = json.loads((confirmed / "verdict.json").read_text())
    trials = json.loads((confirmed / "trials.json").read_text())["trials"]
    assert all(t["state"] == "complete" for t in trials) and len(trials) == 3
    best = sorted(trials, key=lambda t: -t["value"])[:2]  # stable: equal scores keep the trial order
    conf = out["confirm"]
    assert conf["seeds"] == [1042]  # the search's seed 42 + 1000: no verdict seed (43)
    assert [c["trial"] for c in conf["trials"]] == [t["number"] for t in best]
    for c, t in zip(conf["trials"], best, strict=True):
        run = confirmed / "confirm" / f"trial-{t['number']:04d}-s1042"
        assert c["seeds"] == [42, 1042] and c["runs"] == [t["run_dir"], str(run)]
        recipe, own = load_recipe(run / "recipe.yaml"), load_recipe(Path(t["run_dir"]) / "recipe.yaml")
        assert recipe.train.seed == 1042 and own.train.seed == 42
        same = {"output": True, "train": {"seed"}}  # the trial's recipe, another seed
        assert recipe.model_dump(exclude=same) == own.model_dump(exclude=same)
        # its value: its own run's best validation score, as a trial's; the test split never read
        report = json.loads((run / "report.json").read_text())
        assert c["values"] == [t["value"], report["best_validation"]]
        assert report["best_validation"] == max(_evals(run)) and len(_evals(run)) == 4
        assert "test" not in report and not (run / "eval.json").exists() and not (run / "final").exists()
        assert c["mean"] == pytest.approx(statistics.fmean(c["values"]))
    # the verdict's recipe: the best mean (equal means: the search's order), marked chosen
    by_mean = sorted(conf["trials"], key=lambda c: -c["mean"])
    assert [c["name"] for c in out["candidates"]] == ["reference", by_mean[0]["name"]]
    assert [c["chosen"] for c in conf["trials"]] == [c is by_mean[0] for c in conf["trials"]]
    html = (confirmed / "report.html").read_text()
    assert 'id="confirm"' in html and f"{100 * by_mean[0]['mean']:.2f}" in html


def test_resume_retrains_only_an_unfinished_confirmation_run(confirmed, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(confirmed, out)
    runs = sorted((out / "confirm").iterdir())
    assert len(runs) == 2
    unfinished, finished = runs
    before = json.loads((unfinished / "report.json").read_text())["best_validation"]
    (unfinished / "report.json").unlink()  # as a killed search leaves it: no report.json yet
    kept = (finished / "report.json").stat().st_mtime_ns
    lines: list[str] = []
    space = confirmed.parent / "space.yaml"
    run_search(str(space), [], str(out), trials=3, threads=1, echo=lines.append)
    trained = [line for line in lines if ": training " in line]
    assert trained == [f"confirm: training {unfinished.name}"], lines  # no verdict run either
    assert (finished / "report.json").stat().st_mtime_ns == kept
    again = json.loads((unfinished / "report.json").read_text())["best_validation"]
    assert again == pytest.approx(before, abs=1e-12)  # the same run, whole again
    assert json.loads((out / "verdict.json").read_text())["confirm"]["seeds"] == [1042]


@pytest.mark.parametrize("k", [0, 2])
def test_the_verdict_takes_the_best_mean_and_confirm_0_the_best_single_seed(
    confirmed, monkeypatch, tmp_path, k
):
    """The trials' real scores, fake confirmation scores that make the search seed's best the worst
    by the mean: `confirm: 2` takes the second, `confirm: 0` the first, as before. Nothing trains."""
    space = load_space(str(confirmed.parent / "space.yaml"), [f"verdict.confirm={k}"])
    ctx = resolve(space, "space.yaml")
    study = optuna.load_study(study_name=None, storage=journal(confirmed))
    first, second, *_ = verdict.ranked(study, ctx)
    target = {first[0].number: 0.1, second[0].number: 0.9}  # the mean each should end with
    values = {t.number: t.values[0] for t, _ in (first, second)}
    scored = []

    def fake_score(raw, seed, run, tracked=None, echo=print):
        number = int(run.name.split("-")[1])
        scored.append((number, seed, run))
        return {"value": 2 * target[number] - values[number]}

    def fake_train(raw, seed, run, tracked=None, echo=print):
        return {"accuracy": 0.5}

    monkeypatch.setattr(confirm, "score", fake_score)
    monkeypatch.setattr(verdict, "_train", fake_train)
    out = verdict.run_verdict(tmp_path, study, ctx, echo=lambda *_: None)
    names = [c["name"] for c in out["candidates"]]
    if k == 0:
        assert names == ["reference", f"trial-{first[0].number:04d}"] and scored == []
        assert "confirm" not in out
        return
    assert names == ["reference", f"trial-{second[0].number:04d}"]
    assert scored == [(n, 1042, tmp_path / "confirm" / f"trial-{n:04d}-s1042") for n in target]
    records = {c["trial"]: c for c in out["confirm"]["trials"]}
    for n, mean in target.items():
        assert records[n]["mean"] == pytest.approx(mean) and records[n]["chosen"] == (n == second[0].number)
    assert json.loads((tmp_path / "verdict.json").read_text())["confirm"] == out["confirm"]


def _fake(number: int, value: float, pct: float):
    trial = SimpleNamespace(number=number, values=[value], user_attrs={"trainable_pct": pct, "family": "x"})
    return trial, SimpleNamespace(model_dump=lambda **_: {"output": None})


def test_which_trials_are_confirmed_and_the_light_pick_by_the_mean(monkeypatch):
    distinct = [_fake(0, 0.90, 100.0), _fake(1, 0.88, 0.5), _fake(2, 0.85, 50.0), _fake(3, 0.84, 0.3), _fake(4, 0.80, 0.2)]  # fmt: skip
    numbers = lambda pairs: [t.number for t, _ in pairs]  # noqa: E731
    assert numbers(confirm.to_confirm(distinct, 2, None)) == [0, 1]
    assert numbers(confirm.to_confirm(distinct, 2, 1.0)) == [0, 1, 3]  # + the 2 best light ones
    assert numbers(confirm.to_confirm(distinct, 1, 1.0)) == [0, 1]
    monkeypatch.setattr(verdict, "ranked", lambda study, ctx: list(distinct))
    ctx = SimpleNamespace(metric="accuracy")

    def picked(top, light, means=None):
        return [c["trial"] for c in verdict.candidates(None, ctx, top, light, means)]

    assert picked(1, 1.0) == [0, 1]  # one seed: trial 1 is the light pick
    assert picked(1, 1.0, {0: 0.86, 1: 0.60, 3: 0.83}) == [0, 3]  # trial 1 collapsed with its 2nd seed
    # a failed confirmation goes last, after the unconfirmed trials in the search's order
    assert picked(5, None, {0: None, 1: 0.60, 3: 0.83}) == [3, 1, 2, 4, 0]
    assert picked(1, 1.0, {0: None, 1: 0.60, 3: 0.83}) == [3]  # light itself
    assert numbers(verdict.by_mean(distinct[:2], {0: 0.3, 1: 0.1}, up=False)) == [1, 0]  # a loss
