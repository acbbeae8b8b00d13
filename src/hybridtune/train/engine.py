"""The engine: transformers.Trainer, configured from the recipe, plus small callbacks.

The loop, the optimizer (AdamW, no weight decay on biases and norms), warmup + decay, gradient
accumulation, bf16 autocast, checkpointing and early stopping are all Trainer's; hybridtune only
translates the recipe into TrainingArguments and writes `metrics.jsonl`.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import (
    DataCollatorWithPadding,
    EarlyStoppingCallback,
    PreTrainedModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer_pt_utils import LengthGroupedSampler

from hybridtune import strategy, tasks
from hybridtune.data.long_texts import DOC
from hybridtune.errors import TrainingStopped
from hybridtune.rundir import DISK_ERRORS, disk_error
from hybridtune.train.checkpoints import KILL_ENV, KillAt, checkpoints, save_checkpoint
from hybridtune.train.eval_order import LengthOrder
from hybridtune.train.precision import resolve_precision
from hybridtune.train.resume import EpochSeededLengthGroupedSampler, RestoreLoggingWindow


class MetricsJsonl(TrainerCallback):
    """Every log line Trainer emits (train loss, lr, eval metrics) as one JSON object per line."""

    def __init__(self, path: Path):
        self.path = path
        self.start = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = {
            "step": state.global_step,
            "epoch": round(state.epoch or 0.0, 4),
            "time_s": round(time.perf_counter() - self.start, 3),
            **logs,
        }
        try:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            if e.errno in DISK_ERRORS:  # a line cut short is dropped on resume (train/checkpoints.py)
                raise disk_error(e, self.path) from None
            raise


class HybridTrainer(Trainer):
    """Trainer with the recipe's plan: a param group per learning rate (layer-wise lrs, head lr,
    explicit groups; no weight decay on biases and norms) and a LambdaLR of the schedule times the
    stage lr scales. Parameters a later stage unfreezes are in the optimizer from the start; AdamW
    skips them while they have no gradient, so they start with a clean state."""

    def __init__(self, *args, plan=None, on_nan: str = "stop", keep_columns=(), loss_parts=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.plan = plan
        self.on_nan = on_nan
        self.skipped_batches = 0  # batches skipped for a NaN / inf loss (train.on_nan=skip)
        self.keep_columns = list(keep_columns)  # dataset columns for a hook, not the forward's signature
        # (part, config) of the parts that change the training loss (strategy.loss_parts), and the
        # running sums of the loss's addends since the last log line
        self.loss_parts = list(loss_parts)
        self.loss_sums: dict[str, float] = {}
        self.loss_count = 0

    def _set_signature_columns_if_needed(self) -> None:
        """Trainer keeps the dataset columns the model's forward names; also keep `keep_columns`
        (the trunk cache's row index, which its forward pre-hook takes out) and a chunked split's
        `doc` (data/long_texts.py), which `compute_loss` / `prediction_step` take out."""
        super()._set_signature_columns_if_needed()
        keep = [*self.keep_columns, DOC]
        self._signature_columns += [c for c in keep if c not in self._signature_columns]

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Trainer's, with a chunked split's window documents handed to compute_metrics next to the
        labels, as (labels, docs): validation pools the windows of a document, in whatever order the
        eval sampler (length-grouped) and the processes gathered them."""
        docs = inputs.pop(DOC, None)
        loss, logits, labels = super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        if docs is not None and labels is not None:
            labels = (labels, docs.to(labels.device))
        return loss, logits, labels

    def _get_train_sampler(self, train_dataset=None):
        """Trainer's sampler; its length-grouped one drawn per (seed, epoch) (train/resume.py)."""
        sampler = super()._get_train_sampler(train_dataset)
        if type(sampler) is LengthGroupedSampler:
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            return EpochSeededLengthGroupedSampler(sampler.batch_size, sampler.lengths, seed)
        return sampler

    def _get_eval_sampler(self, eval_dataset):
        """Trainer's; its length-grouped one sorted whole (train/eval_order.py: it grouped nothing)."""
        sampler = super()._get_eval_sampler(eval_dataset)
        return LengthOrder(sampler.lengths) if type(sampler) is LengthGroupedSampler else sampler

    def _save_checkpoint(self, model, trial):
        """Atomic: written to a temp dir, renamed when complete (train/checkpoints.py). Distributed
        runs and hyperparameter searches keep Trainer's own in-place write."""
        if trial is not None or self.args.world_size > 1:
            return super()._save_checkpoint(model, trial)
        save_checkpoint(self, model)

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            from hybridtune.strategy.lr import param_groups

            model = self.model if model is None else model
            decay = set(self.get_decay_parameter_names(model))
            no_decay = {n for n, _ in model.named_parameters() if n not in decay}
            groups = param_groups(
                model, self.plan.lrs, no_decay, self.args.weight_decay, self.plan.optimizer_names(model)
            )
            optimizer_cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
            self.optimizer = optimizer_cls(groups, **kwargs)
        return self.optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The task's loss, plus in training the terms the recipe's parts add (`parts_loss`); a
        training loss is checked before its backward: a NaN / inf stops the run (train.on_nan=stop)
        before it reaches the weights, or its batch is skipped (skip)."""
        inputs.pop(DOC, None)  # a training window's document: the model never sees it
        if self.loss_parts and model.training:
            out = self.parts_loss(model, inputs, return_outputs, num_items_in_batch)
        else:
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = out[0] if return_outputs else out
        if not model.training or bool(torch.isfinite(loss.detach()).all()):
            return out
        loss = nonfinite_loss(self, loss)
        return (loss, out[1]) if return_outputs else loss

    def parts_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """task_weight × the task loss + Σ weight × term over the parts' loss terms (strategy/base.py),
        each addend's running sum kept for the log. The engine knows no part: it asks each."""
        task_loss, outputs = super().compute_loss(
            model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        task_weight, terms = 1.0, []
        for part, config in self.loss_parts:
            if part.task_weight is not None:
                task_weight *= part.task_weight(config)
            if part.loss_terms is not None:
                terms += part.loss_terms(config, model, inputs, task_loss, outputs)
        loss = task_loss if task_weight == 1 else task_weight * task_loss
        for term in terms:
            loss = loss + term.weight * term.value
        for name, value in [*((f"loss_{t.name}", t.value) for t in terms), ("loss_task", task_loss)]:
            self.loss_sums[name] = self.loss_sums.get(name, 0.0) + float(value.detach())
        self.loss_count += 1
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict, *args, **kwargs) -> None:
        """Trainer's log, plus the means of the loss's addends since the last log (`loss_<term>`,
        `loss_task`: Trainer's `loss` is a mean over the same steps) and the count of skipped
        (non-finite) batches next to a training `loss`."""
        if self.loss_count and "loss" in logs:
            logs.update({k: round(v / self.loss_count, 4) for k, v in self.loss_sums.items()})
            self.loss_sums, self.loss_count = dict.fromkeys(self.loss_sums, 0.0), 0
        if self.skipped_batches and "loss" in logs:
            logs = {**logs, "skipped_batches": self.skipped_batches}
        super().log(logs, *args, **kwargs)

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None:
            optimizer = optimizer or self.optimizer
            fn = self.plan.lr_lambda()
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer, [fn] * len(optimizer.param_groups)
            )
            self._created_lr_scheduler = True
        return self.lr_scheduler


