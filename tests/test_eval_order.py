"""Validation batches are sorted by length (train/eval_order.py): where Trainer's length-grouped
sampler groups nothing (mega-batches of one batch), each batch is still as short as it can be, every
example comes once, and the metrics are those of the dataset's own order."""

from __future__ import annotations

import pytest
from torch.utils.data import SequentialSampler

from hybridtune import api
from hybridtune.recipe import load_recipe
from hybridtune.train.engine import HybridTrainer, make_trainer, training_arguments
from hybridtune.train.eval_order import LengthOrder
from tests.conftest import FILLER, sentiment_rows, write_csv


def _varied_csv(tmp_path) -> str:
    """The synthetic sentiment rows with 0-12 filler words more each: lengths that differ."""
    rows = [
        (f"{text} {' '.join(FILLER[: i % 21])}", label) for i, (text, label) in enumerate(sentiment_rows(240))
    ]
    return str(write_csv(tmp_path / "varied.csv", rows))


def _trainer(tiny_bert, data, tmp_path):
    recipe = load_recipe(
        None,
        [
            f"model={tiny_bert}",
            f"data.source={data}",
            "data.max_length=48",
            "train.eval_batch_size=4",  # 24 validation texts // (4 x 4) = 1: one batch per mega-batch
            "train.precision=fp32",
            f"output.dir={tmp_path}",
        ],
    )
    prep = api.prepare(recipe)
    args = training_arguments(recipe.train, recipe.output, tmp_path / "ck")
    metrics = prep.task.make_compute_metrics(prep.labels)
    collator = prep.task.collator(prep.tokenizer)
    trainer = make_trainer(
        prep.model,
        prep.tokenizer,
        prep.datasets,
        recipe,
        args,
        tmp_path,
        metrics,
        prep.plan,
        collator=collator,
    )
    return trainer, prep.datasets["validation"]


def test_length_order():
    assert list(LengthOrder([3, 9, 1, 9, 4])) == [1, 3, 4, 0, 2] and len(LengthOrder([2, 1])) == 2


def test_validation_batches_are_sorted_and_the_metrics_unchanged(tiny_bert, tmp_path, monkeypatch):
    trainer, validation = _trainer(tiny_bert, _varied_csv(tmp_path), tmp_path)
    lengths = [len(ids) for ids in validation["input_ids"]]
    assert len(lengths) == 24 and len(set(lengths)) > 4
    widths, seen = [], []
    for batch in trainer.get_eval_dataloader():
        widths.append(batch["input_ids"].shape[1])
        seen += batch["attention_mask"].sum(dim=1).tolist()
    assert sorted(seen, reverse=True) == seen == sorted(lengths, reverse=True)  # each once, longest first
    assert widths == seen[::4]  # each batch of 4 padded to its own longest, no more
    sorted_metrics = trainer.evaluate()

    # the dataset's own order (Trainer without grouping): the same accuracy, macro-F1 and loss
    monkeypatch.setattr(HybridTrainer, "_get_eval_sampler", lambda self, ds: SequentialSampler(ds))
    plain = trainer.evaluate()
    for key in ("eval_accuracy", "eval_f1_macro", "eval_loss"):
        assert sorted_metrics[key] == pytest.approx(plain[key], abs=1e-6)
