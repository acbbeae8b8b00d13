"""One run: `prepare` (every check before the run dir exists) and `train` (the run dir, Trainer,
final/, the test evaluation, report.json). The pipeline `api.train` / `hybridtune train`, compare's
children, search's trials and an ensemble's members all go through; `api.py` is the facade over it.

Everything that can fail on the user's input (recipe, data, model, output dir) is checked in
`prepare`, before the run dir exists: a bad input never leaves a half-written run behind. A failure
after that is one line, exit 3, and `failed.json` in the run dir (errors.RunFailed).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import set_seed

from hybridtune import distributed, rundir, strategy, tasks
from hybridtune.data import Splits, long_texts, token_cache
from hybridtune.errors import RunFailed, TrainingStopped, UserError, one_line
from hybridtune.inference import bind_labels, load_run
from hybridtune.model.anatomy import Anatomy
from hybridtune.model.facts import facts_of
from hybridtune.model.loading import check_vocabulary, load_tokenizer, resolve, tokenizer_path, training_texts
from hybridtune.recipe import Recipe, load_recipe
from hybridtune.report.params import param_table
from hybridtune.strategy import contrastive
from hybridtune.strategy.plan import Plan, make_plan, planned_steps
from hybridtune.train import run_files, trunk_cache
from hybridtune.train.precision import autocast


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
    trunk_depth: int = 0  # frozen bottom blocks the run starts caching (train/trunk_cache.py); 0 = none
    # the splits read from the token cache, and the seconds encoding took (data/token_cache.py)
    token_cache: dict | None = None
    # what max_length cuts of each split's texts (data/long_texts.py); None: the task does not count
    truncation: dict | None = None


def quiet_libraries() -> None:
    """The run's own progress (Trainer's bar, one line per evaluation) is what a user reads; the
    libraries' bars (datasets' "Map" / "Saving the dataset", transformers' shard writing) only flood a
    compare's log."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.disable_progress_bar()


def prepare(recipe: Recipe) -> Prepared:
    quiet_libraries()
    task = tasks.for_recipe(recipe)
    data_cfg = recipe.data
    splits = task.load_splits(data_cfg)
    labels = task.label_space(splits, data_cfg)
    bind_labels(labels, recipe)
    path = resolve(recipe.model.name)
    tokenizer = load_tokenizer(*tokenizer_path(recipe.model))
    skip = {"_where", data_cfg.label_column, getattr(data_cfg, "tags_column", None)}
    check_vocabulary(tokenizer, training_texts(splits.train, skip), tokenizer_path(recipe.model)[1])
    set_seed(recipe.train.seed)  # the new head's initialisation is part of the run's reproducibility
    model, new_params = task.load_model(path, tokenizer, labels)
    model = strategy.reshape(model, recipe)  # e.g. distill's bottom k blocks, before the anatomy maps it
    # what the parts refuse of this model (R-Drop without dropout), judged on the facts a search has too
    strategy.model_check(recipe, facts_of(model, new_params))
    if recipe.train.gradient_checkpointing and not getattr(model, "supports_gradient_checkpointing", False):
        raise UserError(
            "train.gradient_checkpointing",
            f"it with {type(model).__name__} (transformers implements no gradient checkpointing for it)",
            "false for this model",
        )
    # encoded before the plan: with data.long_texts: chunks a training example is a window, not a text
    started = time.perf_counter()
    names = tuple(n for n in ("train", "validation", "test") if len(splits[n]))  # few-shot: no validation
    datasets, cached, counts = token_cache.encode_splits(
        task, recipe, splits, tokenizer, labels, names, counted=tasks.has(recipe.task, "long_texts")
    )
    encoded = {"from_cache": cached, "seconds": round(time.perf_counter() - started, 3)}
    truncation = long_texts.report(counts, data_cfg)
    anatomy = Anatomy.of(model)
    base_ids = {id(p) for p in model.parameters()}
    build = strategy.Build(
        anatomy=anatomy,
        task=task,
        new_params=new_params,
        tokenizer=tokenizer,
        max_length=data_cfg.max_length,
        recipe=recipe,
        labels=labels,
        load_run=load_run,  # a part that loads a finished run (fusion's frozen model, distill's teacher)
        splits=splits,
        datasets=datasets,
    )
    strategy.add_train_rows(recipe, build)  # distill's unlabelled texts: before the steps are counted
    n_train = len(datasets["train"])
    build.total_steps = planned_steps(recipe.train, n_train)
    model = strategy.apply(model, recipe, build)
    plan = make_plan(model, recipe, anatomy, base_ids, n_train)
    held = plan.optimizer_names(model)
    params = param_table(model, anatomy, base_ids, {n: v for n, v in plan.lrs.items() if n in held})
    if plan.stages is not None:
        params["stages"] = plan.stage_summary(model)
    parts = strategy.param_reports(model, recipe, build)  # e.g. what layer sampling trains on average
    if parts:
        params["parts"] = parts
    params.update(build.report)  # a part's own account of its choice (freeze.spectrum: the scores)
    if params["trainable"] == 0:
        raise UserError(
            "freeze", "a strategy that leaves no parameter trainable", "at least one trainable parameter"
        )
    depth = trunk_cache.plan_depth(recipe, model, anatomy, plan.base_names)  # `on` that cannot: UserError
    prep = Prepared(recipe, task, splits, labels, tokenizer, model, anatomy, build, plan, params, datasets)
    prep.trunk_depth, prep.token_cache, prep.truncation = depth, encoded, truncation
    return prep


