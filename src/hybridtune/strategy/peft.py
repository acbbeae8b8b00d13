"""peft: any method of the installed `peft`, by name, with peft's own keys.

    peft:
      method: lora          # lora | dora | adalora | ia3 | prefix_tuning | prompt_tuning | p_tuning | loha | ...
      r: 8
      lora_alpha: 16
      lora_dropout: 0.1
      target_modules: auto  # per-architecture default (peft's table, else found in the blocks)
      layers_to_transform: [4, 5]   # any other key of the method's peft config passes through

The keys are the fields of peft's config dataclass for that method (`LoraConfig`, `IA3Config`, ...):
peft's own typed arguments are the schema, so nothing here can drift from the installed peft. Unknown
keys and wrong types are refused with the key path and a did-you-mean. Methods and their papers:
LoRA (Hu et al. 2021), `dora` = LoRA with `use_dora: true` (Liu et al. 2024), AdaLoRA (Zhang et al.
2023), IA3 (Liu et al. 2022), prefix tuning (Li & Liang 2021), prompt tuning (Lester et al. 2021),
p-tuning (Liu et al. 2021).

Filled in from the run, never by the user: AdaLoRA's `total_step` (the run's optimizer steps) and its
`update_and_allocate` after every optimizer step (a callback); prompt tuning's tokenizer for
`prompt_tuning_init: TEXT`. IA3 on an architecture peft has no table for targets the key and value
projections and the FFN's output projection (its input scaled: the paper's l_ff) found in the blocks.

With `freeze` (e.g. LoRA everywhere + the top block trained fully), peft's own artifact holds only
adapters and `modules_to_save`, so every module `freeze` keeps trainable becomes a `modules_to_save`
entry: a trained copy that peft saves and `PeftModel.from_pretrained` restores, so final/ stays a
plain peft adapter and loses nothing. peft never puts an adapter inside such a module (its rule), which
is also what one wants: a full update subsumes a low-rank one. A selection that splits a module (only
its bias, say) cannot be saved that way and is refused before training; BitFit + LoRA is peft's own
`bias: all`.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, TypeAdapter, model_validator
from torch import nn
from transformers import TrainerCallback

from hybridtune.errors import UserError, did_you_mean
from hybridtune.model.anatomy import block_layout
from hybridtune.strategy.base import Part

ALIASES = {"dora": ("lora", {"use_dora": True})}
# beside a peft adapter in final/: the base model's config as the run built it (label names included)
BASE_CONFIG = "base_config.json"
# set by the task, never by the user
RESERVED = {"task_type", "peft_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping"}
# attention projections LoRA targets when peft has no default for the architecture
QV_NAMES = (
    "query",
    "value",
    "q_lin",
    "v_lin",
    "q",
    "v",
    "q_proj",
    "v_proj",
    "c_attn",
    "query_key_value",
    "Wqkv",
    "qkv_proj",
)
PROMPT_LEARNING = ("prefix_tuning", "prompt_tuning", "p_tuning")
DEFAULTS = {
    "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.1},
    # peft leaves the prompt length unset; 20 is within the range the papers found enough
    **{m: {"num_virtual_tokens": 20} for m in PROMPT_LEARNING},
}


def peft_methods() -> dict[str, type]:
    """Method name -> peft config class, for every method the installed peft has."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    methods = {str(t.value).lower(): cls for t, cls in PEFT_TYPE_TO_CONFIG_MAPPING.items()}
    for alias, (target, _) in ALIASES.items():
        methods[alias] = methods[target]
    return methods


class PeftConfig(BaseModel):
    """`method` plus the keyword arguments of that method's peft config class."""

    model_config = ConfigDict(extra="allow")

    method: str = "lora"

    @model_validator(mode="after")
    def _check_against_peft(self) -> PeftConfig:
        methods = peft_methods()
        if self.method not in methods:
            hint = did_you_mean(self.method, methods)
            raise ValueError(
                f"method {self.method!r} is not a peft method; one of {', '.join(sorted(methods))}"
                + (f" ({hint})" if hint else "")
            )
        cls = methods[self.method]
        fields = {f.name for f in dataclasses.fields(cls)} - RESERVED
        hints = typing.get_type_hints(cls)
        for key, value in (self.model_extra or {}).items():
            if key not in fields:
                hint = did_you_mean(key, fields)
                raise ValueError(f"unknown key '{key}' for {cls.__name__}" + (f" ({hint})" if hint else ""))
            if key == "target_modules" and value == "auto":
                continue
            try:
                adapter = TypeAdapter(hints[key])
            except Exception:  # a type pydantic cannot express; peft checks it when the config is built
                continue
            try:
                adapter.validate_python(value, strict=False)
            except Exception:
                raise ValueError(f"{key}: {value!r} is not a valid {hints[key]}") from None
        return self

    def kwargs(self) -> dict[str, Any]:
        base, extra = ALIASES.get(self.method, (self.method, {}))
        out = dict(DEFAULTS.get(base, {}))
        out.update(extra)
        out.update(self.model_extra or {})
        return out


