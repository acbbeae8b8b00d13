"""Sequence classification: binary or multi-class, integer or string labels, one text or a text pair.

Owns its preprocessing (label ids, tokenization), its head (AutoModelForSequenceClassification adds
a new classifier on top of any backbone), its loss (the model's cross-entropy) and its metrics
(accuracy, macro-F1; per-class report and confusion matrix from scikit-learn).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, f1_score

from hybridtune.data import Splits, check_columns, check_texts
from hybridtune.data import load_splits as load_data_splits
from hybridtune.data.long_texts import DOC, encode_texts, per_document, pool
from hybridtune.data.sources import read_table
from hybridtune.device import to_device
from hybridtune.errors import UserError
from hybridtune.tasks import baseline

NAME = "classification"  # its spec: hybridtune/tasks/__init__.py; the contract: tasks/base.py
peft_task_type = "SEQ_CLS"


@dataclass
class Labels:
    values: list  # the label values as found in the data, in id order
    names: list[str]
    pool: str = "mean"  # data.pool: a document's logits from its windows' (data.long_texts: chunks)

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.names))

    @property
    def label2id(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.names)}


def columns(data_cfg) -> dict[str, str]:
    cols = {"text_column": data_cfg.text_column}
    if data_cfg.text_pair_column:
        cols["text_pair_column"] = data_cfg.text_pair_column
    cols["label_column"] = data_cfg.label_column
    return cols


def _as_label(value, where: str):
    """An int for integer-like labels (1, "1", 1.0), the stripped string otherwise."""
    if (
        value is None
        or (isinstance(value, float) and np.isnan(value))
        or (isinstance(value, str) and not value.strip())
    ):
        raise UserError(where, "no label", "a label in every row")
    if not isinstance(value, (str, int, float, np.integer, np.floating)):  # a JSON list or object
        found = repr(value)[:60]
        raise UserError(where, f"label {found} ({type(value).__name__})", "an integer or a class name")
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        if float(value).is_integer():
            return int(value)
        raise UserError(where, f"label {value!r}", "an integer or a class name")
    text = str(value).strip()
    try:
        return int(text)
    except ValueError:
        return text


def row_checker(data_cfg):
    """The per-file check `load_splits` runs before splitting: labels present, of one kind, normalised."""
    return lambda frame: normalise_labels(frame, data_cfg.label_column)


def load_splits(data_cfg) -> Splits:
    return load_data_splits(data_cfg, columns(data_cfg), data_cfg.label_column, row_checker(data_cfg))


def normalise_labels(frame: pd.DataFrame, column: str) -> pd.DataFrame:
    values = [_as_label(v, w) for v, w in zip(frame[column], frame["_where"], strict=True)]
    first_kind = isinstance(values[0], int)
    for value, where in zip(values, frame["_where"], strict=True):
        if isinstance(value, int) != first_kind:
            kinds = ("integers", "a name") if first_kind else ("names", "an integer")
            raise UserError(
                where, f"label {value!r}, {kinds[1]}, among {kinds[0]}", f"labels that are all {kinds[0]}"
            )
    frame = frame.copy()
    frame[column] = values
    return frame


def label_space(splits, data_cfg) -> Labels:
    """Labels seen in training, sorted; validation/test labels must be among them."""
    column = data_cfg.label_column
    values = sorted(set(splits.train[column]))
    if len(values) < 2:
        raise UserError(
            f"data.{column} (train split)", f"{len(values)} distinct label(s) {values}", "at least 2 classes"
        )
    for name in ("validation", "test"):
        for value, where in zip(splits[name][column], splits[name]["_where"], strict=True):
            if value not in values:
                raise UserError(
                    where,
                    f"label {value!r}, never seen in training",
                    "one of " + ", ".join(map(repr, values)),
                )
    known = splits.label_names
    names = [known[v] if known and isinstance(v, int) and 0 <= v < len(known) else str(v) for v in values]
    return Labels(values=values, names=names)


def encode(frame: pd.DataFrame, tokenizer, labels: Labels | None, data_cfg):
    """A datasets.Dataset of input_ids / attention_mask (/ token_type_ids) and `labels` ids; with
    `data.long_texts: chunks`, a row per window and a `doc` column (data/long_texts.py)."""
    return encode_counted(frame, tokenizer, labels, data_cfg)[0]


def encode_counted(frame: pd.DataFrame, tokenizer, labels: Labels | None, data_cfg) -> tuple:
    """(`encode`'s dataset, what it kept of the texts: data/long_texts.py's counts, as JSON)."""
    import datasets

    texts = frame[data_cfg.text_column].tolist()
    pairs = frame[data_cfg.text_pair_column].tolist() if data_cfg.text_pair_column else None
    columns, counts = encode_texts(tokenizer, texts, pairs, data_cfg)
    if labels is not None and data_cfg.label_column in frame:
        index = {v: i for i, v in enumerate(labels.values)}
        ids = [index[v] for v in frame[data_cfg.label_column]]
        columns["labels"] = [ids[d] for d in columns[DOC]] if DOC in columns else ids
    return datasets.Dataset.from_dict(columns), counts.to_json()


def load_model(path: str, tokenizer, labels: Labels):
    from transformers import AutoModelForSequenceClassification

    from hybridtune.model.loading import load_model as load

    return load(
        AutoModelForSequenceClassification,
        path,
        tokenizer,
        num_labels=len(labels.names),
        id2label=labels.id2label,
        label2id=labels.label2id,
    )


def collator(tokenizer):
    from transformers import DataCollatorWithPadding

    return DataCollatorWithPadding(tokenizer)


def make_compute_metrics(labels: Labels):
    return partial(compute_metrics, pool_by=labels.pool)


def compute_metrics(eval_pred, pool_by: str = "mean") -> dict[str, float]:
    """Accuracy and macro-F1; per document when the labels come with the windows' documents (the
    engine hands them over for a chunked split: (labels, docs))."""
    logits, y_true = eval_pred
    logits = logits[0] if isinstance(logits, tuple) else logits
    if isinstance(y_true, tuple):
        y_true, docs = y_true
        logits, y_true = pool(logits, docs, pool_by), per_document(y_true, docs)
    y_pred = np.asarray(logits).argmax(-1)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "f1_macro": float(f1_score(y_true, y_pred, average="macro")),
    }


def full_report(y_true: np.ndarray, logits: np.ndarray, labels: Labels) -> dict:
    """accuracy, macro-F1, per-class precision/recall/F1/support, the confusion matrix, the
    majority-class baseline and the warnings of a model no better than it (tasks/baseline.py)."""
    y_pred = logits.argmax(-1)
    ids = list(range(len(labels.names)))
    per_class = classification_report(
        y_true, y_pred, labels=ids, target_names=labels.names, output_dict=True, zero_division=0
    )
    accuracy = float(accuracy_score(y_true, y_pred))
    names = labels.names
    base = baseline.shares([names[i] for i in y_true], [names[i] for i in y_pred], names)
    return {
        "accuracy": accuracy,
        "f1_macro": float(f1_score(y_true, y_pred, labels=ids, average="macro", zero_division=0)),
        "n": int(len(y_true)),
        "per_class": {name: per_class[name] for name in labels.names},
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=ids).tolist(),
        "labels": labels.names,
        # the majority-class baseline and the most-predicted class; warnings when no better (baseline.py)
        "baseline": base,
        "warnings": baseline.classification_warnings(accuracy, base, len(y_true)),
    }


@torch.no_grad()
def logits_of(
    model: torch.nn.Module, tokenizer, dataset, batch_size: int = 128, pool_by: str = "mean"
) -> np.ndarray:
    """Logits for every row of a tokenized dataset, in order; for a chunked one (a `doc` column),
    for every document: its windows' logits pooled by `pool_by` (mean | max). Rows are batched by
    length (sorted, then put back in order): dynamic padding pads each batch to its longest row, so
    sorting cuts the padding a forward pass computes on (the attention mask makes the result the same)."""
    collate = collator(tokenizer)
    model.eval()
    device = next(model.parameters()).device
    features = [{k: v for k, v in row.items() if k not in ("labels", DOC)} for row in dataset]
    order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))
    out = []
    for i in range(0, len(order), batch_size):
        # on CUDA: pinned host memory, non-blocking copies
        batch = to_device(collate([features[j] for j in order[i : i + batch_size]]), device)
        out.append(model(**batch).logits.float().cpu().numpy())
    if not out:
        return np.zeros((0, 0))
    logits = np.empty_like(np.concatenate(out))
    logits[order] = np.concatenate(out)
    return pool(logits, dataset[DOC], pool_by) if DOC in dataset.column_names else logits


def report(model: torch.nn.Module, tokenizer, dataset, labels: Labels) -> dict:
    """`full_report` of the model's predictions on an encoded dataset (with labels), per document."""
    y_true = np.asarray(dataset["labels"])
    if DOC in dataset.column_names:
        y_true = per_document(y_true, dataset[DOC])
    return full_report(y_true, logits_of(model, tokenizer, dataset, pool_by=labels.pool), labels)


