"""A few-shot search (search/draws.py): a base with `data.shots` and `data.draws` scores each trial on
every draw (its value the mean), confirms on every draw, and the verdict pairs candidate and
reference by (seed, draw); a pruned trial stops within draw 0; no validation split is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from hybridtune.recipe import load_recipe
from hybridtune.search import run_search

from .test_search import _space, _trials, refused_before_writing

SHOTS = {"shots": 6, "draws": 3}


def _few_shot_space(path: Path, tiny_bert: str, data: str, **extra) -> Path:
    space = _space(path, tiny_bert, data, **extra)
    raw = yaml.safe_load(space.read_text())
    raw["base"]["data"] |= SHOTS
    raw["train"]["batch_size"] = 4  # 12 rows a draw: 3 steps an epoch
    space.write_text(yaml.safe_dump(raw))
    return space


def _best(run: Path) -> float:
    return json.loads((run / "report.json").read_text())["best_validation"]


def _draw(run: Path) -> int:
    return json.loads((run / "report.json").read_text())["few_shot"]["draw"]


@pytest.fixture(scope="module")
def few_shot_search(tmp_path_factory, tiny_bert, sentiment_csv) -> Path:
    tmp = tmp_path_factory.mktemp("few-shot-search")
    space = _few_shot_space(
        tmp / "space.yaml", tiny_bert, sentiment_csv, pruner="none",
        families={"full": {"lr": {"low": 1e-3, "high": 1e-2, "log": True}}, "bitfit": {"lr": 1e-2}},
        verdict={"top": 1, "seeds": 2, "confirm": 1, "confirm_seeds": 1,
                 "reference": {"train": {"epochs": 1, "lr": 0.005, "batch_size": 4}}},
    )  # fmt: skip
    return run_search(str(space), [], str(tmp / "out"), trials=2, threads=1, echo=lambda *_: None)


def test_a_trial_is_the_mean_of_its_draws(few_shot_search):
    trials = _trials(few_shot_search)
    assert len(trials) == 2 and all(t["state"] == "complete" for t in trials)
    for t in trials:
        run = Path(t["run_dir"])
        runs = [run, run / "draws" / "d1", run / "draws" / "d2"]
        assert [_draw(r) for r in runs] == [0, 1, 2]  # each on its own draw of 6 per class
        rows = [json.loads((r / "report.json").read_text())["few_shot"]["train_rows"] for r in runs]
        assert rows == [12, 12, 12]
        values = [_best(r) for r in runs]
        assert t["draw_values"] == values
        assert t["value"] == pytest.approx(sum(values) / 3)
        # the trial's recipe.yaml, as `hybridtune train` / `compare` run it: draw 0 of the 3 draws
        recipe = load_recipe(run / "recipe.yaml")
        assert (recipe.data.shots, recipe.data.draws, recipe.data.draw) == (6, 3, 0)


def test_confirmation_is_the_mean_over_draws(few_shot_search):
    verdict = json.loads((few_shot_search / "verdict.json").read_text())
    (confirmed,) = verdict["confirm"]["trials"]
    (seed,) = verdict["confirm"]["seeds"]
    run = few_shot_search / "confirm" / f"{confirmed['name']}-s{seed}"
    values = [_best(r) for r in (run, run / "draws" / "d1", run / "draws" / "d2")]
    assert confirmed["values"][1] == pytest.approx(sum(values) / 3)


def test_verdict_pairs_by_seed_and_draw(few_shot_search):
    verdict = json.loads((few_shot_search / "verdict.json").read_text())
    assert verdict["seeds"] == [43, 44] and verdict["draws"] == 3
    ref, cand = verdict["candidates"]
    for c in (ref, cand):
        names = [Path(r).name for r in c["runs"]]
        assert names == [f"{c['name']}-s{s}-d{d}" for s in (43, 44) for d in range(3)]
        values = [json.loads((Path(r) / "eval.json").read_text())["accuracy"] for r in c["runs"]]
        assert c["values"] == values
        recipes = [load_recipe(Path(r) / "recipe.yaml") for r in c["runs"]]
        assert [(x.train.seed, x.data.draw) for x in recipes] == [(s, d) for s in (43, 44) for d in range(3)]
    p = cand["paired"]
    assert p["diffs"] == [a - b for a, b in zip(cand["values"], ref["values"], strict=True)]
    assert "2 seeds × 3 draws" in verdict["sentences"][0]


def test_a_pruned_trial_trains_no_other_draw(tmp_path, tiny_bert, sentiment_csv):
    """Trial 1 (lr 1e-7: learns nothing) is stopped at a rung of draw 0 and never trains draws 1-2."""
    space = _few_shot_space(
        tmp_path / "space.yaml", tiny_bert, sentiment_csv,
        families={"full": {"lr": [0.005, 1e-7]}}, metric="loss", pruner="successive_halving",
        enqueue=[{"full.lr": 0.005}, {"full.lr": 1e-7}], verdict={"top": 0},
        train={"epochs": 4.0, "batch_size": 4, "warmup": 0.0, "weight_decay": 0.0, "schedule": "linear"},
    )  # fmt: skip
    lines: list[str] = []
    root = run_search(str(space), [], str(tmp_path / "out"), trials=2, threads=1, echo=lines.append)
    good, weak = _trials(root)
    assert good["state"] == "complete" and len(good["draw_values"]) == 3
    assert weak["state"] == "pruned", lines
    assert not (Path(weak["run_dir"]) / "draws").exists() and "draw_values" not in weak


def test_a_rung_between_draws_stops_a_trial_that_validates_once_a_draw(tmp_path, tiny_bert, sentiment_csv):
    """With one validation a draw (`evaluations: 1`, as a SetFit-like trial) no rung inside a draw can
    stop a trial; `draw_rungs: true` stops trial 1 (lr 1e-7: learns nothing) after its first draw,
    below trial 0 there: pruned, draws 1-2 never trained."""
    space = _few_shot_space(
        tmp_path / "space.yaml", tiny_bert, sentiment_csv,
        families={"full": {"lr": [0.005, 1e-7]}}, metric="loss", pruner="successive_halving",
        evaluations=1, draw_rungs=True, enqueue=[{"full.lr": 0.005}, {"full.lr": 1e-7}], verdict={"top": 0},
        train={"epochs": 4.0, "batch_size": 4, "warmup": 0.0, "weight_decay": 0.0, "schedule": "linear"},
    )  # fmt: skip
    lines: list[str] = []
    root = run_search(str(space), [], str(tmp_path / "out"), trials=2, threads=1, echo=lines.append)
    good, weak = _trials(root)
    assert good["state"] == "complete" and len(good["draw_values"]) == 3 and good["evaluations"] == 1
    assert weak["state"] == "pruned" and weak["evaluations"] == 1, lines
    assert weak["draw_values"] == [weak["value"]] and weak["value"] > good["draw_values"][0]
    assert "after 1 of 3 draws" in weak["error"] and not (Path(weak["run_dir"]) / "draws").exists()
    assert any("pruned after 1 draw," in line for line in lines), lines


def test_a_few_shot_base_without_validation_is_refused(tmp_path, tiny_bert, sentiment_csv):
    refused_before_writing(
        tmp_path, tiny_bert, sentiment_csv,
        ["base.data.shots=6", "base.data.draws=3", "base.data.validation_shots=0"],
        ["base.data.validation_shots", "ranks its trials on the validation split"],
    )  # fmt: skip


def test_a_setfit_like_trial_is_scored_on_validation(tmp_path, tiny_bert, sentiment_csv):
    """`contrastive.then: none` takes no Trainer step; the run is validated once after the stage
    (contrastive.validate_untrained), so a trial of it has a value: each draw's best_validation is that one evaluation."""
    space = _few_shot_space(
        tmp_path / "space.yaml", tiny_bert, sentiment_csv, pruner="none", verdict={"top": 0},
        families={"full": {"lr": 1e-3}},
        parts={"contrastive": {"use": True, "head": "logistic", "then": "none", "pairs": 2, "sampling": "cycle"}},
    )  # fmt: skip
    raw = yaml.safe_load(space.read_text())
    raw["base"]["pooling"] = "mean"
    space.write_text(yaml.safe_dump(raw))
    (trial,) = _trials(
        run_search(str(space), [], str(tmp_path / "out"), trials=1, threads=1, echo=lambda *_: None)
    )
    assert trial["state"] == "complete" and trial["evaluations"] == 1
    run = Path(trial["run_dir"])
    for r in (run, run / "draws" / "d1", run / "draws" / "d2"):
        assert (r / "contrastive.json").is_file()
        evals = [
            json.loads(x) for x in (r / "metrics.jsonl").read_text().splitlines() if "eval_accuracy" in x
        ]
        assert len(evals) == 1 and _best(r) == evals[0]["eval_accuracy"]
    assert trial["value"] == pytest.approx(sum(trial["draw_values"]) / 3)


