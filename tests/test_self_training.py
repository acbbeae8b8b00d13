"""Self-training on unlabelled text (`self_training:`, `data.unlabeled`): the pseudo-labels of each round
are what the teacher's `predict` and the threshold give, class-balanced; a given teacher; the rounds
in report.json; the run dir loads as one run; a killed self-training resumes at its round; bad input
exits 2 before anything is written."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from hybridtune import api
from hybridtune.data.unlabeled import load_unlabeled, read_unlabeled
from hybridtune.errors import UserError
from hybridtune.recipe import load_recipe, recipe_to_yaml
from hybridtune.self_training.pseudo import select
from hybridtune.self_training.rounds import round_recipe
from hybridtune.tasks import classification

from .conftest import write_csv
from .refusal import refused

RECIPES = Path(__file__).parent.parent / "recipes"
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


def test_report_has_every_round_and_the_run_dir_is_the_last_round(self_trained):
    run, summary, _ = self_trained
    report = json.loads((run / "report.json").read_text())
    rounds = report["self_training"]["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    for r in rounds:
        scores = json.loads((Path(r["run_dir"]) / "report.json").read_text())
        assert r["validation"] == scores["best_validation"] and r["test"] == scores["test"]
    assert rounds[0]["given"] is False and rounds[2]["trained"] is True
    assert report["test"] == rounds[2]["test"] and report["self_training"]["final_round"] == 2
    assert report["self_training"]["unlabeled"]["texts"] == 96
    # the cost: every round's training and the labelling
    trained = sum(r["train_seconds"] for r in rounds)
    assert report["train_seconds"] == pytest.approx(
        trained + report["self_training"]["label_seconds"], abs=0.05
    )
    # final/ is the last round's and loads with plain transformers
    import torch
    from transformers import AutoModelForSequenceClassification

    plain = AutoModelForSequenceClassification.from_pretrained(run / "final")
    last = AutoModelForSequenceClassification.from_pretrained(run / "round-2" / "final")
    for (name, a), b in zip(plain.state_dict().items(), last.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert api.predict(str(run), ["a wonderful film"]) == api.predict(
        str(run / "round-2"), ["a wonderful film"]
    )
    assert api.evaluate(str(run))["accuracy"] == report["test"]["accuracy"]


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


def test_select_balanced_none_and_max_per_round():
    probs = np.array(
        [[0.95, 0.05], [0.9, 0.1], [0.2, 0.8], [0.97, 0.03], [0.5, 0.5], [0.05, 0.95], [0.91, 0.09]]
    )
    # confident at 0.9: class 0 -> 3 (0.97), 0 (0.95), 6 (0.91), 1 (0.9); class 1 -> 5 (0.95)
    assert select(probs, 0.9, "balanced", None) == [3, 5]
    assert select(probs, 0.9, "none", None) == [0, 1, 3, 5, 6]
    assert select(probs, 0.9, "none", 2) == [0, 3]  # 0.97, then 0.95 of texts 0 and 5: the earlier wins
    assert select(probs, 0.9, "none", 3) == [0, 3, 5]
    # at 0.8 class 1 has 5 (0.95) and 2 (0.8): two per class, each class's most confident
    assert select(probs, 0.8, "balanced", None) == [0, 2, 3, 5]
    assert select(probs, 0.8, "balanced", 3) == [3, 5]  # 3 // 2 classes = 1 per class
    assert select(probs, 0.99, "balanced", None) == [] and select(probs, 0.99, "none", None) == []
    assert select(probs, 0.5, "none", None) == list(range(7))  # the threshold is inclusive


def test_unlabelled_files_txt_bundled_and_what_is_left_out(tmp_path, sentiment_csv):
    recipe = load_recipe(None, [f"data.source={sentiment_csv}", "data.shots=8"])
    splits = classification.load_splits(recipe.data)
    labels = classification.label_space(splits, recipe.data)
    test_text = splits.test["text"][0]
    txt = tmp_path / "more.txt"
    txt.write_text(f"a new line\n\n{test_text}\na new line\nanother one\n")
    data = recipe.data.model_copy(update={"unlabeled": str(txt)})
    found = read_unlabeled(data, splits, labels)
    # a test text would leak into training; a repeated text counts once; blank lines are no texts
    assert found.texts == ["a new line", "another one"] and (found.duplicates, found.overlap) == (1, 1)
    # a label column that agrees with the label set is allowed (and dropped); blank labels are no labels
    labelled = write_csv(tmp_path / "u.csv", [("fresh words here", "positive"), ("more words", "")])
    data = recipe.data.model_copy(update={"unlabeled": str(labelled)})
    assert load_unlabeled(data, splits, labels) == ["fresh words here", "more words"]
    rest = load_unlabeled(recipe.data.model_copy(update={"unlabeled": "train_rest"}), splits, labels)
    assert len(rest) == 192 - 16 and not set(rest) & set(splits.train["text"])
    bundled = load_unlabeled(recipe.data.model_copy(update={"unlabeled": "bundled:rotten_tomatoes"}), splits)
    assert len(bundled) == 8530  # every review of the bundled set (none is in the synthetic splits)


def test_run_train_refuses_a_self_training_recipe(tiny_bert, sentiment_csv, tmp_path):
    from hybridtune import run

    recipe = load_recipe(None, settings(tiny_bert, sentiment_csv, tmp_path))
    with pytest.raises(
        UserError, match="self_training: found a self-training recipe in the one-run pipeline"
    ):
        run.train(recipe, search_trial=True)  # what a search trial would do


def test_round_recipes_take_the_student_overrides_only_for_students(tiny_bert, sentiment_csv, tmp_path):
    recipe = load_recipe(
        None, settings(tiny_bert, sentiment_csv, tmp_path, "self_training.student_overrides=[train.epochs=2]")
    )
    assert round_recipe(recipe, tmp_path, 0, None).train.epochs == 6
    student = round_recipe(recipe, tmp_path, 1, tmp_path / "p.jsonl")
    assert student.train.epochs == 2 and student.data.pseudo_labels == str((tmp_path / "p.jsonl").resolve())
    assert student.self_training is None and student.data.unlabeled is None


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


def test_unlabeled_without_self_training_and_pseudo_labels_by_hand_are_refused():
    with pytest.raises(UserError, match="data.unlabeled: found it without a section that reads it"):
        load_recipe(None, ["data.unlabeled=train_rest", "data.shots=8"])
    with pytest.raises(UserError, match="self_training: found it with data.pseudo_labels"):
        load_recipe(None, ["data.unlabeled=x.csv", "data.pseudo_labels=p.jsonl", "self_training.rounds=1"])
    with pytest.raises(UserError, match="self_training: found it with `ensemble`"):
        load_recipe(None, ["data.unlabeled=x.csv", "self_training.rounds=1", "ensemble.members=2"])


def test_the_example_recipe_reads():
    recipe = load_recipe(RECIPES / "self_training.yaml")
    assert recipe.data.shots == 64 and recipe.data.unlabeled == "train_rest"
    assert recipe.self_training.rounds >= 1 and recipe.self_training.per_class == "balanced"


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
