"""head_l2: a toy loss part, the whole of it in this one file (tests/test_part_contract.py registers it).

    head_l2:
      alpha: 0.01      # loss = task loss + alpha * Σ w² over the head's weight matrices

An L2 penalty on the classification head only (the body keeps the optimizer's own weight decay).
It changes the loss and nothing else: `apply` notes which parameters are the head's, `loss_terms`
adds alpha · Σ w², `check` refuses a task without a classification head. No engine, trunk cache
or recipe code names it: the engine sums whatever loss terms the configured parts return, and the
recipe gets a `head_l2:` section from `config` when the part is registered.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from hybridtune.model.anatomy import unwrap
from hybridtune.strategy.base import LossTerm, Part

ATTR = "head_l2_weights"  # the head's weight matrices, a plain list on the model (no state-dict entry)


class HeadL2Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    alpha: float = Field(0.01, ge=0, description="weight of Σ w² over the head's weight matrices")


def apply(model: nn.Module, config: HeadL2Config, build) -> nn.Module:
    weights = [p for n, p in model.named_parameters() if build.anatomy.slot_of(n) == "head" and p.ndim == 2]
    setattr(unwrap(model), ATTR, weights)
    return model


def loss_terms(
    config: HeadL2Config, model: nn.Module, inputs: dict, task_loss: torch.Tensor, outputs
) -> list[LossTerm]:
    weights = getattr(unwrap(getattr(model, "module", model)), ATTR)
    return [LossTerm("head_l2", sum((w.float() ** 2).sum() for w in weights), config.alpha)]


def check(config: HeadL2Config, recipe) -> None:
    if recipe.task not in ("classification", "token_classification"):
        raise ValueError(
            f"head_l2: found it with task {recipe.task}; expected a task with a classification head"
        )


PART = Part(
    key="head_l2",
    config=HeadL2Config,
    apply=apply,
    check=check,
    loss_terms=loss_terms,
    summary="an L2 penalty alpha · Σ w² on the head's weights (a toy loss part)",
)
