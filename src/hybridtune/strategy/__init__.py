"""Strategy parts: one file each, named as its recipe key, listed once in PARTS, applied in that order.

The contract a part fulfils (its config, `apply`, and the hooks it declares: checks, loss terms,
trunk-cache eligibility, training arguments, callbacks, save / restore) is strategy/base.py. This
module lists the parts, lets a user register one of their own (`register`), and runs the hooks of
the parts a recipe configures: the recipe, the engine and the trunk cache ask the parts through
these functions and name none. (Still named outside strategy/: contrastive's stage, run by
run._train before the Trainer; export's refusals of parts plain transformers cannot load; peft's
adapter loading.)

How their effects combine is decided here alone: a part that adds weights (peft, adapters,
soft_prompt) freezes the pretrained base, and the base parameters `freeze` selected train anyway:
"freeze + X" means "these base parameters *and* X train". The selection travels in `build.keep`
(`freeze` fills it); a part that takes some of it over (peft saves them as `modules_to_save`
copies) removes those; what is left is made trainable again at the end.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch import nn
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from hybridtune.strategy import (
    adapters,
    adversarial,
    contrastive,
    distill,
    freeze,
    fusion,
    l2sp,
    label_loss,
    layer_sampling,
    mixout,
    neftune,
    objective,
    peft,
    pooling,
    prompt,
    rdrop,
    soft_prompt,
)
from hybridtune.strategy.base import Build, LossTerm, Part, TrainRows

__all__ = ["PARTS", "Build", "LossTerm", "Part", "TrainRows", "register", "unregister", "configured"]

# recipe key -> part, in the order of application (DESIGN: freeze -> peft -> prompt -> head/fusion -> objective).
# pooling: after peft (hooks on the modules that run); prompt (the template + verbalizer scorer)
# wraps all of the above and fusion wraps it; contrastive only checks here, its stage runs before
# the Trainer (run._train); distill wraps the forward last (its hard-label loss skips unlabelled rows)
PARTS: dict[str, Part] = {
    part.key: part
    for part in (
        freeze.PART,
        peft.PART,
        adapters.PART,
        soft_prompt.PART,
        pooling.PART,
        prompt.PART,
        fusion.PART,
        objective.PART,
        distill.PART,
        contrastive.PART,
        layer_sampling.PART,
        l2sp.PART,
        mixout.PART,
        label_loss.PART,
        rdrop.PART,
        adversarial.PART,
        neftune.PART,
    )
}


def register(part: Part, before: str | None = None) -> None:
    """Add a part of one's own: it is applied before the part `before` (default: after all), and
    the recipe gets a `part.key` section from `part.config` (hybridtune.recipe.validate_recipe).
    For this process: `hybridtune compare` trains each run in a process of its own, which knows the
    parts of the package only."""
    if not isinstance(part, Part):
        raise TypeError(f"register: found {type(part).__name__}; expected a strategy.Part")
    if part.key in PARTS:
        raise ValueError(f"register: found part key {part.key!r} again; expected a new key")
    if before is not None and before not in PARTS:
        raise ValueError(f"register: found before={before!r}; expected one of {', '.join(PARTS)}")
    items = list(PARTS.items())
    at = len(items) if before is None else list(PARTS).index(before)
    items.insert(at, (part.key, part))
    PARTS.clear()
    PARTS.update(items)


def unregister(key: str) -> None:
    """Remove a part added with `register` (a test's cleanup)."""
    PARTS.pop(key)


def configured(recipe) -> Iterator[tuple[str, Part, Any]]:
    """(key, part, config) of every part the recipe sets, in the order of application."""
    for key, part in PARTS.items():
        config = getattr(recipe, key, None)
        if config is not None:
            yield key, part, config


def reshape(model: nn.Module, recipe) -> nn.Module:
    """The loaded base model as the configured parts reshape it (distill's bottom k blocks), before
    its anatomy is mapped and any part applies."""
    for _, part, config in configured(recipe):
        if part.reshape is not None:
            model = part.reshape(model, config)
    return model


def add_train_rows(recipe, build: Build) -> None:
    """Append the rows each configured part adds (its `train_rows` hook) to the training dataset,
    `build.datasets["train"]`, and their texts to `build.train_frame` (which starts as the labelled
    training split), in the order of the parts; `build.added_rows` says what each part added.
    Called before any part applies, so every part (distill's soft labels) sees the whole training set."""
    import datasets
    import pandas as pd

    from hybridtune.data.long_texts import DOC

    build.train_frame = build.splits.train
    for key, part, config in configured(recipe):
        rows = part.train_rows(config, build) if part.train_rows is not None else None
        if rows is None:
            continue
        train, extra = build.datasets["train"], rows.dataset
        if set(extra.column_names) != set(train.column_names):
            raise RuntimeError(
                f"{key}.train_rows: found columns {extra.column_names}; expected the training split's "
                f"{train.column_names}"
            )
        offset = len(build.train_frame)  # a chunked row's `doc`: its text's row in train_frame
        columns = {c: [d + offset for d in extra[c]] if c == DOC else extra[c] for c in train.column_names}
        extra = datasets.Dataset.from_dict(columns, features=train.features)
        build.datasets["train"] = datasets.concatenate_datasets([train, extra])
        build.train_frame = pd.concat([build.train_frame, rows.frame], ignore_index=True)
        build.added_rows[key] = {"texts": len(rows.frame), "rows": len(extra), **rows.about}


def apply(model: nn.Module, recipe, build: Build) -> nn.Module:
    """Apply every configured part in order (see the module docstring for how they combine)."""
    build.pretrained = {id(p) for n, p in model.named_parameters() if n not in build.new_params}
    for _, part, config in configured(recipe):
        model = part.apply(model, config, build)
    for p in build.keep.values():
        p.requires_grad_(True)
    return model


def check(recipe) -> None:
    """Each configured part's refusals of the rest of the recipe (ValueError, key path first)."""
    for _, part, config in configured(recipe):
        if part.check is not None:
            part.check(config, recipe)


def model_check(recipe, facts) -> None:
    """Each configured part's refusals of the model (its `model_check` hook, on the model's facts:
    model/facts.py), a UserError naming the key; run.prepare calls it before any part applies, and
    `hybridtune search` before a trial draws a part."""
    for _, part, config in configured(recipe):
        if part.model_check is not None:
            part.model_check(config, recipe, facts)


def trunk_cache_reason(recipe) -> str | None:
    """Why a configured part rules the frozen-trunk cache out, or None."""
    for _, part, config in configured(recipe):
        reason = part.trunk_cache(config, recipe) if part.trunk_cache is not None else None
        if reason is not None:
            return reason
    return None


def loss_parts(recipe) -> list[tuple[Part, Any]]:
    """(part, config) of the configured parts that change the training loss."""
    return [
        (part, config)
        for _, part, config in configured(recipe)
        if part.loss_terms is not None or part.task_weight is not None
    ]


def training_args(recipe) -> dict:
    """TrainingArguments a part must override (e.g. AdaLoRA keeps its final model, not the best)."""
    out: dict = {}
    for _, part, config in configured(recipe):
        if part.training_args is not None:
            out.update(part.training_args(config))
    return out


def callbacks(model: nn.Module, recipe, build: Build) -> list:
    """The training-time callbacks of every configured part that has some."""
    out: list = []
    for _, part, config in configured(recipe):
        if part.callbacks is not None:
            out += part.callbacks(model, config, build)
    if any(part.save is not None for _, part, _ in configured(recipe)):
        out.append(CheckpointExtras(model, recipe))
    return out


def param_reports(model: nn.Module, recipe, build: Build) -> dict[str, dict]:
    """key -> what each configured part with a `params` hook says about what trains."""
    return {
        key: part.params(model, config, build)
        for key, part, config in configured(recipe)
        if part.params is not None
    }


def save(model: nn.Module, recipe, out_dir: str | Path) -> set[str]:
    """Let each part write its own weights into `out_dir`; returns the state-dict keys they wrote."""
    keys: set[str] = set()
    for _, part, config in configured(recipe):
        if part.save is not None:
            keys |= set(part.save(model, config, Path(out_dir)))
    return keys


def restore(model: nn.Module, recipe, in_dir: str | Path, load_run=None) -> nn.Module:
    """Re-apply the parts that saved their own weights, in order, and load those weights back;
    `load_run` (inference.load_run) for the parts that load a finished run (`loads_runs`)."""
    for _, part, config in configured(recipe):
        if part.restore is not None:
            extra = {"load_run": load_run} if part.loads_runs else {}
            model = part.restore(model, config, Path(in_dir), **extra)
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
