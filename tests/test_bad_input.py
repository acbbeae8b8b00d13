"""Bad input stops before training: exit code 2, one message (where, found, expected), no traceback,
and no run dir left behind. One case at a time: data files, recipe keys, model dirs, the console entry
point (tests/test_bad_input_catalogue.py: one bad input of each kind, a full disk, what is read)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from .conftest import sentiment_rows, write_csv
from .refusal import assert_refused, refused


@pytest.fixture
def base(tmp_path, tiny_bert):
    def make(data: str, *extra: str) -> list[str]:
        return [
            "train",
            f"model={tiny_bert}",
            f"data.source={data}",
            "train.max_steps=2",
            f"output.dir={tmp_path / 'runs'}",
            *extra,
        ]

    return make


def test_missing_data_file(base, tmp_path):
    refused(base(str(tmp_path / "nope.csv")), tmp_path / "runs", "data.source", "nope.csv", "no such file")


def test_missing_column_with_suggestion(base, tmp_path):
    path = write_csv(tmp_path / "d.csv", sentiment_rows(20), header=("txt", "label"))
    refused(base(str(path)), tmp_path / "runs", "no column 'text'", "txt", "did you mean 'txt'")


def test_empty_dataset(base, tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text("text,label\n")
    refused(base(str(path)), tmp_path / "runs", "empty.csv", "no rows")


def test_empty_file(base, tmp_path):
    path = tmp_path / "zero.csv"
    path.write_text("")
    refused(base(str(path)), tmp_path / "runs", "zero.csv", "an empty file")


def test_label_in_test_never_seen_in_train(base, tmp_path):
    train = write_csv(tmp_path / "train.csv", sentiment_rows(30))
    test = write_csv(tmp_path / "test.csv", [("fine words", "positive"), ("odd words", "neutral")])
    args = base(str(train))
    args[2] = "data.source=null"
    refused(
        [*args, f"data.train={train}", f"data.test={test}"],
        tmp_path / "runs",
        "test.csv:row 3",
        "'neutral'",
        "never seen in training",
    )


@pytest.mark.parametrize("text, word", [("", "empty text"), ("   ", "empty text")])
def test_empty_text(base, tmp_path, text, word):
    rows = sentiment_rows(20)
    rows[4] = (text, "positive")
    path = write_csv(tmp_path / "d.csv", rows)
    refused(base(str(path)), tmp_path / "runs", "d.csv:row 6", word)


def test_null_text_in_jsonl(base, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "good", "label": 1}\n{"text": null, "label": 0}\n')
    refused(base(str(path)), tmp_path / "runs", "d.jsonl:line 2", "no value in column 'text'")


def test_unknown_recipe_key_with_did_you_mean(base, tmp_path, sentiment_csv):
    refused(
        base(sentiment_csv, "train.learning_rate=0.1"),
        tmp_path / "runs",
        "train.learning_rate",
        "unknown key",
        "did you mean 'lr'",
    )


def test_unknown_key_in_recipe_file(tmp_path, sentiment_csv):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"data: {sentiment_csv}\ntrian:\n  epochs: 1\n")
    refused(
        ["train", str(recipe), f"output.dir={tmp_path / 'runs'}"],
        tmp_path / "runs",
        "r.yaml: trian",
        "did you mean 'train'",
    )


def test_value_of_the_wrong_type(base, tmp_path, sentiment_csv):
    refused(
        base(sentiment_csv, "train.batch_size=big"), tmp_path / "runs", "train.batch_size", "'big'", "integer"
    )


def test_k_larger_than_the_number_of_blocks(base, tmp_path, sentiment_csv):
    refused(
        base(sentiment_csv, "freeze.trainable=[{top_k: 9}]"),
        tmp_path / "runs",
        "freeze.trainable[0].top_k",
        "9",
        "at most 2",
        "2 blocks",
    )


def test_model_dir_that_does_not_exist(base, tmp_path, sentiment_csv):
    refused(
        base(sentiment_csv, f"model={tmp_path / 'no-model'}"),
        tmp_path / "runs",
        "model.name",
        "no such directory",
    )


def test_model_dir_without_config(base, tmp_path, sentiment_csv):
    (tmp_path / "hollow").mkdir()
    refused(
        base(sentiment_csv, f"model={tmp_path / 'hollow'}"),
        tmp_path / "runs",
        "model.name",
        "without config.json",
    )


def test_mixed_numeric_and_string_labels(base, tmp_path):
    path = write_csv(
        tmp_path / "d.csv", [("a good film", "1"), ("a bad film", "0"), ("so so", "meh")] + sentiment_rows(10)
    )
    refused(base(str(path)), tmp_path / "runs", "d.csv:row 4", "'meh'")


def test_eval_of_a_dir_that_is_no_run(tmp_path):
    refused(["eval", str(tmp_path)], tmp_path, "no finished run")


def test_real_process_exit_code_and_stderr(tmp_path):
    """The installed console entry point: code 2, one line on stderr, nothing on stdout, no traceback."""
    proc = subprocess.run(
        [sys.executable, "-m", "hybridtune", "train", "train.epochs=-1", f"output.dir={tmp_path / 'runs'}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert_refused(proc, tmp_path / "runs", "train.epochs", "-1", absent=True)
    assert proc.stdout == ""
