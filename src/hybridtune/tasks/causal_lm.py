"""Causal LM: instruction / chat supervised fine-tuning (SFT) of a decoder, and generation.

Owns its preprocessing (the tokenizer's chat template, loss on the response tokens only), its model
(AutoModelForCausalLM: the pretrained LM head, nothing new), its loss (the model's next-token
cross-entropy over the response) and its metrics (held-out loss and perplexity; exact match of greedy
generations where the answers are short).

Data, one example per row, as either
- `data.prompt_column` / `data.response_column` (default prompt / response): one question, one answer;
- `data.messages_column`: chat turns [{role, content}, ...] whose last turn, the assistant's, is the
  response (the earlier turns, a system prompt included, are the context and are not trained on);
- `bundled:chatterbot` (question -> answer pairs, data/chatterbot.py), or `bundled:rotten_tomatoes` /
  `bundled:imdb` as an instruction task: "Review: <text>\\nIs this review positive or negative?" ->
  "positive" / "negative".

Format (hybridtune/generation.py, which generation shares): with a chat template (SmolLM2 has one)
the context is rendered by `tokenizer.apply_chat_template(turns, add_generation_prompt=True)` and
tokenized without adding special tokens (the template has its own); without one (GPT-2, a test model)
the plain format is used, and said so: the tokenizer's BOS token (if it has one), then the turns'
texts joined by newlines and a final "\\n", tokenized without special tokens. run.json records which
(`prompt_format`); `hybridtune generate`, `predict` and `serve` read that record.
Either way the response follows, then the EOS token (which ends generation). Labels are -100 on the
context and on padding, so the loss is on the response and its EOS only (as TRL's
`completion_only_loss`). A tokenizer without an EOS token gets its SEP (else PAD) token as EOS.
Too long an example loses the start of its context first (the question and the assistant header sit at
its end), then the end of its response; the context always keeps half of `data.max_length` if it needs it.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field

import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field

from hybridtune import bundled, generation
from hybridtune.data import Splits, check_columns, check_texts
from hybridtune.data import load_splits as load_data_splits
from hybridtune.data.sources import read_table
from hybridtune.errors import UserError

NAME = "causal_lm"  # its spec: hybridtune/tasks/__init__.py; the contract: tasks/base.py
peft_task_type = "CAUSAL_LM"
IGNORE = -100
ROLES = ("system", "user", "assistant")
SENTIMENT_PROMPT = "Review: {text}\nIs this review positive or negative?"
# the frame every source becomes: the context turns and the response text
TURNS, RESPONSE = "turns", "response"
_told: set[str] = set()  # models whose missing chat template was reported (once per process)


class GenerationConfig(BaseModel):
    """`generation:` in a recipe — how evaluation generates (`hybridtune generate` has its own flags)."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int = Field(32, ge=1, le=4096, description="tokens generated per answer")
    exact_match_samples: int = Field(
        200,
        ge=0,
        description="test examples scored by exact match of their greedy generation (0 = none); only "
        "those whose reference fits in max_new_tokens count",
    )


@dataclass
class Labels:
    """No label space (the responses are text); carries the recipe's generation settings instead, and
    a saved run's prompt format (run.json's `prompt_format`) for `predict`."""

    values: list = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    prompt_format: str | None = None


# --------------------------------------------------------------------------------------------------
# data


def _sentiment(source: str | None) -> bool:
    return source in ("bundled:rotten_tomatoes", "bundled:imdb")


def columns(data_cfg) -> dict[str, str]:
    if _sentiment(data_cfg.source):
        return {"text_column": "text", "label_column": "label"}
    if data_cfg.source == "bundled:chatterbot":
        return {"prompt_column": "prompt", "response_column": "response"}
    if data_cfg.messages_column:
        return {"messages_column": data_cfg.messages_column}
    return {"prompt_column": data_cfg.prompt_column, "response_column": data_cfg.response_column}


