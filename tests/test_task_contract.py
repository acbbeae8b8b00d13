"""The task contract (tasks/base.py), tried on a task hybridtune does not have: text regression.

This file is the whole task — a module that satisfies `tasks.base.Task` (the functions below) and
one registration, `tasks.register(SPEC)` (in the `regression` fixture here; in hybridtune itself,
one `register(TaskSpec(...))` in src/hybridtune/tasks/__init__.py) — and the tests that train it
through the normal pipeline (`api.train`), load it back (`api.evaluate`, `api.predict`, the CLI,
plain transformers) and export it. Nothing else in hybridtune names it: the recipe accepts
`task: regression`, early stopping picks `mse` and minimises it, the progress line shows it, export
names its model class — all from SPEC. docs/ARCHITECTURE.md "Adding a task" walks through it.

One number per text; MSE and Pearson's r (numpy); the model is transformers' sequence classifier
with one output and `problem_type="regression"` (its loss is then MSE).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from hybridtune import api, tasks
from hybridtune.cli import app
from hybridtune.data import check_columns, check_texts
from hybridtune.data import load_splits as load_data_splits
from hybridtune.data.sources import read_table
from hybridtune.errors import UserError
from hybridtune.recipe import load_recipe
from hybridtune.tasks import TaskSpec

from .conftest import NEGATIVE, POSITIVE, write_csv

# --------------------------------------------------------------------------------------------------
# the task: what a task module provides (tasks/base.py `Task`), for text regression

NAME = "regression"
peft_task_type = "SEQ_CLS"  # peft's sequence-classification wrapper: a LoRA run keeps its head trainable

SPEC = TaskSpec(
    name=NAME,
    module=__name__,
    auto_model="AutoModelForSequenceClassification",
    data="bundled:rotten_tomatoes",  # its 0 / 1 label read as a number
    metrics=("mse", "pearson", "loss"),
    headline=("mse", "pearson", "n"),
    lower_is_better=frozenset({"mse", "loss"}),
    progress=("mse",),
    label_space=False,
)


@dataclass
class Labels:
    """No label space: the target is a number."""

    values: list = field(default_factory=list)
    names: list[str] = field(default_factory=list)


def _numbers(frame: pd.DataFrame, column: str) -> pd.DataFrame:
    out = []
    for value, where in zip(frame[column], frame["_where"], strict=True):
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = float("nan")
        if not np.isfinite(number):
            raise UserError(where, f"target {str(value)[:40]!r}", "a finite number")
        out.append(number)
    frame = frame.copy()
    frame[column] = out
    return frame


def _columns(data_cfg) -> dict[str, str]:
    return {"text_column": data_cfg.text_column, "label_column": data_cfg.label_column}


def load_splits(data_cfg):
    check = lambda frame: _numbers(frame, data_cfg.label_column)  # noqa: E731
    return load_data_splits(data_cfg, _columns(data_cfg), None, check)  # not stratified: numbers


def label_space(splits, data_cfg) -> Labels:
    return Labels()


def encode(frame: pd.DataFrame, tokenizer, labels, data_cfg):
    import datasets

    texts = frame[data_cfg.text_column].tolist()
    columns = dict(tokenizer(texts, truncation=True, max_length=data_cfg.max_length))
    if labels is not None and data_cfg.label_column in frame:
        columns["labels"] = [float(v) for v in frame[data_cfg.label_column]]
    return datasets.Dataset.from_dict(columns)


def collator(tokenizer):
    from transformers import DataCollatorWithPadding

    return DataCollatorWithPadding(tokenizer)


def load_model(path: str, tokenizer, labels: Labels):
    from transformers import AutoModelForSequenceClassification

    from hybridtune.model.loading import load_model as load

    return load(AutoModelForSequenceClassification, path, tokenizer, num_labels=1, problem_type="regression")


def scores(y_true, y_pred) -> dict[str, float]:
    y_true, y_pred = np.asarray(y_true, float).ravel(), np.asarray(y_pred, float).ravel()
    constant = y_true.std() == 0 or y_pred.std() == 0  # r is undefined; 0 = no linear relation shown
    return {
        "mse": float(np.mean((y_true - y_pred) ** 2)),
        "pearson": 0.0 if constant else float(np.corrcoef(y_true, y_pred)[0, 1]),
    }


def make_compute_metrics(labels: Labels):
    def compute_metrics(eval_pred) -> dict[str, float]:
        predictions, y_true = eval_pred
        return scores(y_true, predictions[0] if isinstance(predictions, tuple) else predictions)

    return compute_metrics


def _predictions(model, tokenizer, dataset) -> np.ndarray:
    from hybridtune.tasks.classification import logits_of  # batched by length, back in order

    return logits_of(model, tokenizer, dataset)[:, 0]


def report(model, tokenizer, dataset, labels: Labels) -> dict:
    return {**scores(dataset["labels"], _predictions(model, tokenizer, dataset)), "n": len(dataset)}


def eval_frame(data: str | None, data_cfg, labels: Labels) -> pd.DataFrame:
    if data is None:
        return load_splits(data_cfg).test
    frame = read_table(data, "--data", data_cfg.delimiter)
    check_columns(frame, _columns(data_cfg), data)
    check_texts(frame, [data_cfg.text_column])
    return _numbers(frame, data_cfg.label_column)


def predict(model, tokenizer, labels: Labels, data_cfg, texts: list[str], text_pairs=None) -> list[dict]:
    frame = pd.DataFrame(
        {data_cfg.text_column: texts, "_where": [f"text {i + 1}" for i in range(len(texts))]}
    )
    check_texts(frame, [data_cfg.text_column])
    values = _predictions(model, tokenizer, encode(frame, tokenizer, None, data_cfg))
    return [{"text": t, "score": float(v)} for t, v in zip(texts, values, strict=True)]


def format_prediction(row: dict) -> str:
    return f"{row['score']:.4f}\t{row['text']}"


def eval_tables(report: dict, title: str = "test") -> list:
    from rich.table import Table

    table = Table(title=f"{title}: {report['n']} texts")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("MSE", f"{report['mse']:.4f}")
    table.add_row("Pearson r", f"{report['pearson']:.4f}")
    return [table]


# --------------------------------------------------------------------------------------------------
# the tests


@pytest.fixture
def regression():
    """The task registered for one test, as a plugin would (`hybridtune.tasks.register`)."""
    tasks.register(SPEC)
    yield SPEC
    tasks.unregister(NAME)


@pytest.fixture
def scores_csv(tmp_path) -> Path:
    """Texts whose number is given away by their words: +1 per positive word, -1 per negative one."""
    rng = random.Random(0)
    rows = []
    for i in range(48):
        pos, neg = rng.randint(0, 2), rng.randint(0, 2)
        words = rng.sample(POSITIVE, pos) + rng.sample(NEGATIVE, neg) + ["the", "film", str(i)]
        rng.shuffle(words)
        rows.append((" ".join(words), pos - neg))
    return write_csv(tmp_path / "scores.csv", rows, header=("text", "label"))


def test_every_registered_task_keeps_the_contract():
    for name in tasks.names():
        spec = tasks.spec(name)
        module = tasks.load(name)  # imported and checked: the required members and its capabilities'
        assert module.NAME == name and spec.headline[0] in (*spec.metrics, *spec.headline)
    assert tasks.names()[:4] == (
        "classification",
        "token_classification",
        "causal_lm",
        "prompt_classification",
    )
    # export and the int8 reload name the spec's model class; a task whose model decides has none
    from hybridtune.inference import auto_class

    assert auto_class("token_classification", "x").__name__ == "AutoModelForTokenClassification"
    with pytest.raises(UserError, match="prompt_classification, whose model class depends on the model"):
        auto_class("prompt_classification", "run.json")
    with pytest.raises(UserError, match="run.json: found task 'nope'; expected one of classification"):
        auto_class("nope", "run.json")
    # the direction of a metric is declared, by name, across tasks
    assert not tasks.higher_is_better("loss") and not tasks.higher_is_better("perplexity")
    assert tasks.higher_is_better("accuracy") and tasks.higher_is_better("f1")


def test_a_module_that_breaks_the_contract_is_refused_by_name():
    broken = TaskSpec(
        name="broken",
        module="hybridtune.tasks.baseline",  # a helper module, no task
        auto_model=None,
        data="bundled:rotten_tomatoes",
        metrics=("loss",),
        headline=("loss",),
    )
    tasks.register(broken)
    try:
        with pytest.raises(TypeError, match="lacks NAME, peft_task_type, Labels, load_splits"):
            tasks.load("broken")
    finally:
        tasks.unregister("broken")
    with pytest.raises(ValueError, match="registered already"):
        tasks.register(tasks.spec("classification"))
    with pytest.raises(ValueError, match="'loss' points the other way"):
        tasks.register(TaskSpec("up", "x", None, "d", ("loss",), ("loss",), lower_is_better=frozenset()))
    with pytest.raises(ValueError, match="unknown capabilities"):
        TaskSpec("x", "x", None, "d", ("loss",), ("loss",), capabilities=frozenset({"fly"}))


def test_the_recipe_accepts_a_task_once_it_is_registered(tiny_bert):
    with pytest.raises(UserError, match="task: found 'regression'.*one of 'classification'"):
        load_recipe(None, ["task=regression"])
    tasks.register(SPEC)
    try:
        recipe = load_recipe(None, ["task=regression"])
        # the spec's defaults and metrics, and what it lacks, all without a line of hybridtune changed
        assert recipe.data.source == "bundled:rotten_tomatoes" and recipe.train.early_stopping.metric == "mse"
        with pytest.raises(UserError, match="not a regression metric; expected one of mse, pearson, loss"):
            load_recipe(None, ["task=regression", "train.early_stopping.metric=accuracy"])
        with pytest.raises(UserError, match="data.long_texts: found chunks with task regression;"):
            load_recipe(None, ["task=regression", "data.long_texts=chunks"])
        with pytest.raises(UserError, match="data.shots: found it with task regression"):
            load_recipe(None, ["task=regression", "data.shots=4"])
        with pytest.raises(UserError, match="trunk_cache: found on, with task regression"):
            load_recipe(None, ["task=regression", "train.trunk_cache=on"])
        from hybridtune.report.stats import higher_is_better
        from hybridtune.train.engine import training_arguments

        assert not higher_is_better("mse")  # compare / search read the direction by name
        args = training_arguments(recipe.train, recipe.output, Path("unused"))
        assert args.metric_for_best_model == "mse" and args.greater_is_better is False
    finally:
        tasks.unregister(NAME)
    with pytest.raises(UserError, match="task: found 'regression'"):
        load_recipe(None, ["task=regression"])


def test_a_new_task_trains_through_the_pipeline_and_loads_back(
    regression, tiny_bert, scores_csv, tmp_path, capsys
):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from hybridtune.export import export

    overrides = [
        "name=regression",
        "task=regression",
        f"model.name={tiny_bert}",
        f"data.source={scores_csv}",
        "train.max_steps=2",
        "train.eval_steps=1",  # a validation pass per step: early stopping reads `mse`, lower is better
        "train.batch_size=8",
        "train.lr=0.001",
        "train.precision=fp32",
        f"output.dir={tmp_path / 'runs'}",
    ]
    summary = api.train(load_recipe(None, overrides))
    run = Path(summary["run_dir"])
    assert summary["metric"] == "mse" and set(summary["test"]) == {"mse", "pearson", "n"}
    assert summary["best_validation_metric"] == "mse" and summary["steps"] == 2
    assert "validation mse " in capsys.readouterr().out  # the progress line shows the spec's `progress`
    last = max((run / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.rsplit("-", 1)[1]))
    state = json.loads((last / "trainer_state.json").read_text())
    evals = [r["eval_mse"] for r in state["log_history"] if "eval_mse" in r]
    assert len(evals) == 2 and state["best_metric"] == min(evals)  # minimised, as the spec says
    info = json.loads((run / "run.json").read_text())
    assert info["task"] == NAME and info["labels"] == []

    # loaded back: evaluate reproduces the test report, predict the numbers plain transformers gives
    test = json.loads((run / "eval.json").read_text())
    again = api.evaluate(str(run))
    assert again["n"] == test["n"] == summary["test"]["n"]
    assert again["mse"] == pytest.approx(test["mse"], rel=1e-5)
    texts = ["the film superb and charming", "a dull, tedious film"]
    rows = api.predict(str(run), texts)
    model = AutoModelForSequenceClassification.from_pretrained(run / "final").eval()
    tokenizer = AutoTokenizer.from_pretrained(run / "final")
    with torch.no_grad():
        plain = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits[:, 0]
    assert [r["score"] for r in rows] == pytest.approx(plain.tolist(), abs=1e-5)

    # the CLI reads the task off run.json; export names the spec's model class
    result = CliRunner().invoke(app, ["predict", str(run), texts[0]])
    assert result.exit_code == 0 and result.output == f"{rows[0]['score']:.4f}\t{texts[0]}\n"
    result = CliRunner().invoke(app, ["eval", str(run)])
    assert result.exit_code == 0 and "Pearson r" in result.output
    meta = export(str(run), "merged", str(tmp_path / "export"))
    assert (
        meta["task"] == NAME
        and meta["load"] == "transformers.AutoModelForSequenceClassification.from_pretrained(DIR)"
    )
