"""peft's prompt learning (prefix tuning: Li & Liang 2021; prompt tuning: Lester et al. 2021;
p-tuning: Liu et al. 2021) on the models of this project, the part of strategy/peft.py that peft
does not do by itself: refusing before training what cannot work (too few positions, a decoder's
classification head reading a pad token), the prompt's sizes where peft cannot read them from the
config, and a shim for encoders whose attention takes key/value prefixes under a new name.
"""

from __future__ import annotations

import functools
import inspect

from torch import nn

from hybridtune.errors import UserError

PROMPT_LEARNING = ("prefix_tuning", "prompt_tuning", "p_tuning")


def prepare(model: nn.Module, method: str, kwargs: dict, build) -> None:
    """Check a prompt-learning method against the model and fill in its sizes (in `kwargs`)."""
    check_prompt_learning(model, method, kwargs["num_virtual_tokens"], build)
    kwargs.update({k: v for k, v in prompt_dims(model, build.anatomy).items() if k not in kwargs})
    if method == "prefix_tuning":
        accept_prefix_cache(model)
        if not takes_prefixes(model):
            raise UserError(
                "peft.method",
                f"prefix_tuning on {type(model).__name__}, whose attention takes no key/value prefixes "
                "(its forward has no past_key_values / cache argument)",
                "another method for this architecture, e.g. lora, prompt_tuning or `soft_prompt:`",
            )


def check(config, recipe) -> None:
    """peft's refusals of the rest of the recipe (the part's `check` hook)."""
    if config.method == "prefix_tuning" and recipe.train.gradient_checkpointing:
        # transformers' checkpointed blocks (GradientCheckpointingLayer) drop the cache argument under
        # checkpointing, and with it the prefixes: the attention mask then has more keys than the keys
        raise ValueError(
            "train.gradient_checkpointing: found it with peft.method prefix_tuning (transformers' "
            "checkpointed blocks drop the key/value cache that holds the prefixes); expected "
            "train.gradient_checkpointing: false, or lora, prompt_tuning or `soft_prompt:`"
        )


def _position_limit(model: nn.Module) -> int | None:
    config = model.config
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def check_prompt_learning(model: nn.Module, method: str, n_virtual: int, build) -> None:
    """Refuse what peft's prompt learning cannot do on this model, before training."""
    limit = _position_limit(model)
    if limit and build.max_length and n_virtual + build.max_length > limit:
        raise UserError(
            "peft.num_virtual_tokens",
            f"{n_virtual} virtual tokens + data.max_length {build.max_length} = "
            f"{n_virtual + build.max_length} positions",
            f"at most {limit}, the positions {type(model).__name__} has (lower one of them)",
        )
    # prompt/p-tuning hand the model inputs_embeds without input_ids; a decoder's classification head
    # (`score`) then cannot find the last non-padding token and reads the last position: a pad token
    # whenever the batch is padded on the right
    padding = getattr(build.tokenizer, "padding_side", "right")
    if method in ("prompt_tuning", "p_tuning") and hasattr(model, "score") and padding != "left":
        raise UserError(
            "peft.method",
            f"{method} on {type(model).__name__}, a decoder that classifies from its last token",
            "prefix_tuning, or `soft_prompt:` (which keeps the input ids) for a continuous prompt",
        )


def prompt_dims(model: nn.Module, anatomy) -> dict[str, int]:
    """Prompt learning's sizes where peft cannot read them from the config (it knows `hidden_size` /
    `n_embd` / `d_model`; DistilBERT says `dim`, `n_layers`, `n_heads`): from the model itself."""
    config = model.config
    known = {
        "token_dim": ("hidden_size", "n_embd", "d_model"),
        "num_layers": ("num_hidden_layers", "num_layers", "n_layer"),
        "num_attention_heads": ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads"),
    }
    found = {
        "token_dim": model.get_input_embeddings().embedding_dim,
        "num_layers": anatomy.num_blocks,
        "num_attention_heads": next(
            (
                getattr(config, k)
                for k in ("num_attention_heads", "n_heads", "n_head", "num_heads")
                if hasattr(config, k)
            ),
            None,
        ),
    }
    missing = {k for k, names in known.items() if not any(n in config.to_dict() for n in names)}
    return {k: v for k, v in found.items() if k in missing and v is not None}


def takes_prefixes(model: nn.Module) -> bool:
    """Whether peft's prefix tuning can hand this model its key/value prefixes (the same test peft
    makes at the first forward, made here before anything is written)."""
    if "past_key_values" in inspect.signature(model.forward).parameters:
        return True
    backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
    return backbone is not None and "past_key_values" in inspect.signature(backbone.forward).parameters


def accept_prefix_cache(model: nn.Module) -> nn.Module:
    """Let peft's prefix tuning hand its key/value prefixes to a model that renamed the argument.

    transformers 5.24 renamed encoders' `past_key_values` to `cache` (the old name still works
    through its `deprecate_kwarg`, and the attention still prepends what the cache holds), but peft
    (0.21) decides by the *signature* whether a model takes prefixes and refuses BERT-like models
    ("Model does not support past key values ..."). The prefixes are still supplied through the
    model's own attention: this gives the instance a forward whose signature names
    `past_key_values` and passes it on as `cache`. A no-op where the model still takes
    `past_key_values`, or takes no cache at all (then peft's own error stands)."""
    forward = model.forward
    signature = inspect.signature(forward)
    params = signature.parameters
    if "past_key_values" in params or not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return model
    backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if backbone is None or "cache" not in inspect.signature(backbone.forward).parameters:
        return model

    @functools.wraps(forward)
    def with_prefix(*args, past_key_values=None, **kwargs):
        if past_key_values is not None:
            kwargs["cache"] = past_key_values
        return forward(*args, **kwargs)

    named = [p for p in params.values() if p.kind is not p.VAR_KEYWORD]
    rest = [p for p in params.values() if p.kind is p.VAR_KEYWORD]
    prefix = inspect.Parameter("past_key_values", inspect.Parameter.KEYWORD_ONLY, default=None)
    with_prefix.__signature__ = signature.replace(parameters=[*named, prefix, *rest])
    model.forward = with_prefix
    return model