def eval_frame(data: str | None, data_cfg, labels: Labels) -> pd.DataFrame:
    """The rows to evaluate: the recipe's test split, or every row of `data` (a file or dataset dir)."""
    if data is None:
        frame = load_splits(data_cfg).test
    else:
        frame = read_table(data, "--data", data_cfg.delimiter)
        if isinstance(frame, dict):
            frame = frame["test"] if "test" in frame else next(iter(frame.values()))
        check_columns(frame, columns(data_cfg), data)
        check_texts(frame, [c for k, c in columns(data_cfg).items() if k != "label_column"])
        frame = normalise_labels(frame, data_cfg.label_column)
    for value, where in zip(frame[data_cfg.label_column], frame["_where"], strict=True):
        if value not in labels.values:
            raise UserError(
                where,
                f"label {value!r}, unknown to this run",
                "one of " + ", ".join(map(repr, labels.values)),
            )
    return frame


def predict(
    model, tokenizer, labels: Labels, data_cfg, texts: list[str], text_pairs=None, encoder=None
) -> list[dict]:
    """Label, score and class probabilities for each text (`encoder`: another task's `encode`)."""
    frame = prediction_frame(data_cfg, texts, text_pairs)
    dataset = (encoder or encode)(frame, tokenizer, None, data_cfg)
    logits = logits_of(model, tokenizer, dataset, pool_by=labels.pool)
    probs = torch.softmax(torch.from_numpy(logits), -1).numpy()
    return prediction_rows(texts, probs, labels.names)


