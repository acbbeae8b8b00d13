"""peft: any method of the installed `peft`, by name, with peft's own keys.

    peft:
      method: lora          # lora | dora | adalora | ia3 | prefix_tuning | prompt_tuning | p_tuning | loha | ...
      r: 8
      lora_alpha: 16
      lora_dropout: 0.1
      target_modules: auto  # per-architecture default (peft's table, else the attention q/v projections)

The keys are the fields of peft's config dataclass for that method (`LoraConfig`, `IA3Config`, ...):
peft's own typed arguments are the schema, so nothing here can drift from the installed peft. Unknown
keys and wrong types are refused with the key path and a did-you-mean. `dora` is LoRA with
`use_dora: true` (Liu et al. 2024).
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, TypeAdapter, model_validator
from torch import nn

from hybridtune.errors import UserError, did_you_mean

ALIASES = {"dora": ("lora", {"use_dora": True})}
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
DEFAULTS = {"lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.1}}


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
        out = dict(DEFAULTS.get(self.method, {}))
        out.update(ALIASES.get(self.method, (None, {}))[1])
        out.update(self.model_extra or {})
        return out


def default_target_modules(model: nn.Module, anatomy) -> list[str] | None:
    """peft's per-architecture default when it has one, else the q/v projections found in block 0."""
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    if getattr(model.config, "model_type", None) in TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING:
        return None
    block0 = model.get_submodule(f"{anatomy.blocks_path}.0")
    leaves = {name.rsplit(".", 1)[-1] for name, m in block0.named_modules() if isinstance(m, nn.Linear)}
    found = [n for n in QV_NAMES if n in leaves]
    return found or ["all-linear"]


def apply(model: nn.Module, config: PeftConfig, build) -> nn.Module:
    from peft import get_peft_model

    cls = peft_methods()[config.method]
    kwargs = config.kwargs()
    if kwargs.get("target_modules") == "auto" or (
        "target_modules" in {f.name for f in dataclasses.fields(cls)} and "target_modules" not in kwargs
    ):
        kwargs["target_modules"] = default_target_modules(model, build.anatomy)
        if kwargs["target_modules"] is None:
            kwargs.pop("target_modules")
    try:
        peft_config = cls(task_type=build.task.peft_task_type, **kwargs)
        return get_peft_model(model, peft_config)
    except (ValueError, TypeError) as e:
        raise UserError(
            "peft", f"a configuration peft refuses ({e})", f"valid {cls.__name__} arguments"
        ) from None
