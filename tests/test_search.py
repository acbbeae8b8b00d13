"""hybridtune search on a tiny model: valid and reproducible trial recipes, pruning, kill -9 and
resume, the Pareto fronts, the verdict's numbers, bad input (the pure parts without a search:
test_search_units.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml

from hybridtune import tasks
from hybridtune.recipe import load_recipe
from hybridtune.search import run_search
from hybridtune.search.budget import stop_line

from .refusal import refused


def _space(path: Path, tiny_bert: str, data: str, **extra) -> Path:
    """A tiny space: the tiny BERT on the synthetic sentiment data, 1 epoch of 12 steps, 4 evaluations."""
    space = {
        "name": "tiny",
        "base": {
            "model": tiny_bert,
            "data": {"source": data, "max_length": 48},
            "train": {"precision": "fp32", "logging_steps": 5, "early_stopping": {"patience": None}},
        },
        "families": {
            "full": {"lr": {"low": 1e-3, "high": 1e-2, "log": True}},
            "lora": {"lr": {"low": 3e-3, "high": 3e-2, "log": True}, "r": [2, 4]},
            "bitfit": {"lr": {"low": 3e-3, "high": 3e-2, "log": True}},
            "freeze_top": {"lr": {"low": 1e-3, "high": 1e-2, "log": True}},
        },
        "train": {"epochs": 1.0, "batch_size": 16, "warmup": 0.0, "weight_decay": 0.0, "schedule": "linear"},
        "parts": {},  # the families alone (tests/test_search_parts.py adds parts)
        "verdict": {
            "top": 2,
            "seeds": 2,
            "reference": {"train": {"epochs": 1, "lr": 0.005, "batch_size": 16}},
        },
    }
    space.update(extra)
    path.write_text(yaml.safe_dump(space))
    return path


@pytest.fixture(scope="module")
def searched(tmp_path_factory, tiny_bert, sentiment_csv) -> Path:
    """One two-objective search of 6 trials + the verdict (2 recipes + the reference, 2 seeds)."""
    tmp = tmp_path_factory.mktemp("search")
    space = _space(tmp / "space.yaml", tiny_bert, sentiment_csv, objectives=["metric", "params"])
    return run_search(str(space), [], str(tmp / "out"), trials=6, threads=1, echo=lambda *_: None)


def _trials(root: Path) -> list[dict]:
    return json.loads((root / "trials.json").read_text())["trials"]


def test_outputs_and_every_trial_recipe_is_valid(searched):
    for name in ("trials.csv", "trials.json", "pareto.json", "pareto_params.png", "pareto_time.png",
                 "report.html", "verdict.json", "study.journal", "search.json"):  # fmt: skip
        assert (searched / name).stat().st_size > 0, name
    trials = _trials(searched)
    assert len(trials) == 6 and all(t["state"] == "complete" for t in trials)
    for t in trials:
        run = Path(t["run_dir"])
        recipe = load_recipe(run / "recipe.yaml")  # valid: the schema accepts it as it is
        assert recipe.name == t["family"]
        # no early stopping in this base: every trial validates the space's 4 times
        evals = [
            json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if "eval_accuracy" in x
        ]
        assert len(evals) == t["evaluations"] == 4
        assert t["value"] == max(e["eval_accuracy"] for e in evals)
        assert not (run / "final").exists() and not (run / "eval.json").exists()  # the search never tests
        # a family's settings exist only in its own trials
        assert {k.split(".")[0] for k in t["params"] if "." in k} <= {t["family"]}
    assert os.environ.get("HYBRIDTUNE_CACHE_DIR") != str(searched / "cache")  # not left set
    assert not (searched / "cache").exists()
    html = (searched / "report.html").read_text()
    assert 'id="trials"' in html and 'id="verdict"' in html and "data:image/png;base64," in html
    # the size of the split the trials were ranked on, and what a difference on it can show
    recipe = load_recipe(Path(trials[0]["run_dir"]) / "recipe.yaml")
    n = len(tasks.for_recipe(recipe).load_splits(recipe.data).validation)
    assert f"The validation split has {n} texts: " in html
    assert f"about {100 * (0.1 / n) ** 0.5:.1f} pt (one standard error)" in html


def test_a_trial_recipe_retrained_gives_its_score(searched, tmp_path):
    from hybridtune import api

    best = max(_trials(searched), key=lambda t: (t["value"], -t["number"]))
    path = searched / "pareto" / f"trial-{best['number']:04d}.yaml"
    if not path.is_file():  # not on a front: its own run dir holds the same recipe
        path = Path(best["run_dir"]) / "recipe.yaml"
    summary = api.train(load_recipe(path, [f"output.dir={tmp_path}"]))
    assert summary["best_validation"] == pytest.approx(best["value"], abs=1e-12)


def test_pareto_sets_are_exactly_the_non_dominated_trials(searched):
    trials = [t for t in _trials(searched) if t["state"] == "complete"]
    front = json.loads((searched / "pareto.json").read_text())

    def brute(key):
        return sorted(
            a["number"]
            for a in trials
            if not any(
                b["value"] >= a["value"] and b[key] <= a[key] and (b["value"] > a["value"] or b[key] < a[key])
                for b in trials
            )
        )

    assert sorted(front["params"]) == brute("trainable")
    assert sorted(front["time"]) == brute("train_seconds")
    study = optuna.load_study(
        study_name="tiny",
        storage=optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend(str(searched / "study.journal"))
        ),
    )
    assert sorted(front["objectives"]) == sorted(t.number for t in study.best_trials)
    on_any = {n for numbers in front.values() for n in numbers}
    assert {p.name for p in (searched / "pareto").iterdir()} == {f"trial-{n:04d}.yaml" for n in on_any}


def test_verdict_numbers_equal_the_retrained_runs(searched):
    verdict = json.loads((searched / "verdict.json").read_text())
    assert verdict["seeds"] == [43, 44]  # fresh seeds: the trials ran with 42
    ref, *cands = verdict["candidates"]
    assert ref["name"] == "reference" and len(cands) == 2
    for c in verdict["candidates"]:
        values = [json.loads((Path(r) / "eval.json").read_text())["accuracy"] for r in c["runs"]]
        assert c["values"] == values
        assert [load_recipe(Path(r) / "recipe.yaml").train.seed for r in c["runs"]] == [43, 44]
    for c in cands:
        p = c["paired"]
        assert p["diffs"] == [a - b for a, b in zip(c["values"], ref["values"], strict=True)]
        assert p["mean"] == pytest.approx(sum(p["diffs"]) / 2)
    assert len(verdict["sentences"]) == 2
    for sentence, c in zip(verdict["sentences"], cands, strict=True):
        word = {"better": "better than", "worse": "worse than", "no difference detectable": "not detectably"}
        assert word[c["verdict"]] in sentence and c["name"] in sentence


def test_weak_trials_are_pruned_early(tmp_path, tiny_bert, sentiment_csv, capsys):
    """Successive halving on the validation loss: trial 1 (lr 1e-7 learns nothing) is stopped at a
    rung before its end; its run dir says so; no traceback, no test evaluation. What max_length cuts
    is said once, by the first trial (both read the same data)."""
    space = _space(
        tmp_path / "space.yaml", tiny_bert, sentiment_csv,
        families={"full": {"lr": [0.005, 1e-7]}}, metric="loss", pruner="successive_halving",
        enqueue=[{"full.lr": 0.005}, {"full.lr": 1e-7}], verdict={"top": 0},
        # 3 epochs (36 steps, validated every 9): at the first rung the good trial has learned something
        train={"epochs": 3.0, "batch_size": 16, "warmup": 0.0, "weight_decay": 0.0, "schedule": "linear"},
    )  # fmt: skip
    lines: list[str] = []
    root = run_search(str(space), [], str(tmp_path / "out"), trials=2, threads=1, echo=lines.append)
    good, weak = _trials(root)
    assert good["state"] == "complete" and good["evaluations"] == 4
    assert weak["state"] == "pruned" and weak["evaluations"] < 4, lines  # before its last validation
    marker = json.loads((Path(weak["run_dir"]) / "trial.json").read_text())
    assert marker["state"] == "pruned"
    steps = [
        json.loads(x)["step"] for x in (Path(weak["run_dir"]) / "metrics.jsonl").read_text().splitlines()
    ]
    assert max(steps) < 36  # stopped before the end of its 36 steps
    assert any("trial 1" in line and "pruned at evaluation" in line for line in lines)
    assert capsys.readouterr().err.count("long texts (data.max_length") == 1


def test_the_budget_stops_the_search_and_says_by_how_much_it_ran_over(tmp_path, tiny_bert, sentiment_csv):
    """--budget: no trial starts once the time left is less than the shortest trial; a trial is never
    cut short, so the last one may run past the budget, and the stop line then says by how much."""
    space = _space(
        tmp_path / "space.yaml", tiny_bert, sentiment_csv, families={"full": {"lr": 0.005}},
        start="none", pruner="none", verdict={"top": 0},
        train={"epochs": 8.0, "batch_size": 16, "warmup": 0.0, "weight_decay": 0.0, "schedule": "linear"},
    )  # fmt: skip
    lines: list[str] = []
    root = run_search(str(space), [], str(tmp_path / "out"), budget="1s", threads=1, echo=lines.append)
    (trial,) = _trials(root)  # 96 steps and 4 validations: past the 1-second budget, which held one trial
    assert trial["state"] == "complete" and trial["seconds"] > 1.0
    (stop,) = [line for line in lines if line.startswith("budget:")]
    assert stop.startswith("budget: spent, the last trial ran ") and stop.endswith(" s past it; stopping")
    assert stop_line(4.6, [9.0, 7.0], "no new trial") == (
        "budget: 5 s left, less than the shortest trial; no new trial"
    )
    assert stop_line(7.0, [9.0, 7.0], "stopping") is None and stop_line(0.5, [], "stopping") is None


def test_kill_9_mid_search_and_resume_keeps_finished_trials(tmp_path, tiny_bert, sentiment_csv):
    # no pruning (nor the floor): every trial that is not killed runs to its end
    space = _space(tmp_path / "space.yaml", tiny_bert, sentiment_csv, verdict={"top": 0}, pruner="none")
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "hybridtune",
        "search",
        str(space),
        "--trials",
        "3",
        "--out",
        str(out),
        "--threads",
        "1",
    ]
    env = {**os.environ, "HYBRIDTUNE_TEST_KILL_AT": "trial:2", "HF_HUB_OFFLINE": "1"}
    killed = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    before = {n: (out / "trials" / f"trial-{n:04d}" / "trial.json") for n in (0, 1)}
    kept = {n: (p.read_text(), p.stat().st_mtime_ns) for n, p in before.items()}
    assert (out / "trials" / "trial-0002").is_dir()  # killed mid-trial

    resumed = subprocess.run(cmd, env={**env, "HYBRIDTUNE_TEST_KILL_AT": ""}, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "2 trial(s) finished earlier, kept" in resumed.stdout
    assert "trial 2: interrupted earlier, queued again" in resumed.stdout
    assert {n: (p.read_text(), p.stat().st_mtime_ns) for n, p in before.items()} == kept  # not rerun
    trials = _trials(out)
    assert [t["number"] for t in trials] == [0, 1, 3] and all(t["state"] == "complete" for t in trials)
    retry = json.loads((out / "trials" / "trial-0003" / "trial.json").read_text())
    killed_params = retry["params"]  # the interrupted trial's settings, run again whole
    assert not (out / "trials" / "trial-0002").exists()
    assert killed_params == trials[2]["params"]


# ---- bad input: exit 2, one line naming the key path, nothing written ----------------------------


@pytest.mark.parametrize(
    ("extra", "args", "words"),
    [
        ({"families": []}, [], ["families", "no family"]),
        ({"families": {"lroa": {}}}, [], ["families", "lroa", "did you mean 'lora'"]),
        (
            {"families": {"lora": {"rank": [4]}}},
            [],
            ["families.lora.rank", "unknown key", "did you mean 'r'"],
        ),
        (
            {"families": {"full": {"lr": {"low": 1e-3, "high": 1e-4}}}},
            [],
            ["families.full.lr", "low", "high"],
        ),
        ({"families": {"lora": {"r": []}}}, [], ["families.lora.r", "empty list"]),
        ({"metric": "bleu"}, [], ["metric", "bleu", "accuracy"]),
        ({"objectives": ["params"]}, [], ["objectives", "metric"]),
        ({}, ["base.peft.r=8"], ["base.peft", "families"]),
        ({}, ["base.train.epochs=3"], ["base.train.epochs", "train.epochs"]),
        ({}, ["--budget", "0.001s"], ["--budget", "too small for one trial"]),
        ({}, ["--budget", "soon"], ["--budget", "60m"]),
        ({"verdict": {"top": 1, "confirm": -1}}, [], ["verdict.confirm", "-1", "greater than or equal to 0"]),
        ({}, ["verdict.confirm_seeds=0"], ["verdict.confirm_seeds", "greater than or equal to 1"]),
        ({"pruner": "hyperband", "prune_among": "same_length"}, [], ["prune_among", "hyperband"]),
        ({"pruner": "median", "reduction_factor": 4}, [], ["reduction_factor", "median"]),
        ({"reduction_factor": 1}, [], ["reduction_factor", "greater than or equal to 2"]),
        ({"pruner": "none", "draw_rungs": True}, [], ["draw_rungs", "pruner none"]),
    ],
)
def test_bad_input_exits_2_before_writing(tmp_path, tiny_bert, sentiment_csv, extra, args, words):
    refused_before_writing(tmp_path, tiny_bert, sentiment_csv, args, words, **extra)


def refused_before_writing(tmp_path, tiny_bert, sentiment_csv, args, words, **extra) -> None:
    """`hybridtune search` on `_space(**extra)` with `args`: refused (tests/refusal.py) with each of
    `words`, the search dir never made."""
    space = _space(tmp_path / "space.yaml", tiny_bert, sentiment_csv, **extra)
    out = tmp_path / "out"
    refused(["search", str(space), *args, "--out", str(out), "--trials", "1"], out, *words, absent=True)


def test_a_dir_holding_another_study_is_refused(tmp_path, tiny_bert, sentiment_csv):
    space = _space(tmp_path / "space.yaml", tiny_bert, sentiment_csv, verdict={"top": 0}, families=["bitfit"])
    out = tmp_path / "out"
    run_search(str(space), [], str(out), trials=1, threads=1, echo=lambda *_: None)
    args = ["search", str(space), "families=[full]", "--out", str(out), "--trials", "1"]
    refused(args, out, "--out", "another study")  # the study's files unchanged


def test_lora_on_every_linear_layer_of_the_top_blocks(tmp_path, tiny_bert, sentiment_csv):
    """`all-linear` with a layer share: the block's linear layers by name (peft's own `all-linear`
    refuses layers_to_transform), LoRA only in the top block of two. No pruning: a tiny LoRA still at
    chance at its 2nd evaluation would meet the floor."""
    space = _space(
        tmp_path / "space.yaml", tiny_bert, sentiment_csv, verdict={"top": 0}, pruner="none",
        families={"lora": {"r": 2, "target_modules": "all-linear", "layer_share": 0.5}},
    )  # fmt: skip
    root = run_search(str(space), [], str(tmp_path / "out"), trials=1, threads=1, echo=lambda *_: None)
    (trial,) = _trials(root)
    assert trial["state"] == "complete", trial
    peft = load_recipe(Path(trial["run_dir"]) / "recipe.yaml").peft.kwargs()
    assert peft["layers_to_transform"] == [1] and "intermediate.dense" in peft["target_modules"]
    rows = {r["slot"]: r for r in json.loads((Path(trial["run_dir"]) / "params.json").read_text())["rows"]}
    assert rows["block.0"]["added"] == 0 and rows["block.1"]["added"] > 0


def test_verdict_light_adds_the_best_parameter_efficient_trial(searched):
    """`verdict.light`: the best complete trial training at most that % of the parameters joins the top
    ones when they hold none; the `searched` study's trials give the numbers."""
    from types import SimpleNamespace

    from hybridtune.search.study import journal
    from hybridtune.search.verdict import candidates

    study = optuna.load_study(study_name=None, storage=journal(searched))
    ctx = SimpleNamespace(metric="accuracy")
    done = sorted((t for t in study.get_trials() if t.state.name == "COMPLETE"), key=lambda t: -t.values[0])
    pcts = {t.number: t.user_attrs["trainable_pct"] for t in done}
    top1 = candidates(study, ctx, 1)
    assert [c["trial"] for c in top1] == [done[0].number]
    lightest = min(pcts.values())
    with_light = candidates(study, ctx, 1, light=lightest)
    best_light = next(t.number for t in done if pcts[t.number] <= lightest)
    assert pcts[done[0].number] > lightest  # the fixture's best trial trains more than its lightest
    assert [c["trial"] for c in with_light] == [done[0].number, best_light]
    assert candidates(study, ctx, 1, light=100.0) == top1  # the top one is light enough itself
    assert candidates(study, ctx, 1, light=lightest / 10) == top1  # no trial that light: the top alone
