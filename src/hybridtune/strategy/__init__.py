"""Strategy parts: one file each, registered here under its recipe key, applied in one fixed order.

A part is a module with a pydantic config class and `apply(model, config, build) -> model`. It may
also define:

- `callbacks(model, config, build) -> list[TrainerCallback]`: work during training (AdaLoRA's rank
  allocation); `training_args(config) -> dict`: TrainingArguments it must override;
- `save(model, config, dir) -> list[str]` and `restore(model, config, dir) -> model`: for weights
  that neither the base model's save nor peft's adapter save holds (bottleneck adapters, a soft
  prompt). `save` writes the part's own files into final/ and returns the state-dict keys it wrote,
  which the base save then leaves out; `restore` re-applies the part to a freshly loaded model and
  loads the weights back (only the weights when the part is already applied).

No part knows about another; this file alone decides the order and how their effects combine:
a part that adds weights (peft, adapters, soft_prompt) freezes the pretrained base, and the base
parameters `freeze` selected train anyway: "freeze + X" means "these base parameters *and* X
train". The selection travels in `build.keep`; a part that takes some of it over (peft saves them
as `modules_to_save` copies) removes those; what is left is made trainable again at the end.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from torch import nn
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from hybridtune.model.anatomy import Anatomy
from hybridtune.strategy import (
    adapters,
    contrastive,
    freeze,
    fusion,
    objective,
    peft,
    pooling,
    prompt,
    verbalizer,
)

# recipe key -> part, in the order of application (DESIGN: freeze -> peft -> prompt -> head/fusion -> objective)
PARTS: dict[str, ModuleType] = {
    "freeze": freeze,
    "peft": peft,
    "adapters": adapters,
    "soft_prompt": prompt,
    # classification: the head reads the mean-pooled embedding (after peft: hooks on what runs)
    "pooling": pooling,
    # prompt_classification: the template + verbalizer scorer wraps all of the above; fusion wraps it
    "prompt": verbalizer,
    "fusion": fusion,
    "objective": objective,
    # checks here; its stage (pairs, cosine loss, then the head) runs before the Trainer (api._train)
    "contrastive": contrastive,
}


@dataclass
class Build:
    """What parts may read while they change the model."""

    anatomy: Anatomy
    task: Any  # the task module (hybridtune.tasks.*)
    new_params: set[str] = field(default_factory=set)  # names the checkpoint lacked (a new head)
    tokenizer: Any = None
    max_length: int | None = None  # tokens per example (data.max_length): virtual tokens must fit too
    total_steps: int | None = None  # planned optimizer steps of the run (AdaLoRA's budget schedule)
    recipe: Any = None  # the whole recipe (objective: batch size, seed; fusion: checks on a frozen run)
    labels: Any = None  # the task's Labels
    # filled by `apply`: id() of the parameters loaded from the checkpoint, and the base parameters
    # `freeze` keeps trainable (id -> parameter)
    pretrained: set[int] = field(default_factory=set)
    keep: dict[int, nn.Parameter] = field(default_factory=dict)


def _configured(recipe):
    for key, part in PARTS.items():
        config = getattr(recipe, key, None)
        if config is not None:
            yield key, part, config


def apply(model: nn.Module, recipe, build: Build) -> nn.Module:
    """Apply every configured part in order (see the module docstring for how they combine)."""
    build.pretrained = {id(p) for n, p in model.named_parameters() if n not in build.new_params}
    for key, part, config in _configured(recipe):
        model = part.apply(model, config, build)
        if key == "freeze":
            build.keep = {id(p): p for p in model.parameters() if p.requires_grad}
    for p in build.keep.values():
        p.requires_grad_(True)
    return model


def training_args(recipe) -> dict:
    """TrainingArguments a part must override (e.g. AdaLoRA keeps its final model, not the best)."""
    out: dict = {}
    for _, part, config in _configured(recipe):
        if hasattr(part, "training_args"):
            out.update(part.training_args(config))
    return out


def callbacks(model: nn.Module, recipe, build: Build) -> list:
    """The training-time callbacks of every configured part that has some."""
    out: list = []
    for _, part, config in _configured(recipe):
        if hasattr(part, "callbacks"):
            out += part.callbacks(model, config, build)
    if any(hasattr(part, "save") for _, part, _ in _configured(recipe)):
        out.append(CheckpointExtras(model, recipe))
    return out


def save(model: nn.Module, recipe, out_dir: str | Path) -> set[str]:
    """Let each part write its own weights into `out_dir`; returns the state-dict keys they wrote."""
    keys: set[str] = set()
    for _, part, config in _configured(recipe):
        if hasattr(part, "save"):
            keys |= set(part.save(model, config, Path(out_dir)))
    return keys


def restore(model: nn.Module, recipe, in_dir: str | Path) -> nn.Module:
    """Re-apply the parts that saved their own weights, in order, and load those weights back."""
    for _, part, config in _configured(recipe):
        if hasattr(part, "restore"):
            model = part.restore(model, config, Path(in_dir))
    return model


class CheckpointExtras(TrainerCallback):
    """Trainer's checkpoint of a peft model holds peft's weights only: the parts' own weights are
    written next to them (inside the checkpoint's atomic write: HybridTrainer calls `save_into`),
    read back when a run resumes from the checkpoint, and after Trainer has reloaded the best one."""

    def __init__(self, model: nn.Module, recipe):
        self.model, self.recipe = model, recipe

    def save_into(self, checkpoint: Path) -> None:
        save(self.model, self.recipe, checkpoint)

    def on_train_begin(self, args, state, control, **kwargs):
        checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if state.global_step > 0 and checkpoint.is_dir():  # resumed from this checkpoint
            restore(self.model, self.recipe, checkpoint)

    def on_train_end(self, args, state, control, **kwargs):
        best = state.best_model_checkpoint
        if args.load_best_model_at_end and best and Path(best).is_dir():
            restore(self.model, self.recipe, best)
