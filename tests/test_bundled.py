"""A few slower tests on the real bundled model (MiniLM) and data, on a small subset."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from hybridtune import api
from hybridtune.model.loading import resolve
from hybridtune.recipe import load_recipe

pytestmark = pytest.mark.slow
RECIPES = Path(__file__).parent.parent / "recipes"
TEXTS = ["a gorgeous, witty, seductive movie", "the plot is nothing but a dull mess", "it is what it is"]
# fp32: predict runs under the run's precision (bf16 autocast on this CPU), the plain models below in fp32
QUICK = [
    "data.max_train_samples=96",
    "data.max_eval_samples=64",
    "train.max_steps=6",
    "train.eval_steps=3",
    "train.precision=fp32",
]


def _plain_probs(model, tokenizer) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        batch = tokenizer(TEXTS, padding=True, truncation=True, max_length=128, return_tensors="pt")
        return torch.softmax(model(**batch).logits, -1)


def _ours(run: str) -> torch.Tensor:
    return torch.tensor([list(r["probs"].values()) for r in api.predict(run, TEXTS)])


def test_freeze_top2_recipe_final_loads_with_plain_transformers(tmp_path):
    run = api.train(load_recipe(RECIPES / "freeze_top2.yaml", [*QUICK, f"output.dir={tmp_path}"]))["run_dir"]
    final = Path(run) / "final"
    model = AutoModelForSequenceClassification.from_pretrained(final)
    assert model.config.id2label == {0: "negative", 1: "positive"}
    torch.testing.assert_close(
        _plain_probs(model, AutoTokenizer.from_pretrained(final)), _ours(run), atol=1e-5, rtol=1e-4
    )


def test_lora_recipe_final_loads_with_plain_peft(tmp_path):
    from peft import PeftModel

    run = api.train(load_recipe(RECIPES / "lora.yaml", [*QUICK, f"output.dir={tmp_path}"]))["run_dir"]
    base = AutoModelForSequenceClassification.from_pretrained(resolve("bundled:minilm"), num_labels=2)
    model = PeftModel.from_pretrained(base, Path(run) / "final")
    tokenizer = AutoTokenizer.from_pretrained(Path(run) / "final")
    torch.testing.assert_close(_plain_probs(model, tokenizer), _ours(run), atol=1e-5, rtol=1e-4)


def test_default_recipe_params_match_minilm():
    table = api.params(load_recipe(None, ["data.max_train_samples=32"]))
    assert table["total"] == 22_713_986 and table["trainable"] == table["total"]
    assert [r["slot"] for r in table["rows"]] == ["embeddings", *(f"block.{i}" for i in range(6)), "head"]
