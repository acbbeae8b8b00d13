"""Load a base model and its tokenizer: bundled name, local dir, GGUF file, or hub id (with a network).

A tokenizer must be usable, not only loadable: transformers builds a tokenizer of 5 special tokens
for a model dir that has no tokenizer files, which turns every word into [UNK] and trains at chance
without an error. So a local dir without tokenizer files is refused (unless `model.tokenizer` names
one), and `check_vocabulary` stops a run whose tokenizer maps most of the training words to its
unknown token.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

from hybridtune import bundled
from hybridtune.errors import UserError
from hybridtune.model import gguf

WHERE = "model.name"


def bad_file_errors() -> tuple[type[BaseException], ...]:
    """What a missing, truncated or malformed model / tokenizer file raises in transformers and its
    readers (a config that is no JSON: OSError; an unknown model type, a broken tokenizer.json:
    ValueError; a cut-off safetensors file: SafetensorError). Only these are bad input (exit 2):
    out of memory, an interrupt or a bug in a library propagate (exit 3, `--debug` for the traceback)."""
    from safetensors import SafetensorError

    return (OSError, ValueError, KeyError, SafetensorError)


# what a tokenizer is saved as (tokenizers' JSON, WordPiece / BPE vocabularies, sentencepiece, tiktoken)
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "spiece.model",
    "tokenizer.model",
    "sentencepiece.bpe.model",
    "tokenizer.tiktoken",
)
# above this share of training words mapped to the unknown token, the tokenizer is not the data's
MAX_UNK_SHARE = 0.5


def resolve(name: str, where: str = WHERE, needs_config: bool = True) -> str:
    """A path for bundled names, local dirs and GGUF files (checked; a GGUF file: its cached plain
    copy), the id itself for a hub id."""
    if bundled.is_bundled(name):
        return bundled.model_path(name, where)
    path = Path(name).expanduser()
    if gguf.is_gguf_name(name):
        return str(gguf.plain_dir(path, where))
    looks_local = (
        name.startswith((".", "/", "~")) or path.exists() or name.count("/") > 1 or os.sep + os.sep in name
    )
    if not looks_local:
        return name  # a hub id: transformers fetches it when a network exists
    if not path.is_dir():
        raise UserError(
            where, f"'{name}' (no such directory)", "bundled:minilm, a model dir, a .gguf file, or a hub id"
        )
    if needs_config and not (path / "config.json").is_file():
        raise UserError(where, f"'{name}' without config.json", "a model dir written by save_pretrained")
    return str(path)


def tokenizer_path(model_cfg) -> tuple[str, str]:
    """(where the recipe's tokenizer is, its key path): `model.tokenizer` when set, else the model's."""
    if model_cfg.tokenizer:
        return resolve(model_cfg.tokenizer, "model.tokenizer", needs_config=False), "model.tokenizer"
    return resolve(model_cfg.name), WHERE


def _quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()  # the load report would list the new head as "MISSING"
    transformers.logging.disable_progress_bar()
    # peft calls transformers' deprecated alias; the warning is theirs, not the user's
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def load_tokenizer(path: str, where: str = WHERE):
    from transformers import AutoTokenizer

    local = Path(path)
    if local.is_dir() and not any((local / f).is_file() for f in TOKENIZER_FILES):
        raise UserError(
            where,
            f"'{path}' without tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...)",
            "a model dir saved with its tokenizer",
            "or name one with `model.tokenizer: DIR`; without its files transformers makes a tokenizer "
            "of special tokens only, every word [UNK], and the run learns nothing",
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except bad_file_errors() as e:
        raise UserError(
            where,
            f"'{path}' whose tokenizer could not be loaded ({_first_line(e)})",
            "a model dir with tokenizer files, or a reachable hub id",
        ) from None
    if tokenizer.pad_token is None:  # decoders (GPT-2, Llama) ship without one
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def check_vocabulary(tokenizer, texts: list[str], where: str = WHERE) -> None:
    """Stop before training when the tokenizer maps more than MAX_UNK_SHARE of the words of `texts`
    (whitespace-split, each distinct word tokenized once) to its unknown token. Byte-level tokenizers
    (GPT-2, Llama 3) have no unknown token: nothing to check."""
    unk = tokenizer.unk_token_id
    if unk is None:
        return
    counts: dict[str, int] = {}
    for text in texts:
        for word in text.split():
            counts[word] = counts.get(word, 0) + 1
    if not counts:
        return
    words = list(counts)
    ids = tokenizer(words, add_special_tokens=False)["input_ids"]
    unknown = [w for w, i in zip(words, ids, strict=True) if unk in i]
    share = sum(counts[w] for w in unknown) / sum(counts.values())
    if share > MAX_UNK_SHARE:
        unknown.sort(key=counts.get, reverse=True)
        examples = ", ".join(repr(w) for w in unknown[:3])
        raise UserError(
            where,
            f"a tokenizer that maps {100 * share:.1f} % of the training words to {tokenizer.unk_token} "
            f"(e.g. {examples}; {len(tokenizer)} tokens in its vocabulary)",
            "the tokenizer the model was trained with (its own tokenizer files, or `model.tokenizer: DIR`)",
        )


def training_texts(frame, skip: set[str], limit: int = 2000) -> list[str]:
    """The text in the first `limit` rows of a data frame: string cells, lists of strings (tokens),
    chat turns' `content`; the columns in `skip` (labels, tags, row origins) left out."""
    texts = []
    for column in [c for c in frame.columns if c not in skip]:
        for cell in frame[column].head(limit):
            if isinstance(cell, str):
                texts.append(cell)
            elif hasattr(cell, "__iter__") and not isinstance(cell, dict | bytes):
                for item in cell:
                    if isinstance(item, str):
                        texts.append(item)
                    elif isinstance(item, dict) and isinstance(item.get("content"), str):
                        texts.append(item["content"])
    return texts


def load_model(auto_class: Any, path: str, tokenizer, where: str = WHERE, **kwargs) -> tuple[Any, set[str]]:
    """(model, names of parameters the checkpoint did not have), e.g. a new classification head."""
    _quiet_transformers()
    try:
        model, info = auto_class.from_pretrained(path, output_loading_info=True, **kwargs)
    except bad_file_errors() as e:
        raise UserError(
            where, f"'{path}' that could not be loaded ({_first_line(e)})", "a loadable transformers model"
        ) from None
    if model.config.pad_token_id is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, set(info.get("missing_keys", ()))


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


def lm_class(model_type: str | None):
    """The LM class of an architecture with its pretrained head: masked LM if it has one, else causal."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return AutoModelForMaskedLM if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES else AutoModelForCausalLM


def meta_model(auto_class: Any, path: str) -> tuple[Any, set[str]]:
    """(`auto_class`'s model of the checkpoint at `path` on the meta device, the names of its
    parameters the checkpoint does not have): transformers' own loading report (`missing_keys`, with
    its key renamings, base-model prefix and tied weights), no tensor read. A checkpoint that cannot be
    loaded gives the model from its config and no names: loading it for the run reports that, by the
    recipe key."""
    import torch
    from transformers import AutoConfig

    _quiet_transformers()
    try:
        model, info = auto_class.from_pretrained(path, device_map="meta", output_loading_info=True)
        return model, set(info.get("missing_keys", ()))
    except Exception:  # a damaged or foreign file: unknown here
        with torch.device("meta"):
            return auto_class.from_config(AutoConfig.from_pretrained(path)), set()