def params(recipe: Recipe) -> dict:
    """The per-layer parameter table of a recipe, without training."""
    return prepare(recipe).params


def train(
    recipe: Recipe | None = None,
    resume: str | Path | None = None,
    callbacks: list | tuple = (),
    search_trial: bool = False,
    resume_weights_only: bool = False,
    prepared: Prepared | None = None,
) -> dict:
    """Train one recipe end to end; returns the summary written to `report.json`.

    `prepared`: what `prepare(recipe)` returned, when the caller prepared it already (self-training
    checks its first round before its run dir exists) -- the model in it is trained in place.

    `callbacks`: more `TrainerCallback`s (a search's pruning callback). `search_trial`: a trial of
    `hybridtune search`, which sees only the validation split: no checkpoints, no final/, no test
    evaluation, no progress bar; report.json holds the validation results (search/trial.py).

    `resume`: an interrupted run dir to continue from its last complete checkpoint (its own
    recipe.yaml; model, optimizer, scheduler, RNG states, data order, stage and early stopping
    restored), which then ends like a normal run (train/resume.py). `resume_weights_only`: go on from
    a checkpoint without its optimizer state (refused otherwise). The run dir's lock is held until
    the run ends: a second writer is refused (durable.lock_dir)."""
    from hybridtune.train.resume import prepare_resume

    held, checkpoint = [], None
    if resume is not None:  # under a launcher, rank 0 alone locks and tidies the run dir
        checkpoint, lock = prepare_resume(
            Path(resume), resume_weights_only, os.environ.get("RANK", "0") == "0"
        )
        held.append(lock)
    try:
        if resume is not None:  # its checkpoint's state and run.json were checked by prepare_resume
            recipe = load_recipe(Path(resume) / "recipe.yaml")
        return _train_held(recipe, resume, checkpoint, held, callbacks, search_trial, prepared)
    finally:
        for lock in held:
            if lock is not None:
                lock.release()


