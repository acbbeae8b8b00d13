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
`prompt_tuning_init: TEXT`; prompt learning's sizes where peft cannot read them, and its checks
(strategy/peft_prompt.py). IA3 on an architecture peft has no table for targets the key and value
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
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, TypeAdapter, model_validator
from torch import nn
from transformers import TrainerCallback

from hybridtune.errors import UserError, did_you_mean
from hybridtune.model.anatomy import block_layout
from hybridtune.strategy import peft_prompt
from hybridtune.strategy.base import Part
from hybridtune.strategy.peft_prompt import PROMPT_LEARNING, accept_prefix_cache
from hybridtune.strategy.peft_prompt import check as peft_prompt_check

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


@functools.cache
def _fields_and_hints(cls) -> tuple[frozenset[str], dict]:
    """A peft config class's settable fields and their types (built once per class: a search checks
    a PEFT config at every draw, and `get_type_hints` was a quarter of the drawing time)."""
    return frozenset({f.name for f in dataclasses.fields(cls)} - RESERVED), typing.get_type_hints(cls)


@functools.cache
def _adapter(cls, key: str) -> TypeAdapter | None:
    """pydantic's validator for one field of a peft config class, or None where its type cannot be
    expressed."""
    try:
        return TypeAdapter(_fields_and_hints(cls)[1][key])
    except Exception:
        return None


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
        fields, hints = _fields_and_hints(cls)
        for key, value in (self.model_extra or {}).items():
            if key not in fields:
                hint = did_you_mean(key, fields)
                raise ValueError(f"unknown key '{key}' for {cls.__name__}" + (f" ({hint})" if hint else ""))
            if key == "target_modules" and value == "auto":
                continue
            if key == "layers_to_transform" and isinstance(value, dict):
                share_of_depth(value)  # {top_frac: F} | {bottom_frac: F}: checked here, resolved in apply
                continue
            adapter = _adapter(cls, key)
            if adapter is None:  # a type pydantic cannot express; peft checks it when the config is built
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


def dropout(config: PeftConfig) -> float:
    """The largest dropout the method's own layers apply in training (LoRA's lora_dropout, LoHa's
    module_dropout, ...): peft's keys ending in `dropout`, with our defaults; 0 when none."""
    rates = [
        v
        for k, v in config.kwargs().items()
        if k.endswith("dropout") and isinstance(v, int | float) and not isinstance(v, bool)
    ]
    return float(max(rates, default=0))


# --------------------------------------------------------------------------------------------------
# defaults per architecture


def _peft_table(method: str) -> dict:
    from peft import utils

    name = {"ia3": "IA3", "adalora": "ADALORA"}.get(method, "LORA")
    return getattr(utils, f"TRANSFORMERS_MODELS_TO_{name}_TARGET_MODULES_MAPPING")


def share_of_depth(value: dict) -> tuple[str, float]:
    """`layers_to_transform: {top_frac: F}` (or `bottom_frac`): peft's layers named relative to the
    model's depth (model/depth.py's rule), so one recipe puts LoRA in the same share of any model."""
    if len(value) != 1 or next(iter(value)) not in ("top_frac", "bottom_frac"):
        raise ValueError(
            f"layers_to_transform: {value!r} is not a list of block indices, {{top_frac: F}} or {{bottom_frac: F}}"
        )
    key, fraction = next(iter(value.items()))
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 < fraction <= 1:
        raise ValueError(f"layers_to_transform.{key}: {fraction!r} is not a fraction in (0, 1]")
    return key, float(fraction)


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
    if isinstance(kwargs.get("layers_to_transform"), dict):
        from hybridtune.model.depth import fraction_blocks

        key, fraction = share_of_depth(kwargs["layers_to_transform"])
        n = build.anatomy.num_blocks
        k = fraction_blocks(n, fraction)
        kwargs["layers_to_transform"] = list(range(n - k, n) if key == "top_frac" else range(k))
    if kwargs.get("target_modules") == "all-linear" and "exclude_modules" not in kwargs:
        # peft's all-linear leaves out only the output layer; a classifier's head (DistilBERT's
        # pre_classifier, BERT's pooler) is trained whole as modules_to_save, which cannot also hold LoRA
        kwargs["exclude_modules"] = head_linears(model, build.anatomy)
    if method == "adalora" and "total_step" not in kwargs:
        kwargs["total_step"] = build.total_steps
    if method == "prompt_tuning" and str(kwargs.get("prompt_tuning_init", "")).upper() == "TEXT":
        kwargs.setdefault("tokenizer_name_or_path", getattr(build.tokenizer, "name_or_path", None))
    if method in PROMPT_LEARNING:
        peft_prompt.prepare(model, method, kwargs, build)
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
    check=peft_prompt_check,
    training_args=training_args,
    callbacks=callbacks,
    summary="any method of the installed peft (LoRA, DoRA, AdaLoRA, IA3, prefix / prompt tuning, ...)",
)
