"""Long texts (data/long_texts.py): the truncation report's counts, head_tail's kept tokens, chunks'
windows and document pooling, and that a label only the end of a text reveals is learned with
`chunks` and not with `truncate`."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer
from typer.testing import CliRunner

from hybridtune import api
from hybridtune.cli import app
from hybridtune.data import long_texts
from hybridtune.errors import UserError
from hybridtune.recipe import DataConfig, load_recipe
from hybridtune.tasks import classification

from .conftest import FILLER, NEGATIVE, POSITIVE, write_csv

WORDS = "alpha beta gamma delta epsilon zeta eta theta kappa lambda mu nu xi pi sigma tau".split()


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def _words(n: int) -> str:
    return " ".join(WORDS[i % len(WORDS)] for i in range(n))  # one token per word (MiniLM's vocabulary)


def test_each_word_is_one_token(tok):
    assert len(tok(_words(30), add_special_tokens=False)["input_ids"]) == 30


def test_truncation_counts_of_known_texts(tok):
    texts = [_words(3), _words(6), _words(20)]  # max_length 8 = [CLS] + 6 text tokens + [SEP]
    _, truncated = long_texts.encode_texts(tok, texts, None, DataConfig(max_length=8))
    assert truncated.to_json() == {
        "texts": 3,
        "cut": 1,
        "tokens": 29,
        "kept": 3 + 6 + 6,
        "windows": 3,
        "longest": 20,
        "cut_share": round(1 / 3, 4),
        "kept_share": round(15 / 29, 4),
    }
    cfg = DataConfig(max_length=8, long_texts="chunks", stride=2)
    columns, chunked = long_texts.encode_texts(tok, texts, None, cfg)
    # 20 tokens in windows of 6 that move by 4: 0-5, 4-9, 8-13, 12-17, 16-19
    assert columns[long_texts.DOC] == [0, 1, 2, 2, 2, 2, 2]
    assert (chunked.cut, chunked.kept, chunked.windows) == (0, 29, 7)


def test_report_warns_past_the_threshold(tok):
    short = {"texts": 10, "cut": 1, "tokens": 100, "kept": 95, "windows": 10, "longest": 20}
    quiet = {**short, "cut_share": 0.1, "kept_share": 0.95}
    loud = {**short, "cut": 2, "cut_share": 0.2, "kept_share": 0.95}
    cfg = DataConfig(max_length=16)
    assert long_texts.report({"train": quiet, "test": quiet}, cfg)["warning"] is None
    report = long_texts.report({"train": quiet, "test": loud}, cfg)
    assert "20.0 % of the test texts" in report["warning"]
    assert "data.long_texts: head_tail | chunks" in report["warning"]
    lines = long_texts.report_lines(report)
    assert len(lines) == 2 and lines[1].startswith("warning: data.max_length 16 (truncate)")
    assert long_texts.report({"train": None}, cfg) is None  # a task that does not count


def test_within_said_once_each_distinct_report_is_printed_once(capsys):
    """A search's trials read the same data: `said_once` keeps the report to its first; another
    report (another max_length, a few-shot draw) is still said; outside it every run says its own."""
    counts = {"texts": 10, "cut": 1, "tokens": 100, "kept": 95, "windows": 10, "longest": 20,
              "cut_share": 0.1, "kept_share": 0.95}  # fmt: skip
    with long_texts.said_once():
        for max_length in (16, 16, 32, 16):
            long_texts.announce(long_texts.report({"train": counts}, DataConfig(max_length=max_length)))
    err = capsys.readouterr().err
    assert err.count("(data.max_length 16, truncate): train 10.0 % of 10 texts cut") == 1, err
    assert err.count("(data.max_length 32, truncate)") == 1, err
    for _ in range(2):
        long_texts.announce(long_texts.report({"train": counts}, DataConfig(max_length=16)))
    assert capsys.readouterr().err.count("(data.max_length 16, truncate)") == 2


def test_truncate_is_the_tokenizers_own_truncation(tok):
    texts = [_words(n) for n in (1, 5, 6, 7, 40)]
    columns, _ = long_texts.encode_texts(tok, texts, None, DataConfig(max_length=8))
    assert columns == dict(tok(texts, truncation=True, max_length=8))
    pairs = [_words(n) for n in (9, 1, 2, 3, 4)]
    columns, counts = long_texts.encode_texts(tok, texts, pairs, DataConfig(max_length=8))
    assert columns == dict(tok(texts, pairs, truncation=True, max_length=8))
    assert counts.tokens == sum(map(len, (t.split() for t in texts + pairs)))


def test_head_tail_keeps_a_quarter_head_and_three_quarters_tail(tok):
    text = " ".join(f"{w}{i}" for i, w in enumerate(["the"] * 40))  # distinct tokens: their order shows
    content = tok(text, add_special_tokens=False)["input_ids"]
    assert len(content) > 16
    columns, counts = long_texts.encode_texts(
        tok, [text, _words(5)], None, DataConfig(max_length=18, long_texts="head_tail")
    )
    assert long_texts.head_tail(16) == (4, 12)
    assert columns["input_ids"][0] == [tok.cls_token_id, *content[:4], *content[-12:], tok.sep_token_id]
    assert columns["input_ids"][1] == tok(_words(5))["input_ids"]  # a short text is whole
    assert len(columns["attention_mask"][0]) == 18 and counts.kept == 16 + 5


def test_pooling_is_the_mean_or_max_of_window_logits():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 3)).astype(np.float32)
    docs = [2, 0, 1, 0, 2, 2]  # windows in any order (a length-grouped sampler)
    mean = long_texts.pool(logits, docs, "mean")
    top = long_texts.pool(logits, docs, "max")
    for doc, rows in {0: [1, 3], 1: [2], 2: [0, 4, 5]}.items():
        np.testing.assert_allclose(mean[doc], logits[rows].mean(0), rtol=1e-6)
        np.testing.assert_allclose(top[doc], logits[rows].max(0), rtol=1e-6)
    labels = np.array([1, 0, 2, 0, 1, 1])
    assert long_texts.per_document(labels, docs).tolist() == [0, 2, 1]
    # validation metrics count documents: doc 2's windows vote 1 on their mean
    scores = np.zeros((6, 3), dtype=np.float32)
    scores[[1, 3], 0] = 1  # doc 0 right
    scores[2, 0] = 1  # doc 1 wrong (label 2)
    scores[[0, 4], 1], scores[5, 2] = 1, 1.5  # doc 2: mean right (label 1), max wrong
    assert classification.compute_metrics((scores, (labels, docs)))["accuracy"] == pytest.approx(2 / 3)
    assert classification.compute_metrics((scores, (labels, docs)), pool_by="max")[
        "accuracy"
    ] == pytest.approx(1 / 3)


# --------------------------------------------------------------------------------------------------
# end to end: the label is the last word of a long text


def _last_word_rows(n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        words = [rng.choice(FILLER) for _ in range(36)] + [rng.choice(POSITIVE if label else NEGATIVE)]
        rows.append((" ".join(words), "positive" if label else "negative"))
    return rows


@pytest.fixture(scope="module")
def last_word(tmp_path_factory):
    root = tmp_path_factory.mktemp("last-word")
    return {
        name: str(write_csv(root / f"{name}.csv", _last_word_rows(n, seed)))
        for name, n, seed in (("train", 240, 0), ("validation", 40, 1), ("test", 100, 2))
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_bert, last_word):
    out = tmp_path_factory.mktemp("runs")
    runs = {}

    def make(mode: str, *extra: str) -> Path:
        if mode not in runs:
            overrides = [
                f"model.name={tiny_bert}",
                f"data.train={last_word['train']}",
                f"data.validation={last_word['validation']}",
                f"data.test={last_word['test']}",
                "data.max_length=16",
                f"data.long_texts={mode}",
                "train.max_steps=240",  # the same budget for every mode (chunks: 8 epochs of windows)
                "train.early_stopping.patience=null",
                "train.batch_size=32",
                "train.lr=0.002",
                "train.precision=fp32",
                f"output.dir={out}",
                f"output.name={mode}",
                *extra,
            ]
            runs[mode] = Path(api.train(load_recipe(None, overrides))["run_dir"])
        return runs[mode]

    return make


def test_a_label_only_the_end_reveals_is_learned_with_chunks_not_truncate(trained, capsys):
    chunks = json.loads((trained("chunks") / "report.json").read_text())
    assert "long texts (data.max_length 16, chunks): train 0.0 % of 240 texts cut" in capsys.readouterr().err
    truncate = json.loads((trained("truncate") / "report.json").read_text())
    err = capsys.readouterr().err
    assert "warning: data.max_length 16 (truncate) cuts 100.0 % of the" in err
    assert truncate["test"]["accuracy"] < 0.7, truncate["test"]  # chance: the start is filler
    assert chunks["test"]["accuracy"] > 0.9, chunks["test"]
    assert chunks["test"]["n"] == truncate["test"]["n"] == 100  # documents, not windows
    # the report: every text cut by truncate, every token read by chunks, in several windows
    assert truncate["truncation"]["splits"]["train"]["cut_share"] == 1.0
    train = chunks["truncation"]["splits"]["train"]
    assert train["kept_share"] == 1.0 and train["windows"] >= 3 * train["texts"]
    assert chunks["truncation"]["stride"] == 4  # max_length // 4


def _window_logits(loaded, texts: list[str]) -> tuple[np.ndarray, list[int]]:
    frame = classification.prediction_frame(loaded.recipe.data, texts)
    dataset = classification.encode(frame, loaded.tokenizer, None, loaded.recipe.data)
    docs = dataset[long_texts.DOC]
    return classification.logits_of(
        loaded.model, loaded.tokenizer, dataset.remove_columns(long_texts.DOC)
    ), docs


def test_predict_and_eval_of_a_chunks_run_pool_documents(trained, last_word):
    run = trained("chunks")
    texts = [text for text, _ in _last_word_rows(6, seed=9)]
    rows = api.predict(str(run), texts)
    assert len(rows) == len(texts)
    loaded = api.load_run(str(run))
    assert loaded.labels.pool == "mean"
    windows, docs = _window_logits(loaded, texts)
    assert len(windows) > len(texts)
    expected = torch.softmax(torch.from_numpy(long_texts.pool(windows, docs, "mean")), -1).numpy()
    got = np.array([[row["probs"][name] for name in loaded.labels.names] for row in rows])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    # eval of the run's test split (CLI): the test report again, per document
    result = CliRunner().invoke(app, ["eval", str(run), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    saved = json.loads((run / "eval.json").read_text())
    assert report["n"] == 100 and report["accuracy"] == pytest.approx(saved["accuracy"])
    # --data FILE too, and predict on the command line
    result = CliRunner().invoke(app, ["eval", str(run), "--data", last_word["validation"], "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["n"] == 40
    # the best validation accuracy Trainer saw (its pick of final/) is this, per document
    best = json.loads((run / "report.json").read_text())["best_validation"]
    assert json.loads(result.stdout)["accuracy"] == pytest.approx(best)
    result = CliRunner().invoke(app, ["predict", str(run), "--json", texts[0]])
    assert result.exit_code == 0 and len(result.stdout.splitlines()) == 1


def test_serve_and_an_export_of_a_chunks_run_pool_documents(trained, tmp_path):
    from fastapi.testclient import TestClient

    from hybridtune import inference
    from hybridtune.export import export
    from hybridtune.serve import create_app

    run = trained("chunks")
    texts = [text for text, _ in _last_word_rows(4, seed=11)]
    expected = [row["probs"] for row in api.predict(str(run), texts)]
    with TestClient(create_app(run)) as client:
        response = client.post("/v1/classify", json={"texts": texts})
    assert response.status_code == 200, response.text
    for got, want in zip(response.json()["predictions"], expected, strict=True):
        assert got["probs"] == pytest.approx(want, abs=1e-5)
    export(str(run), "merged", str(tmp_path / "merged"))
    loaded = inference.load(tmp_path / "merged")
    assert loaded.data_cfg.long_texts == "chunks" and loaded.labels.pool == "mean"
    rows = loaded.task.predict(loaded.model, loaded.tokenizer, loaded.labels, loaded.data_cfg, texts)
    for got, want in zip(rows, expected, strict=True):
        assert got["probs"] == pytest.approx(want, abs=1e-5)


def test_max_pooling_scores_with_the_max_of_windows(trained, last_word):
    loaded = api.load_run(str(trained("chunks")))
    loaded.labels.pool = "max"
    frame = classification.eval_frame(last_word["validation"], loaded.recipe.data, loaded.labels)
    dataset = classification.encode(frame, loaded.tokenizer, loaded.labels, loaded.recipe.data)
    report = classification.report(loaded.model, loaded.tokenizer, dataset, loaded.labels)
    windows, docs = _window_logits(loaded, frame["text"].tolist())
    y = [loaded.labels.values.index(v) for v in frame["label"]]
    expected = classification.full_report(np.array(y), long_texts.pool(windows, docs, "max"), loaded.labels)
    assert report["n"] == 40 and report["accuracy"] == expected["accuracy"]
    assert report["confusion_matrix"] == expected["confusion_matrix"]


def test_head_tail_run_reads_the_end(trained):
    report = json.loads((trained("head_tail") / "report.json").read_text())
    assert report["test"]["accuracy"] > 0.9, report["test"]  # the last word is in the tail
    assert report["truncation"]["splits"]["test"]["cut_share"] == 1.0


def test_trunk_cache_serves_chunked_windows(tmp_path, tiny_bert, last_word):
    overrides = [
        f"model.name={tiny_bert}",
        f"data.train={last_word['train']}",
        f"data.test={last_word['test']}",
        "data.max_train_samples=40",
        "data.max_length=16",
        "data.long_texts=chunks",
        "freeze.trainable=[head]",
        "train.trunk_cache=on",
        "train.max_steps=6",
        "train.precision=fp32",
        f"output.dir={tmp_path}",
    ]
    summary = api.train(load_recipe(None, overrides))
    assert summary["trunk_cache"]["used"] and summary["test"]["n"] == 100


def test_token_cache_keeps_the_counts_and_keys_the_setting(quick, tmp_path, monkeypatch):
    from hybridtune.data import token_cache
    from hybridtune.train.trunk_store import CACHE_DIR_ENV

    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(token_cache, "_memo", type(token_cache._memo)())
    first = api.prepare(load_recipe(None, quick(None, "data.max_length=8")))
    monkeypatch.setattr(token_cache, "_memo", type(token_cache._memo)())  # a new process
    again = api.prepare(load_recipe(None, quick(None, "data.max_length=8")))
    assert again.token_cache["from_cache"] == ["train", "validation", "test"]
    assert again.truncation == first.truncation and first.truncation["splits"]["train"]["cut"] > 0
    chunked = api.prepare(load_recipe(None, quick(None, "data.max_length=8", "data.long_texts=chunks")))
    assert chunked.token_cache["from_cache"] == []
    assert len(chunked.datasets["train"]) > len(first.datasets["train"]) == len(first.splits.train)
    # the plan counts windows: an epoch is as many steps as the windows make
    assert chunked.plan.steps_per_epoch > first.plan.steps_per_epoch


def test_an_ensemble_of_chunks_members_pools_each_member(tmp_path, tiny_bert, last_word):
    from hybridtune import ensemble

    overrides = [
        f"model.name={tiny_bert}",
        f"data.train={last_word['train']}",
        f"data.test={last_word['test']}",
        "data.max_train_samples=40",
        "data.max_length=16",
        "data.long_texts=chunks",
        "ensemble.members=2",
        "ensemble.shared_trunk=true",  # trained together, scored through the shared trunk
        "freeze.trainable=[head]",
        "train.max_steps=4",
        "train.precision=fp32",
        f"output.dir={tmp_path}",
    ]
    run = api.train(load_recipe(None, overrides))["run_dir"]
    texts = [text for text, _ in _last_word_rows(3, seed=5)]
    assert len(api.predict(run, texts)) == 3
    loaded = ensemble.Ensemble(run)
    assert loaded.shared is not None
    frame = classification.prediction_frame(loaded.data_cfg, texts)
    for member, logits in zip(loaded.members, loaded.shared.logits(frame), strict=True):
        np.testing.assert_allclose(logits, member.logits(frame), atol=1e-5)  # shared = alone, pooled
    assert api.evaluate(run)["n"] == 100


# --------------------------------------------------------------------------------------------------
# bad values: exit 2 naming the key


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (
            ["task=token_classification", "data.long_texts=chunks"],
            ["data.long_texts", "token_classification"],
        ),
        (["task=causal_lm", "data.long_texts=head_tail"], ["data.long_texts", "causal_lm"]),
        (
            ["task=prompt_classification", "data.long_texts=chunks"],
            ["data.long_texts", "prompt_classification"],
        ),
        (["data.text_pair_column=pair", "data.long_texts=chunks"], ["data.long_texts", "a text pair"]),
        (["data.long_texts=windows"], ["data.long_texts", "'truncate', 'head_tail' or 'chunks'"]),
        (["data.stride=8"], ["data.stride", "data.long_texts: chunks"]),
        (["data.pool=max", "data.long_texts=head_tail"], ["data.pool", "data.long_texts: chunks"]),
        (["data.long_texts=chunks", "data.stride=64"], ["data.stride", "fewer than 64"]),
        (["data.long_texts=chunks", "data.pool=median"], ["data.pool", "'mean' or 'max'"]),
    ],
)
def test_bad_values_exit_2(overrides, words, tmp_path):
    with pytest.raises(UserError) as raised:
        load_recipe(None, overrides)
    for word in words:
        assert word in str(raised.value), (word, str(raised.value))
    result = CliRunner().invoke(app, ["train", *overrides, f"output.dir={tmp_path}"])
    assert result.exit_code == 2 and words[0] in result.stderr
    assert not any(tmp_path.iterdir())


def test_benchmark_smoke():
    import subprocess
    import sys

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_long_texts.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--smoke"], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [
        line
        for line in proc.stdout.splitlines()
        if line.startswith(("| truncate", "| head_tail", "| chunks"))
    ]
    assert len(rows) == 3, proc.stdout
    assert "CPU: " in proc.stdout
