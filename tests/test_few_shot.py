"""Few-shot: k-per-class draws, EDA augmentation, the bundled topic set, and bad input (exit 2 before
anything is written). The contrastive stage and pooling: tests/test_contrastive.py."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from hybridtune import bundled
from hybridtune.compare import load_suite, plan_runs
from hybridtune.data.augment import AugmentConfig, augment, augment_text
from hybridtune.errors import UserError
from hybridtune.recipe import load_recipe
from hybridtune.tasks import classification

from .conftest import sentiment_rows, write_csv
from .refusal import refused

RECIPES = Path(__file__).parent.parent / "recipes"


def _splits(source: str, *overrides: str):
    return classification.load_splits(load_recipe(None, [f"data.source={source}", *overrides]).data)


def test_draw_is_k_per_class_reproducible_and_nested(sentiment_csv):
    full = _splits(sentiment_csv)
    eight = _splits(sentiment_csv, "data.shots=8")
    assert Counter(eight.train["label"]) == {"negative": 8, "positive": 8}
    assert Counter(eight.validation["label"]) == {"negative": 8, "positive": 8}
    assert set(eight.train["_where"]) <= set(full.train["_where"])  # drawn from the train split
    assert eight.test.equals(full.test)  # every draw and budget is scored on the same rows
    again = _splits(sentiment_csv, "data.shots=8")
    assert again.train.equals(eight.train) and again.validation.equals(eight.validation)
    four = _splits(sentiment_csv, "data.shots=4")
    assert set(four.train["_where"]) < set(eight.train["_where"])  # a larger budget only adds rows
    other = _splits(sentiment_csv, "data.shots=8", "data.draws=3", "data.draw=1")
    assert set(other.train["_where"]) != set(eight.train["_where"])
    # kept in split order
    order = {w: i for i, w in enumerate(full.train["_where"])}
    assert [order[w] for w in eight.train["_where"]] == sorted(order[w] for w in eight.train["_where"])


def test_validation_shots_zero_leaves_no_validation(sentiment_csv):
    splits = _splits(sentiment_csv, "data.shots=4", "data.validation_shots=0")
    assert len(splits.validation) == 0 and len(splits.train) == 8
    two = _splits(sentiment_csv, "data.shots=4", "data.validation_shots=2")
    assert Counter(two.validation["label"]) == {"negative": 2, "positive": 2}


def test_run_without_validation_trains_fixed_steps_and_keeps_the_last(quick, tmp_path):
    from hybridtune import api

    summary = api.train(
        load_recipe(None, quick(None, "data.shots=8", "data.validation_shots=0", "train.max_steps=6"))
    )
    run = Path(summary["run_dir"])
    assert summary["steps"] == 6 and summary["best_validation"] is None
    assert summary["few_shot"] == {"shots": 8, "draw": 0, "train_rows": 16}
    assert "eval_loss" not in (run / "metrics.jsonl").read_text()
    assert summary["test"]["n"] == 24  # the whole test split


def test_compare_runs_every_seed_on_every_draw(tmp_path):
    suite = tmp_path / "suite.yaml"
    suite.write_text(f"strategies: [{RECIPES / 'setfit.yaml'}]\nseeds: [1, 2]\n")
    runs = plan_runs(*load_suite(str(suite), overrides=["data.draws=3"]))
    assert [r["run"] for r in runs] == [f"setfit-s{s}-d{d}" for s in (1, 2) for d in range(3)]
    assert all(f"data.draw={r['draw']}" in r["overrides"] for r in runs)


def test_augment_ops_are_eda_and_seeded():
    import numpy as np

    rng = np.random.default_rng(0)
    text = "the film was a quiet and moving story"
    swapped = augment_text(text, "swap", 0.2, [], rng)
    assert sorted(swapped.split()) == sorted(text.split()) and swapped != text
    deleted = augment_text(text, "delete", 0.3, [], rng).split()
    assert 1 <= len(deleted) < len(text.split()) and all(w in text.split() for w in deleted)
    inserted = augment_text(text, "insert", 0.25, ["superb"], rng).split()
    assert len(inserted) == len(text.split()) + 2 and inserted.count("superb") == 2


def test_augment_adds_n_copies_from_the_class_vocabulary(sentiment_csv):
    train = _splits(sentiment_csv, "data.shots=4").train
    config = AugmentConfig(n=3, ops=["insert"], alpha=0.2)
    out = augment(train, "text", "label", config)
    copies = out[out["_where"].str.contains("augmented")]
    assert len(copies) == 3 * len(train)  # an insertion always makes a new text
    vocab = {
        lab: {w for t in train[train["label"] == lab]["text"] for w in t.split()}
        for lab in ("negative", "positive")
    }
    for text, label in zip(copies["text"], copies["label"], strict=True):
        assert set(text.split()) <= vocab[label]  # inserted words come from the same class's texts
    assert augment(train, "text", "label", config).equals(out)  # seeded
    assert not augment(train, "text", "label", config.model_copy(update={"seed": 1})).equals(out)


def test_augment_in_a_recipe_only_touches_train(sentiment_csv):
    plain = _splits(sentiment_csv, "data.shots=4")
    aug = _splits(sentiment_csv, "data.shots=4", "data.augment.n=2")
    assert len(plain.train) < len(aug.train) <= 3 * len(plain.train)
    assert aug.validation.equals(plain.validation) and aug.test.equals(plain.test)


def test_bundled_chatterbot_topics():
    frame, names = bundled.dataset("bundled:chatterbot_topics")
    assert names is None
    counts = Counter(frame["label"])
    assert len(counts) >= 10 and min(counts.values()) >= 20
    assert {"ai", "sports", "food", "emotion"} <= set(counts)
    assert not frame["text"].duplicated().any()  # a text in two topics is dropped
    assert frame["_where"].iloc[0].startswith("ai.yml:conversation 1, turn 1")
    splits = _splits("bundled:chatterbot_topics", "data.shots=8", "data.validation_shots=0")
    assert Counter(splits.train["label"]) == dict.fromkeys(counts, 8)


# --------------------------------------------------------------------------------------------------
# bad input: exit 2, one line naming the key, nothing written


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["data.shots=200"], ["data.shots", "200 per class", "at most 96"]),
        (["data.shots=4", "data.validation_shots=40"], ["data.validation_shots", "validation split"]),
        (["data.shots=4", "data.draws=2", "data.draw=2"], ["data.draw", "0 .. 1"]),
        (["data.draws=3"], ["data.draws", "without data.shots"]),
        (["contrastive.head=logistic"], ["contrastive.head", "pooling"]),
        (["contrastive.pairs=2", "stages=[{train: [head]}]"], ["contrastive", "stages"]),
        (["task=prompt_classification", "pooling=mean"], ["pooling", "task: classification"]),
        (
            ["data.shots=4", "data.validation_shots=0", "ensemble.members=2"],
            ["data.validation_shots", "ensemble"],
        ),
    ],
)
def test_bad_few_shot_input_exits_2_before_anything_is_written(
    extra, words, tmp_path, tiny_bert, sentiment_csv
):
    out = tmp_path / "runs"
    args = ["train", f"model={tiny_bert}", f"data.source={sentiment_csv}", f"output.dir={out}", *extra]
    refused(args, out, *words)


def test_shots_refused_for_token_classification():
    with pytest.raises(UserError, match=r"data\.shots: found it with task token_classification"):
        load_recipe(None, ["task=token_classification", "data.shots=4"])


def test_a_class_too_small_is_named(tmp_path):
    rows = sentiment_rows(60) + [("one lonely neutral line", "neutral"), ("another neutral line", "neutral")]
    path = write_csv(tmp_path / "d.csv", rows)
    with pytest.raises(UserError, match=r"data\.shots: found 4 per class, but class 'neutral' has 1"):
        _splits(str(path), "data.shots=4", "data.split.validation=0.3", "data.split.test=0.2")