# --------------------------------------------------------------------------------------------------
# defaults per architecture


def _peft_table(method: str) -> dict:
    from peft import utils

    name = {"ia3": "IA3", "adalora": "ADALORA"}.get(method, "LORA")
    return getattr(utils, f"TRANSFORMERS_MODELS_TO_{name}_TARGET_MODULES_MAPPING")


def default_target_modules(model: nn.Module, anatomy, method: str = "lora") -> dict[str, Any]:
    """{} where peft has a default for the architecture, else target_modules found in block 0
    (IA3: also feedforward_modules)."""
    if getattr(model.config, "model_type", None) in _peft_table(method):
        return {}
    if method == "ia3":
        return ia3_modules(model, anatomy)
    block0 = model.get_submodule(f"{anatomy.blocks_path}.0")
    leaves = {name.rsplit(".", 1)[-1] for name, m in block0.named_modules() if isinstance(m, nn.Linear)}
    found = [n for n in QV_NAMES if n in leaves]
    return {"target_modules": found or ["all-linear"]}


def ia3_modules(model: nn.Module, anatomy) -> dict[str, list[str]]:
    """IA3 (Liu et al. 2022) rescales keys, values and the FFN's inner activation; the last is the
    input of the FFN's output projection, a peft `feedforward_modules` entry. Full module names,
    because block-relative suffixes are ambiguous (BERT's `output.dense` also ends
    `attention.output.dense`)."""
    targets: list[str] = []
    feedforward: list[str] = []
    for i in range(anatomy.num_blocks):
        prefix = f"{anatomy.blocks_path}.{i}."
        layout = block_layout(model.get_submodule(prefix[:-1]))
        targets += [prefix + p for p in dict.fromkeys(layout.keys + layout.values)]
        if layout.ffn_out:
            targets.append(prefix + layout.ffn_out)
            feedforward.append(prefix + layout.ffn_out)
    if not targets or not feedforward:
        raise UserError(
            "peft.target_modules",
            f"no key/value or feed-forward projections found in {type(model).__name__}'s blocks",
            "target_modules and feedforward_modules given explicitly",
        )
    return {"target_modules": targets, "feedforward_modules": feedforward}


# --------------------------------------------------------------------------------------------------
# checks before training


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


def modules_to_keep(model: nn.Module, keep: dict[int, nn.Parameter]) -> list[str]:
    """The largest modules whose parameters `freeze` keeps trainable, all of them; refuses a
    selection that splits a module (peft saves trained base weights only as whole modules)."""
    chosen: list[str] = []
    covered: set[int] = set()
    for name, module in model.named_modules():
        if not name or any(name.startswith(c + ".") for c in chosen):
            continue
        params = list(module.parameters())
        if params and all(id(p) in keep for p in params):
            chosen.append(name)
            covered |= {id(p) for p in params}
    split = [n for n, p in model.named_parameters() if id(p) in keep and id(p) not in covered]
    if split:
        more = f" and {len(split) - 1} more" if len(split) > 1 else ""
        raise UserError(
            "freeze",
            f"a selection that splits a module ({split[0]}{more}, without the rest of its module) "
            "together with peft",
            "whole modules (peft saves trained base weights as whole `modules_to_save` modules); "
            "for BitFit + LoRA use peft's own `peft.bias: all`",
        )
    return chosen


# --------------------------------------------------------------------------------------------------


def apply(model: nn.Module, config: PeftConfig, build) -> nn.Module:
    from peft import get_peft_model

    method = config.method
    cls = peft_methods()[method]
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = config.kwargs()
    base_method = ALIASES.get(method, (method,))[0]
    if "target_modules" in fields and kwargs.get("target_modules", "auto") == "auto":
        kwargs.pop("target_modules", None)
        defaults = default_target_modules(model, build.anatomy, base_method)
        kwargs.update({k: v for k, v in defaults.items() if k not in kwargs})
    elif (
        method == "ia3"
        and "feedforward_modules" not in kwargs
        and model.config.model_type not in _peft_table("ia3")
    ):
        raise UserError(
            "peft.feedforward_modules",
            f"nothing, with target_modules given, on {model.config.model_type} (peft has no IA3 default for it)",
            "the feed-forward modules among target_modules (IA3 rescales their input)",
        )
    if kwargs.get("target_modules") == "all-linear" and "exclude_modules" not in kwargs:
        # peft's all-linear leaves out only the output layer; a classifier's head (DistilBERT's
        # pre_classifier, BERT's pooler) is trained whole as modules_to_save, which cannot also hold LoRA
        kwargs["exclude_modules"] = head_linears(model, build.anatomy)
    if method == "adalora" and "total_step" not in kwargs:
        kwargs["total_step"] = build.total_steps
    if method == "prompt_tuning" and str(kwargs.get("prompt_tuning_init", "")).upper() == "TEXT":
        kwargs.setdefault("tokenizer_name_or_path", getattr(build.tokenizer, "name_or_path", None))
    if method in PROMPT_LEARNING:
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
    if build.keep:
        kwargs["modules_to_save"] = [
            *(kwargs.get("modules_to_save") or []),
            *modules_to_keep(model, build.keep),
        ]
    try:
        peft_config = cls(task_type=build.task.peft_task_type, **kwargs)
        model = get_peft_model(model, peft_config)
    except (ValueError, TypeError) as e:
        raise UserError(
            "peft", f"a configuration peft refuses ({e})", f"valid {cls.__name__} arguments"
        ) from None
    saved = model.peft_config["default"]
    if saved.modules_to_save:  # the task adds the head again; once is enough in adapter_config.json
        saved.modules_to_save = list(dict.fromkeys(saved.modules_to_save))
    build.keep.clear()  # all taken over: the originals stay frozen, the modules_to_save copies train
    return model


