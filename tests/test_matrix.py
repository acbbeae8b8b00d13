"""Every example recipe x every architecture family the anatomy supports: `prepare` and a few optimizer
steps on a tiny model, or a refusal (exit 2) that names the pair and the reason. A library upgrade that
breaks a (strategy, architecture) pair fails here, not in a user's run (docs/dependencies.md)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import yaml

from hybridtune.errors import UserError
from hybridtune.recipe import load_recipe

from .conftest import sentiment_rows, write_csv
from .test_recipes import _run as run_steps
from .test_recipes import teacher_of

RECIPE_DIR = Path(__file__).parent.parent / "recipes"
# an ensemble recipe's members are recipes below; a self-training recipe is rounds of one of them
# (tests/test_self_training.py)
RECIPES = sorted(
    p
    for p in RECIPE_DIR.glob("*.yaml")
    if not {"ensemble", "self_training"} & set(yaml.safe_load(p.read_text()))
)
ENCODERS = ("bert", "roberta", "distilbert", "mpnet")
DECODERS = ("gpt2", "llama")
# a template of our own for the decoders (the bundled BERT tokenizer has none)
TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
# (recipe, family) pairs that are refused by design, with words the one-line refusal must contain;
# every other pair must train. Each entry is a limit of the method, not of hybridtune's code.
REFUSED = {
    # peft passes inputs_embeds; a decoder's head reads the last position, a pad (docs/strategies-peft.md)
    **{(name, dec): "peft.method" for name in ("prompt_tuning", "p_tuning") for dec in DECODERS},
    # attention without a key/value cache argument: nowhere to put the prefixes
    **{("prefix_tuning", enc): "takes no key/value prefixes" for enc in ("distilbert", "mpnet")},
    # a masked-LM template ("It was {mask}.") cannot be answered by a decoder, which answers last
    **{("pet_minilm", dec): "prompt.template" for dec in DECODERS},
    # a closed-form logistic head needs a head that is one linear layer (RoBERTa, DistilBERT and MPNet
    # put a hidden layer in theirs)
    **{
        (n, e): "contrastive.head"
        for n in ("setfit", "setfit_then_all", "contrastive_lora_top", "linear_probe")
        for e in ("roberta", "distilbert", "mpnet")
    },
    # R-Drop's two passes differ only by their dropout masks; Llama's config sets every dropout to 0
    ("rdrop", "llama"): "dropout probabilities are all 0",
    # SFT needs a causal LM head, which transformers does not have for these encoders
    **{
        (n, e): "AutoModelForCausalLM"
        for n in ("sft_chatterbot_smollm2", "sft_rotten_tomatoes_smollm2", "neftune_sft_smollm2")
        for e in ("distilbert", "mpnet")
    },
}


def _config(family: str, vocab: int, pad: int):
    from transformers import (
        BertConfig,
        DistilBertConfig,
        GPT2Config,
        LlamaConfig,
        MPNetConfig,
        RobertaConfig,
    )

    encoder = dict(hidden_size=32, num_hidden_layers=6, num_attention_heads=2, intermediate_size=64)
    return {
        "bert": lambda: BertConfig(vocab_size=vocab, max_position_embeddings=160, **encoder),
        # RoBERTa / MPNet count positions from pad + 1: two more than the longest input
        "roberta": lambda: RobertaConfig(
            vocab_size=vocab, max_position_embeddings=162, pad_token_id=pad, **encoder
        ),
        "mpnet": lambda: MPNetConfig(
            vocab_size=vocab, max_position_embeddings=162, pad_token_id=pad, **encoder
        ),
        "distilbert": lambda: DistilBertConfig(
            vocab_size=vocab,
            dim=32,
            n_layers=6,
            n_heads=2,
            hidden_dim=64,
            max_position_embeddings=160,
            pad_token_id=pad,
        ),
        "gpt2": lambda: GPT2Config(
            vocab_size=vocab, n_embd=32, n_layer=6, n_head=2, n_positions=160, pad_token_id=pad
        ),
        "llama": lambda: LlamaConfig(
            vocab_size=vocab,
            hidden_size=32,
            num_hidden_layers=6,
            num_attention_heads=2,
            num_key_value_heads=1,
            intermediate_size=64,
            max_position_embeddings=160,
            pad_token_id=pad,
        ),
    }[family]()


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer_dir) -> dict[str, str]:
    """One tiny 6-block base model per family, with the bundled tokenizer (decoders: a chat template)."""
    from transformers import AutoModel, AutoTokenizer

    out = {}
    for family in (*ENCODERS, *DECODERS):
        torch.manual_seed(0)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        model = AutoModel.from_config(_config(family, tokenizer.vocab_size, tokenizer.pad_token_id))
        path = tmp_path_factory.mktemp(f"tiny-{family}")
        if family in DECODERS:
            tokenizer.chat_template = TEMPLATE
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        out[family] = str(path)
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("matrix-data")
    rng = random.Random(0)
    words = ["paris", "london", "ana", "bob", "monday", "film", "the", "was", "in", "met"]
    tags = {"paris": "B-loc", "london": "B-loc", "ana": "B-person", "bob": "B-person"}
    conll = root / "ner.conll"
    conll.write_text(
        "\n".join(
            "\n".join(f"{w}\t{tags.get(w, 'O')}" for w in rng.sample(words, 5)) + "\n" for _ in range(60)
        )
    )
    pairs = root / "pairs.jsonl"
    pairs.write_text(
        "".join(
            json.dumps({"prompt": f"what is {i} plus one?", "response": f"it is {i + 1}"}) + "\n"
            for i in range(60)
        )
    )
    return {
        "classification": str(write_csv(root / "sentiment.csv", sentiment_rows(60))),
        "prompt_classification": str(write_csv(root / "sentiment.csv", sentiment_rows(60))),
        "token_classification": str(conll),
        "causal_lm": str(pairs),
    }


def _one_step(recipe, tmp_path: Path) -> None:
    _, changed, held = run_steps(recipe, tmp_path)  # test_recipes: prepare, then Trainer for max_steps
    assert changed and changed <= held, "nothing moved, or a parameter outside the optimizer did"


@pytest.mark.parametrize("family", [*ENCODERS, *DECODERS])
@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_recipe_trains_one_step_on_every_family_or_is_refused_by_name(
    path, family, models, data, tmp_path, request
):
    task = yaml.safe_load(path.read_text()).get("task", "classification")
    overrides = [
        f"model={models[family]}",
        f"data.source={data[task]}",
        "data.max_length=48",
        "train.max_steps=8",  # staged recipes need room for their stages
        "train.batch_size=8",
        "train.precision=fp32",
        "train.lr=0.01",
        "train.early_stopping.patience=null",
        f"output.dir={tmp_path}",
        *teacher_of(
            path, request
        ),  # a distill recipe's teacher: a tiny BERT run (any family may learn from it)
    ]
    expected = REFUSED.get((path.stem, family))
    try:
        recipe = load_recipe(path, overrides)
        _one_step(recipe, tmp_path)
    except UserError as e:
        assert expected is not None, f"refused, but expected to train: {e}"
        assert expected in str(e) and "\n" not in str(e), str(e)
        return
    assert expected is None, f"trained, but expected a refusal naming {expected!r}"


# with train.gradient_checkpointing: the pairs REFUSED names, and these (docs/speed.md)
REFUSED_CHECKPOINTING = {
    **REFUSED,
    # transformers' checkpointed blocks drop the key/value cache argument, which holds the prefixes
    **{("prefix_tuning", f): "train.gradient_checkpointing" for f in ("bert", "llama")},
}


# every recipe on BERT and Llama; MPNet, which transformers does not checkpoint, once
CHECKPOINTING_PAIRS = [(p, f) for p in RECIPES for f in ("bert", "llama")] + [
    (RECIPE_DIR / "full.yaml", "mpnet")
]


@pytest.mark.parametrize(
    "path, family", CHECKPOINTING_PAIRS, ids=[f"{p.stem}-{f}" for p, f in CHECKPOINTING_PAIRS]
)
def test_every_recipe_trains_with_gradient_checkpointing_or_is_refused_by_name(
    path, family, models, data, tmp_path, request
):
    task = yaml.safe_load(path.read_text()).get("task", "classification")
    overrides = [
        f"model={models[family]}",
        f"data.source={data[task]}",
        "data.max_length=48",
        "train.max_steps=8",
        "train.batch_size=8",
        "train.precision=fp32",
        "train.lr=0.01",
        "train.early_stopping.patience=null",
        "train.gradient_checkpointing=true",
        f"output.dir={tmp_path}",
        *teacher_of(path, request),  # a distill recipe's teacher: a tiny BERT run
    ]
    # MPNet: transformers implements no gradient checkpointing for it (found when the model loads)
    expected = (
        "MPNetForSequenceClassification"
        if family == "mpnet"
        else REFUSED_CHECKPOINTING.get((path.stem, family))
    )
    try:
        _one_step(load_recipe(path, overrides), tmp_path)
    except UserError as e:
        assert expected is not None, f"refused, but expected to train: {e}"
        assert expected in str(e) and "\n" not in str(e), str(e)
        return
    assert expected is None, f"trained, but expected a refusal naming {expected!r}"
