"""Property-based fuzzing (hypothesis) of the recipe loader and the data readers: whatever the input,
the result is a validated Recipe / a table, or our clean UserError; never another exception."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pandas as pd
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hybridtune.data.conll import check_sentence, read_conll
from hybridtune.data.sources import read_table
from hybridtune.errors import UserError
from hybridtune.recipe import Recipe, load_recipe

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# recipe keys and values users write, so that examples reach deep into the schema, not only the top
KEYS = st.sampled_from(
    [
        "name", "task", "model", "data", "train", "output", "freeze", "peft", "adapters", "soft_prompt",
        "lr", "schedule", "stages", "source", "epochs", "lr", "batch_size", "precision", "trainable",
        "method", "r", "top_k", "plan", "steps", "fraction", "train", "warmup", "early_stopping",
        "metric", "patience", "max_length", "split", "test", "on_nan", "layer_decay", "keep_checkpoints",
    ]
)  # fmt: skip
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["head", "all", "lora", "cosine", "fp32", "skip", "bundled:minilm", "{top_k: 2}"]),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(KEYS | st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def _clean(e: UserError) -> None:
    """One line (the CLI prints it as is) that says what was found and what was expected."""
    message = str(e)
    assert "\n" not in message and "; expected " in message and ": found " in message, message


def _recipe_or_clean_error(path=None, overrides=None) -> None:
    try:
        assert isinstance(load_recipe(path, overrides), Recipe)
    except UserError as e:
        _clean(e)


@FUZZ
@given(st.dictionaries(KEYS, VALUES, max_size=6))
def test_recipe_dicts(raw):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "r.yaml"
        path.write_text(yaml.safe_dump(raw), encoding="utf-8")
        _recipe_or_clean_error(path)


@FUZZ
@given(st.text(max_size=200) | st.binary(max_size=200).map(lambda b: b.decode("latin-1")))
def test_recipe_yaml_text(text):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "r.yaml"
        path.write_bytes(text.encode("utf-8", "surrogatepass"))
        _recipe_or_clean_error(path)


@FUZZ
@given(
    st.lists(
        st.tuples(
            st.lists(KEYS, min_size=1, max_size=3).map(".".join) | st.text(max_size=10), st.text(max_size=20)
        ).map(lambda kv: f"{kv[0]}={kv[1]}")
        | st.text(max_size=20),
        max_size=4,
    )
)
def test_recipe_overrides(overrides):
    _recipe_or_clean_error(None, overrides)


# data: bytes of every kind in every file type we read, and well-formed files of odd content

SUFFIXES = st.sampled_from([".csv", ".tsv", ".jsonl", ".json", ".conll", ".txt"])
CELLS = st.text(st.characters(blacklist_categories=["Cs"]), max_size=12)


def _table_or_clean_error(path: Path) -> None:
    try:
        frame = read_table(str(path), "data.source")
    except UserError as e:
        return _clean(e)
    assert isinstance(frame, pd.DataFrame) and len(frame) > 0 and "_where" in frame


@FUZZ
@given(SUFFIXES, st.binary(max_size=300))
def test_data_files_of_random_bytes(suffix, content):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"d{suffix}"
        path.write_bytes(content)
        _table_or_clean_error(path)


@FUZZ
@given(
    SUFFIXES,
    st.lists(
        st.lists(CELLS | st.sampled_from(['"', "\r\n", "\t", ",", "{", "}", "O", "B-x", "I-y"]), max_size=4),
        max_size=6,
    ),
    st.sampled_from(["\n", "\r\n", "\t", ","]),
)
def test_data_files_of_random_rows(suffix, rows, sep):
    """Structured enough to get past the first byte: rows of cells with separators of any kind."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"d{suffix}"
        text = "\n".join(sep.join(row) for row in rows)
        path.write_text(text, encoding="utf-8")
        _table_or_clean_error(path)


TAGS = st.sampled_from(["O", "B-per", "I-per", "B-loc", "I-loc", "I-", "B", "x", "", " ", None, 3])


@FUZZ
@given(st.lists(st.tuples(CELLS, TAGS), max_size=12), st.booleans())
def test_conll_and_sentences(pairs, as_file):
    """CoNLL files, and token/tag lists from a table row (JSON Lines, parquet)."""
    if as_file:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "d.conll"
            path.write_text("\n".join(f"{token}\t{tag}" for token, tag in pairs), encoding="utf-8")
            try:
                frame = read_conll(path)
            except UserError as e:
                return _clean(e)
            assert all(len(t) == len(g) > 0 for t, g in zip(frame["tokens"], frame["tags"], strict=True))
    else:
        try:
            check_sentence([p[0] for p in pairs], [p[1] for p in pairs], "d.jsonl:line 1")
        except UserError as e:
            _clean(e)