def _check_messages(value, where: str) -> list[dict]:
    """A list of {role, content} turns ending with the assistant's (a JSON string in a csv cell, an
    array in a parquet file)."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise UserError(where, "messages that are not JSON", "a list of {role, content} turns") from None
    if not isinstance(value, list) or len(value) < 2:
        raise UserError(where, f"messages {str(value)[:60]!r}", "a list of at least 2 {role, content} turns")
    turns = []
    for i, turn in enumerate(value):
        place = f"{where}, turn {i + 1}"
        if not isinstance(turn, dict) or set(turn) - {"role", "content"} or "role" not in turn:
            raise UserError(place, f"{str(turn)[:60]!r}", "an object with 'role' and 'content'")
        if turn["role"] not in ROLES:
            raise UserError(place, f"role {turn['role']!r}", "one of " + ", ".join(ROLES))
        content = turn.get("content")
        if not isinstance(content, str) or not content.strip():
            raise UserError(place, f"content {content!r}", "a non-empty text")
        turns.append({"role": turn["role"], "content": content})
    if turns[-1]["role"] != "assistant":
        raise UserError(
            f"{where}, turn {len(turns)}", f"a last turn by {turns[-1]['role']}", "the assistant's"
        )
    return turns


def row_checker(data_cfg):
    """Check every row and turn it into (context turns, response); the sentiment sources become
    instructions here."""
    cols = columns(data_cfg)

    def check(frame: pd.DataFrame) -> pd.DataFrame:
        where = list(frame["_where"])
        if "messages_column" in cols:
            turns = [
                _check_messages(v, w) for v, w in zip(frame[cols["messages_column"]], where, strict=True)
            ]
            contexts, responses = [t[:-1] for t in turns], [t[-1]["content"] for t in turns]
        elif "label_column" in cols:
            contexts = [[user(SENTIMENT_PROMPT.format(text=t))] for t in frame["text"]]
            responses = [bundled.SENTIMENT_NAMES[int(v)] for v in frame["label"]]
        else:
            check_texts(frame, [cols["prompt_column"], cols["response_column"]])
            contexts = [[user(p)] for p in frame[cols["prompt_column"]]]
            responses = list(frame[cols["response_column"]])
        return pd.DataFrame({TURNS: contexts, RESPONSE: responses, "_where": where})

    return check


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def load_splits(data_cfg) -> Splits:
    # de-duplicated on the context alone: a question asked twice (with two answers) is one example,
    # in one split; the instruction version of a sentiment set keeps its label balance per split
    stratify = RESPONSE if _sentiment(data_cfg.source) else None
    return load_data_splits(
        data_cfg, columns(data_cfg), stratify, row_checker(data_cfg), inputs=[TURNS], texts=False
    )


def label_space(splits: Splits, data_cfg) -> Labels:
    return Labels()


def eval_frame(data: str | None, data_cfg, labels: Labels) -> pd.DataFrame:
    """The rows to evaluate: the recipe's test split, or every row of `data` (a file or dataset dir)."""
    if data is None:
        return load_splits(data_cfg).test
    frame = read_table(data, "--data", data_cfg.delimiter)
    if isinstance(frame, dict):
        frame = frame["test"] if "test" in frame else next(iter(frame.values()))
    check_columns(frame, columns(data_cfg), data)
    return row_checker(data_cfg)(frame)


# --------------------------------------------------------------------------------------------------
# tokenization


def has_chat_template(tokenizer) -> bool:
    return generation.training_format(tokenizer) == generation.CHAT_TEMPLATE


def prompt_ids(tokenizer, turns: list[dict]) -> list[int]:
    """The tokens the response follows: the chat template's rendering up to the assistant's turn, or
    the plain format's "<turns>\\n" (see the module docstring)."""
    return generation.context_ids(tokenizer, generation.training_format(tokenizer), turns)


def response_ids(tokenizer, response: str) -> list[int]:
    return tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def fit(prompt: list[int], response: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Cut an example to `max_length` tokens (module docstring: context start first, response end next)."""
    if len(prompt) + len(response) <= max_length:
        return prompt, response
    keep = max(max_length - len(response), min(len(prompt), max_length // 2))
    prompt = prompt[len(prompt) - keep :]
    return prompt, response[: max_length - len(prompt)]


def encode(frame: pd.DataFrame, tokenizer, labels: Labels | None, data_cfg):
    """input_ids / attention_mask / labels (-100 on the context), plus the prompt length and the
    reference text for evaluation's generations (Trainer drops those two: the model does not take them)."""
    import datasets

    columns: dict[str, list] = {k: [] for k in ("input_ids", "attention_mask", "labels", "prompt_length")}
    for turns, response in zip(frame[TURNS], frame[RESPONSE], strict=True):
        prompt, answer = fit(
            prompt_ids(tokenizer, turns), response_ids(tokenizer, response), data_cfg.max_length
        )
        columns["input_ids"].append(prompt + answer)
        columns["attention_mask"].append([1] * (len(prompt) + len(answer)))
        columns["labels"].append([IGNORE] * len(prompt) + answer)
        columns["prompt_length"].append(len(prompt))
    columns["reference"] = list(frame[RESPONSE])
    columns["query"] = [turns[-1]["content"] for turns in frame[TURNS]]
    return datasets.Dataset.from_dict(columns)


def collator(tokenizer):
    """Pads input ids, and the label lists with -100 (transformers' seq2seq collator does both; it
    works for a decoder alone)."""
    from transformers import DataCollatorForSeq2Seq

    return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE)