def prediction_frame(data_cfg, texts: list[str], text_pairs=None) -> pd.DataFrame:
    """The texts to predict as a checked frame with the recipe's columns (text pairs when it has them)."""
    columns = {data_cfg.text_column: texts, "_where": [f"text {i + 1}" for i in range(len(texts))]}
    if data_cfg.text_pair_column:
        if not text_pairs or len(text_pairs) != len(texts):
            raise UserError(
                "--pair",
                f"{len(text_pairs or [])} second texts",
                f"{len(texts)}, one per text (this run takes text pairs)",
            )
        columns[data_cfg.text_pair_column] = text_pairs
    frame = pd.DataFrame(columns)
    check_texts(frame, [c for c in columns if c != "_where"])
    return frame


def prediction_rows(texts: list[str], probs: np.ndarray, names: list[str]) -> list[dict]:
    """One row per text: the predicted label, its probability and every class's probability."""
    return [
        {
            "text": t,
            "label": names[int(p.argmax())],
            "score": float(p.max()),
            "probs": dict(zip(names, map(float, p), strict=True)),
        }
        for t, p in zip(texts, probs, strict=True)
    ]


def format_prediction(row: dict) -> str:
    return f"{row['label']}\t{row['score']:.4f}\t{row['text']}"


def eval_tables(report: dict, title: str = "test") -> list:
    from hybridtune.report.console import eval_tables as tables

    return tables(report, title=title)
