"""Every strategy part on the causal-LM task: each trains a few steps of SFT on the tiny GPT-2, and
exactly the intended parameters change; every other one stays bit-identical (as tests/test_recipes.py
does for classification)."""

from __future__ import annotations

import re

import pytest
import torch

from hybridtune import api
from hybridtune.recipe import load_recipe
from hybridtune.train.engine import make_trainer, training_arguments
from tests.test_causal_lm import colour_rows, write_jsonl

# part overrides -> what must change (regex on parameter names without peft's `base_model.model.`);
# GPT-2's LM head is tied to the token embeddings, so it is no parameter of its own
PARTS = {
    "full": ([], r"."),
    "freeze_top1": (["freeze.trainable=[{top_k: 1}]"], r"^transformer\.h\.1\."),
    "lora": (["peft.method=lora"], r"\.lora_[AB]\."),
    "lora_top1": (
        ["peft.method=lora", "freeze.trainable=[{top_k: 1}]"],
        r"\.lora_[AB]\.|^transformer\.h\.1\.modules_to_save\.",
    ),
    "prefix_tuning": (["peft.method=prefix_tuning", "peft.num_virtual_tokens=4"], r"^prompt_encoder\."),
    "adapters": (["adapters.method=houlsby"], r"adapter"),
    "soft_prompt": (["soft_prompt.num_virtual_tokens=4"], r"soft_prompt\.weight$"),
    "soft_prompt_lora": (
        ["soft_prompt.num_virtual_tokens=4", "peft.method=lora"],
        r"soft_prompt\.weight$|\.lora_[AB]\.",
    ),
    "layer_decay": (["lr.layer_decay=0.5"], r"."),
    "stages": (["stages=[{fraction: 0.5, train: [{top_k: 1}]}, {train: [all]}]"], r"."),
}


@pytest.fixture(scope="module")
def small_pairs(tmp_path_factory) -> str:
    return write_jsonl(tmp_path_factory.mktemp("sft-parts") / "pairs.jsonl", colour_rows(40))


@pytest.mark.parametrize("part", PARTS, ids=list(PARTS))
def test_part_trains_exactly_the_intended_parameters_of_a_causal_lm(part, tiny_gpt2, small_pairs, tmp_path):
    overrides, intended_pattern = PARTS[part]
    recipe = load_recipe(
        None,
        [
            "task=causal_lm",
            f"model={tiny_gpt2}",
            f"data.source={small_pairs}",
            "data.max_length=24",
            "train.max_steps=2",
            "train.batch_size=8",
            "train.lr=0.01",  # large enough that every held parameter visibly moves in 2 steps
            "train.precision=fp32",
            "train.early_stopping.patience=null",
            f"output.dir={tmp_path}",
            *overrides,
        ],
    )
    prep = api.prepare(recipe)
    before = {n: p.detach().clone() for n, p in prep.model.named_parameters()}
    held = prep.plan.optimizer_names(prep.model)
    args = training_arguments(recipe.train, recipe.output, tmp_path / "ck")
    args.save_strategy = args.eval_strategy = "no"
    args.load_best_model_at_end = False
    trainer = make_trainer(
        prep.model,
        prep.tokenizer,
        prep.datasets,
        recipe,
        args,
        tmp_path,
        None,
        plan=prep.plan,
        callbacks=[],
        collator=prep.task.collator(prep.tokenizer),
    )
    trainer.train()
    changed = {n for n, p in prep.model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert changed, "nothing trained"
    never = r"\.original_module\."  # peft keeps the original of a modules_to_save module untouched
    assert changed == {n for n in held if not re.search(never, n)}, (
        sorted(held - changed)[:5],
        sorted(changed - held)[:5],
    )
    names = [n for n, _ in prep.model.named_parameters()]
    intended = {n for n in names if re.search(intended_pattern, n.removeprefix("base_model.model."))}
    intended -= {n for n in intended if re.search(never, n)}
    assert changed == intended, (sorted(intended - changed)[:5], sorted(changed - intended)[:5])
    if part == "layer_decay":  # the lower block learns at half the rate of the upper one
        lrs = prep.plan.lrs
        assert lrs["transformer.h.0.attn.c_attn.weight"][0] == pytest.approx(
            0.5 * lrs["transformer.h.1.attn.c_attn.weight"][0]
        )