def test_the_shipped_spaces_are_valid():
    """spaces/*.yaml load as they ship; light_long.yaml trains every trial 3 epochs; few_shot.yaml's
    base is a 5-draw one, with SetFit's recipe enqueued and the rungs between draws on (docs/search.md,
    measured 4.00x at these settings)."""
    from hybridtune.search.setup import load_space, resolve

    root = Path(__file__).parent.parent / "spaces"
    spaces = {p.name: load_space(str(p)) for p in sorted(root.glob("*.yaml"))}
    assert {"light.yaml", "light_long.yaml", "few_shot.yaml"} <= set(spaces)
    long = spaces["light_long.yaml"]  # one length: every trial 3 epochs, rungs at 1/2, 1 and 2 epochs
    assert long.train.fewest_epochs == 3 and long.train.epochs.corners() == [3.0] and long.evaluations == 6
    assert set(long.chosen()) == {"lora", "dora", "adapters"} and long.verdict.light == 2.0
    few = spaces["few_shot.yaml"]
    ctx = resolve(few, "spaces/few_shot.yaml")
    assert ctx.draws == 5 and ctx.n_train == 16  # 8 per class, 2 classes
    assert few.enqueue[0]["parts.contrastive.then"] == "none"
    assert few.draw_rungs and few.reduction_factor == 4 and few.pruner == "successive_halving"
    assert few.base["data"]["validation_shots"] == 16


