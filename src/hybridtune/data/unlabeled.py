"""Texts without labels (`data.unlabeled`) and a self-training round's pseudo-labels (`data.pseudo_labels`).

    data:
      unlabeled: more_reviews.csv   # a csv/tsv/jsonl/json/parquet file or a saved HF dataset dir:
                                    # its data.text_column; a .txt file: one text per line
      unlabeled: bundled:imdb       # a bundled set's texts
      unlabeled: train_rest         # the train split's rows the few-shot draw left out, labels dropped

`load_unlabeled(data_cfg, splits, labels) -> list[str]` is the one reader, for every feature that
learns from unlabelled text (self-training, hybridtune/self_training/; distillation): the caller
loads the labelled splits and the label space first, as a run does:

    task = tasks.for_recipe(recipe)
    splits = task.load_splits(recipe.data)
    texts = load_unlabeled(recipe.data, splits, task.label_space(splits, recipe.data))

What it keeps: every text once (stripped text compared, the first kept), and none that is in the
labelled train, validation or test split: a test text pseudo-labelled and trained on would leak the
test set into training (transductive), a train text is labelled already. A label column in the file
is allowed (its labels are dropped) but must agree with the label set: a label outside it says the
file is of another task, and stops at its file:row. A blank label is no label.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from hybridtune import bundled
from hybridtune.data import Splits, check_columns, check_texts
from hybridtune.data.lines import text_lines
from hybridtune.data.sources import read_table
from hybridtune.errors import UserError

TRAIN_REST = "train_rest"
KEY = "data.unlabeled"


@dataclass
class Unlabeled:
    """The texts and what was dropped on the way (report.json shows it)."""

    texts: list[str]
    source: str
    read: int  # rows read
    duplicates: int  # repeated texts dropped
    overlap: int  # texts of the labelled splits dropped

    def summary(self) -> dict:
        return {
            "source": self.source,
            "read": self.read,
            "duplicates": self.duplicates,
            "in_labelled_splits": self.overlap,
            "texts": len(self.texts),
        }


def load_unlabeled(data_cfg, splits: Splits, labels=None) -> list[str]:
    """The unlabelled texts of `data_cfg.unlabeled` (see the module docstring); `splits`: the
    recipe's labelled splits (train_rest reads their `rest`; their texts are left out); `labels`: the
    label space a label column in the file must agree with (None: not checked)."""
    return read_unlabeled(data_cfg, splits, labels).texts


def read_unlabeled(data_cfg, splits: Splits, labels=None) -> Unlabeled:
    """`load_unlabeled` with the counts of what was dropped."""
    source, column = data_cfg.unlabeled, data_cfg.text_column
    if not source:
        raise UserError(KEY, "nothing", "a file, bundled:<name> or train_rest")
    if source == TRAIN_REST:
        if splits.rest is None:
            raise UserError(
                KEY,
                "train_rest without data.shots",
                "data.shots (train_rest is the rest of the train split the few-shot draw leaves out)",
            )
        frame = splits.rest
    elif bundled.is_bundled(source):
        frame, _ = bundled.dataset(source)
    elif Path(source).suffix.lower() == ".txt":
        frame = _read_lines(Path(source), column)
    else:
        frame = read_table(source, KEY, data_cfg.delimiter)
        if isinstance(frame, dict):  # a saved DatasetDict: every split's texts
            frame = pd.concat(list(frame.values()), ignore_index=True)
    if source != TRAIN_REST:
        check_columns(frame, {"text_column": column}, source)
        check_texts(frame, [column])
        if labels is not None and data_cfg.label_column in frame.columns:
            _check_labels(frame, data_cfg.label_column, labels)
    texts = [str(t) for t in frame[column]]
    labelled = {str(t).strip() for name in ("train", "validation", "test") for t in splits[name][column]}
    seen: set[str] = set()
    kept, duplicates, overlap = [], 0, 0
    for text in texts:
        key = text.strip()
        if key in seen:
            duplicates += 1
        elif key in labelled:
            overlap += 1
        else:
            kept.append(text)
        seen.add(key)
    if not kept:
        raise UserError(
            KEY,
            f"no text left of {source} ({len(texts)} read, {duplicates} repeated, {overlap} in the "
            "labelled train / validation / test splits)",
            "at least one text that is not in the labelled splits",
        )
    return Unlabeled(kept, source, len(texts), duplicates, overlap)


def _read_lines(path: Path, column: str) -> pd.DataFrame:
    """A .txt file of unlabelled text: one text per line, blank lines skipped (not CoNLL tokens:
    unlabelled data is texts)."""
    if not path.is_file():
        raise UserError(KEY, f"'{path}' (no such file)", "a csv/tsv/jsonl/json/parquet/txt file")
    try:
        lines = text_lines(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as e:
        raise UserError(
            str(path), f"bytes that are not UTF-8 at byte {e.start}", "a UTF-8 text file"
        ) from None
    rows = [(line, f"{path}:line {i}") for i, line in enumerate(lines, start=1) if line.strip()]
    if not rows:
        raise UserError(str(path), "no text (an empty file)", "one text per line")
    return pd.DataFrame(rows, columns=[column, "_where"])


def _label_key(value) -> str | None:
    """A label as text, integer-like values as integers ("1", 1.0 -> "1"); None for no label."""
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    try:
        return str(int(float(text))) if float(text).is_integer() else text
    except ValueError:
        return text or None


def _check_labels(frame: pd.DataFrame, column: str, labels) -> None:
    allowed = {str(v) for v in labels.values} | {str(n) for n in labels.names}
    for value, where in zip(frame[column], frame["_where"], strict=True):
        key = _label_key(value)
        if key is not None and key not in allowed:
            raise UserError(
                where,
                f"label {value!r} in column '{column}', not in the label set",
                "one of " + ", ".join(map(repr, labels.values)) + " or no label (unlabelled texts: "
                "a label column, when there is one, must be of this task)",
            )


def read_pseudo_labels(
    cfg, train: pd.DataFrame, columns: dict[str, str], stratify: str | None, check_rows=None
) -> pd.DataFrame:
    """The train split with the rows of `data.pseudo_labels` (a labelled file, as self-training
    writes it) appended; their labels must be among the labelled training rows' labels."""
    frame = read_table(cfg.pseudo_labels, "data.pseudo_labels", cfg.delimiter)
    if isinstance(frame, dict):
        raise UserError("data.pseudo_labels", "a dataset dict", "a single file of labelled rows")
    check_columns(frame, columns, cfg.pseudo_labels)
    frame = frame[[*columns.values(), "_where"]]
    check_texts(frame, [c for k, c in columns.items() if k != "label_column"])
    frame = check_rows(frame) if check_rows else frame
    if stratify:
        known = set(train[stratify])
        for value, where in zip(frame[stratify], frame["_where"], strict=True):
            if value not in known:
                raise UserError(
                    where,
                    f"label {value!r}, not among the labelled training rows' labels",
                    "one of " + ", ".join(map(repr, sorted(known, key=str))),
                )
    return pd.concat([train, frame], ignore_index=True)
