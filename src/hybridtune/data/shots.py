"""Few-shot draws: k labelled examples per class, taken from the train (and validation) split.

    data:
      shots: 8              # k per class, from the train split
      draws: 5              # how many seeded draws compare runs each strategy on
      draw: 0               # the draw this run trains on (compare sets it)
      validation_shots: 8   # per class from the validation split (default: = shots); 0 = none

The protocol of the few-shot literature (SetFit, Tunstall et al. 2022 §4: "8 / 64 labelled examples
per class", mean ± sd over draws): the splits are made as always (data/splits.py: de-duplicated,
seeded, stratified), then draw `i` keeps k rows of each class of the train split. The test split
is untouched, so every draw and every budget is scored on the same rows.

Reproducible and nested: draw `i` permutes each class's rows (in split order, classes in sorted
order) with `numpy.random.default_rng([split.seed, i, 0])` and keeps the first k, so for one draw the
8-shot set is inside the 16-shot set, inside the 64-shot set (a larger budget only adds examples,
which makes budgets comparable draw by draw). Validation uses the stream `[split.seed, i, 1]`.
The kept rows stay in split order.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from hybridtune.errors import UserError


def scored(shots: int | None, draws: int) -> list[int | None]:
    """The draws a recipe is trained and scored on, by `hybridtune compare` and `search` alike: every
    draw 0 .. n-1 of a few-shot recipe with `data.draws` n > 1, else [None]: the recipe as it is
    (its own `data.draw`)."""
    return list(range(draws)) if shots and draws > 1 else [None]


def run_name(name: str, seed: int, draw: int | None) -> str:
    """A seeded run's name in compare and in a search's verdict: `<name>-s<seed>`, with `-d<draw>`
    when it is one of a recipe's draws (`scored`)."""
    return f"{name}-s{seed}" + (f"-d{draw}" if draw is not None else "")


def draw(
    frame: pd.DataFrame, label_column: str, k: int, seed: int, draw: int, stream: int, key: str, split: str
) -> pd.DataFrame:
    """k rows of every class of `frame` (see the module docstring); a class with fewer than k rows is
    a UserError naming `key`."""
    labels = frame[label_column]
    counts = labels.value_counts()
    small = counts[counts < k]
    if len(small):
        label = sorted(small.index, key=lambda v: (counts[v], str(v)))[0]
        raise UserError(
            key,
            f"{k} per class, but class {label!r} has {counts[label]} example(s) in the {split} split",
            f"at most {counts.min()} (the smallest class of the {split} split)",
            "data.validation_shots: 0 trains without a validation split" if split == "validation" else None,
        )
    rng = np.random.default_rng([seed, draw, stream])
    keep: list[int] = []
    for value in sorted(counts.index, key=lambda v: (str(type(v)), v)):
        rows = np.flatnonzero((labels == value).to_numpy())
        keep += rows[rng.permutation(len(rows))[:k]].tolist()
    return frame.iloc[sorted(keep)].reset_index(drop=True)


def apply(frames: dict[str, pd.DataFrame], cfg, label_column: str) -> dict[str, pd.DataFrame]:
    """The train (and validation) split cut to the recipe's draw; `validation_shots: 0` leaves an
    empty validation split (the run trains its fixed number of steps and keeps the last model)."""
    seed = cfg.split.seed
    out = dict(frames)
    out["train"] = draw(frames["train"], label_column, cfg.shots, seed, cfg.draw, 0, "data.shots", "train")
    k_val = cfg.shots if cfg.validation_shots is None else cfg.validation_shots
    if k_val == 0:
        out["validation"] = frames["validation"].iloc[:0]
    else:
        out["validation"] = draw(
            frames["validation"],
            label_column,
            k_val,
            seed,
            cfg.draw,
            1,
            "data.validation_shots",
            "validation",
        )
    return out