def nonfinite_loss(trainer: HybridTrainer, loss: torch.Tensor) -> torch.Tensor:
    """What a NaN / inf training loss becomes: a stop with the last good checkpoint named, or
    (on_nan=skip) a zero loss with no graph, whose backward leaves every gradient untouched."""
    step = trainer.state.global_step + 1
    if trainer.on_nan == "skip":
        trainer.skipped_batches += 1
        tqdm.write(f"step {step}: {loss.item()} loss, batch skipped (train.on_nan=skip)")
        return loss.new_zeros((), requires_grad=True)
    saved = checkpoints(Path(trainer.args.output_dir))
    kept = f"the last checkpoint is {saved[-1]}" if saved else "no checkpoint was written yet"
    raise TrainingStopped(
        f"training stopped at step {step}: the loss is {loss.item()}; {kept} "
        "(lower train.lr, or set train.on_nan=skip to skip such batches)"
    )


def tensorboard(log_dir: Path, purge_step: int | None = None) -> TrainerCallback:
    """transformers' TensorBoard callback, writing event files into the run dir (in transformers 5
    its own default is <output_dir>/runs/<date>, i.e. inside checkpoints/). A resumed run purges
    the events after its checkpoint's step (`purge_step`), as metrics.jsonl is cut back."""
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    return TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(log_dir), purge_step=purge_step))