def load_model(path: str, tokenizer, labels: Labels):
    from transformers import AutoModelForCausalLM

    from hybridtune.model.loading import load_model as load

    if tokenizer.eos_token is None:  # e.g. a BERT tokenizer on a test decoder: SEP ends an answer
        tokenizer.eos_token = tokenizer.sep_token or tokenizer.pad_token
    tokenizer.padding_side = "right"  # training; generation pads on the left itself
    if not has_chat_template(tokenizer) and path not in _told:
        _told.add(path)
        warnings.warn(
            f"{path}: the tokenizer has no chat template; causal_lm uses the plain 'prompt\\nresponse' format",
            stacklevel=1,
        )
    model, missing = load(AutoModelForCausalLM, path, tokenizer)
    # final/ then generates like `hybridtune generate` with plain transformers: stop at our EOS
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, missing


def run_info(tokenizer) -> dict:
    """What run.json says about the format, for readers of final/ without hybridtune (serve)."""
    return {
        "prompt_format": generation.training_format(tokenizer),
        "eos_token": tokenizer.eos_token,
    }


# --------------------------------------------------------------------------------------------------
# metrics


def make_compute_metrics(labels: Labels):
    """None: validation reports Trainer's own eval loss, and never gathers vocabulary-sized logits."""
    return None


@torch.no_grad()
def response_loss(model, tokenizer, dataset, batch_size: int = 8) -> tuple[float, int]:
    """(mean cross-entropy per response token, response tokens) over an encoded dataset."""
    collate = collator(tokenizer)
    model.eval()
    device = next(model.parameters()).device
    keys = ("input_ids", "attention_mask", "labels")
    rows = [{k: row[k] for k in keys} for row in dataset]
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        batch = {k: v.to(device) for k, v in collate(rows[i : i + batch_size]).items()}
        n = int((batch["labels"][:, 1:] != IGNORE).sum())  # the model shifts labels by one
        total += float(model(**batch).loss) * n
        count += n
    return total / max(count, 1), count


def normalise(text: str) -> str:
    return " ".join(text.casefold().split())


def report(model, tokenizer, dataset, labels: Labels) -> dict:
    """Held-out loss and perplexity over the response tokens; exact match (case and spacing aside) of
    greedy generations on the first `exact_match_samples` examples whose reference fits in
    `max_new_tokens`; a few samples to read."""
    loss, tokens = response_loss(model, tokenizer, dataset)
    gen = labels.generation
    short = [
        i
        for i, ref in enumerate(dataset["reference"])
        if len(tokenizer(ref, add_special_tokens=False)["input_ids"]) < gen.max_new_tokens
    ][: gen.exact_match_samples]
    # the ids training built (cut to max_length as it was), through the one generation path
    prompts = [{"input_ids": dataset[i]["input_ids"][: dataset[i]["prompt_length"]]} for i in short]
    greedy = generation.Sampling(gen.max_new_tokens)
    fmt = generation.training_format(tokenizer)
    done = generation.generate(model, tokenizer, prompts, greedy, fmt, batch_size=16) if prompts else []
    generated = [c.text.strip() for c in done]
    hits = [normalise(g) == normalise(dataset[i]["reference"]) for i, g in zip(short, generated, strict=True)]
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        "exact_match": sum(hits) / len(hits) if hits else None,
        "n": len(dataset),
        "response_tokens": tokens,
        "n_exact_match": len(hits),
        "max_new_tokens": gen.max_new_tokens,
        "samples": [
            {"prompt": dataset[i]["query"], "reference": dataset[i]["reference"], "generated": g}
            for i, g in zip(short[:5], generated[:5], strict=False)
        ],
    }


# --------------------------------------------------------------------------------------------------
# the CLI's predict / eval output


def predict(model, tokenizer, labels: Labels, data_cfg, texts: list[str], text_pairs=None) -> list[dict]:
    """`hybridtune predict` on a causal run: the greedy answer to each text."""
    if text_pairs:
        raise UserError(
            "--pair", f"{len(text_pairs)} second texts", "none: a causal LM answers single prompts"
        )
    answers = generation.answer(
        model, tokenizer, texts, labels.generation.max_new_tokens, prompt_format=labels.prompt_format
    )
    return [{"prompt": t, "response": a} for t, a in zip(texts, answers, strict=True)]


def format_prediction(row: dict) -> str:
    return f"{row['prompt']}\t{row['response']}"


def eval_tables(report: dict, title: str = "test") -> list:
    from rich.table import Table

    summary = Table(title=f"{title}: {report['n']} examples, {report['response_tokens']} response tokens")
    summary.add_column("metric")
    summary.add_column("value", justify="right")
    summary.add_row("loss (per response token)", f"{report['loss']:.4f}")
    summary.add_row("perplexity", f"{report['perplexity']:.2f}")
    em = report["exact_match"]
    summary.add_row(
        f"exact match ({report['n_exact_match']} greedy answers)", "-" if em is None else f"{100 * em:.2f} %"
    )
    samples = Table(title="samples (greedy)")
    for col in ("prompt", "reference", "generated"):
        samples.add_column(col)
    for row in report["samples"]:
        samples.add_row(row["prompt"], row["reference"], row["generated"])
    return [summary, samples]
