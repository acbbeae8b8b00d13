"""The Python API: the thin facade a Python user (and the CLI) calls.

    from hybridtune import api
    from hybridtune.recipe import load_recipe
    result = api.train(load_recipe("recipes/lora.yaml", ["train.epochs=1"]))
    api.predict(result["run_dir"], ["a gorgeous, witty film"])

One run goes through `hybridtune.run` (prepare, train); a recipe with `ensemble:` through
`hybridtune.ensemble`; finished runs are loaded by `hybridtune.inference` (one loader), saved
ensembles by `hybridtune.ensemble`.
"""

from __future__ import annotations

from pathlib import Path

from hybridtune import generation, tasks
from hybridtune.errors import UserError
from hybridtune.inference import LoadedRun, bind_labels, load_run, task_of  # noqa: F401  (the API)
from hybridtune.model.loading import load_tokenizer, resolve, tokenizer_path
from hybridtune.recipe import Recipe, load_recipe
from hybridtune.run import Prepared, params, prepare, quiet_libraries  # noqa: F401
from hybridtune.run import train as train_one
from hybridtune.tasks.classification import logits_of  # noqa: F401  (part of the API)
from hybridtune.train.precision import autocast
from hybridtune.train.run_files import train_tokens  # noqa: F401


def task_for(recipe: Recipe):
    """The recipe's task (hybridtune.tasks: the contract in tasks/base.py): its module, or what the
    module's `bind` makes of the recipe (a prompt task needs the recipe's template and verbalizer to
    encode its data)."""
    return tasks.for_recipe(recipe)


def train(
    recipe: Recipe | None = None,
    resume: str | Path | None = None,
    callbacks: list | tuple = (),
    search_trial: bool = False,
    resume_weights_only: bool = False,
) -> dict:
    """Train one recipe end to end (`hybridtune.run.train`), an `ensemble:` recipe's members and
    their combination (`hybridtune.ensemble.train`), or a `self_training:` recipe's rounds
    (`hybridtune.self_training`); returns the summary written to report.json."""
    if resume is None and recipe is not None and recipe.ensemble is not None:
        from hybridtune import ensemble

        return ensemble.train(recipe)
    plain = not (callbacks or search_trial or resume_weights_only)  # else run.train refuses it
    if resume is None and recipe is not None and recipe.self_training is not None and plain:
        from hybridtune.self_training import rounds

        return rounds.train(recipe)
    if resume is not None and (Path(resume) / "recipe.yaml").is_file():
        try:
            saved = load_recipe(Path(resume) / "recipe.yaml")
        except UserError:
            saved = None  # run.train says what is wrong with it
        is_ensemble = saved is not None and saved.ensemble is not None
        if saved is not None and saved.self_training is not None and plain:
            from hybridtune.self_training import rounds

            return rounds.resume(Path(resume))
        if is_ensemble:
            raise UserError(
                f"--resume {resume}",
                "an ensemble run",
                "a single run: resume the unfinished member (<run>/members/<i>), then combine with "
                "`hybridtune ensemble`",
            )
    return train_one(recipe, resume, callbacks, search_trial, resume_weights_only)


def distill(
    teacher: str,
    student: str | None = None,
    blocks: int | None = None,
    recipe: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    repeats: int = 3,
    echo=lambda _: None,
) -> dict:
    """Train a student on a finished run's soft labels and compare the two (hybridtune.distillation):
    `student` another model, or `blocks` K: the teacher's base cut to its bottom K blocks."""
    from hybridtune.distillation import distill as run_distill

    return run_distill(teacher, student, blocks, recipe, overrides, repeats, echo)


def evaluate(run_dir: str, data: str | None = None) -> dict:
    """Metrics of a finished run (or a saved ensemble) on its test split, or on every row of `data`."""
    from hybridtune import ensemble

    if ensemble.is_ensemble(run_dir):
        return ensemble.Ensemble(run_dir).evaluate(data)
    loaded = load_run(run_dir)
    task, data_cfg = loaded.task, loaded.recipe.data
    frame = task.eval_frame(data, data_cfg, loaded.labels)
    dataset = task.encode(frame, loaded.tokenizer, loaded.labels, data_cfg)
    with autocast(loaded.recipe.train.precision):
        return task.report(loaded.model, loaded.tokenizer, dataset, loaded.labels)


def evaluate_zero_shot(recipe: Recipe, data: str | None = None) -> dict:
    """Metrics of a prompt recipe's base model, untrained, on its test split or on every row of `data`."""
    if not tasks.has(recipe.task, "zero_shot"):
        able = " or ".join(n for n in tasks.names() if tasks.has(n, "zero_shot"))
        raise UserError("task", f"{recipe.task}, whose model needs training", f"task: {able} (zero-shot)")
    task = task_for(recipe)
    splits = task.load_splits(recipe.data)
    labels = task.label_space(splits, recipe.data)
    path = resolve(recipe.model.name)
    tokenizer = load_tokenizer(*tokenizer_path(recipe.model))
    model, _ = task.load_model(path, tokenizer, labels)  # also resolves the prompt against the tokenizer
    frame = task.eval_frame(data, recipe.data, labels) if data else splits.test
    with autocast(recipe.train.precision):
        return task.zero_shot(tokenizer, task.encode(frame, tokenizer, labels, recipe.data), labels, model)


def predict(run_dir: str, texts: list[str], text_pairs: list[str] | None = None) -> list[dict]:
    """The task's prediction for each text: label + probabilities, or the entities found."""
    from hybridtune import ensemble
    from hybridtune.export import merged_for_inference

    if ensemble.is_ensemble(run_dir):
        return ensemble.Ensemble(run_dir).predict(texts, text_pairs)
    loaded = load_run(run_dir)
    with autocast(loaded.recipe.train.precision):
        return loaded.task.predict(
            merged_for_inference(loaded.model),  # export.py: LoRA folded in, one matmul per layer
            loaded.tokenizer,
            loaded.labels,
            loaded.recipe.data,
            texts,
            text_pairs,
        )


def generate(
    run_dir: str,
    prompts: list[str],
    max_new_tokens: int | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = None,
) -> list[str]:
    """A causal_lm run's answer to each prompt (in run.json's prompt format, as in training; the one
    generation path, hybridtune/generation.py): greedy by default, or sampled; `max_new_tokens`
    defaults to the recipe's `generation.max_new_tokens`."""
    task = task_of(run_dir)
    if not tasks.has(task.NAME, "generate"):
        able = " or ".join(n for n in tasks.names() if tasks.has(n, "generate"))
        raise UserError(
            str(run_dir), f"a {task.NAME} run", f"a {able} run (`generate` needs a language model)"
        )
    loaded = load_run(run_dir)
    return generation.answer(
        loaded.model,
        loaded.tokenizer,
        prompts,
        loaded.recipe.generation.max_new_tokens if max_new_tokens is None else max_new_tokens,
        prompt_format=loaded.labels.prompt_format,
        do_sample=do_sample,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
    )
