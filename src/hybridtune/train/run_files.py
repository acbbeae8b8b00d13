"""The files of a trained run dir, written in one place: `hybridtune train` (run.py) and a
shared-trunk ensemble's members (ensemble/joint.py) both go through here, so a run dir holds the
same files with the same keys whichever command trained it (the layout: rundir.py).

    begin(run, recipe, ...)      recipe.yaml, run.json, params.json   (before training)
    save_final(run, ...)         final/, atomically                    (after training)
    training_summary(...)        report.json's keys about the training (time, throughput, steps)
    rundir.write_json(run / "eval.json" | "report.json", ...)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from hybridtune import rundir, strategy
from hybridtune.model.loading import resolve
from hybridtune.recipe import recipe_to_yaml
from hybridtune.strategy import peft as peft_part
from hybridtune.train.precision import choose, resolve_precision


def run_info(recipe, labels, model: nn.Module, **extra: Any) -> dict:
    """run.json: what a loader needs to load final/ back (task, labels, base model, format)."""
    return {
        "task": recipe.task,
        "labels": labels.names,
        "label_values": labels.values,
        "base_model": resolve(recipe.model.name),
        "format": "peft" if hasattr(model, "peft_config") else "model",
        **extra,
    }


def begin(run: Path, recipe, labels, model: nn.Module, params: dict, **extra: Any) -> None:
    """The files a run dir holds from its start: the resolved recipe, run.json (`extra`: more keys,
    e.g. the trunk cache or the task's run_info), the parameter table."""
    rundir.write_text(run / "recipe.yaml", recipe_to_yaml(recipe))
    rundir.write_json(run / "run.json", run_info(recipe, labels, model, **extra))
    rundir.write_json(run / "params.json", params)


def save_final(run: Path, model: nn.Module, tokenizer, recipe) -> None:
    """final/, written whole or not at all: the parts' own files (adapters, a soft prompt), the
    model's weights without what those hold, the tokenizer, and beside a peft adapter the base's
    config with the label names (strategy/peft.py: save_base_config)."""

    def save(tmp: Path) -> None:
        own = strategy.save(model, recipe, tmp)
        base = {k: v for k, v in model.state_dict().items() if k not in own}
        model.save_pretrained(tmp, **({"state_dict": base} if own else {}))
        tokenizer.save_pretrained(tmp)
        peft_part.save_base_config(model, tmp)

    rundir.save_dir_atomically(run / "final", save)


def training_summary(trainer, out, seconds: float, tokens: float, precision: str, params: dict) -> dict:
    """report.json's keys about the training itself, the same for every kind of run: the best
    validation, the trainable share (`params`: trainable, total), time and throughput (`tokens`: the
    non-padding tokens this process trained on), epochs, steps and precision."""
    state = trainer.state
    trainable, total = params["trainable"], params["total"]
    return {
        "best_validation": state.best_metric,
        "best_checkpoint": state.best_model_checkpoint,
        "trainable": trainable,
        "total": total,
        "trainable_pct": round(100 * trainable / total, 4),
        "train_seconds": round(seconds, 2),
        "train_samples_per_second": out.metrics.get("train_samples_per_second"),
        "train_tokens_per_second": round(tokens / seconds, 1),
        "cuda_peak_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1)
        if torch.cuda.is_available()
        else None,
        "best_validation_metric": trainer.args.metric_for_best_model,
        "epochs": state.epoch,
        "steps": state.global_step,
        "precision": resolve_precision(precision),
        "precision_reason": choose(precision).reason,
    }


def train_tokens(dataset, epochs: float) -> float:
    """Non-padding tokens seen in `epochs` passes over a tokenized dataset."""
    return sum(len(ids) for ids in dataset["input_ids"]) * epochs
