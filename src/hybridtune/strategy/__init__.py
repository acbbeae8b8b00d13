"""Strategy parts: one file each, registered here under its recipe key, applied in one fixed order.

A part is a module with a pydantic config class and `apply(model, config, build) -> model`; it may
also define `callbacks(model, config, build) -> list[TrainerCallback]` for work during training
(e.g. AdaLoRA's rank allocation). No part knows about another; this file alone decides the order
(freeze -> peft -> ...) and how their effects combine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from torch import nn

from hybridtune.model.anatomy import Anatomy
from hybridtune.strategy import freeze, peft

# recipe key -> part, in the order of application (DESIGN: freeze -> peft -> prompt -> head/fusion -> objective)
PARTS: dict[str, ModuleType] = {
    "freeze": freeze,
    "peft": peft,
}


@dataclass
class Build:
    """What parts may read while they change the model."""

    anatomy: Anatomy
    task: Any  # the task module (hybridtune.tasks.*)
    new_params: set[str] = field(default_factory=set)  # names the checkpoint lacked (a new head)


def apply(model: nn.Module, recipe, build: Build) -> nn.Module:
    """Apply every configured part in order. A part that wraps the model (peft) freezes the base
    model; the parameters `freeze` left trainable are made trainable again after it, so
    `freeze` + `peft` means "these base parameters *and* the adapters train"."""
    kept_trainable: list[nn.Parameter] | None = None
    for key, part in PARTS.items():
        config = getattr(recipe, key, None)
        if config is None:
            continue
        model = part.apply(model, config, build)
        if key == "freeze":
            # the head is peft's business (modules_to_save); keep the rest of the selection
            kept_trainable = [
                p
                for n, p in model.named_parameters()
                if p.requires_grad and build.anatomy.slot_of(n) != "head"
            ]
    if kept_trainable is not None and recipe.peft is not None:
        for p in kept_trainable:
            p.requires_grad_(True)
    return model


def callbacks(model: nn.Module, recipe, build: Build) -> list:
    """The training-time callbacks of every configured part that has some."""
    out: list = []
    for key, part in PARTS.items():
        config = getattr(recipe, key, None)
        if config is not None and hasattr(part, "callbacks"):
            out += part.callbacks(model, config, build)
    return out