def head_linears(model: nn.Module, anatomy) -> list[str]:
    """Names of the linear layers outside the blocks and embeddings: the head and what feeds it."""
    return [
        name
        for name, module in model.named_modules()
        if hasattr(module, "weight")
        and getattr(module.weight, "ndim", 0) == 2
        and not isinstance(module, nn.Embedding)
        and anatomy.slot_of(f"{name}.weight") == "head"
    ]


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


def load_adapter(base: nn.Module, path: str | Path, **kwargs: Any) -> nn.Module:
    """`PeftModel.from_pretrained` of a saved adapter, prefix tuning's cache shim included."""
    from peft import PeftConfig as PeftAdapterConfig
    from peft import PeftModel

    if str(PeftAdapterConfig.from_pretrained(str(path)).peft_type.value).lower() == "prefix_tuning":
        accept_prefix_cache(base)
    return PeftModel.from_pretrained(base, str(path), **kwargs)


def save_base_config(model: nn.Module, out_dir: Path) -> None:
    """peft saves an adapter and no transformers config, so a classifier's label names (id2label,
    label2id) would live only in run.json: the base loaded by itself shows LABEL_0, LABEL_1, ... Write
    the config the run built the base with beside the adapter, under a name of its own: a `config.json`
    there would make transformers take final/ for a whole model (`integrations/peft.py:
    maybe_load_adapters` loads the base named in adapter_config.json only when config.json is absent).
    Load: `from_pretrained(BASE, config=AutoConfig.from_pretrained("final/base_config.json"))`."""
    if hasattr(model, "peft_config"):
        model.get_base_model().config.to_json_file(Path(out_dir) / BASE_CONFIG)


def training_args(config: PeftConfig) -> dict:
    """AdaLoRA resizes its matrices to the allocated ranks at the end of its budget schedule, so an
    earlier checkpoint no longer fits the model: its result is the final model, not the best one."""
    return {"load_best_model_at_end": False} if config.method == "adalora" else {}


def callbacks(model: nn.Module, config: PeftConfig, build) -> list[TrainerCallback]:
    if config.method != "adalora":
        return []
    return [AdaLoraBudget(model, derive_total="total_step" not in (config.model_extra or {}))]


class AdaLoraBudget(TrainerCallback):
    """AdaLoRA (Zhang et al. 2023) re-allocates the rank budget from each step's gradients: peft's
    `update_and_allocate(step)` must run after `optimizer.step()` and before `zero_grad()`. Trainer's
    `on_optimizer_step` fires exactly there (transformers' Trainer: on_pre_optimizer_step ->
    optimizer.step() -> on_optimizer_step -> lr_scheduler.step() -> zero_grad()), with
    `state.global_step` still the 0-based index of the step just taken, as in peft's example."""

    def __init__(self, model: nn.Module, derive_total: bool):
        self.tuner = model.base_model  # the AdaLoraModel under the PeftModel
        self.derive_total = derive_total

    def _config(self):
        return self.tuner.peft_config[self.tuner.trainable_adapter_name]

    def on_train_begin(self, args, state, control, **kwargs):
        if self.derive_total and state.max_steps > 0:
            self._config().total_step = state.max_steps  # Trainer's own count wins over the plan's

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.tuner.update_and_allocate(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        # peft saves only the ranks the budget kept; ranks masked at the last allocation may have moved
        # since, so mask them again and the model in memory is the model saved
        if args.load_best_model_at_end and state.best_model_checkpoint:
            return  # Trainer reloaded a saved checkpoint: already resized to its rank pattern
        pattern = self._config().rank_pattern
        allocator = getattr(self.tuner, "rankallocator", None)
        if pattern and allocator is not None:
            allocator.mask_using_rank_pattern(self.tuner.model, pattern)


PART = Part(
    key="peft",
    config=PeftConfig,
    apply=apply,
    training_args=training_args,
    callbacks=callbacks,
    summary="any method of the installed peft (LoRA, DoRA, AdaLoRA, IA3, prefix / prompt tuning, ...)",
)
