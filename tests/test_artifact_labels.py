"""The label names travel with the artifact: final/ of every kind (a whole model, a peft adapter,
bottleneck adapters) loads with plain transformers / peft showing the run's label names, not
LABEL_0, LABEL_1, ... (docs/export.md, "Loading final/ without hybridtune")."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from .conftest import write_csv

NAMES = ["bad", "good", "mixed"]  # sorted: the run's label order


@pytest.fixture(scope="module")
def three_class_csv(tmp_path_factory) -> str:
    rng = random.Random(0)
    words = {"bad": "awful", "mixed": "uneven", "good": "superb"}
    rows = [(f"{words[n]} film {rng.randrange(10**6)} {i}", n) for i in range(60) for n in [NAMES[i % 3]]]
    return str(write_csv(tmp_path_factory.mktemp("labels") / "three.csv", rows))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_bert, three_class_csv):
    from hybridtune import api
    from hybridtune.recipe import load_recipe

    out = tmp_path_factory.mktemp("runs")
    kinds = {
        "full": [],
        "lora": ["peft.method=lora"],
        "ia3": ["peft.method=ia3"],
        "adapters": ["adapters.method=pfeiffer"],
    }
    done = {}
    for kind, extra in kinds.items():
        overrides = [
            f"model.name={tiny_bert}",
            f"data.source={three_class_csv}",
            "train.max_steps=2",
            "train.precision=fp32",
            "data.max_length=32",
            f"output.dir={out}",
            f"output.name={kind}",
            *extra,
        ]
        done[kind] = Path(api.train(load_recipe(None, overrides))["run_dir"])
    return done


def _expected(run: Path) -> dict[int, str]:
    names = json.loads((run / "run.json").read_text())["labels"]
    assert names == NAMES
    return dict(enumerate(names))


@pytest.mark.parametrize("kind", ["full", "adapters"])
def test_a_whole_model_in_final_shows_the_label_names(runs, kind):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(runs[kind] / "final")
    assert model.config.id2label == _expected(runs[kind])
    assert model.config.label2id == {n: i for i, n in enumerate(NAMES)}


@pytest.mark.parametrize("kind", ["lora", "ia3"])
def test_a_peft_adapter_in_final_shows_the_label_names(runs, kind):
    """The base config beside the adapter; config.json there would make transformers take final/ for
    a whole model, so it is base_config.json."""
    from peft import AutoPeftModelForSequenceClassification, PeftModel
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from hybridtune import api

    final = runs[kind] / "final"
    assert not (final / "config.json").exists()
    config = AutoConfig.from_pretrained(final / "base_config.json")
    assert config.id2label == _expected(runs[kind])
    base_path = json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"]

    tokenizer = AutoTokenizer.from_pretrained(final)
    batch = tokenizer(["an awful film", "a superb film"], return_tensors="pt", padding=True)
    with torch.no_grad():
        ours = api.load_run(str(runs[kind])).model(**batch).logits
    loaded = [
        # peft
        PeftModel.from_pretrained(
            AutoModelForSequenceClassification.from_pretrained(base_path, config=config), final
        ),
        # peft's auto class, the label names passed on to the base model's from_pretrained
        AutoPeftModelForSequenceClassification.from_pretrained(
            final, id2label=config.id2label, label2id=config.label2id
        ),
    ]
    if kind == "lora":  # transformers loads a LoRA adapter dir itself (its peft integration)
        loaded.append(AutoModelForSequenceClassification.from_pretrained(final, config=config))
    for model in loaded:
        assert model.config.id2label == _expected(runs[kind])
        with torch.no_grad():
            torch.testing.assert_close(
                model.eval()(**batch).logits, ours
            )  # the trained model, not a new head
