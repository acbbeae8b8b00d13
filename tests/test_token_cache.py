"""The token cache (data/token_cache.py): the runs of an ensemble / compare encode each split once;
what they read from the cache is what encoding would have given; anything that changes the encoding
changes the key; the tokenizer's key ignores the truncation state a call leaves on it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from hybridtune import api
from hybridtune.data import token_cache
from hybridtune.recipe import load_recipe
from hybridtune.train.trunk_store import CACHE_DIR_ENV

SPLITS = ["train", "validation", "test"]


@pytest.fixture(autouse=True)
def empty_memo(monkeypatch):
    monkeypatch.setattr(token_cache, "_memo", type(token_cache._memo)())
    monkeypatch.delenv(CACHE_DIR_ENV, raising=False)


def _rows(dataset) -> dict:
    return dataset.to_dict()


def _prepare(quick, *extra):
    return api.prepare(load_recipe(None, quick(None, *extra)))


def test_second_run_of_an_ensemble_reads_every_split_from_the_process(quick):
    first = _prepare(quick)
    assert first.token_cache["from_cache"] == []
    # another seed and another strategy: the same data and tokenizer, so the same encodings
    second = _prepare(quick, "train.seed=7", "freeze.trainable=[head]")
    assert second.token_cache["from_cache"] == SPLITS
    for name in SPLITS:
        assert second.datasets[name] is first.datasets[name]


def test_shared_dir_entry_equals_a_fresh_encoding(quick, tmp_path, monkeypatch):
    plain = _prepare(quick)  # no cache dir: encoded in the process
    monkeypatch.setattr(token_cache, "_memo", type(token_cache._memo)())
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "cache"))
    writer = _prepare(quick)
    assert writer.token_cache["from_cache"] == []
    entries = sorted(p.name for p in (tmp_path / "cache" / "tokens").iterdir())
    assert len(entries) == 3 and not any(e.startswith(".") for e in entries)  # no temp dir left
    monkeypatch.setattr(token_cache, "_memo", type(token_cache._memo)())  # a new process
    reader = _prepare(quick, "train.seed=3")
    assert reader.token_cache["from_cache"] == SPLITS
    for name in SPLITS:
        assert _rows(reader.datasets[name]) == _rows(plain.datasets[name])
        assert len(reader.datasets[name]) == len(plain.splits[name])


@pytest.mark.parametrize(
    "change",
    [
        "data.max_length=8",  # truncation (the synthetic rows are longer than 8 tokens)
        "data.max_train_samples=100",  # other rows
        "data.split.seed=1",  # other rows in each split
        "task=prompt_classification",  # another encoding of the same rows
    ],
)
def test_what_changes_the_encoding_changes_the_key(quick, tiny_bert_mlm, change):
    model = tiny_bert_mlm if change.startswith("task") else None
    base = api.prepare(load_recipe(None, quick(model)))
    other = api.prepare(load_recipe(None, quick(model, change)))
    assert base.token_cache["from_cache"] == []
    assert "train" not in other.token_cache["from_cache"]
    assert _rows(other.datasets["train"]) != _rows(base.datasets["train"])


def test_another_tokenizer_misses(quick, tiny_bert, tmp_path):
    first = _prepare(quick)
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    tok.add_tokens(["brilliantly-new-token"])  # one more word in the vocabulary
    assert token_cache.tokenizer_digest(tok) != token_cache.tokenizer_digest(first.tokenizer)
    low = AutoTokenizer.from_pretrained(tiny_bert, do_lower_case=False)  # another normalizer
    assert token_cache.tokenizer_digest(low) != token_cache.tokenizer_digest(first.tokenizer)


def test_tokenizer_key_ignores_the_truncation_a_call_leaves(tiny_bert):
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    before = token_cache.tokenizer_digest(tok)
    tok(["a rather long sentence about a film"], truncation=True, max_length=4, padding="max_length")
    assert tok.backend_tokenizer.truncation is not None  # the call did leave state behind
    assert token_cache.tokenizer_digest(tok) == before


def test_an_unwritable_cache_dir_does_not_stop_the_run(quick, tmp_path, monkeypatch):
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    monkeypatch.setenv(CACHE_DIR_ENV, str(blocked))
    with pytest.raises(OSError):  # mkdir of <file>/tokens fails ...
        (blocked / "tokens").mkdir(parents=True)
    prep = _prepare(quick)  # ... and the run encodes for itself
    assert prep.token_cache["from_cache"] == [] and len(prep.datasets["train"]) > 0


def test_report_records_the_token_cache(quick, tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "cache"))
    api.train(load_recipe(None, quick(None, "train.epochs=1", "output.name=a")))
    monkeypatch.setattr(token_cache, "_memo", type(token_cache._memo)())
    result = api.train(load_recipe(None, quick(None, "train.epochs=1", "output.name=b")))
    report = json.loads((Path(result["run_dir"]) / "report.json").read_text())
    assert report["token_cache"]["from_cache"] == SPLITS
    first = json.loads((tmp_path / "runs" / "a" / "report.json").read_text())
    assert first["test"] == report["test"]  # same seed, same rows: the same run
