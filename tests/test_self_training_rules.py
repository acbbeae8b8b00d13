"""Self-training's rules without a self-training run: which texts join (`select`), the unlabelled
texts read, the rounds' recipes, which round is kept (`kept`), and the recipes refused or allowed
by the schema. tests/test_self_training.py trains the rounds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hybridtune.data.unlabeled import load_unlabeled, read_unlabeled
from hybridtune.errors import UserError
from hybridtune.recipe import load_recipe
from hybridtune.self_training.pseudo import select
from hybridtune.self_training.rounds import check, kept, round_recipe
from hybridtune.tasks import classification

from .conftest import write_csv
from .test_self_training import settings

RECIPES = Path(__file__).parent.parent / "recipes"


def test_kept_ties_direction_and_candidates():
    def r(number, validation, **more):
        return {"round": number, "validation": validation, "validation_metric": "accuracy", **more}

    rounds = [r(0, 0.8, trained=True), r(1, 0.9, trained=True), r(2, 0.9, trained=True)]
    assert kept(rounds, "best")[0] == 1  # a tie keeps the earlier round
    assert kept(rounds, "last") == (2, "the last round trained (self_training.keep: last)")
    loss = [{**x, "validation_metric": "eval_loss"} for x in rounds]
    assert kept(loss, "best")[0] == 0  # loss: lower is better
    # a given teacher is no candidate, however well it validates; an untrained round neither
    given = [r(0, 0.99, given=True), r(1, 0.7, trained=True), r(2, 0.6, trained=True), r(3, 0.95)]
    assert kept(given, "best")[0] == 1 and kept(given, "last")[0] == 2
    unscored = [r(0, None, trained=True), r(1, None, trained=True)]
    assert kept(unscored, "best") == (
        1,
        "the last round trained: no round has a validation score to choose on",
    )


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


def test_keep_last_needs_no_validation_split_nor_one_metric(tiny_bert, sentiment_csv, tmp_path):
    base = settings(tiny_bert, sentiment_csv, tmp_path)
    recipe = load_recipe(None, [*base, "data.validation_shots=0", "self_training.keep=last"])
    assert recipe.self_training.keep == "last" and recipe.self_training.min_added == 1
    # students scored on another metric: the rounds cannot be compared, which only `best` does
    other = "self_training.student_overrides=[train.early_stopping.metric=loss]"
    check(load_recipe(None, [*base, other, "self_training.keep=last"]), tmp_path / "r", prepare_first=False)
    with pytest.raises(UserError, match="early_stopping.metric=loss with keep: best; expected the recipe"):
        check(load_recipe(None, [*base, other]), tmp_path / "r", prepare_first=False)
    assert not (tmp_path / "r").exists()


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