class Progress(ProgressCallback):
    """Trainer's progress bar, with the train loss on the bar and one short line per evaluation
    (the full log goes to metrics.jsonl) instead of a dict per logging step: the loss and the task's
    `progress` metrics (tasks/__init__.py), a share in % when better higher."""

    def __init__(self, shown: tuple[str, ...] = ()):
        super().__init__()
        self.shown = shown

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or self.training_bar is None or not logs:
            return
        if "loss" in logs:
            self.training_bar.set_postfix(loss=f"{logs['loss']:.4f}", refresh=False)
        evals = {k[5:]: v for k, v in logs.items() if k.startswith("eval_") and isinstance(v, float)}
        if "loss" in evals:
            shown = [
                f"{k} {100 * v:.2f} %" if tasks.higher_is_better(k) else f"{k} {v:.4f}"
                for k, v in evals.items()
                if k in self.shown
            ]
            self.training_bar.write(
                f"epoch {state.epoch:.2f} · validation " + " · ".join([*shown, f"loss {evals['loss']:.4f}"])
            )


def training_arguments(train, output, checkpoints_dir: Path) -> TrainingArguments:
    every = (
        {
            "eval_strategy": "steps",
            "eval_steps": train.eval_steps,
            "save_strategy": "steps",
            "save_steps": train.eval_steps,
        }
        if train.eval_steps
        else {"eval_strategy": "epoch", "save_strategy": "epoch"}
    )
    metric = train.early_stopping.metric
    return TrainingArguments(
        output_dir=str(checkpoints_dir),
        per_device_train_batch_size=train.batch_size,
        per_device_eval_batch_size=train.eval_batch_size,
        gradient_accumulation_steps=train.grad_accum,
        num_train_epochs=train.epochs,
        max_steps=train.max_steps or -1,  # the plan counts steps the same way (strategy/plan.py)
        learning_rate=train.lr,
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        bf16=resolve_precision(train.precision) == "bf16",
        use_cpu=not torch.cuda.is_available(),
        seed=train.seed,
        data_seed=train.seed,
        logging_steps=train.logging_steps,
        save_total_limit=output.keep_checkpoints,
        load_best_model_at_end=True,
        metric_for_best_model=metric,
        greater_is_better=tasks.higher_is_better(metric),
        restore_callback_states_from_checkpoint=True,  # early stopping's patience count on resume
        train_sampling_strategy="group_by_length" if train.group_by_length else "random",
        torch_compile=train.compile,
        report_to="none",  # TensorBoard (and MLflow: train.report_to) are added in make_trainer
        disable_tqdm=False,
        dataloader_num_workers=0,
        # Trainer multiplies the loss by the number of processes for models whose forward takes
        # **kwargs, expecting them to divide by the global token count; the classification heads take
        # **kwargs but average per batch, so under DDP their loss (and gradient) would be N times too
        # big. A task whose model does divide (causal LM) may turn it back on.
        average_tokens_across_devices=False,
        **every,
        **checkpointing(train.gradient_checkpointing),
    )


def checkpointing(on: bool) -> dict:
    """TrainingArguments for gradient checkpointing (Chen et al. 2016, https://arxiv.org/abs/1604.06174):
    each block keeps its input only and is recomputed in the backward pass. Non-reentrant
    (torch.utils.checkpoint's recommended mode): gradients reach parameters whose block input needs
    no grad (a frozen trunk under LoRA), and the recomputation replays dropout's RNG. transformers 5
    renamed the argument `activation_checkpointing`; `gradient_checkpointing` is its deprecated alias."""
    if not on:
        return {}
    fields = TrainingArguments.__dataclass_fields__
    name = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    return {name: True, f"{name}_kwargs": {"use_reentrant": False}}


