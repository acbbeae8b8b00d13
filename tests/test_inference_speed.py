"""Inference speed-ups keep results: length-sorted batches come back in order, LoRA merged for
prediction predicts as the unmerged run, the run's precision reaches eval / predict, and
`train.compile` reaches Trainer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from hybridtune import api, export
from hybridtune.recipe import load_recipe
from hybridtune.tasks.classification import encode, logits_of
from hybridtune.train.precision import autocast

# lengths out of order, so that sorted batching would permute the rows if it did not put them back
TEXTS = [
    "the film was great and charming and the actors were superb all the way through",
    "dull",
    "a tedious story with a messy plot",
    "fresh",
    "the movie is quite brilliant and funny",
]


def test_length_sorted_batches_return_every_row_in_its_place(tiny_bert):
    import pandas as pd

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2).eval()
    cfg = load_recipe(None, [f"model.name={tiny_bert}"]).data
    dataset = encode(pd.DataFrame({"text": TEXTS}), tokenizer, None, cfg)
    batched = logits_of(model, tokenizer, dataset, batch_size=2)
    one_by_one = [
        logits_of(model, tokenizer, dataset.select([i]), batch_size=1)[0] for i in range(len(TEXTS))
    ]
    assert batched.shape == (len(TEXTS), 2)
    torch.testing.assert_close(
        torch.from_numpy(batched), torch.from_numpy(np.stack(one_by_one)), atol=1e-5, rtol=1e-4
    )
    assert len({tuple(row.round(5)) for row in batched}) == len(TEXTS)  # rows differ: a permutation shows


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_bert, sentiment_csv) -> Path:
    out = tmp_path_factory.mktemp("runs")
    overrides = [
        f"model.name={tiny_bert}",
        f"data.source={sentiment_csv}",
        "peft.method=lora",
        "train.max_steps=8",
        "train.batch_size=16",
        "train.lr=0.01",
        "train.precision=fp32",
        f"output.dir={out}",
        "output.name=lora",
    ]
    return Path(api.train(load_recipe(None, overrides))["run_dir"])


def test_predict_folds_lora_into_the_weights_and_predicts_as_the_unmerged_model(lora_run):
    loaded = api.load_run(str(lora_run))
    assert hasattr(loaded.model, "peft_config")
    tokenizer = loaded.tokenizer
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        unmerged = torch.softmax(loaded.model(**batch).logits, -1)
    merged = export.merged_for_inference(loaded.model)
    assert not hasattr(merged, "peft_config") and not any("lora_" in n for n, _ in merged.named_modules())
    rows = api.predict(str(lora_run), TEXTS)
    predicted = torch.tensor([list(r["probs"].values()) for r in rows])
    torch.testing.assert_close(predicted, unmerged, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(predicted[:, 0], predicted[:, 1])  # the adapter changed something


def test_what_cannot_be_merged_is_predicted_as_it_is(tiny_bert):
    from peft import PromptTuningConfig, get_peft_model

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    prompt_tuned = get_peft_model(model, PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4))
    assert export.merged_for_inference(prompt_tuned) is prompt_tuned
    plain = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    assert export.merged_for_inference(plain) is plain


def test_the_runs_precision_reaches_the_passes_trainer_does_not_run():
    layer = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    with autocast("bf16"):
        assert layer(x).dtype == torch.bfloat16
    with autocast("fp32"):
        assert layer(x).dtype == torch.float32


def test_train_compile_reaches_trainers_arguments(tmp_path, tiny_bert):
    from hybridtune.train.engine import training_arguments

    for flag in (True, False):
        recipe = load_recipe(None, [f"model.name={tiny_bert}", f"train.compile={str(flag).lower()}"])
        args = training_arguments(recipe.train, recipe.output, tmp_path)
        assert args.torch_compile is flag


def test_token_logits_batched_by_length_come_back_in_order(tiny_bert):
    from transformers import AutoModelForTokenClassification

    from hybridtune.tasks.token_classification import token_logits

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    model = AutoModelForTokenClassification.from_pretrained(tiny_bert, num_labels=3).eval()
    features = [dict(tokenizer(text)) for text in TEXTS]
    batched = token_logits(model, tokenizer, features, batch_size=2)
    for feature, got in zip(features, batched, strict=True):
        alone = token_logits(model, tokenizer, [feature], batch_size=1)[0]
        assert got.shape == (len(feature["input_ids"]), 3)
        np.testing.assert_allclose(got, alone, atol=1e-5, rtol=1e-4)
