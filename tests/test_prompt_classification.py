"""prompt_classification on tiny random LMs: templates and verbalizers (masked and causal LMs), the
zero-shot report, plain transformers / peft artifacts, composition with the strategy parts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

from hybridtune import api
from hybridtune.errors import UserError
from hybridtune.recipe import load_recipe
from hybridtune.strategy import prompt
from hybridtune.strategy.prompt import PromptConfig

from .conftest import TEXTS


def _train(overrides) -> Path:
    return Path(api.train(load_recipe(None, overrides))["run_dir"])


def _probs(run: Path, texts=TEXTS) -> torch.Tensor:
    return torch.tensor([list(r["probs"].values()) for r in api.predict(str(run), texts)])


# --------------------------------------------------------------------------------------------------
# the template


def test_template_keeps_its_tokens_and_cuts_the_text_from_the_left(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = PromptConfig(template="Review: {text} It was {mask}.", verbalizer={"neg": "bad", "pos": "good"})
    fmt = prompt.resolve(config, tokenizer, "mlm", ["neg", "pos"], pair=False)
    long = " ".join(f"w{i}" for i in range(200)) + " the very end"
    short, cut = prompt.encode(fmt, tokenizer, ["a fine film", long], None, max_length=32)
    assert tokenizer.decode(short) == "[CLS] review : a fine film it was [MASK]. [SEP]"
    assert len(cut) == 32 and cut.count(tokenizer.mask_token_id) == 1
    text = tokenizer.decode(cut)
    assert text.startswith("[CLS] review :") and text.endswith("the very end it was [MASK]. [SEP]"), text
    assert "w0 " not in text  # the start of the text went, not the template
    with pytest.raises(UserError, match="data.max_length"):
        prompt.encode(fmt, tokenizer, ["x"], None, max_length=8)


def test_decoder_prompt_ends_at_the_answer_and_spaces_move_onto_the_words(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = PromptConfig(
        template="Review: {text}\nSentiment: {mask}", verbalizer={"a": "good", "b": "so bad"}
    )
    fmt = prompt.resolve(config, tokenizer, "causal", ["a", "b"], pair=False)
    so_bad = tokenizer(" so bad", add_special_tokens=False)["input_ids"]
    assert fmt.words == [[tokenizer(" good", add_special_tokens=False)["input_ids"]], [so_bad]]
    assert len(so_bad) == 2  # a word of two tokens, scored by the chain rule
    (ids,) = prompt.encode(fmt, tokenizer, ["nice"], None, max_length=32)
    assert tokenizer.decode(ids) == "[CLS] review : nice sentiment :"  # no [SEP]: the answer comes next
    bad = PromptConfig(template="{text} is {mask} indeed", verbalizer={"a": "x", "b": "y"})
    with pytest.raises(UserError, match=r"\{mask\} at the end"):
        prompt.resolve(bad, tokenizer, "causal", ["a", "b"], pair=False)


@pytest.mark.parametrize(
    "override, where",
    [
        ("prompt.template='{text} no answer slot'", "prompt.template"),
        ("prompt.template='{text} {mask} {label}'", "prompt.template"),
        ("prompt.verbalizer={negative: bad}", "prompt.verbalizer"),
        ("prompt.verbalizer={negative: bad, positive: good, neutral: meh}", "prompt.verbalizer.neutral"),
        ("prompt.verbalizer={negative: bad, positive: bad}", "prompt.verbalizer.positive"),
        ("prompt.template='{text} / {text_pair}: {mask}'", "prompt.template"),
    ],
)
def test_bad_prompts_stop_before_training(prompt_run, tiny_bert_mlm, tmp_path, override, where):
    with pytest.raises(UserError) as e:
        api.prepare(load_recipe(None, prompt_run(tiny_bert_mlm, override)))
    assert str(e.value).startswith(where) or f": {where}" in str(e.value), str(e.value)
    assert not (tmp_path / "runs").exists()


def test_prompt_keys_belong_to_the_prompt_task(quick, tiny_bert_mlm):
    for override, key in (
        ("prompt.template='{text} {mask}'", "prompt"),
        ("objective.lm_weight=0.1", "objective"),
        ("fusion.frozen=zero_shot", "fusion.frozen"),
    ):
        with pytest.raises(UserError, match=rf"default recipe: {key}: found"):
            load_recipe(None, quick(tiny_bert_mlm, override))


# --------------------------------------------------------------------------------------------------
# runs


def test_masked_lm_run_trains_saves_a_plain_masked_lm_and_scores_like_it(prompt_run, tiny_bert_mlm):
    words = "prompt.verbalizer={negative: bad, positive: good}"
    run = _train(prompt_run(tiny_bert_mlm, "train.max_steps=24", "train.lr=0.003", words))
    report = json.loads((run / "report.json").read_text())
    logs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["eval_loss"] for r in logs if "eval_loss" in r]
    assert len(losses) == 2 and losses[1] < losses[0], losses  # the scorer learns through the LM head
    assert set(report["zero_shot_test"]) == {"accuracy", "f1_macro", "n"}
    assert json.loads((run / "zero_shot.json").read_text())["n"] == report["test"]["n"]
    # standard artifact: plain transformers' masked LM, scored by hand, gives the same probabilities
    model = AutoModelForMaskedLM.from_pretrained(run / "final").eval()
    tokenizer = AutoTokenizer.from_pretrained(run / "final")
    batch = tokenizer(
        [f"{t} It was {tokenizer.mask_token}." for t in TEXTS], padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        logits = model(**batch).logits
    at = batch["input_ids"] == tokenizer.mask_token_id
    words = tokenizer.convert_tokens_to_ids(["bad", "good"])
    plain = torch.softmax(logits[at].log_softmax(-1)[:, words], -1)
    torch.testing.assert_close(plain, _probs(run), atol=1e-5, rtol=1e-4)
    assert api.evaluate(str(run))["accuracy"] == report["test"]["accuracy"]


def test_causal_lm_lora_multi_token_words_load_with_plain_peft(prompt_run, tiny_gpt2):
    from peft import PeftModel

    words = "prompt.verbalizer={negative: [bad, so bad], positive: [good, very good]}"
    run = _train(
        prompt_run(tiny_gpt2, "train.max_steps=4", "peft.method=lora", "prompt.word_score=sum", words)
    )
    final = run / "final"
    assert json.loads((final / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    base = AutoModelForCausalLM.from_pretrained(tiny_gpt2)
    model = PeftModel.from_pretrained(base, final).eval()
    tokenizer = AutoTokenizer.from_pretrained(final)

    def logp(prompt: str, word: str) -> torch.Tensor:
        """Chain-rule log-probability of ` word` after the prompt, one text at a time (no padding)."""
        ids = tokenizer(prompt)["input_ids"][:-1]  # [CLS] prompt, without [SEP]
        answer = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids + answer])).logits[0].log_softmax(-1)
        return sum(out[len(ids) - 1 + i, t] for i, t in enumerate(answer))

    rows = []
    for text in TEXTS:
        prompt = f"Review: {text}\nSentiment:"
        scores = [
            torch.logsumexp(torch.stack([logp(prompt, w) for w in ws]), 0)
            for ws in (["bad", "so bad"], ["good", "very good"])
        ]
        rows.append(torch.softmax(torch.stack(scores), 0))
    torch.testing.assert_close(torch.stack(rows), _probs(run), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "model, parts",
    [
        ("gpt2", ["soft_prompt.num_virtual_tokens=4", "peft.method=lora", "data.max_length=64"]),
        ("gpt2", ["freeze.trainable=[{top_k: 1}]"]),
        ("bert", ["adapters.reduction_factor=4", "soft_prompt.num_virtual_tokens=3", "data.max_length=64"]),
        ("bert", ["stages=[{fraction: 0.5, train: [{top_k: 1}]}, {train: [all]}]"]),
    ],
    ids=["gpt2-soft_prompt+lora", "gpt2-freeze", "bert-adapters+soft_prompt", "bert-stages"],
)
def test_strategy_parts_compose_with_the_prompt(prompt_run, tiny_gpt2, tiny_bert_mlm, model, parts):
    path = tiny_gpt2 if model == "gpt2" else tiny_bert_mlm
    recipe = load_recipe(None, prompt_run(path, "train.max_steps=4", *parts))
    prep = api.prepare(recipe)
    assert 0 < prep.params["trainable"] <= prep.params["total"]
    run = _train(prompt_run(path, "train.max_steps=4", *parts))
    report = json.loads((run / "report.json").read_text())
    again = api.evaluate(str(run))
    assert again["accuracy"] == report["test"]["accuracy"], "a reloaded run scores as the trained one"


def test_freezing_the_head_of_a_tied_lm_leaves_its_embeddings_frozen(prompt_run, tiny_bert_mlm):
    prep = api.prepare(load_recipe(None, prompt_run(tiny_bert_mlm, "freeze.trainable=[head]")))
    trainable = {n for n, p in prep.model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("cls.predictions.") for n in trainable)
    assert not prep.model.get_output_embeddings().weight.requires_grad  # the decoder is the embeddings


def test_zero_shot_eval_of_a_recipe_from_the_cli(prompt_run, tiny_bert_mlm, quick, tmp_path):
    from typer.testing import CliRunner

    from hybridtune.cli import app

    recipe = tmp_path / "zs.yaml"
    recipe.write_text("task: prompt_classification\nprompt:\n  verbalizer: {negative: bad, positive: good}\n")
    sets = [x for o in quick(tiny_bert_mlm) if o.startswith(("model", "data")) for x in ("--set", o)]
    result = CliRunner().invoke(app, ["eval", str(recipe), *sets, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    run = _train(
        prompt_run(tiny_bert_mlm, "train.max_steps=1", "prompt.verbalizer={negative: bad, positive: good}")
    )
    assert report == json.loads((run / "zero_shot.json").read_text())  # the same untrained scorer
    plain = tmp_path / "plain.yaml"
    plain.write_text("task: classification\n")
    result = CliRunner().invoke(app, ["eval", str(plain), *sets])
    assert result.exit_code == 2 and "prompt_classification" in result.stderr
