"""Augmentation without a network: EDA's word operations (Wei & Zou 2019, "EDA: Easy Data
Augmentation Techniques for Boosting Performance on Text Classification Tasks").

    data:
      augment:
        n: 4                          # augmented copies per training example
        ops: [swap, delete, insert]   # copy j uses ops[j % len(ops)]
        alpha: 0.1                    # share of the words a copy changes (EDA's α)
        seed: 0

- swap: swap two random words, round(α·words) times (at least once);
- delete: drop each word with probability α (at least one word stays);
- insert: insert round(α·words) words (at least one), each a random word of the *same class's*
  training texts, at a random place. EDA inserts WordNet synonyms; a synonym list or a model is a
  download, so hybridtune takes words from the data's own vocabulary, and from the example's class
  so that an inserted word cannot speak for another label.

Only the train split is augmented (after a few-shot draw: data/shots.py), only its text column,
each copy kept next to its original with `_where` "<original> (augmented j)"; a copy equal to its
original or to an earlier copy is dropped. Seeded: `numpy.random.default_rng([seed, draw])`, the
same copies on every machine. Back-translation and model-made paraphrases or synonyms need a model
download, so they are not offered (docs/few_shot.md).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

Op = Literal["swap", "delete", "insert"]


class AugmentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n: int = Field(4, ge=1, le=64, description="augmented copies per training example")
    ops: list[Op] = Field(
        default_factory=lambda: ["swap", "delete", "insert"],
        min_length=1,
        description="EDA operations, taken in turn: copy j uses ops[j % len(ops)]",
    )
    alpha: float = Field(0.1, gt=0, le=0.5, description="share of a text's words one copy changes (EDA's α)")
    seed: int = Field(0, description="with the draw, seeds every choice")


def _changes(alpha: float, words: int) -> int:
    return max(1, round(alpha * words))


def augment_text(text: str, op: str, alpha: float, vocabulary: list[str], rng: np.random.Generator) -> str:
    """One EDA copy of `text` (words split on whitespace)."""
    words = text.split()
    if op == "swap" and len(words) > 1:
        for _ in range(_changes(alpha, len(words))):
            i, j = rng.choice(len(words), size=2, replace=False)
            words[i], words[j] = words[j], words[i]
    elif op == "delete" and len(words) > 1:
        kept = [w for w in words if rng.random() >= alpha]
        words = kept or [words[int(rng.integers(len(words)))]]
    elif op == "insert" and vocabulary:
        for _ in range(_changes(alpha, len(words))):
            words.insert(int(rng.integers(len(words) + 1)), vocabulary[int(rng.integers(len(vocabulary)))])
    return " ".join(words)


def augment(
    frame: pd.DataFrame, text_column: str, label_column: str, config: AugmentConfig, draw: int = 0
) -> pd.DataFrame:
    """The train frame with `config.n` EDA copies after each row (see the module docstring)."""
    rng = np.random.default_rng([config.seed, draw])
    vocab: dict = {}
    for text, label in zip(frame[text_column], frame[label_column], strict=True):
        vocab.setdefault(label, {}).update(dict.fromkeys(text.split()))  # first-seen order: reproducible
    vocabulary = {label: list(words) for label, words in vocab.items()}
    rows = []
    for record in frame.to_dict("records"):
        rows.append(record)
        seen = {record[text_column]}
        for j in range(config.n):
            op = config.ops[j % len(config.ops)]
            text = augment_text(record[text_column], op, config.alpha, vocabulary[record[label_column]], rng)
            if text in seen:
                continue
            seen.add(text)
            rows.append({**record, text_column: text, "_where": f"{record['_where']} (augmented {j + 1})"})
    return pd.DataFrame(rows, columns=frame.columns).reset_index(drop=True)
