"""causal_lm: instruction / chat SFT on a tiny random GPT-2 (with and without a chat template), its data
sources and errors, generation, and plain transformers / peft loading of what it saves."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from hybridtune import api, generation
from hybridtune.cli import app
from hybridtune.errors import EXIT_USER_ERROR, UserError
from hybridtune.recipe import load_recipe
from hybridtune.tasks import causal_lm

# a template of our own (the tiny model's BERT tokenizer has none): roles as words, one turn a line
TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
COLOURS = {
    "apple": "red",
    "banana": "yellow",
    "grass": "green",
    "sky": "blue",
    "snow": "white",
    "coal": "black",
}
FILLER = ["what", "colour", "is", "the", "a", "tell", "me", "please", "about", "of"]


def colour_rows(n: int, seed: int = 0) -> list[dict]:
    """Questions whose one-word answer is given away by one keyword: learnable in a few steps."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        key = rng.choice(list(COLOURS))
        rows.append(
            {
                "prompt": " ".join([*rng.sample(FILLER, 4), key]) + f" {i}?",
                "response": f"it is {COLOURS[key]}",
            }
        )
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="session")
def pairs_jsonl(tmp_path_factory) -> str:
    return write_jsonl(tmp_path_factory.mktemp("sft") / "pairs.jsonl", colour_rows(120))