class NoInputGrads(TrainerCallback):
    """transformers' checkpointing switch also makes the embeddings' output require grad (a forward
    hook, `enable_input_require_grads`), which only reentrant checkpointing needs: with it the
    backward runs down through every frozen block, and the hook on the embeddings rules the trunk
    cache out. Non-reentrant checkpointing (ours) reaches the trained parameters without it."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        for module in model.modules() if model is not None else ():
            if isinstance(module, PreTrainedModel):
                module.disable_input_require_grads()


def without_validation(args: TrainingArguments) -> TrainingArguments:
    """No validation split (few-shot, data.validation_shots: 0): no evaluation, no early stopping,
    the model of the last step is the final one; checkpoints are still written (resume)."""
    from transformers.trainer_utils import IntervalStrategy

    args.eval_strategy = IntervalStrategy.NO
    args.load_best_model_at_end = False
    args.metric_for_best_model = None
    return args


def make_trainer(
    model,
    tokenizer,
    datasets: dict,
    recipe,
    args: TrainingArguments,
    run_dir: Path,
    compute_metrics,
    plan,
    callbacks: list[TrainerCallback] = (),
    collator=None,
    resume_from: Path | None = None,
    trunk_cache=None,
    progress: bool = True,
    stop_early: bool | None = None,
) -> Trainer:
    """The run's HybridTrainer with its callbacks; `trunk_cache` (train/trunk_cache.py), when given,
    keeps its row column in the batches and follows the frozen depth (after the stage switch);
    `resume_from`: the checkpoint a resumed run goes on from (its logging window, TensorBoard purge);
    `stop_early`: whether the recipe's early stopping applies (default: where the best model is loaded
    at the end; a search trial loads none, run.py, but stops where the recipe alone would)."""
    from hybridtune.rundir import step_of
    from hybridtune.strategy.stages import StageCallback
    from hybridtune.train.trunk_cache import ROW, TrunkCacheCallback

    callbacks = [MetricsJsonl(run_dir / "metrics.jsonl"), *callbacks]
    if args.gradient_checkpointing:  # first: the trunk cache looks for hooks on the embeddings
        callbacks.insert(0, NoInputGrads())
    if args.process_index == 0:  # one event file per run, however many processes train
        purge = step_of(resume_from) if resume_from is not None else None
        callbacks.append(tensorboard(run_dir / "tensorboard", purge))
        if "mlflow" in recipe.train.report_to:
            from hybridtune.train.tracking import MLflowTracking, run_callback

            # a search gives its trials a callback of their own (the search's experiment, tags)
            if not any(isinstance(c, MLflowTracking) for c in callbacks):
                callbacks.append(run_callback(recipe, run_dir))
    if plan.stages is not None:
        callbacks.append(StageCallback(plan.stages, plan.base_names, run_dir / "metrics.jsonl"))
    if stop_early is None:
        stop_early = args.load_best_model_at_end  # not without validation, not for a final-model result
    if recipe.train.early_stopping.patience and stop_early:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=recipe.train.early_stopping.patience))
    if os.environ.get(KILL_ENV):  # the test hook, after StageCallback (checkpoints.py)
        callbacks.append(KillAt(plan.stages.starts if plan.stages is not None else None))
    trainer = HybridTrainer(
        plan=plan,
        on_nan=recipe.train.on_nan,
        model=model,
        args=args,
        train_dataset=datasets["train"],
        eval_dataset=datasets.get("validation"),  # none: few-shot without validation (data/shots.py)
        data_collator=collator or DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer,
        compute_metrics=compute_metrics,
        callbacks=callbacks,
        keep_columns=[ROW] if trunk_cache is not None else [],
        loss_parts=strategy.loss_parts(recipe),
    )
    # Trainer reads "the forward takes **kwargs" as "its loss divides by num_items_in_batch" and then
    # skips its own division by the accumulation steps; a classification head's loss is a per-batch
    # mean, so with grad_accum N the step's loss (and gradient) was N times too big
    if not tasks.spec(recipe.task).loss_over_tokens:
        trainer.model_accepts_loss_kwargs = False
    if resume_from is not None:
        trainer.add_callback(RestoreLoggingWindow(trainer, resume_from))
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    if progress:  # a search trial prints no bar: the search prints one line per trial
        trainer.add_callback(Progress(tasks.spec(recipe.task).progress))
    if trunk_cache is not None:  # last: a stage switch has set requires_grad before it looks
        trainer.add_callback(TrunkCacheCallback(trunk_cache))
    return trainer
