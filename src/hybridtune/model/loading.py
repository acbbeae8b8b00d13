"""Load a base model and its tokenizer: bundled name, local dir, GGUF file, or hub id (with a network)."""

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


def resolve(name: str) -> str:
    """A path for bundled names, local dirs and GGUF files (checked; a GGUF file: its cached plain
    copy), the id itself for a hub id."""
    if bundled.is_bundled(name):
        return bundled.model_path(name, WHERE)
    path = Path(name).expanduser()
    if gguf.is_gguf_name(name):
        return str(gguf.plain_dir(path, WHERE))
    looks_local = (
        name.startswith((".", "/", "~")) or path.exists() or name.count("/") > 1 or os.sep + os.sep in name
    )
    if not looks_local:
        return name  # a hub id: transformers fetches it when a network exists
    if not path.is_dir():
        raise UserError(
            WHERE, f"'{name}' (no such directory)", "bundled:minilm, a model dir, a .gguf file, or a hub id"
        )
    if not (path / "config.json").is_file():
        raise UserError(WHERE, f"'{name}' without config.json", "a model dir written by save_pretrained")
    return str(path)


def _quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()  # the load report would list the new head as "MISSING"
    transformers.logging.disable_progress_bar()
    # peft calls transformers' deprecated alias; the warning is theirs, not the user's
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def load_tokenizer(path: str, where: str = WHERE):
    from transformers import AutoTokenizer

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
