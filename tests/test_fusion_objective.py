"""Logit fusion (frozen + tuned class logits) and the mixed objective (λ·LM + (1−λ)·task), on tiny LMs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from hybridtune import api
from hybridtune.errors import UserError
from hybridtune.model.anatomy import unwrap
from hybridtune.recipe import load_recipe
from hybridtune.strategy import fusion, prompt
from hybridtune.train.engine import make_trainer, training_arguments

from .conftest import TEXTS


def _train(overrides) -> Path:
    return Path(api.train(load_recipe(None, overrides))["run_dir"])


def _logs(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------------------------------
# fusion


def test_fusion_trains_around_a_frozen_scorer_that_stays_bit_identical(prompt_run, tiny_gpt2, tmp_path):
    recipe = load_recipe(
        None, prompt_run(tiny_gpt2, "train.max_steps=4", "peft.method=lora", "fusion.frozen=zero_shot")
    )
    prep = api.prepare(recipe)
    frozen = getattr(unwrap(prep.model), fusion.ATTR).model
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    lora = {n: p.detach().clone() for n, p in prep.model.named_parameters() if p.requires_grad}
    # outside the tuned model: none of its parameters can reach the optimizer, a checkpoint or final/
    assert not {id(p) for p in frozen.parameters()} & {id(p) for p in prep.model.parameters()}
    assert not any(p.requires_grad for p in frozen.parameters())
    args = training_arguments(recipe.train, recipe.output, tmp_path / "ck")
    args.save_strategy = args.eval_strategy = "no"
    args.load_best_model_at_end = False
    make_trainer(prep.model, prep.tokenizer, prep.datasets, recipe, args, tmp_path, None, prep.plan).train()
    assert any(not torch.equal(lora[n], p) for n, p in prep.model.named_parameters() if n in lora), (
        "no training"
    )
    after = frozen.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    base = AutoModelForCausalLM.from_pretrained(tiny_gpt2).state_dict()
    assert all(torch.equal(base[k], after[k]) for k in base)  # the base model's own weights
    assert not frozen.training


def test_fused_run_predicts_softmax_of_the_sum(prompt_run, tiny_gpt2):
    from peft import PeftModel

    run = _train(
        prompt_run(tiny_gpt2, "train.max_steps=3", "train.lr=0.05", "peft.method=lora", "fusion.weight=0.5")
    )
    final = run / "final"
    assert json.loads((final / "fusion.json").read_text())["frozen"] == "zero_shot"
    assert not any("fusion" in k for k in json.loads((final / "adapter_config.json").read_text()))
    # rebuilt independently: the tuned adapter with plain peft, the frozen base as a zero-shot scorer
    fmt = prompt.PromptFormat.from_json(json.loads((final / "prompt.json").read_text()))
    tuned = prompt.attach(
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_gpt2), final), fmt
    )
    frozen = prompt.load_scorer(tiny_gpt2, fmt)
    loaded = api.load_run(str(run))
    batch = loaded.task.collator(loaded.tokenizer)(
        [dict(x) for x in loaded.task.encode(_frame(TEXTS), loaded.tokenizer, None, loaded.recipe.data)]
    )
    with torch.no_grad():
        expected = torch.softmax(tuned.eval()(**batch).logits + 0.5 * frozen(**batch).logits, -1)
    ours = torch.tensor([list(r["probs"].values()) for r in api.predict(str(run), TEXTS)])
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)


def _frame(texts):
    import pandas as pd

    return pd.DataFrame({"text": texts, "_where": [f"text {i}" for i in range(len(texts))]})


def test_fusion_with_a_frozen_run_checks_that_it_fits(prompt_run, tiny_gpt2):
    first = _train(prompt_run(tiny_gpt2, "train.max_steps=1", "output.name=first"))
    second = _train(
        prompt_run(tiny_gpt2, "train.max_steps=2", f"fusion.frozen={first}", "output.name=second")
    )
    assert json.loads((second / "final" / "fusion.json").read_text())["frozen"] == str(first.resolve())
    assert len(api.predict(str(second), TEXTS)) == 3
    other_template = prompt_run(
        tiny_gpt2, f"fusion.frozen={first}", "prompt.template='Text: {text} Label: {mask}'"
    )
    with pytest.raises(UserError, match="fusion.frozen: found a run with another prompt template"):
        api.prepare(load_recipe(None, other_template))


# --------------------------------------------------------------------------------------------------
# mixed objective


@pytest.mark.parametrize(
    "model, lm_weight", [("bert", 0.0), ("bert", 0.1), ("gpt2", 0.5)], ids=["mlm-0", "mlm-0.1", "clm-0.5"]
)
def test_mixed_objective_logs_both_losses_and_mixes_them(
    prompt_run, tiny_bert_mlm, tiny_gpt2, model, lm_weight
):
    path = tiny_bert_mlm if model == "bert" else tiny_gpt2
    run = _train(prompt_run(path, "train.max_steps=10", f"objective.lm_weight={lm_weight}"))
    rows = [r for r in _logs(run) if "loss" in r]
    assert rows and all("loss_lm" in r and "loss_task" in r for r in rows)
    for r in rows:  # Trainer's loss is the mean of the mixed loss over the same steps
        assert r["loss"] == pytest.approx(
            lm_weight * r["loss_lm"] + (1 - lm_weight) * r["loss_task"], abs=2e-3
        )
        assert r["loss_lm"] > 5  # an LM loss over a 30k vocabulary, not the 2-way task loss
    assert all("loss_lm" not in r for r in _logs(run) if "eval_loss" in r)  # evaluation: the task alone


def test_mixed_objective_on_an_unlabeled_corpus(prompt_run, tiny_gpt2, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"an unlabeled sentence number {i}" for i in range(20)) + "\n\n")
    run = _train(
        prompt_run(tiny_gpt2, "train.max_steps=6", "objective.lm_weight=0.5", f"objective.corpus={corpus}")
    )
    assert any("loss_lm" in r for r in _logs(run))
    missing = prompt_run(tiny_gpt2, "objective.lm_weight=0.5", f"objective.corpus={tmp_path / 'nope.txt'}")
    with pytest.raises(UserError, match="objective.corpus"):
        api.prepare(load_recipe(None, missing))


def test_lm_batches_are_masked_for_encoders_and_shifted_inside_the_model_for_decoders(tokenizer_dir):
    from transformers import AutoTokenizer

    from hybridtune.strategy.objective import LmObjective, ObjectiveConfig

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    enc = tokenizer(["a rather long sentence about films " * 8, "short"], padding=True, return_tensors="pt")
    torch.manual_seed(0)
    mlm = LmObjective(ObjectiveConfig(lm_weight=0.5), tokenizer, True, None, 2, 0).lm_inputs(dict(enc))
    targets = mlm["labels"] != -100
    special = torch.isin(enc["input_ids"], torch.tensor(tokenizer.all_special_ids))
    assert targets.any() and not (targets & special).any()  # never a special or padding token
    assert torch.equal(mlm["labels"][targets], enc["input_ids"][targets])
    assert 0.05 < targets.sum() / (~special).sum() < 0.3  # ~15 % of the real tokens
    clm = LmObjective(ObjectiveConfig(lm_weight=0.5), tokenizer, False, None, 2, 0).lm_inputs(dict(enc))
    assert torch.equal(clm["labels"] == -100, enc["attention_mask"] == 0)