def _train_held(
    recipe: Recipe | None,
    resume,
    checkpoint: Path | None,
    held: list,
    callbacks=(),
    search_trial=False,
    prepared: Prepared | None = None,
) -> dict:
    from hybridtune.train.engine import resolve_precision, training_arguments

    recipe = recipe or load_recipe()
    if recipe.ensemble is not None:  # api.train sends these to hybridtune.ensemble
        raise UserError(
            "ensemble", "an ensemble recipe in the one-run pipeline", "api.train (hybridtune.ensemble)"
        )
    if "mlflow" in recipe.train.report_to:  # not installed: exit 2 before the model loads
        from hybridtune.train.tracking import check

        check(recipe.train.report_to)
    if recipe.self_training is not None:  # api.train sends these to hybridtune.self_training
        raise UserError(
            "self_training",
            "a self-training recipe in the one-run pipeline",
            "api.train / hybridtune train (hybridtune.self_training)",
        )
    prep = prepared or prepare(recipe)
    run = Path(resume) if resume else rundir.run_dir_path(recipe.output.dir, recipe.output.name, recipe.name)
    args = training_arguments(recipe.train, recipe.output, run / "checkpoints")
    # under torchrun / accelerate launch every process runs this function; rank 0 names the run dir
    # (a timestamped name could differ between processes) and is the only one that writes
    distributed.setup(args)
    run = Path(distributed.broadcast(str(run)))
    args.output_dir = str(run / "checkpoints")
    main = distributed.is_main()
    if recipe.data.validation_shots == 0:  # few-shot without validation: fixed steps, the last model
        from hybridtune.train.engine import without_validation

        without_validation(args)
    for key, value in strategy.training_args(recipe).items():
        setattr(args, key, value)
    cache, datasets = None, prep.datasets
    if prep.trunk_depth:
        cache = trunk_cache.TrunkCache(
            prep.model,
            prep.anatomy,
            prep.plan.base_names,
            prep.tokenizer,
            resolve_precision(recipe.train.precision),
            recipe.train.eval_batch_size,
            max_length=recipe.data.max_length,
            scratch=run,
            stage_plan=prep.plan.stages,
        )
        datasets = cache.add_rows(prep.datasets)
    phase = {"step": "writing the run dir", "written": checkpoint is not None, "trainer": None, "held": held}
    try:
        summary = _train(
            recipe,
            prep,
            run,
            args,
            checkpoint,
            main,
            cache,
            datasets,
            phase,
            list(callbacks),
            search_trial,
        )
    except BaseException as e:
        if "mlflow" in recipe.train.report_to:  # its MLflow run ends now, marked, not FINISHED at exit
            from hybridtune.train.tracking import end_runs

            end_runs(phase["trainer"], "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        if isinstance(e, KeyboardInterrupt):
            raise  # interrupted, not failed: `hybridtune train --resume` goes on from the last checkpoint
        if not (main and phase["written"]):
            raise  # nothing of this run was written (e.g. its name was taken): the error says why
        step = phase["step"]
        trainer = phase["trainer"]
        if step == "training" and trainer is not None:
            step = f"training (step {trainer.state.global_step} of {trainer.state.max_steps})"
        last = rundir.last_checkpoint(run)
        rundir.mark_failed(run, step, one_line(e), last.name if last else None)
        if isinstance(e, UserError | TrainingStopped):
            raise  # their own one-line message and exit code (2 / 3)
        resume = f"; resume: hybridtune train --resume {run}" if last else ""
        raise RunFailed(f"{run}: {step} failed: {one_line(e)}{resume}") from e
    finally:
        if cache is not None:
            cache.close()
    if checkpoint is not None:  # a failed run resumed to its end is no longer failed
        (run / rundir.FAILED).unlink(missing_ok=True)
    return summary


def _train(
    recipe, prep, run, args, checkpoint, main, cache, datasets, phase, extra=(), search_trial=False
) -> dict:
    """`train` from the run dir on: run files, Trainer, final/, the test evaluation, report.json."""
    from hybridtune.train.engine import make_trainer, resolve_precision

    if main and checkpoint is None:
        phase["held"].append(rundir.new_run_dir(run))  # the run dir, and its lock (released by train)
        phase["written"] = True
        run_files.begin(
            run,
            recipe,
            prep.labels,
            prep.model,
            prep.params,
            trunk_cache={"used": cache is not None, "depth": prep.trunk_depth},
            **(prep.task.run_info(prep.tokenizer) if tasks.has(recipe.task, "run_info") else {}),
        )
    distributed.barrier()  # the run dir exists before any process trains
    if main:  # every check has passed (the run dir too): the run starts by saying what max_length cuts
        long_texts.announce(prep.truncation)

    stop_early = args.load_best_model_at_end  # the result is the best model (not AdaLoRA's final one)
    if search_trial:  # the best validation metric is Trainer's own bookkeeping, with or without saves:
        # a trial saves nothing and loads no best model, but stops where `hybridtune train` would
        args.save_strategy, args.load_best_model_at_end = "no", False
    trainer = make_trainer(
        prep.model,
        prep.tokenizer,
        datasets,
        recipe,
        args,
        run,
        prep.task.make_compute_metrics(prep.labels),
        plan=prep.plan,
        callbacks=[*strategy.callbacks(prep.model, recipe, prep.build), *extra],
        collator=prep.task.collator(prep.tokenizer),  # token classification pads its label lists too
        resume_from=checkpoint,
        trunk_cache=cache,
        progress=not search_trial,
        stop_early=stop_early,
    )
    resumed_epoch = rundir.read_json(checkpoint / "trainer_state.json")["epoch"] if checkpoint else 0.0
    zero_shot = None
    if (
        tasks.has(recipe.task, "zero_shot") and main and not search_trial
    ):  # what the prompt alone scores, before training: the lift
        if checkpoint is not None and (run / "zero_shot.json").is_file():  # measured when the run began
            zero_shot = rundir.read_json(run / "zero_shot.json")
        else:
            with autocast(recipe.train.precision):
                zero_shot = prep.task.zero_shot(prep.tokenizer, prep.datasets["test"], prep.labels)
            rundir.write_json(run / "zero_shot.json", zero_shot)
    started, record = time.perf_counter(), None
    if recipe.contrastive is not None and checkpoint is None:  # a resumed run is past this stage
        phase["step"] = "contrastive tuning"
        record = contrastive.run(prep, resolve_precision(recipe.train.precision))
        if main:
            rundir.write_json(run / "contrastive.json", record)
    phase.update(step="training", trainer=trainer)
    out = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    train_seconds = time.perf_counter() - started
    if recipe.contrastive is not None:  # then: none takes no Trainer step: validated once here
        contrastive.validate_untrained(recipe, trainer)
    model = trainer.model

    if not main:  # rank 0 saves and evaluates; the others are done
        return {"run_dir": str(run), "rank": distributed.rank()}
    test = None
    if not search_trial:
        phase["step"] = "saving final/"
        run_files.save_final(run, model, prep.tokenizer, recipe)
        phase["step"] = "the test evaluation"
        with autocast(recipe.train.precision):  # as Trainer's validation passes ran
            test = prep.task.report(model, prep.tokenizer, datasets["test"], prep.labels)  # cached too
        rundir.write_json(run / "eval.json", test)
    headline = tasks.spec(recipe.task).headline
    # with stages: the most that trains in any stage (the table in params.json has each stage)
    trainable = max([prep.params["trainable"], *(s["trainable"] for s in prep.params.get("stages", []))])
    tokens = run_files.train_tokens(prep.datasets["train"], trainer.state.epoch - resumed_epoch)
    summary = {
        "run_dir": str(run),
        "recipe": recipe.name,
        **({"test": {k: test[k] for k in headline}} if test is not None else {}),
        "warnings": test.get("warnings", []) if test is not None else [],  # tasks/baseline.py
        **({"zero_shot_test": {k: zero_shot[k] for k in headline}} if zero_shot else {}),
        # tokens per second: those the model read (padding excluded), of this process if resumed
        **run_files.training_summary(
            trainer,
            out,
            train_seconds,
            tokens,
            recipe.train.precision,
            {"trainable": trainable, "total": prep.params["total"]},
        ),
        "metric": headline[0],  # the task's main test metric
        "trunk_cache": cache.summary() if cache is not None else {"used": False, "depth": 0},
        "token_cache": prep.token_cache,
        "truncation": prep.truncation,
        # few-shot: the draw trained on (data/shots.py); contrastive: its stage, inside train_seconds
        **(
            {
                "few_shot": {
                    "shots": recipe.data.shots,
                    "draw": recipe.data.draw,
                    "train_rows": len(prep.splits.train),
                }
            }
            if recipe.data.shots
            else {}
        ),
        **({"contrastive": {k: v for k, v in record.items() if k != "losses"}} if record else {}),
        **({"added_train_rows": prep.build.added_rows} if prep.build.added_rows else {}),  # + labelled
    }
    phase["step"] = "writing report.json"
    rundir.write_json(run / "report.json", summary)
    return summary
