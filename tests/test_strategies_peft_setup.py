"""peft methods, bottleneck adapters and the soft prompt as built, without a training run: adapters start
near the identity, the soft prompt's initialisations, AdaLoRA's budget driven by hand, a deep copy runs
its own weights, the example recipes load; and impossible combinations and bad keys are refused before
training. (tests/test_strategies_peft.py: each part and hybrid trained.)"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from hybridtune import api
from hybridtune.errors import UserError
from hybridtune.recipe import load_recipe

from .conftest import TEXTS

# --------------------------------------------------------------------------------------------------
# as built


def test_adalora_model_in_memory_is_the_model_saved_without_a_checkpoint_reload(quick, tmp_path):
    from peft import PeftModel
    from transformers import TrainingArguments
    from transformers.trainer_callback import TrainerControl, TrainerState

    from hybridtune import strategy

    recipe = load_recipe(
        None, quick(None, "peft.method=adalora", "peft.init_r=4", "peft.target_r=2", "peft.deltaT=1")
    )
    prep = api.prepare(recipe)
    (budget,) = [
        c for c in strategy.callbacks(prep.model, recipe, prep.build) if type(c).__name__ == "AdaLoraBudget"
    ]
    args = TrainingArguments(
        output_dir=str(tmp_path), load_best_model_at_end=False, report_to="none", use_cpu=True
    )
    state, control = TrainerState(max_steps=5), TrainerControl()
    budget.on_train_begin(args, state, control)
    batch = prep.tokenizer(TEXTS, padding=True, return_tensors="pt")
    optimizer = torch.optim.AdamW([p for p in prep.model.parameters() if p.requires_grad], lr=0.01)
    for step in range(5):
        state.global_step = step
        prep.model(**batch, labels=torch.tensor([1, 0, 0])).loss.backward()
        optimizer.step()
        budget.on_optimizer_step(args, state, control)
        optimizer.zero_grad()
    budget.on_train_end(args, state, control)
    prep.model.eval()
    prep.model.save_pretrained(tmp_path / "out")
    base = AutoModelForSequenceClassification.from_pretrained(api.resolve(recipe.model.name), num_labels=2)
    reloaded = PeftModel.from_pretrained(base, tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, prep.model(**batch).logits, atol=1e-6, rtol=1e-5)


def test_adapters_start_near_the_identity(quick):
    plain = api.prepare(load_recipe(None, quick(None, "freeze.trainable=[head]")))
    adapted = api.prepare(load_recipe(None, quick(None, "adapters.method=houlsby")))
    batch = plain.tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        a, b = plain.model.eval()(**batch).logits, adapted.model.eval()(**batch).logits
    assert not torch.equal(a, b)
    torch.testing.assert_close(a, b, atol=1e-3, rtol=0)


def test_soft_prompt_initialisations(quick):
    def prompt(*extra: str) -> tuple[torch.Tensor, torch.Tensor, object]:
        prep = api.prepare(
            load_recipe(None, quick(None, "data.max_length=64", "soft_prompt.num_virtual_tokens=5", *extra))
        )
        return (
            prep.model.soft_prompt.weight.detach(),
            prep.model.get_input_embeddings().weight.detach(),
            prep.tokenizer,
        )

    text = "great movie"
    weight, table, tokenizer = prompt("soft_prompt.init=text", f"soft_prompt.init_text={text}")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert torch.equal(weight, table[(ids * 5)[:5]])  # the text's tokens, repeated to n
    weight, table, _ = prompt()  # vocab: each row a vocabulary embedding
    assert all((table == row).all(-1).any() for row in weight)
    weight, table, _ = prompt("soft_prompt.init=random")
    assert not any((table == row).all(-1).any() for row in weight)
    assert 0.5 < weight.std() / table.std() < 2  # at the scale of real tokens


# --------------------------------------------------------------------------------------------------
# refused before training


@pytest.mark.parametrize(
    "extra, where, says",
    [
        (["freeze.trainable=[bias]", "peft.method=lora"], "freeze", "splits a module"),
        (
            ["soft_prompt.num_virtual_tokens=4", "peft.method=prompt_tuning"],
            "soft_prompt",
            "together with peft",
        ),
        (
            ["peft.method=prefix_tuning", "peft.num_virtual_tokens=100"],
            "peft.num_virtual_tokens",
            "164 positions",
        ),
        (["soft_prompt.num_virtual_tokens=100"], "soft_prompt.num_virtual_tokens", "at most 128"),
        (["peft.method=adalora", "peft.tinit=10", "peft.total_step=5"], "peft", "budgeting phase"),
    ],
)
def test_impossible_combinations_are_refused_before_training(quick, tmp_path, extra, where, says):
    with pytest.raises(UserError, match=re.escape(says)) as e:
        api.prepare(load_recipe(None, quick(None, "data.max_length=64", *extra)))
    assert e.value.where == where
    assert not (tmp_path / "runs").exists()


def test_prompt_tuning_on_a_decoder_padded_right_is_refused(quick, tiny_gpt2):
    with pytest.raises(UserError, match="soft_prompt") as e:
        api.prepare(load_recipe(None, quick(tiny_gpt2, "peft.method=prompt_tuning", "data.max_length=64")))
    assert e.value.where == "peft.method" and "last token" in e.value.found


def test_ia3_with_targets_but_no_feedforward_modules_on_an_unknown_architecture(quick, tiny_distilbert):
    with pytest.raises(UserError) as e:
        api.prepare(
            load_recipe(None, quick(tiny_distilbert, "peft.method=ia3", "peft.target_modules=[k_lin, lin2]"))
        )
    assert e.value.where == "peft.feedforward_modules"


@pytest.mark.parametrize(
    "extra, where, says",
    [
        (["adapters.non_linearity=tanh"], "adapters.non_linearity", "relu"),
        (["adapters.reduction=8"], "adapters.reduction", "reduction_factor"),
        (["soft_prompt.init=text"], "soft_prompt", "init_text"),
        (["soft_prompt.init_txt=hi"], "soft_prompt.init_txt", "init_text"),
    ],
)
def test_bad_part_keys_name_the_key_and_the_choices(extra, where, says):
    with pytest.raises(UserError, match=re.escape(says)) as e:
        load_recipe(None, extra)
    assert e.value.where.endswith(where)


@pytest.mark.parametrize(
    "name",
    [
        "dora",
        "adalora",
        "ia3",
        "prefix_tuning",
        "prompt_tuning",
        "p_tuning",
        "lora_attn_ffn",
        "houlsby_adapters",
        "soft_prompt_lora",
    ],
)
def test_example_recipe_is_valid(name):
    recipe = load_recipe(Path(__file__).parent.parent / "recipes" / f"{name}.yaml")
    assert recipe.name == name and recipe.model.name == "bundled:minilm"


def test_a_deep_copy_of_a_model_with_adapters_and_a_soft_prompt_runs_its_own_weights(quick):
    import copy

    prep = api.prepare(
        load_recipe(
            None,
            quick(None, "data.max_length=64", "soft_prompt.num_virtual_tokens=4", "adapters.method=houlsby"),
        )
    )
    model = prep.model.eval()
    twin = copy.deepcopy(model)
    batch = prep.tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        before = model(**batch).logits
        torch.testing.assert_close(twin(**batch).logits, before)
        twin.soft_prompt.weight.normal_()
        twin.bottleneck_adapters["0"]["ffn"].up.weight.normal_()
        assert not torch.allclose(twin(**batch).logits, before)
        assert torch.equal(model(**batch).logits, before)
