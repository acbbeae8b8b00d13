"""The Python API: train, evaluate, predict, params. The CLI is a thin layer over these functions.

    from hybridtune import api
    from hybridtune.recipe import load_recipe
    result = api.train(load_recipe("recipes/lora.yaml", ["train.epochs=1"]))
    api.predict(result["run_dir"], ["a gorgeous, witty film"])

Everything that can fail on the user's input (recipe, data, model, output dir) is checked in
`prepare`, before the run dir exists: a bad input never leaves a half-written run behind.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import set_seed

from hybridtune import rundir, strategy
from hybridtune.data import Splits, check_columns, check_texts, load_splits
from hybridtune.data.sources import read_table
from hybridtune.errors import UserError
from hybridtune.model.anatomy import Anatomy
from hybridtune.model.loading import load_tokenizer, resolve
from hybridtune.recipe import Recipe, load_recipe, recipe_to_yaml
from hybridtune.report.params import param_table
from hybridtune.strategy.plan import Plan, make_plan
from hybridtune.tasks import classification

TASKS = {"classification": classification}


@dataclass
class Prepared:
    """Everything a run needs, built and checked before anything is written."""

    recipe: Recipe
    task: Any
    splits: Splits
    labels: Any
    tokenizer: Any
    model: torch.nn.Module
    anatomy: Anatomy
    build: strategy.Build
    plan: Plan
    params: dict
    datasets: dict


def prepare(recipe: Recipe) -> Prepared:
    task = TASKS[recipe.task]
    data_cfg = recipe.data
    splits = load_splits(data_cfg, task.columns(data_cfg), data_cfg.label_column, task.row_checker(data_cfg))
    labels = task.label_space(splits, data_cfg.label_column)
    path = resolve(recipe.model.name)
    tokenizer = load_tokenizer(path)
    set_seed(recipe.train.seed)  # the new head's initialisation is part of the run's reproducibility
    model, new_params = task.load_model(path, tokenizer, labels)
    anatomy = Anatomy.of(model)
    base_ids = {id(p) for p in model.parameters()}
    build = strategy.Build(anatomy=anatomy, task=task, new_params=new_params)
    model = strategy.apply(model, recipe, build)
    plan = make_plan(model, recipe, anatomy, base_ids, len(splits.train))
    params = param_table(model, anatomy, base_ids, plan.lrs)
    if params["trainable"] == 0:
        raise UserError(
            "freeze", "a strategy that leaves no parameter trainable", "at least one trainable parameter"
        )
    datasets = {
        name: task.encode(splits[name], tokenizer, labels, data_cfg)
        for name in ("train", "validation", "test")
    }
    return Prepared(recipe, task, splits, labels, tokenizer, model, anatomy, build, plan, params, datasets)


def params(recipe: Recipe) -> dict:
    """The per-layer parameter table of a recipe, without training."""
    return prepare(recipe).params


def train(recipe: Recipe | None = None) -> dict:
    """Train one recipe end to end; returns the summary written to `report.json`."""
    from hybridtune.train.engine import make_trainer, resolve_precision, training_arguments

    recipe = recipe or load_recipe()
    prep = prepare(recipe)
    run = rundir.run_dir_path(recipe.output.dir, recipe.output.name, recipe.name)
    args = training_arguments(recipe.train, recipe.output, run / "checkpoints")
    rundir.new_run_dir(run)
    is_peft = hasattr(prep.model, "peft_config")
    rundir.write_text(run / "recipe.yaml", recipe_to_yaml(recipe))
    rundir.write_json(
        run / "run.json",
        {
            "task": recipe.task,
            "labels": prep.labels.names,
            "label_values": prep.labels.values,
            "base_model": resolve(recipe.model.name),
            "format": "peft" if is_peft else "model",
        },
    )
    rundir.write_json(run / "params.json", prep.params)

    trainer = make_trainer(
        prep.model,
        prep.tokenizer,
        prep.datasets,
        recipe,
        args,
        run,
        prep.task.compute_metrics,
        plan=prep.plan,
        callbacks=strategy.callbacks(prep.model, recipe, prep.build),
    )
    started = time.perf_counter()
    out = trainer.train()
    train_seconds = time.perf_counter() - started
    model = trainer.model

    def save(tmp: Path) -> None:
        model.save_pretrained(tmp)
        prep.tokenizer.save_pretrained(tmp)

    rundir.save_dir_atomically(run / "final", save)
    test = prep.task.full_report(
        np.asarray(prep.datasets["test"]["labels"]),
        logits_of(model, prep.tokenizer, prep.datasets["test"]),
        prep.labels,
    )
    rundir.write_json(run / "eval.json", test)
    state = trainer.state
    summary = {
        "run_dir": str(run),
        "recipe": recipe.name,
        "test": {k: test[k] for k in ("accuracy", "f1_macro", "n")},
        "best_validation": state.best_metric,
        "best_checkpoint": state.best_model_checkpoint,
        "trainable": prep.params["trainable"],
        "total": prep.params["total"],
        "trainable_pct": prep.params["trainable_pct"],
        "train_seconds": round(train_seconds, 2),
        "train_samples_per_second": out.metrics.get("train_samples_per_second"),
        "epochs": state.epoch,
        "steps": state.global_step,
        "precision": resolve_precision(recipe.train.precision),
    }
    rundir.write_json(run / "report.json", summary)
    return summary


# --------------------------------------------------------------------------------------------------
# inference on a finished run


@dataclass
class LoadedRun:
    run_dir: Path
    recipe: Recipe
    model: torch.nn.Module
    tokenizer: Any
    labels: Any


def load_run(run_dir: str) -> LoadedRun:
    run = rundir.check_run_dir(run_dir)
    info = rundir.read_json(run / "run.json")
    recipe = load_recipe(run / "recipe.yaml")
    task = TASKS[info["task"]]
    labels = task.Labels(values=info["label_values"], names=info["labels"])
    final = str(run / "final")
    tokenizer = load_tokenizer(final, where=f"{run}/final")
    if info["format"] == "peft":
        from peft import PeftModel

        base, _ = task.load_model(resolve(recipe.model.name), tokenizer, labels)
        model = PeftModel.from_pretrained(base, final)
    else:
        model, _ = task.load_model(final, tokenizer, labels)
    model.eval()
    return LoadedRun(run, recipe, model, tokenizer, labels)


@torch.no_grad()
def logits_of(model: torch.nn.Module, tokenizer, dataset, batch_size: int = 128) -> np.ndarray:
    """Logits for every row of a tokenized dataset, in order (dynamic padding per batch)."""
    from transformers import DataCollatorWithPadding

    collate = DataCollatorWithPadding(tokenizer)
    model.eval()
    device = next(model.parameters()).device
    features = [{k: v for k, v in row.items() if k != "labels"} for row in dataset]
    out = []
    for i in range(0, len(features), batch_size):
        batch = {k: v.to(device) for k, v in collate(features[i : i + batch_size]).items()}
        out.append(model(**batch).logits.float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0))


def evaluate(run_dir: str, data: str | None = None) -> dict:
    """Metrics of a finished run on its test split, or on every row of `data` (a file or dataset dir)."""
    loaded = load_run(run_dir)
    recipe, task = loaded.recipe, classification
    data_cfg = recipe.data
    if data is None:
        frame = load_splits(
            data_cfg, task.columns(data_cfg), data_cfg.label_column, task.row_checker(data_cfg)
        ).test
    else:
        frame = read_table(data, "--data")
        if isinstance(frame, dict):
            frame = frame.get("test") or next(iter(frame.values()))
        check_columns(frame, task.columns(data_cfg), data)
        check_texts(frame, [c for k, c in task.columns(data_cfg).items() if k != "label_column"])
    frame = task.normalise_labels(frame, data_cfg.label_column)
    for value, where in zip(frame[data_cfg.label_column], frame["_where"], strict=True):
        if value not in loaded.labels.values:
            raise UserError(
                where,
                f"label {value!r}, unknown to this run",
                "one of " + ", ".join(map(repr, loaded.labels.values)),
            )
    dataset = task.encode(frame, loaded.tokenizer, loaded.labels, data_cfg)
    logits = logits_of(loaded.model, loaded.tokenizer, dataset)
    return task.full_report(np.asarray(dataset["labels"]), logits, loaded.labels)


def predict(run_dir: str, texts: list[str], text_pairs: list[str] | None = None) -> list[dict]:
    """Label, score and class probabilities for each text."""
    import pandas as pd

    loaded = load_run(run_dir)
    data_cfg = loaded.recipe.data
    columns = {data_cfg.text_column: texts, "_where": [f"text {i + 1}" for i in range(len(texts))]}
    if data_cfg.text_pair_column:
        if not text_pairs or len(text_pairs) != len(texts):
            raise UserError(
                "--pair",
                f"{len(text_pairs or [])} second texts",
                f"{len(texts)}, one per text (this run takes text pairs)",
            )
        columns[data_cfg.text_pair_column] = text_pairs
    frame = pd.DataFrame(columns)
    check_texts(frame, [c for c in columns if c != "_where"])
    dataset = classification.encode(frame, loaded.tokenizer, None, data_cfg)
    probs = torch.softmax(torch.from_numpy(logits_of(loaded.model, loaded.tokenizer, dataset)), -1).numpy()
    names = loaded.labels.names
    return [
        {
            "text": t,
            "label": names[int(p.argmax())],
            "score": float(p.max()),
            "probs": dict(zip(names, map(float, p), strict=True)),
        }
        for t, p in zip(texts, probs, strict=True)
    ]
