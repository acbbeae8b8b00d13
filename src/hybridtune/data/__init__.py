"""Data: sources -> checked table -> train / validation / test splits (pandas frames with `_where`)."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from hybridtune import bundled
from hybridtune.data.sources import read_table
from hybridtune.data.splits import cut, drop_duplicates, split
from hybridtune.errors import UserError, did_you_mean

SPLITS = ("train", "validation", "test")


@dataclass
class Splits:
    train: pd.DataFrame
    validation: pd.DataFrame
    test: pd.DataFrame
    label_names: list[str] | None = None  # known names of integer labels (bundled data)
    # the train split's rows the few-shot draw left out (None without data.shots): what
    # `data.unlabeled: train_rest` reads, labels dropped (data/unlabeled.py)
    rest: pd.DataFrame | None = None

    def __getitem__(self, name: str) -> pd.DataFrame:
        return getattr(self, name)


def check_columns(frame: pd.DataFrame, columns: dict[str, str], origin: str) -> None:
    """`columns`: recipe key -> column name; every one must exist in the frame."""
    present = [c for c in frame.columns if c != "_where"]
    for key, column in columns.items():
        if column not in present and len(present) == 1 and "delimiter" in frame.attrs:
            # a CSV file the delimiter split into nothing: every row is one column
            shown = {"\t": "tab"}.get(frame.attrs["delimiter"], repr(frame.attrs["delimiter"]))
            raise UserError(
                f"{origin} (data.delimiter)",
                f"every row one column ('{present[0][:60]}') when split at {shown}",
                f"the columns {', '.join(repr(c) for c in columns.values())}: set data.delimiter to the "
                "file's delimiter",
            )
        if column not in present:
            raise UserError(
                f"{origin} (data.{key})",
                f"no column '{column}' (columns: {', '.join(map(str, present))})",
                f"a column named '{column}'",
                did_you_mean(column, map(str, present)),
            )


def check_texts(frame: pd.DataFrame, text_columns: list[str]) -> None:
    for column in text_columns:
        for value, where in zip(frame[column], frame["_where"], strict=True):
            if value is None or (isinstance(value, float) and pd.isna(value)):
                raise UserError(f"{where}", f"no value in column '{column}'", "a non-empty text")
            if not isinstance(value, str):
                raise UserError(
                    f"{where}", f"{value!r} ({type(value).__name__}) in column '{column}'", "a text"
                )
            if not value.strip():
                raise UserError(f"{where}", f"an empty text in column '{column}'", "a non-empty text")


def load_splits(
    cfg,
    columns: dict[str, str],
    stratify: str | None,
    check_rows=None,
    inputs: list[str] | None = None,
    texts: bool = True,
) -> Splits:
    """Read `cfg.source` (split automatically) or `cfg.train/validation/test`; check columns and texts.

    `check_rows(frame) -> frame` is the task's own check and normalisation of each file's rows (labels),
    run in file order before any split, so the first bad row of a file is the one reported.
    `inputs`: the columns that make an example (duplicates are dropped on them); default: every column
    but `label_column`. `texts`: whether the inputs are texts, checked here; False for inputs of another
    kind (token lists), which `check_rows` checks."""
    label_names = None
    frames: dict[str, pd.DataFrame] = {}
    if cfg.source:
        if bundled.is_bundled(cfg.source):
            table, label_names = bundled.dataset(cfg.source)
        else:
            table = read_table(cfg.source, "data.source", cfg.delimiter)
        if isinstance(table, dict):  # a saved DatasetDict brings its own splits
            frames = {name: table[name] for name in SPLITS if name in table}
            if "train" not in frames:
                raise UserError("data.source", f"splits {', '.join(table)}", "a 'train' split")
        else:
            frames = {"train": table}
    else:
        for name in SPLITS:
            path = getattr(cfg, name)
            if path:
                frames[name] = read_table(path, f"data.{name}", cfg.delimiter)
                if isinstance(frames[name], dict):
                    raise UserError(
                        f"data.{name}", "a dataset dict", "a single split (file or saved Dataset)"
                    )
    text_columns = inputs or [c for k, c in columns.items() if k != "label_column"]
    for name, frame in frames.items():
        origin = getattr(cfg, name) or cfg.source or name
        check_columns(frame, columns, str(origin))
        frame = frame[[*columns.values(), "_where"]]
        if texts:
            check_texts(frame, text_columns)
        frames[name] = check_rows(frame) if check_rows else frame
    # split off what was not given, seeded and stratified, with duplicates dropped first
    seed = cfg.split.seed
    if "validation" not in frames or "test" not in frames:
        train = drop_duplicates(frames["train"], text_columns)
        if "test" not in frames and "validation" not in frames:
            parts = split(train, cfg.split.validation, cfg.split.test, seed, stratify)
        else:
            missing = "test" if "test" not in frames else "validation"
            fraction = getattr(cfg.split, missing)
            rest, part = cut(train, fraction, stratify, seed)
            parts = {"train": rest, missing: part}
        frames.update(parts)
    if cfg.max_train_samples:
        frames["train"] = frames["train"].iloc[: cfg.max_train_samples]
    if cfg.max_eval_samples:
        for name in ("validation", "test"):
            frames[name] = frames[name].iloc[: cfg.max_eval_samples]
    rest = None
    if getattr(cfg, "shots", None):  # few-shot: draw `data.draw` of k per class (data/shots.py)
        from hybridtune.data import shots

        pool = frames["train"]
        frames = shots.apply(frames, cfg, stratify)
        rest = pool[~pool["_where"].isin(set(frames["train"]["_where"]))].reset_index(drop=True)
    if getattr(cfg, "pseudo_labels", None):  # a self-training round's rows (data/unlabeled.py)
        from hybridtune.data.unlabeled import read_pseudo_labels

        frames["train"] = read_pseudo_labels(cfg, frames["train"], columns, stratify, check_rows)
    if getattr(cfg, "augment", None) is not None:  # EDA copies of the training texts (data/augment.py)
        from hybridtune.data.augment import augment

        frames["train"] = augment(frames["train"], text_columns[0], stratify, cfg.augment, cfg.draw)
    for name in SPLITS:
        if name == "validation" and getattr(cfg, "validation_shots", None) == 0:
            continue  # few-shot without a validation split: a fixed number of steps, the last model
        if len(frames[name]) == 0:
            raise UserError(f"data ({name} split)", "no examples", "at least one example per split")
    return Splits(
        **{name: frames[name].reset_index(drop=True) for name in SPLITS}, label_names=label_names, rest=rest
    )
