"""stages: gradual unfreezing, as a list of stages with their own trainable selection and lr scale.

    stages:                       # ULMFiT order: top down, one more group per epoch
      - {epochs: 1, train: [head]}       # a length in epochs, steps, or as a fraction of the run
      - {fraction: 0.25, train: [{top_k: 2}]}
      - {train: [all], lr_scale: 0.5}   # the last stage runs to the end of training

    stages: {cumulative: false, plan: [...]}   # each stage trains only its own selection

`train` takes the selectors of `freeze`. Stages govern the model's own parameters; what other parts
added (LoRA, adapters, a soft prompt) keeps training throughout. Cumulative (the default): a stage
trains its selection plus everything earlier stages trained. Parameters unfrozen by a stage start
with a clean optimizer state. Each change is logged to metrics.jsonl and shown on the console.
Gradual unfreezing: Howard & Ruder 2018 (ULMFiT, top-down); AHF's bottom-up order: the word level
first, then sentence, then paragraph.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn
from tqdm.auto import tqdm
from transformers import TrainerCallback

from hybridtune.errors import UserError
from hybridtune.strategy.freeze import parse_selector, select


class Stage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    epochs: float | None = Field(None, gt=0)
    steps: int | None = Field(None, ge=1)
    fraction: float | None = Field(None, gt=0, lt=1, description="share of the run's steps (any budget)")
    train: list[str | dict] = Field(..., description="selector of what this stage trains (as in freeze)")
    lr_scale: float = Field(1.0, gt=0)

    @field_validator("train", mode="before")
    @classmethod
    def _selector(cls, value: Any) -> Any:
        return parse_selector(value)

    @model_validator(mode="after")
    def _one_length(self) -> Stage:
        if sum(x is not None for x in (self.epochs, self.steps, self.fraction)) > 1:
            raise ValueError("give one of `epochs`, `steps` or `fraction`")
        return self


class StagesConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cumulative: bool = True
    plan: list[Stage] = Field(..., min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _from_list(cls, value: Any) -> Any:
        return {"plan": value} if isinstance(value, list) else value

    @model_validator(mode="after")
    def _lengths(self) -> StagesConfig:
        for i, stage in enumerate(self.plan[:-1]):
            if stage.epochs is None and stage.steps is None and stage.fraction is None:
                raise ValueError(
                    f"stage {i} needs `epochs`, `steps` or `fraction` (only the last stage may run to the end)"
                )
        return self


@dataclass
class StagePlan:
    starts: list[int]  # optimizer step at which each stage begins
    scales: list[float]
    trainable: list[set[str]]  # names of the model's own parameters that train in each stage

    @property
    def ever_trainable(self) -> set[str]:
        return set().union(*self.trainable)


def plan(
    model: nn.Module,
    config: StagesConfig,
    anatomy,
    base_names: set[str],
    steps_per_epoch: int,
    total_steps: int,
) -> StagePlan:
    starts, scales, trainable = [], [], []
    step, so_far = 0, set()
    for i, stage in enumerate(config.plan):
        picked = select(model, anatomy, stage.train, f"stages.plan[{i}].train") & base_names
        so_far = so_far | picked if config.cumulative else picked
        if step >= total_steps:
            raise UserError(
                f"stages.plan[{i}]",
                f"a stage starting at step {step}",
                f"stages that start before the run ends (step {total_steps})",
            )
        starts.append(step)
        scales.append(stage.lr_scale)
        trainable.append(set(so_far))
        if stage.steps is not None:
            length = stage.steps
        elif stage.fraction is not None:
            length = max(round(stage.fraction * total_steps), 1)
        else:
            length = math.ceil((stage.epochs or 0) * steps_per_epoch)
        step += length
    return StagePlan(starts, scales, trainable)


def enter_stage(model: nn.Module, stage_plan: StagePlan, k: int, base_names: set[str], optimizer=None) -> int:
    """Set requires_grad of the model's own parameters for stage k; newly unfrozen ones lose any
    optimizer state. Returns how many elements train in this stage (own + added parameters)."""
    wanted = stage_plan.trainable[k]
    state = getattr(optimizer, "state", None) if optimizer is not None else None
    for name, p in model.named_parameters():
        if name not in base_names:
            continue
        train = name in wanted
        if train and not p.requires_grad and state is not None:
            state.pop(p, None)  # clean optimizer state for what this stage unfreezes
        p.requires_grad_(train)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class StageCallback(TrainerCallback):
    """Switches stages at their first optimizer step, logs each switch."""

    def __init__(self, stage_plan: StagePlan, base_names: set[str], log_path=None):
        self.plan, self.base_names, self.log_path = stage_plan, base_names, log_path
        self.current = -1

    def _stage_at(self, step: int) -> int:
        return max(i for i, s in enumerate(self.plan.starts) if s <= step)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        """On resume, the stage the checkpoint was taken in, without touching the optimizer state
        it restored; a stage that begins at the checkpoint's step is entered as usual, next."""
        if state.global_step > 0:
            self.current = self._stage_at(state.global_step - 1)
            enter_stage(model, self.plan, self.current, self.base_names)

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        from hybridtune.durable import maybe_kill

        k = self._stage_at(state.global_step)
        if k == self.current:
            return
        self.current = k
        n = enter_stage(model, self.plan, k, self.base_names, optimizer)
        maybe_kill("stage", k)  # test hook: a kill right at a stage change
        record = {
            "step": state.global_step,
            "epoch": round(state.epoch or 0.0, 4),
            "stage": k,
            "trainable": n,
            "lr_scale": self.plan.scales[k],
        }
        if state.is_world_process_zero:
            tqdm.write(
                f"stage {k} from step {state.global_step}: {n:,} parameters train, lr x {self.plan.scales[k]:g}"
            )
            if self.log_path is not None:
                with open(self.log_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
