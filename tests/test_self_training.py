"""Self-training on unlabelled text (`self_training:`, `data.unlabeled`): the pseudo-labels of each round
are what the teacher's `predict` and the threshold give, class-balanced; a given teacher; the rounds
in report.json; the run dir is the kept round (`keep`) as one run; `min_added` stops the rounds; a
killed self-training resumes at its round; bad input exits 2 before anything is written. The rules
that need no run: test_self_training_rules.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from hybridtune import api
from hybridtune.data.unlabeled import load_unlabeled
from hybridtune.errors import UserError
from hybridtune.recipe import load_recipe, recipe_to_yaml
from hybridtune.tasks import classification

from .conftest import write_csv
from .refusal import refused

THRESHOLD = 0.6


def settings(model: str, data: str, out: Path, *extra: str) -> list[str]:
    """48 labelled rows per class of the synthetic data (the other 96 train rows unlabelled): a
    tiny BERT learns it in 6 epochs, with confidences on both sides of THRESHOLD."""
    return [
        f"model.name={model}",
        f"data.source={data}",
        "data.shots=48",
        "data.validation_shots=12",
        "data.unlabeled=train_rest",
        "train.epochs=6",
        "train.batch_size=16",
        "train.lr=0.005",
        "train.precision=fp32",
        "train.early_stopping.patience=null",
        f"self_training.threshold={THRESHOLD}",
        f"output.dir={out}",
        *extra,
    ]


@pytest.fixture(scope="module")
def self_trained(tmp_path_factory, tiny_bert, sentiment_csv):
    """One self-training run of two rounds (three trainings), shared by the tests that only read it."""
    out = tmp_path_factory.mktemp("self-trained")
    overrides = settings(tiny_bert, sentiment_csv, out, "self_training.rounds=2", "output.name=st")
    summary = api.train(load_recipe(None, overrides))
    return Path(summary["run_dir"]), summary, overrides


def unlabelled_texts(overrides: list[str]) -> tuple[list[str], object]:
    recipe = load_recipe(None, overrides)
    splits = classification.load_splits(recipe.data)
    labels = classification.label_space(splits, recipe.data)
    return load_unlabeled(recipe.data, splits, labels), splits


def by_hand(teacher: Path, texts: list[str]) -> set[tuple[str, str]]:
    """The rows a round should add, from `hybridtune predict`'s rows: confidence >= THRESHOLD, then
    per class the most confident, as many as the class with the fewest confident texts has."""
    rows = api.predict(str(teacher), texts)
    confident = [r for r in rows if r["score"] >= THRESHOLD]
    per_class = {name: [r for r in confident if r["label"] == name] for name in rows[0]["probs"]}
    n = min(len(v) for v in per_class.values())
    chosen = set()
    for members in per_class.values():
        members.sort(key=lambda r: -r["score"])  # stable: ties keep the earlier text
        chosen |= {(r["text"], r["label"]) for r in members[:n]}
    return chosen


def pseudo_rows(run: Path, number: int) -> list[dict]:
    path = run / "pseudo-labels" / f"round-{number}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_each_round_adds_what_predict_and_the_threshold_give(self_trained):
    run, summary, overrides = self_trained
    texts, splits = unlabelled_texts(overrides)
    assert len(texts) == 96 and not set(texts) & set(splits.train["text"])  # the rest of the train split
    rounds = summary["self_training"]["rounds"]
    for number in (1, 2):
        rows = pseudo_rows(run, number)
        expected = by_hand(run / f"round-{number - 1}", texts)  # the round before is the teacher
        assert expected, "the teacher is confident about nothing: the test would prove nothing"
        assert {(r["text"], r["label"]) for r in rows} == expected
        assert all(r["confidence"] >= THRESHOLD for r in rows)
        # class-balanced: every class adds as many
        counts = Counter(r["label"] for r in rows)
        assert len(set(counts.values())) == 1 and set(counts) == {"negative", "positive"}
        assert rounds[number]["added"] == dict(counts)
        # the round trained on the labelled rows plus exactly these
        report = json.loads((run / f"round-{number}" / "report.json").read_text())
        assert report["few_shot"]["train_rows"] == 96 + len(rows)
    # the rounds' confident counts, before balancing, are the hand counts
    first = api.predict(str(run / "round-0"), texts)
    confident = Counter(r["label"] for r in first if r["score"] >= THRESHOLD)
    assert rounds[1]["above_threshold"] == {n: confident.get(n, 0) for n in ("negative", "positive")}


def test_report_has_every_round_and_the_run_dir_is_the_kept_round(self_trained):
    run, summary, _ = self_trained
    report = json.loads((run / "report.json").read_text())
    rounds = report["self_training"]["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    for r in rounds:
        scores = json.loads((Path(r["run_dir"]) / "report.json").read_text())
        assert r["validation"] == scores["best_validation"] and r["test"] == scores["test"]
    assert rounds[0]["given"] is False and rounds[2]["trained"] is True
    # keep: best (the default): the highest validation accuracy, the earlier round on a tie
    best = max(rounds, key=lambda r: (r["validation"], -r["round"]))["round"]
    section = report["self_training"]
    assert (section["keep"], section["final_round"], section["last_round"]) == ("best", best, 2)
    assert report["test"] == rounds[best]["test"] and section["stopped"] is None
    assert json.loads((run / "self_training.json").read_text()) == section
    assert report["self_training"]["unlabeled"]["texts"] == 96
    # the cost: every round's training and the labelling
    trained = sum(r["train_seconds"] for r in rounds)
    assert report["train_seconds"] == pytest.approx(
        trained + report["self_training"]["label_seconds"], abs=0.05
    )
    # final/ is the kept round's and loads with plain transformers
    assert_final_is(run, best)
    assert api.predict(str(run), ["a wonderful film"]) == api.predict(
        str(run / f"round-{best}"), ["a wonderful film"]
    )
    assert api.evaluate(str(run))["accuracy"] == report["test"]["accuracy"]


def same_weights(a: Path, b: Path) -> bool:
    import torch
    from transformers import AutoModelForSequenceClassification

    one = AutoModelForSequenceClassification.from_pretrained(a).state_dict()
    other = AutoModelForSequenceClassification.from_pretrained(b).state_dict()
    return one.keys() == other.keys() and all(torch.equal(one[k], other[k]) for k in one)


def assert_final_is(run: Path, number: int) -> None:  # the run dir is round `number` as one run
    assert same_weights(run / "final", run / f"round-{number}" / "final")
    for name in ("run.json", "eval.json", "params.json"):
        assert (run / name).read_text() == (run / f"round-{number}" / name).read_text(), name


def unfinished_copy(run: Path, dest: Path, **settings) -> Path:
    """A copy of the finished self-training `run` as a killed one (no result written yet), its
    recipe's `self_training` section edited: `train --resume` then only chooses the result, or goes
    on with the rounds it lacks."""
    import yaml

    shutil.copytree(run, dest)
    shutil.rmtree(dest / "final")
    for name in ("report.json", "self_training.json"):
        (dest / name).unlink()
    raw = yaml.safe_load((dest / "recipe.yaml").read_text())
    raw["self_training"] |= settings
    (dest / "recipe.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return dest


@pytest.mark.parametrize("keep, expected", [("best", 1), ("last", 2)])
def test_keep_chooses_the_result_among_the_rounds(keep, expected, self_trained, tmp_path, monkeypatch):
    """Round 2 validates worse than round 1 (the rounds' scores set here, so the choice does not
    hang on what the tiny model learnt): keep: best makes round 1 the result, keep: last round 2."""
    from hybridtune.self_training import rounds as loop

    run, _, _ = self_trained
    assert not same_weights(run / "round-1" / "final", run / "round-2" / "final")  # else untestable
    validation, scores = {"round-0": 0.5, "round-1": 0.9, "round-2": 0.7}, loop._scores
    monkeypatch.setattr(loop, "_scores", lambda p: {**scores(p), "validation": validation[Path(p).name]})
    copy = unfinished_copy(run, tmp_path / "copy", keep=keep)
    summary = api.train(resume=copy)
    section = summary["self_training"]
    assert (section["final_round"], section["last_round"], section["keep"]) == (expected, 2, keep)
    assert f"self_training.keep: {keep}" in section["kept_because"]
    assert keep == "last" or "round 0 0.5000, round 1 0.9000, round 2 0.7000" in section["kept_because"]
    kept = json.loads((copy / f"round-{expected}" / "report.json").read_text())
    assert summary["test"] == kept["test"] and summary["best_validation"] == kept["best_validation"]
    assert json.loads((copy / "report.json").read_text())["self_training"] == section
    assert_final_is(copy, expected)
    assert api.evaluate(str(copy))["accuracy"] == kept["test"]["accuracy"]
    # the whole cost still counts every round
    assert summary["steps"] == sum(
        json.loads((copy / f"round-{r}" / "report.json").read_text())["steps"] for r in (0, 1, 2)
    )


def test_min_added_stops_before_the_student_trains(self_trained, tmp_path):
    """Round 1 labelled afresh by round 0 adds as many texts as in the uninterrupted run: one fewer
    than min_added stops the rounds there, before round 1 trains; round 0 is the result."""
    run, _, _ = self_trained
    added = json.loads((run / "pseudo-labels" / "round-1.json").read_text())["added_total"]
    assert added >= 1, "round 1 added nothing: the test would prove nothing"
    copy = unfinished_copy(run, tmp_path / "copy", min_added=added + 1)
    for name in ("round-1", "round-2", "pseudo-labels"):
        shutil.rmtree(copy / name)
    summary = api.train(resume=copy)
    assert not (copy / "round-1").exists() and not (copy / "round-2").exists()
    assert pseudo_rows(copy, 1) == pseudo_rows(run, 1)  # labelled, not trained on
    assert not (copy / "pseudo-labels" / "round-2.jsonl").exists()
    section = summary["self_training"]
    stop = (
        f"stopped after round 0: round 1 adds {added} texts, fewer than self_training.min_added ({added + 1})"
    )
    assert section["stopped"] == stop and stop in summary["warnings"]
    assert [r["round"] for r in section["rounds"]] == [0, 1] and section["rounds"][1]["trained"] is False
    assert (section["final_round"], section["last_round"]) == (0, 0)
    assert summary["test"] == section["rounds"][0]["test"]
    assert_final_is(copy, 0)


def test_round_0_is_the_recipe_without_self_training(self_trained, tiny_bert, sentiment_csv, tmp_path):
    run, _, overrides = self_trained
    plain = [o for o in overrides if not o.startswith(("self_training.", "data.unlabeled", "output."))]
    expected = load_recipe(None, [*plain, f"output.dir={run}", "output.name=round-0"])
    assert (run / "round-0" / "recipe.yaml").read_text() == recipe_to_yaml(expected)


def test_the_console_table_shows_each_round(self_trained):
    from rich.console import Console

    from hybridtune.report.console import self_training_table

    _, summary, _ = self_trained
    console = Console(width=200, record=True)
    console.print(self_training_table(summary))
    text = console.export_text()
    added = summary["self_training"]["rounds"][1]["added"]["negative"]
    assert "+ round 0's pseudo-labels" in text and f"negative {added}" in text


def test_a_given_teacher_labels_the_first_round(self_trained, tiny_bert, sentiment_csv, tmp_path):
    run, _, _ = self_trained
    teacher = run / "round-0"
    overrides = settings(
        tiny_bert, sentiment_csv, tmp_path, "self_training.rounds=1", f"self_training.teacher={teacher}"
    )
    summary = api.train(load_recipe(None, [*overrides, "output.name=taught"]))
    new = Path(summary["run_dir"])
    assert not (new / "round-0").exists()
    rounds = summary["self_training"]["rounds"]
    assert rounds[0]["given"] is True and rounds[0]["run_dir"] == str(teacher)
    # the same teacher, texts and rule as the first run's round 1: the very same rows
    assert pseudo_rows(new, 1) == pseudo_rows(run, 1)
    assert rounds[1]["teacher"] == str(teacher)


def test_a_killed_self_training_resumes_at_its_round(self_trained, tiny_bert, sentiment_csv, tmp_path):
    """SIGKILLed after labelling round 2 (the test hook), `train --resume` trains round 2 only and ends
    where the uninterrupted run ended."""
    run, summary, overrides = self_trained
    out = tmp_path / "runs"
    args = [*[o for o in overrides if not o.startswith("output.")], f"output.dir={out}", "output.name=k"]
    env = {
        **os.environ,
        "HYBRIDTUNE_TEST_KILL_AT": "round:2",
        "PYTHONPATH": str(Path(api.__file__).parents[1]),
    }
    cmd = [sys.executable, "-m", "hybridtune", "train", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-2000:]
    killed = out / "k"
    assert (killed / "round-1" / "report.json").is_file() and not (killed / "round-2").exists()
    assert (killed / "pseudo-labels" / "round-2.jsonl").is_file() and not (killed / "report.json").exists()
    before = {r: (killed / f"round-{r}" / "report.json").stat().st_mtime_ns for r in (0, 1)}
    resumed = api.train(resume=killed)
    assert {r: (killed / f"round-{r}" / "report.json").stat().st_mtime_ns for r in (0, 1)} == before
    assert pseudo_rows(killed, 2) == pseudo_rows(run, 2)
    assert resumed["test"] == summary["test"]  # CPU, fp32, seeded: the uninterrupted run's result
    with pytest.raises(UserError, match="a finished self-training run"):
        api.train(resume=killed)


def _finished_copy(run: Path, tmp_path: Path, **edits) -> Path:
    copy = tmp_path / "teacher"
    shutil.copytree(run / "round-0", copy)
    info = json.loads((copy / "run.json").read_text())
    (copy / "run.json").write_text(json.dumps({**info, **edits}))
    return copy


@pytest.mark.parametrize(
    "extra, words",
    [
        (["data.unlabeled=missing.csv"], ["data.unlabeled", "missing.csv", "no such file"]),
        (["data.unlabeled=EMPTY"], ["empty"]),
        (["data.unlabeled=WRONGCOL"], ["data.text_column", "no column 'text'", "review"]),
        (["data.unlabeled=BADLABEL"], ["u.csv:row 3", "label 'neutral'", "not in the label set"]),
        (["self_training.threshold=0"], ["self_training.threshold", "greater than 0"]),
        (["self_training.threshold=1.5"], ["self_training.threshold", "less than or equal to 1"]),
        (["self_training.rounds=0"], ["self_training.rounds", "greater than or equal to 1"]),
        (
            ["data.shots=null", "data.validation_shots=null"],
            ["data.unlabeled", "train_rest without data.shots"],
        ),
        (["self_training.max_per_round=1"], ["self_training.max_per_round", "2 classes"]),
        (["self_training.teacher=nowhere"], ["self_training.teacher", "nowhere", "no finished run"]),
        (["self_training.teacher=LABELS"], ["self_training.teacher", "['a', 'b']", "the recipe's labels"]),
        (["self_training.teacher=TASK"], ["self_training.teacher", "token_classification run"]),
        (["self_training.student_overrides=[peft.r=4]"], ["self_training.student_overrides", "train.<key>"]),
        (["self_training.min_added=0"], ["self_training.min_added", "greater than or equal to 1"]),
        (["self_training.keep=worst"], ["self_training.keep", "'best' or 'last'"]),
        (
            ["data.validation_shots=0"],
            ["self_training.keep", "best (the default) with data.validation_shots: 0", "keep: last"],
        ),
        (["data.validation_shots=0", "self_training.keep=best"], ["keep: found best with data.validation"]),
        (
            ["self_training.student_overrides=[train.early_stopping.metric=loss]"],
            ["self_training.student_overrides", "early_stopping.metric=loss with keep: best", "accuracy"],
        ),
        (
            ["task=token_classification", "data.shots=null", "data.validation_shots=null"],
            ["self_training", "task token_classification"],
        ),
        (["data.text_pair_column=text2"], ["self_training", "text_pair_column"]),
    ],
)
def test_bad_input_exits_2_before_anything_is_written(
    extra, words, self_trained, tiny_bert, sentiment_csv, tmp_path
):
    run, _, _ = self_trained
    files = {
        "EMPTY": tmp_path / "e.csv",
        "WRONGCOL": write_csv(tmp_path / "w.csv", [("some text", "x")], header=("review", "label")),
        "BADLABEL": write_csv(tmp_path / "u.csv", [("fine words", "positive"), ("other words", "neutral")]),
        "LABELS": tmp_path / "labels",
        "TASK": tmp_path / "task",
    }
    files["EMPTY"].write_text("")
    if "self_training.teacher=LABELS" in extra:
        _finished_copy(run, tmp_path, labels=["a", "b"], label_values=["a", "b"]).rename(files["LABELS"])
    if "self_training.teacher=TASK" in extra:
        _finished_copy(run, tmp_path, task="token_classification").rename(files["TASK"])
    extra = [
        e.split("=")[0] + "=" + str(files[e.split("=")[1]]) if e.split("=")[1] in files else e for e in extra
    ]
    out = tmp_path / "runs"
    args = ["train", *settings(tiny_bert, sentiment_csv, out), "self_training.rounds=1", *extra]
    refused(args, out, *words)


def test_a_prompt_task_self_trains_too(tiny_bert_mlm, sentiment_csv, tmp_path):
    """prompt_classification (a label per text, its own predict): per_class none at threshold 0.5 of
    two classes takes every unlabelled text."""
    overrides = settings(tiny_bert_mlm, sentiment_csv, tmp_path, "self_training.rounds=1")
    overrides += [
        "task=prompt_classification",
        "prompt.verbalizer={negative: bad, positive: good}",
        "train.max_steps=2",
        "self_training.threshold=0.5",
        "self_training.per_class=none",
    ]
    summary = api.train(load_recipe(None, overrides))
    run = Path(summary["run_dir"])
    assert summary["self_training"]["rounds"][1]["added_total"] == 96
    assert json.loads((run / "round-1" / "report.json").read_text())["few_shot"]["train_rows"] == 96 + 96
    assert json.loads((run / "run.json").read_text())["task"] == "prompt_classification"


def test_a_round_killed_mid_training_goes_on_from_its_checkpoint(self_trained, tmp_path):
    """SIGKILLed at step 8 of round 0 (after its first epoch's checkpoint), `train --resume` resumes
    round 0 from that checkpoint and self-trains on: the rounds end where the uninterrupted run's did."""
    run, _, overrides = self_trained
    out = tmp_path / "runs"
    args = [o for o in overrides if not o.startswith(("output.", "self_training.rounds"))]
    args += [f"output.dir={out}", "output.name=k", "self_training.rounds=1"]
    env = {
        **os.environ,
        "HYBRIDTUNE_TEST_KILL_AT": "step:8",
        "PYTHONPATH": str(Path(api.__file__).parents[1]),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "hybridtune", "train", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    killed = out / "k"
    assert (killed / "round-0" / "checkpoints" / "checkpoint-6").is_dir()
    assert not (killed / "round-0" / "report.json").exists()
    resumed = api.train(resume=killed)
    original = json.loads((run / "report.json").read_text())["self_training"]["rounds"]
    rounds = resumed["self_training"]["rounds"]
    assert rounds[0]["test"] == original[0]["test"] and rounds[1]["test"] == original[1]["test"]
    assert pseudo_rows(killed, 1) == pseudo_rows(run, 1)
