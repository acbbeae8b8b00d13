"""Seeded, stratified train / validation / test splits with no text in two splits.

Duplicates are dropped before splitting (the first occurrence is kept), so a sentence can never be
trained on and then tested on. Stratification keeps each split's label balance; a class too small to
stratify falls back to a plain seeded shuffle. The same seed gives the same split on every machine
(scikit-learn's `train_test_split` over a frame in file order).
"""

from __future__ import annotations

import pandas as pd
from sklearn.model_selection import train_test_split

from hybridtune.errors import UserError


def drop_duplicates(frame: pd.DataFrame, text_columns: list[str]) -> pd.DataFrame:
    key = frame[text_columns].astype(str).apply(lambda col: col.str.strip())
    return frame.loc[~key.duplicated(keep="first")].reset_index(drop=True)


def cut(
    frame: pd.DataFrame, fraction: float, stratify: str | None, seed: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(rest, part) with `part` about `fraction` of the rows."""
    labels = frame[stratify].astype(str) if stratify else None
    n_part = max(1, round(len(frame) * fraction))
    if len(frame) - n_part < 1:  # scikit-learn's own error is a traceback about test_size
        raise UserError(
            "data.split",
            f"{len(frame)} distinct example(s) to split a part of {fraction:.0%} from",
            "at least 3 distinct examples (train, validation and test each get one), or explicit "
            "data.train / data.validation / data.test files",
        )
    can_stratify = labels is not None and labels.value_counts().min() >= 2 and n_part >= labels.nunique()
    rest, part = train_test_split(
        frame, test_size=n_part, random_state=seed, stratify=labels if can_stratify else None, shuffle=True
    )
    return rest.reset_index(drop=True), part.reset_index(drop=True)


def split(
    frame: pd.DataFrame, validation: float, test: float, seed: int, stratify: str | None
) -> dict[str, pd.DataFrame]:
    if len(frame) < 3:
        raise UserError(
            "data.split",
            f"{len(frame)} distinct example(s) to split into train / validation / test",
            "at least 3 distinct examples, or explicit data.train / data.validation / data.test files",
        )
    rest, test_part = cut(frame, test, stratify, seed)
    train, val = cut(rest, validation / (1 - test), stratify, seed)
    return {"train": train, "validation": val, "test": test_part}
