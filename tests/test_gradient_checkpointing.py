"""train.gradient_checkpointing: the blocks are recomputed in the backward pass (counted), a run ends
with the losses and weights of one without it (dropout included: the recomputation replays its RNG),
it reaches through peft, adapters, a soft prompt, stages and the trunk cache, and where it cannot run
(prefix tuning, a model transformers does not checkpoint) it is refused by name with exit 2."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers.models.bert.modeling_bert import BertAttention

from hybridtune import api
from hybridtune.recipe import load_recipe
from hybridtune.train.engine import training_arguments

from .refusal import refused
from .test_matrix import RECIPE_DIR
from .test_recipes import _run as run_steps


@pytest.fixture
def attention_calls(monkeypatch) -> dict[str, int]:
    """Calls of BERT's attention in training mode: a checkpointed block runs it again in the backward."""
    calls = {"train": 0}
    real = BertAttention.forward

    def counted(self, *args, **kwargs):
        if self.training and torch.is_grad_enabled():
            calls["train"] += 1
        return real(self, *args, **kwargs)

    monkeypatch.setattr(BertAttention, "forward", counted)
    return calls


def test_the_option_reaches_training_arguments():
    recipe = load_recipe(None, ["train.gradient_checkpointing=true"])
    args = training_arguments(recipe.train, recipe.output, Path("/tmp/unused"))
    assert args.gradient_checkpointing is True
    assert args.gradient_checkpointing_kwargs == {"use_reentrant": False}
    plain = load_recipe(None, [])
    assert training_arguments(plain.train, plain.output, Path("/tmp/unused")).gradient_checkpointing is False


def _train(quick, on: bool, *extra: str, model: str | None = None) -> Path:
    recipe = load_recipe(
        None,
        quick(
            model,
            "train.max_steps=4",
            "train.logging_steps=1",
            "train.eval_steps=2",
            f"train.gradient_checkpointing={str(on).lower()}",
            f"output.name={'gc-on' if on else 'gc-off'}",
            *extra,
        ),
    )
    return Path(api.train(recipe)["run_dir"])


def _losses(run: Path) -> list[float]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in lines if "loss" in r and "eval_loss" not in r]


def test_same_losses_and_weights_as_without(quick, attention_calls):
    # tiny_bert has dropout: equal losses need the recomputation to replay the forward's masks
    on = _train(quick, True)
    recomputed = attention_calls["train"]
    attention_calls["train"] = 0
    off = _train(quick, False)
    assert recomputed == 2 * attention_calls["train"] == 2 * 4 * 2  # 4 steps x 2 blocks, twice each
    ours, theirs = _losses(on), _losses(off)
    assert len(ours) == 4 and ours[0] != ours[-1]
    assert all(math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6) for a, b in zip(ours, theirs, strict=True))
    wa, wb = (load_file(r / "final" / "model.safetensors") for r in (on, off))
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-5


@pytest.mark.parametrize(
    "recipe, per_step",
    [
        ("lora", 12),  # every one of the 6 blocks holds LoRA: each recomputed
        ("houlsby_adapters", 12),
        ("soft_prompt_lora", 12),
        ("pet_minilm", 12),
        ("ulmfit", None),  # stages: only the unfrozen blocks need their activations
        ("spectrum", None),
        # the top 2 of 6 blocks train: 6 forwards + 2 recomputed; the backward stops at block 4
        # (transformers' switch would make the embeddings' output need grad: engine.NoInputGrads)
        ("freeze_top2", 8),
    ],
)
def test_it_reaches_through_the_parts(recipe, per_step, tiny_bert6, sentiment_csv, tmp_path, attention_calls):
    overrides = [
        f"model={tiny_bert6}",
        f"data.source={sentiment_csv}",
        "train.max_steps=6",
        "train.batch_size=16",
        "train.precision=fp32",
        "train.lr=0.01",
        "train.early_stopping.patience=null",
        "train.gradient_checkpointing=true",
        "train.trunk_cache=off",
        f"output.dir={tmp_path}",
    ]
    _, changed, held = run_steps(load_recipe(RECIPE_DIR / f"{recipe}.yaml", overrides), tmp_path)
    assert changed and changed <= held
    if per_step is not None:
        assert attention_calls["train"] == per_step * 6
    else:
        assert attention_calls["train"] > 6 * 6, "no block was recomputed"


def test_with_the_trunk_cache(quick, still_bert):
    # the cached bottom blocks are not run at all; the trained top block is checkpointed
    runs = {
        on: _train(quick, on, "freeze.trainable=[head, {top_k: 1}]", "train.trunk_cache=on", model=still_bert)
        for on in (True, False)
    }
    report = json.loads((runs[True] / "report.json").read_text())
    assert report["trunk_cache"]["used"], report["trunk_cache"]
    assert report["trunk_cache"]["depth"] == 2
    wa, wb = (load_file(r / "final" / "model.safetensors") for r in runs.values())
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-5
    assert _losses(runs[True]) == pytest.approx(_losses(runs[False]), rel=1e-5)


def test_prefix_tuning_is_refused_by_name(quick, tmp_path):
    args = ["train", *quick(None, "peft.method=prefix_tuning", "train.gradient_checkpointing=true")]
    message = refused(args, tmp_path / "runs", "train.gradient_checkpointing", "prefix_tuning")
    assert "drop the key/value cache" in message


def test_a_model_without_checkpointing_is_refused_by_name(quick, tmp_path, tokenizer_dir):
    from transformers import AutoTokenizer, MPNetConfig, MPNetModel

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = MPNetConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=162,
        pad_token_id=tokenizer.pad_token_id,
    )
    path = tmp_path / "tiny-mpnet"
    MPNetModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    args = ["train", *quick(str(path), "train.gradient_checkpointing=true")]
    refused(args, tmp_path / "runs", "train.gradient_checkpointing", "MPNetForSequenceClassification")