@pytest.fixture(scope="session")
def tiny_chat_gpt2(tmp_path_factory, tiny_gpt2) -> str:
    """The tiny GPT-2 whose tokenizer has a chat template (and [SEP] as its EOS)."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("tiny-chat-gpt2")
    shutil.copytree(tiny_gpt2, out, dirs_exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2)
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(out)
    return str(out)


def recipe_for(model: str, data: str, tmp_path: Path, *extra: str):
    return load_recipe(
        None,
        [
            "task=causal_lm",
            f"model={model}",
            f"data.source={data}",
            "data.max_length=32",
            "train.max_steps=12",
            "train.batch_size=8",
            "train.lr=0.02",
            "train.precision=fp32",
            "train.eval_steps=6",
            "generation.max_new_tokens=6",
            f"output.dir={tmp_path / 'runs'}",
            *extra,
        ],
    )


# --------------------------------------------------------------------------------------------------
# tokenization


def test_chat_template_example_trains_on_the_response_and_eos_only(tiny_chat_gpt2, tmp_path, pairs_jsonl):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_gpt2)
    causal_lm.load_model(tiny_chat_gpt2, tokenizer, causal_lm.Labels())  # sets EOS = [SEP]
    data_cfg = recipe_for(tiny_chat_gpt2, pairs_jsonl, tmp_path).data
    rows = {"prompt": ["is snow white?", "sky"], "response": ["yes it is", "blue"], "_where": ["a", "b"]}
    data = causal_lm.encode(causal_lm.row_checker(data_cfg)(pd.DataFrame(rows)), tokenizer, None, data_cfg)
    row = data[0]
    text = tokenizer.decode(row["input_ids"])
    assert text == "user : is snow white? assistant : yes it is [SEP]"
    # the loss sees exactly the response and EOS; the rendered template is context
    trained = [t for t in row["labels"] if t != causal_lm.IGNORE]
    assert tokenizer.decode(trained) == "yes it is [SEP]"
    assert row["labels"][: row["prompt_length"]] == [causal_lm.IGNORE] * row["prompt_length"]
    assert row["prompt_length"] == len(row["input_ids"]) - len(trained)
    # padding is ignored by the loss too
    batch = causal_lm.collator(tokenizer)(
        [{k: data[i][k] for k in ("input_ids", "attention_mask", "labels")} for i in (0, 1)]
    )
    short = batch["attention_mask"][1] == 0
    assert short.any() and (batch["labels"][1][short] == causal_lm.IGNORE).all()


def test_plain_format_without_a_chat_template(tiny_gpt2, monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.setattr(
        causal_lm, "_told", set()
    )  # said once per model path: another test may have loaded it
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2)
    with pytest.warns(UserWarning, match="no chat template"):
        causal_lm.load_model(tiny_gpt2, tokenizer, causal_lm.Labels())
    ids = causal_lm.prompt_ids(tokenizer, [causal_lm.user("is snow white?")])
    assert ids == tokenizer("is snow white?\n", add_special_tokens=False)["input_ids"]
    assert causal_lm.response_ids(tokenizer, "yes")[-1] == tokenizer.sep_token_id == tokenizer.eos_token_id


def test_fit_cuts_the_context_start_first_then_the_response_end():
    prompt, response = list(range(10)), list(range(100, 104))
    assert causal_lm.fit(prompt, response, 20) == (prompt, response)
    assert causal_lm.fit(prompt, response, 12) == (prompt[2:], response)  # context loses its start
    assert causal_lm.fit(prompt, list(range(100, 130)), 12) == (prompt[4:], list(range(100, 106)))


# --------------------------------------------------------------------------------------------------
# data sources


def test_chatterbot_pairs_are_strings_from_consecutive_turns_and_split_without_repeats():
    from hybridtune import bundled

    frame, _ = bundled.dataset("bundled:chatterbot")
    assert len(frame) > 2000
    assert all(isinstance(v, str) and v for v in [*frame["prompt"], *frame["response"]])
    first = frame[frame["_where"].str.startswith("ai.yml:conversation 1,")]
    assert list(first["prompt"]) == ["What is AI?"]
    recipe = load_recipe(None, ["task=causal_lm"])
    assert recipe.data.source == "bundled:chatterbot" and recipe.model.name == "bundled:smollm2"
    splits = causal_lm.load_splits(recipe.data)
    keys = [json.dumps(t) for name in ("train", "validation", "test") for t in splits[name]["turns"]]
    assert len(keys) == len(set(keys)) == frame["prompt"].str.strip().nunique()


def test_rotten_tomatoes_as_an_instruction_task():
    recipe = load_recipe(None, ["task=causal_lm", "data.source=bundled:rotten_tomatoes"])
    splits = causal_lm.load_splits(recipe.data)
    assert set(splits.train["response"]) == {"positive", "negative"}
    turns = splits.test["turns"][0]
    assert turns[0]["role"] == "user"
    assert turns[0]["content"].startswith("Review: ")
    assert turns[0]["content"].endswith("\nIs this review positive or negative?")
    assert abs((splits.test["response"] == "positive").mean() - 0.5) < 0.05  # stratified


def test_messages_column(tmp_path, tiny_chat_gpt2):
    rows = [
        {
            "messages": [
                {"role": "system", "content": "Answer in one word."},
                {"role": "user", "content": f"colour of {k} {i}?"},
                {"role": "assistant", "content": v},
            ]
        }
        for i, (k, v) in enumerate(list(COLOURS.items()) * 4)
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    recipe = recipe_for(tiny_chat_gpt2, path, tmp_path, "data.messages_column=messages")
    splits = causal_lm.load_splits(recipe.data)
    assert len(splits.train) + len(splits.validation) + len(splits.test) == 24
    assert [t["role"] for t in splits.train["turns"][0]] == ["system", "user"]
    assert set(splits.train["response"]) <= set(COLOURS.values())


@pytest.mark.parametrize(
    "row, message",
    [
        ({"messages": [{"role": "user", "content": "hi"}]}, r"chat.jsonl:line 2: found messages"),
        (
            {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]},
            r"line 2, turn 2: found role 'bot'; expected one of system, user, assistant",
        ),
        (
            {"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}]},
            r"line 2, turn 2: found a last turn by user; expected the assistant's",
        ),
        (
            {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "x"}]},
            r"line 2, turn 1: found content ''",
        ),
    ],
)
def test_bad_chat_rows_are_refused_by_line_and_turn(tmp_path, row, message):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    path = write_jsonl(tmp_path / "chat.jsonl", [good, row, good])
    recipe = load_recipe(None, ["task=causal_lm", f"data.source={path}", "data.messages_column=messages"])
    with pytest.raises(UserError, match=message):
        causal_lm.load_splits(recipe.data)


def test_missing_response_column_is_a_user_error(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}] * 3)
    recipe = load_recipe(None, ["task=causal_lm", f"data.source={path}"])
    with pytest.raises(UserError, match=r"data.prompt_column\): found no column 'prompt'"):
        causal_lm.load_splits(recipe.data)


# --------------------------------------------------------------------------------------------------
# train -> generate -> plain transformers / peft


def _plain_greedy(model, tokenizer, prompt: str, max_new_tokens: int, **kwargs) -> str:
    """What a user without hybridtune does: the chat template, then transformers' generate."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    # (the test tokenizer is BERT's: its token_type_ids would be embedded by GPT-2; real decoders' have none)
    batch = tokenizer(text, add_special_tokens=False, return_tensors="pt", return_token_type_ids=False)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, **kwargs)
    return tokenizer.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True).strip()


PROMPTS = ["tell me the colour of snow", "what colour is the sky?"]


