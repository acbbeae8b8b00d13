"""The training plan: what the engine needs from the recipe once the model is built.

LR plan (a learning rate per parameter, from `lr`) + stage plan (what trains when, from `stages`) +
the schedule (from `schedule`), over a known number of optimizer steps. Everything here is checked
before training starts, so a stage naming block 9 of a 6-block model fails before the run dir exists.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from hybridtune.strategy import lr as lr_part
from hybridtune.strategy import stages as stages_part
from hybridtune.strategy.schedule import lr_lambda


@dataclass
class Plan:
    steps_per_epoch: int
    total_steps: int
    lrs: dict[str, tuple[float, str]]  # parameter name -> (lr, group label)
    base_names: set[str]  # the model's own parameters (not added by a part)
    stages: stages_part.StagePlan | None
    schedule: object  # ScheduleConfig

    def optimizer_names(self, model: nn.Module) -> set[str]:
        """Parameters the optimizer must hold: trainable now, or unfrozen by a later stage."""
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        return names | (self.stages.ever_trainable if self.stages else set())

    def stage_summary(self, model: nn.Module) -> list[dict]:
        """Per stage: first step, lr scale, trainable elements (the model's own + what parts added)."""
        sizes = {n: p.numel() for n, p in model.named_parameters()}
        added = sum(
            p.numel() for n, p in model.named_parameters() if n not in self.base_names and p.requires_grad
        )
        return [
            {
                "stage": k,
                "start_step": start,
                "lr_scale": scale,
                "trainable": added + sum(sizes[n] for n in names),
            }
            for k, (start, scale, names) in enumerate(
                zip(self.stages.starts, self.stages.scales, self.stages.trainable, strict=True)
            )
        ]

    def lr_lambda(self):
        bounds = self.stages.starts if self.stages else []
        scales = self.stages.scales if self.stages else []
        return lr_lambda(self.schedule, self.total_steps, bounds, scales)


def steps_per_epoch(n_train: int, batch_size: int, grad_accum: int, world_size: int = 1) -> int:
    """Optimizer steps per epoch, as transformers.Trainer counts them (no dropped last batch)."""
    batches = math.ceil(n_train / (batch_size * world_size))
    return max(math.ceil(batches / grad_accum), 1)


def planned_steps(train, n_train: int, world_size: int = 1) -> int:
    """The optimizer steps the run will take: train.max_steps, else epochs x steps per epoch."""
    return train.max_steps or math.ceil(
        train.epochs * steps_per_epoch(n_train, train.batch_size, train.grad_accum, world_size)
    )


def eval_interval(steps: int, evaluations: int) -> int:
    """Steps between validations so that a run of `steps` validates `evaluations` times, the last at
    its end (Trainer validates a last time at the end when the last step is not on the interval):
    642 steps, 4 evaluations -> every 161 (161, 322, 483, 642), not every 160 (160 ... 640 and 642,
    a fifth validation two steps after the fourth). Where no interval gives exactly that many
    (few steps), more rather than fewer."""
    every = math.ceil(steps / evaluations)
    return every if math.ceil(steps / every) == evaluations else max(1, steps // evaluations)


def make_plan(
    model: nn.Module, recipe, anatomy, base_ids: set[int], n_train: int, world_size: int = 1
) -> Plan:
    train = recipe.train
    per_epoch = steps_per_epoch(n_train, train.batch_size, train.grad_accum, world_size)
    total = planned_steps(train, n_train, world_size)
    base_names = {n for n, p in model.named_parameters() if id(p) in base_ids}
    lrs = lr_part.lr_per_parameter(model, recipe.lr, anatomy, train.lr)
    stage_plan = None
    if recipe.stages is not None:
        stage_plan = stages_part.plan(model, recipe.stages, anatomy, base_names, per_epoch, total)
        stages_part.enter_stage(model, stage_plan, 0, base_names)  # the model starts in stage 0
    return Plan(per_epoch, total, lrs, base_names, stage_plan, recipe.schedule)
