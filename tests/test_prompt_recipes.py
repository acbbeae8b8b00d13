"""Every prompt_classification example recipe trains two steps on a tiny LM of its kind (a masked LM
for an encoder recipe, a causal LM for a decoder one) and writes a run that reloads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from hybridtune import api
from hybridtune.recipe import load_recipe

RECIPES = sorted(
    p
    for p in (Path(__file__).parent.parent / "recipes").glob("*.yaml")
    if yaml.safe_load(p.read_text()).get("task") == "prompt_classification"
)


def test_there_are_prompt_recipes():
    assert {p.stem for p in RECIPES} >= {"prompt_lora_smollm2", "pet_minilm", "mixed_objective", "fusion"}


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_prompt_recipe_trains_on_a_tiny_lm(path, tiny_bert_mlm, tiny_gpt2, sentiment_csv, tmp_path):
    decoder = "smollm2" in yaml.safe_load(path.read_text())["model"]
    overrides = [
        f"model={tiny_gpt2 if decoder else tiny_bert_mlm}",
        f"data.source={sentiment_csv}",
        "train.max_steps=2",
        "train.precision=fp32",
        f"output.dir={tmp_path}",
    ]
    if decoder:
        overrides.append("prompt.chat=false")  # the tiny model's (BERT) tokenizer has no chat template
    summary = api.train(load_recipe(path, overrides))
    assert summary["steps"] == 2 and "zero_shot_test" in summary
    run = Path(summary["run_dir"])
    assert json.loads((run / "run.json").read_text())["task"] == "prompt_classification"
    assert api.evaluate(str(run))["accuracy"] == summary["test"]["accuracy"]