def test_full_sft_lowers_held_out_loss_and_final_generates_the_same_with_plain_transformers(
    tiny_chat_gpt2, pairs_jsonl, tmp_path
):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe = recipe_for(tiny_chat_gpt2, pairs_jsonl, tmp_path, "output.name=full")
    prep = api.prepare(recipe)
    before, tokens = causal_lm.response_loss(prep.model, prep.tokenizer, prep.datasets["test"])
    summary = api.train(recipe)
    run = Path(summary["run_dir"])
    test = json.loads((run / "eval.json").read_text())
    assert test["n"] == len(prep.datasets["test"]) and test["response_tokens"] == tokens
    assert test["loss"] < before - 1.0, (before, test["loss"])
    assert test["perplexity"] == pytest.approx(2.718281828 ** test["loss"], rel=1e-6)
    assert test["n_exact_match"] == test["n"] and 0 <= test["exact_match"] <= 1
    info = json.loads((run / "run.json").read_text())
    assert info == info | {"task": "causal_lm", "format": "model", "prompt_format": "chat_template"}

    answers = api.generate(str(run), PROMPTS, max_new_tokens=6)
    assert any(answers), "the trained model answers"
    model = AutoModelForCausalLM.from_pretrained(run / "final")  # its generation_config stops at [SEP]
    tokenizer = AutoTokenizer.from_pretrained(run / "final")
    assert tokenizer.chat_template == TEMPLATE
    assert [_plain_greedy(model, tokenizer, p, 6) for p in PROMPTS] == answers
    # sampling: seeded draws repeat; `predict` on a causal run answers greedily
    loaded = api.load_run(str(run))
    draw = dict(max_new_tokens=6, do_sample=True, temperature=1.5, top_p=0.95, seed=7)
    fmt = loaded.labels.prompt_format
    drawn = generation.answer(loaded.model, loaded.tokenizer, PROMPTS, prompt_format=fmt, **draw)
    assert drawn == generation.answer(loaded.model, loaded.tokenizer, PROMPTS, prompt_format=fmt, **draw)
    assert [r["response"] for r in api.predict(str(run), PROMPTS)] == answers  # recipe: 6 new tokens
    # the CLI, and a re-evaluation of the reloaded run, agree with what training wrote
    result = CliRunner().invoke(app, ["generate", str(run), PROMPTS[0], "--max-new-tokens", "6"])
    assert result.exit_code == 0 and result.output == answers[0] + "\n"
    assert api.evaluate(str(run))["loss"] == pytest.approx(test["loss"], rel=1e-5)


def test_lora_sft_saves_an_adapter_that_plain_peft_loads_and_generates_the_same(
    tiny_chat_gpt2, pairs_jsonl, tmp_path
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe = recipe_for(
        tiny_chat_gpt2,
        pairs_jsonl,
        tmp_path,
        "output.name=lora",
        "peft.method=lora",
        "peft.r=8",
    )
    summary = api.train(recipe)
    run = Path(summary["run_dir"])
    final = run / "final"
    assert (final / "adapter_config.json").is_file() and not (final / "model.safetensors").exists()
    assert json.loads((final / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    answers = api.generate(str(run), PROMPTS, max_new_tokens=6)
    assert any(answers)
    tokenizer = AutoTokenizer.from_pretrained(final)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_chat_gpt2), final).eval()
    stop = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    assert [_plain_greedy(model, tokenizer, p, 6, **stop) for p in PROMPTS] == answers


def test_generate_refuses_bad_input_in_one_line(tmp_path):
    run = tmp_path / "cls"
    (run / "final").mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"task": "classification"}))
    result = CliRunner().invoke(app, ["generate", str(run), "hello"])
    assert result.exit_code == EXIT_USER_ERROR
    assert "found a classification run; expected a causal_lm run" in result.output
    assert "Traceback" not in result.output
    with pytest.raises(UserError, match="--top-p"):
        generation.answer(None, None, ["hi"], 4, prompt_format="plain", do_sample=True, top_p=0)
    with pytest.raises(UserError, match="prompt 2: found an empty prompt"):
        generation.answer(None, None, ["hi", " "], 4, prompt_format="plain")


@pytest.mark.parametrize(
    "name", ["sft_chatterbot_smollm2", "sft_rotten_tomatoes_smollm2", "neftune_sft_smollm2"]
)
def test_example_recipe_runs_on_a_tiny_model(name, tiny_chat_gpt2, tmp_path):
    """The example SFT recipes as they are, on the tiny model and a slice of their bundled data."""
    recipe = load_recipe(
        Path(__file__).parent.parent / "recipes" / f"{name}.yaml",
        [
            f"model={tiny_chat_gpt2}",
            "train.max_steps=2",
            "train.eval_steps=2",
            "train.precision=fp32",
            "data.max_train_samples=16",
            "data.max_eval_samples=8",
            "generation.max_new_tokens=4",
            f"output.dir={tmp_path}",
        ],
    )
    summary = api.train(recipe)
    assert summary["test"]["n"] == 8 and summary["steps"] == 2
    params = json.loads((Path(summary["run_dir"]) / "params.json").read_text())
    assert 0 < params["trainable"] < params["total"] / 10  # LoRA only
    assert (Path(summary["run_dir"]) / "final" / "adapter_config.json").is_file()
