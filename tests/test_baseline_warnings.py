"""A run that learned nothing says so (tasks/baseline.py): every classification evaluation reports the
majority-class baseline and the most-predicted class, and warns in eval.json, report.json, the CLI's
test report and compare's table when the model is no better than the baseline or predicts one class."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from hybridtune.cli import app
from hybridtune.tasks import baseline, token_classification
from hybridtune.tasks.classification import Labels, full_report

LABELS = Labels(values=["neg", "neu", "pos"], names=["neg", "neu", "pos"])


def _logits(pred: list[int], classes: int = 3) -> np.ndarray:
    return np.eye(classes)[pred]


def test_a_model_predicting_one_class_is_at_the_majority_baseline():
    y_true = np.array([0] * 5 + [1] * 3 + [2] * 2)
    report = full_report(y_true, _logits([0] * 10), LABELS)
    assert report["accuracy"] == 0.5
    assert report["baseline"] == {
        "majority_label": "neg",
        "majority_share": 0.5,
        "top_predicted_label": "neg",
        "top_predicted_share": 1.0,
        "top_predicted_true_share": 0.5,
    }
    assert baseline.short(report["warnings"]) == ["majority baseline", "one class"]
    assert "'neg' predicted for 100.0% of the 10 examples (its true share: 50.0%)" in report["warnings"][1]
    json.dumps(report)  # eval.json holds it as it is


def test_a_model_that_learned_is_not_warned_about():
    y_true = np.array([0] * 5 + [1] * 3 + [2] * 2)
    report = full_report(y_true, _logits([0, 0, 0, 0, 1, 1, 1, 2, 2, 2]), LABELS)
    assert report["accuracy"] == 0.8 and report["warnings"] == []
    assert report["baseline"]["top_predicted_share"] == 0.4


def test_below_the_baseline_while_spreading_predictions_still_warns():
    y_true = np.array([0] * 6 + [1] * 2 + [2] * 2)
    report = full_report(y_true, _logits([1, 2, 0, 0, 0, 1, 2, 0, 1, 2]), LABELS)
    assert report["accuracy"] == 0.4  # below the 60 % of always answering "neg"
    assert baseline.short(report["warnings"]) == ["majority baseline"]


def test_one_class_is_not_a_collapse_when_the_class_is_that_frequent():
    """97 % of the split is 'neg': predicting it always is the majority baseline, not a second warning."""
    y_true = np.array([0] * 97 + [1] * 3)
    report = full_report(y_true, _logits([0] * 100), LABELS)
    assert baseline.short(report["warnings"]) == ["majority baseline"]


def test_token_classification_warns_when_no_entity_is_found():
    names = ["B-loc", "I-loc", "O"]
    labels = Labels(values=names, names=names)
    gold = [["O", "B-loc", "I-loc", "O"], ["O", "O", "B-loc"]]
    only_o = [["O"] * 4, ["O"] * 3]
    report = token_classification.full_report(gold, only_o, labels)
    assert report["baseline"]["majority_label"] == "O"
    assert report["baseline"]["majority_share"] == pytest.approx(4 / 7)
    assert baseline.short(report["warnings"]) == ["no entities", "one tag", "majority baseline"]
    good = token_classification.full_report(gold, gold, labels)
    assert good["f1"] == 1.0 and good["warnings"] == []


# --------------------------------------------------------------------------------------------------
# through a run: the model's test predictions are made constant (a collapsed classifier)


@pytest.fixture
def collapsed(monkeypatch):
    from hybridtune.tasks import classification

    def constant(model, tokenizer, dataset, batch_size: int = 128, pool_by: str = "mean") -> np.ndarray:
        return np.tile([2.0, -2.0], (len(dataset), 1))  # always the first label

    monkeypatch.setattr(classification, "logits_of", constant)


def _train_cli(tmp_path: Path, tiny_bert: str, sentiment_csv: str):
    args = [
        "train",
        f"model.name={tiny_bert}",
        f"data.source={sentiment_csv}",
        "train.max_steps=2",
        "train.precision=fp32",
        f"output.dir={tmp_path / 'runs'}",
        "output.name=r",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, (result.stderr[-2000:], result.exception)
    return result, tmp_path / "runs" / "r"


def test_a_collapsed_run_is_flagged_in_its_files_its_output_and_compare(
    collapsed, tmp_path, tiny_bert, sentiment_csv
):
    from hybridtune.report.compare import aggregate, run_row, table_rows

    result, run = _train_cli(tmp_path, tiny_bert, sentiment_csv)
    evaluation = json.loads((run / "eval.json").read_text())
    assert evaluation["baseline"]["top_predicted_share"] == 1.0
    assert baseline.short(evaluation["warnings"]) == ["majority baseline", "one class"]
    assert json.loads((run / "report.json").read_text())["warnings"] == evaluation["warnings"]
    assert "warning: majority baseline" in result.stdout and "warning: one class" in result.stdout
    assert "majority-class baseline" in result.stdout and "most-predicted class" in result.stdout

    again = CliRunner().invoke(app, ["eval", str(run)])
    assert again.exit_code == 0 and "warning: one class" in again.stdout

    row = {"strategy": "collapsed", "seed": 0, "run": "r", **run_row(run, {})}
    header, body = table_rows(aggregate([row]))
    assert header[-1] == "warnings"
    assert body[0][-1] == "majority baseline 1/1, one class 1/1"


def test_a_run_that_learned_has_an_empty_warnings_list(tmp_path, tiny_bert, sentiment_csv):
    from hybridtune.report.compare import aggregate, run_row, table_rows

    result, run = _train_cli(tmp_path, tiny_bert, sentiment_csv)
    evaluation = json.loads((run / "eval.json").read_text())
    # two steps of a tiny random model: whether it beats the baseline is not the point; what is
    # reported must agree with its own figures
    expected = baseline.classification_warnings(
        evaluation["accuracy"], evaluation["baseline"], evaluation["n"]
    )
    assert evaluation["warnings"] == expected
    assert ("warning:" in result.stdout) == bool(expected)
    row = {"strategy": "s", "seed": 0, "run": "r", **run_row(run, {})}
    assert table_rows(aggregate([row]))[1][0][-1] == (
        ", ".join(f"{k} 1/1" for k in baseline.short(expected)) or "-"
    )