def test_search_and_compare_score_the_same_draws(tmp_path):
    """One rule (data/shots.py `scored`) for compare and search: a few-shot recipe of n > 1 draws is
    scored on draws 0 .. n-1, one of a single draw on its own `data.draw` (a confirmation once
    retrained such a base on draw 0); runs are named alike on both sides."""
    from hybridtune.compare import load_suite, plan_runs
    from hybridtune.search import draws

    one = {"data": {"shots": 8, "draw": 3}}
    assert draws.scored(one) == [None] and draws.count(one) == 1
    assert [draws.on_draw(one, d)["data"]["draw"] for d in draws.scored(one)] == [3]
    assert draws.run_dir(tmp_path, None) == tmp_path
    five = {"data": {"shots": 8, "draws": 5}}
    assert [draws.on_draw(five, d)["data"]["draw"] for d in draws.scored(five)] == [0, 1, 2, 3, 4]
    assert draws.run_dir(tmp_path, 2) == tmp_path / "draws" / "d2"
    assert draws.scored({"data": {"draws": 5}}) == [None]  # no shots: the whole split, once
    names = [name for _, _, name in draws.verdict_runs("reference", [43, 44], five)]
    assert names[:2] == ["reference-s43-d0", "reference-s43-d1"] and len(names) == 10
    assert [name for _, _, name in draws.verdict_runs("reference", [43], one)] == ["reference-s43"]
    for n in (1, 3):  # compare's plan of the default suite, few-shot: the same (seed, draw, name)
        suite, base = load_suite(None, seeds=2, overrides=["data.shots=8", f"data.draws={n}"])
        planned = plan_runs(suite, base)
        name = planned[0]["strategy"]
        mine = [(e["seed"], e["draw"], e["run"]) for e in planned if e["strategy"] == name]
        assert mine == draws.verdict_runs(name, suite.seeds, {"data": {"shots": 8, "draws": n}})
