"""lr: a learning rate per parameter, expressed against the model anatomy.

    lr:
      head: 1.0e-3             # the head's own lr (default: train.lr)
      layer_decay: 0.8         # LLRD: lr x decay^(distance from the top); Clark et al. 2020 (ELECTRA)
      # or
      levels: 3                # AHF levels: bottom / middle / top thirds of the blocks = word / sentence /
      level_scale: [0.15, 0.38, 1.0]   # paragraph levels, each with its own lr (or level_lr: [...])
      groups:                  # explicit groups win over layer_decay / levels for the parameters they claim
        - {blocks: [0, 1], lr: 1.0e-5}
        - {match: "LayerNorm", lr_scale: 2.0}

Distance from the top: the head and final norm are at 0, block L-1 at 1, ..., embeddings at L + 1.
Default level scales follow ULMFiT's discriminative fine-tuning, lr(l-1) = lr(l) / 2.6 (Howard & Ruder
2018). Biases and norms get no weight decay (as in BERT and transformers.Trainer).
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from hybridtune.errors import UserError
from hybridtune.model.anatomy import Anatomy

ULMFIT_FACTOR = 2.6


class Group(BaseModel):
    model_config = ConfigDict(extra="forbid")

    blocks: list[int] | None = Field(None, description="block indices")
    match: str | None = Field(None, description="regular expression on parameter names")
    slots: list[str] | None = Field(
        None, description="anatomy slots: embeddings, block.<i>, final_norm, head"
    )
    lr: float | None = Field(None, gt=0)
    lr_scale: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _one_each(self) -> Group:
        if sum(x is not None for x in (self.blocks, self.match, self.slots)) != 1:
            raise ValueError("give exactly one of `blocks`, `match` or `slots`")
        if (self.lr is None) == (self.lr_scale is None):
            raise ValueError("give exactly one of `lr` or `lr_scale`")
        if self.match is not None:
            try:
                re.compile(self.match)
            except re.error as e:
                raise ValueError(f"match {self.match!r} is not a regular expression ({e})") from None
        return self


class LrConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    head: float | None = Field(None, gt=0, description="lr of the head (default: train.lr)")
    layer_decay: float | None = Field(None, gt=0, le=1, description="LLRD factor per block from the top")
    levels: int | None = Field(None, ge=2, description="AHF: split the blocks into this many levels")
    level_lr: list[float] | None = Field(None, description="one lr per level, bottom to top")
    level_scale: list[float] | None = Field(None, description="one lr scale per level, bottom to top")
    groups: list[Group] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> LrConfig:
        if self.layer_decay is not None and self.levels is not None:
            raise ValueError("give `layer_decay` or `levels`, not both")
        given = [k for k in ("level_lr", "level_scale") if getattr(self, k) is not None]
        if given and self.levels is None:
            raise ValueError(f"`{given[0]}` needs `levels`")
        if len(given) > 1:
            raise ValueError("give `level_lr` or `level_scale`, not both")
        for key in given:
            values = getattr(self, key)
            if len(values) != self.levels or any(v <= 0 for v in values):
                raise ValueError(f"`{key}` needs {self.levels} positive values (one per level), got {values}")
        return self


def _depth(slot: str, anatomy: Anatomy) -> int:
    """Distance from the top: head/final norm 0, block L-1 1, ..., embeddings L+1."""
    if slot.startswith("block."):
        return anatomy.num_blocks - int(slot.split(".")[1])
    if slot == "embeddings":
        return anatomy.num_blocks + 1
    return 0


def _level(slot: str, anatomy: Anatomy, levels: int) -> int:
    if slot.startswith("block."):
        return int(slot.split(".")[1]) * levels // anatomy.num_blocks
    return 0 if slot == "embeddings" else levels - 1


def lr_per_parameter(
    model: nn.Module, config: LrConfig | None, anatomy: Anatomy, base_lr: float
) -> dict[str, tuple[float, str]]:
    """Parameter name -> (lr, group label). Explicit groups must not claim the same parameter twice."""
    out: dict[str, tuple[float, str]] = {}
    claimed: dict[str, int] = {}
    for name, _ in model.named_parameters():
        slot = anatomy.slot_of(name)
        lr, label = base_lr, "base"
        if config is not None:
            if config.layer_decay is not None:
                depth = _depth(slot, anatomy)
                lr, label = base_lr * config.layer_decay**depth, f"decay^{depth}"
            elif config.levels is not None:
                level = _level(slot, anatomy, config.levels)
                if config.level_lr is not None:
                    lr = config.level_lr[level]
                else:
                    scales = config.level_scale or [
                        ULMFIT_FACTOR ** -(config.levels - 1 - k) for k in range(config.levels)
                    ]
                    lr = base_lr * scales[level]
                label = f"level {level}"
            if config.head is not None and slot == "head":
                lr, label = config.head, "head"
            for i, group in enumerate(config.groups):
                if _in_group(group, name, slot, anatomy, f"lr.groups[{i}]"):
                    if name in claimed:
                        raise UserError(
                            f"lr.groups[{i}]",
                            f"parameter '{name}' already claimed by lr.groups[{claimed[name]}]",
                            "groups that claim disjoint parameters",
                        )
                    claimed[name] = i
                    lr = group.lr if group.lr is not None else base_lr * group.lr_scale
                    label = f"group {i}"
        out[name] = (lr, label)
    if config is not None:
        for i in range(len(config.groups)):
            if i not in claimed.values():
                raise UserError(
                    f"lr.groups[{i}]",
                    "a group that matches no parameter",
                    "a group that claims parameters (see `hybridtune params`)",
                )
    return out


def _in_group(group: Group, name: str, slot: str, anatomy: Anatomy, where: str) -> bool:
    if group.blocks is not None:
        bad = [b for b in group.blocks if not 0 <= b < anatomy.num_blocks]
        if bad:
            raise UserError(
                f"{where}.blocks",
                str(bad[0]),
                f"a block index in 0..{anatomy.num_blocks - 1} (the model has {anatomy.num_blocks} blocks)",
            )
        return slot in {f"block.{b}" for b in group.blocks}
    if group.slots is not None:
        unknown = [s for s in group.slots if s not in anatomy.slots]
        if unknown:
            raise UserError(f"{where}.slots", repr(unknown[0]), "one of " + ", ".join(anatomy.slots))
        return slot in group.slots
    return re.search(group.match, name) is not None


def param_groups(
    model: nn.Module,
    lrs: dict[str, tuple[float, str]],
    no_decay: set[str],
    weight_decay: float,
    include: set[str],
) -> list[dict[str, Any]]:
    """Optimizer param groups, one per (lr, weight decay): parameters in `include` only."""
    groups: dict[tuple[float, float], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if name not in include:
            continue
        lr, label = lrs[name]
        wd = 0.0 if name in no_decay else weight_decay
        group = groups.setdefault((lr, wd), {"params": [], "lr": lr, "weight_decay": wd, "name": label})
        group["params"].append(p)
    return list(groups.values())
