"""lr: a learning rate per parameter, expressed against the model anatomy.

    lr:
      head: 1.0e-3             # the head's own lr (default: train.lr)
      layer_decay: 0.8         # LLRD: lr x decay^(distance from the top); Clark et al. 2020 (ELECTRA)
      decay_depth: 6           #   ... stated for 6 blocks: the same top-to-bottom decay at any depth
      # or
      layer_decay: 0.385       # decay per level: each level 0.385x the one above (ULMFiT's layer groups)
      decay_per: level
      levels: 3
      # or
      levels: 3                # bottom / middle / top thirds of the blocks (model/depth.py), each with
      level_scale: [0.15, 0.38, 1.0]   # its own lr (or level_lr: [...])
      groups:                  # explicit groups win over layer_decay / levels for the parameters they claim
        - {blocks: [0, 1], lr: 1.0e-5}
        - {top_frac: 0.333, lr_scale: 2.0}
        - {match: "LayerNorm", lr_scale: 2.0}

Distance from the top (per block): the head and final norm are at 0, block L-1 at 1, ..., embeddings at
L + 1. Per level, each level counts as one block. With `decay_depth: R`, the top block is at 1 and the
bottom block at R whatever the depth L, the blocks between evenly spaced (exponent 1 + (L-1-i)(R-1)/(L-1)),
embeddings at R + 1: on R blocks this is plain per-block LLRD. Clark et al. 2020 use 0.8 for the 12-layer
ELECTRA-Base and 0.9 for the 24-layer Large: nearly the same decay over the whole depth (0.8^11 = 0.086,
0.9^23 = 0.089), which is what `decay_depth` keeps. Default level scales follow ULMFiT's discriminative
fine-tuning, lr(l-1) = lr(l) / 2.6 (Howard & Ruder 2018). Biases and norms get no weight decay (as in
BERT and transformers.Trainer).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from torch import nn

from hybridtune.errors import UserError
from hybridtune.model.anatomy import Anatomy
from hybridtune.model.depth import level_of_block
from hybridtune.strategy.freeze import atom_blocks

ULMFIT_FACTOR = 2.6


class Group(BaseModel):
    model_config = ConfigDict(extra="forbid")

    blocks: list[int] | None = Field(None, description="block indices")
    top_frac: float | None = Field(None, gt=0, le=1, description="the top fraction of the blocks")
    bottom_frac: float | None = Field(None, gt=0, le=1, description="the bottom fraction of the blocks")
    levels: int | None = Field(None, ge=1, description="with `level`: split the blocks into this many levels")
    level: int | list[int] | None = Field(None, description="level(s) of `levels`, 0 = bottom")
    match: str | None = Field(None, description="regular expression on parameter names")
    slots: list[str] | None = Field(
        None, description="anatomy slots: `embeddings`, `block.<i>`, `final_norm`, `head`"
    )
    lr: float | None = Field(None, gt=0, description="the group's lr")
    lr_scale: float | None = Field(
        None, gt=0, description="the group's lr as a scale of `train.lr` (or `lr`)"
    )

    @field_validator("level")
    @classmethod
    def _level_below_levels(cls, value: int | list[int] | None, info: ValidationInfo) -> Any:
        levels = info.data.get("levels")
        ks = value if isinstance(value, list) else [value]
        if value is not None and levels is not None:
            bad = [k for k in ks if not -levels <= k < levels]
            if bad or not ks:
                raise ValueError(f"a level in 0..{levels - 1} (negative: from the top), got {bad or value}")
        return value

    @model_validator(mode="after")
    def _one_each(self) -> Group:
        which = (self.blocks, self.top_frac, self.bottom_frac, self.level, self.match, self.slots)
        if sum(x is not None for x in which) != 1:
            raise ValueError(
                "give exactly one of `blocks`, `top_frac`, `bottom_frac`, `level` (with `levels`), "
                "`match` or `slots`"
            )
        if (self.level is None) != (self.levels is None):
            raise ValueError("`level` and `levels` go together")
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

    head: float | None = Field(None, gt=0, description="the head's lr (default: `train.lr`)")
    layer_decay: float | None = Field(
        None, gt=0, le=1, description="LLRD factor in (0, 1], per block (or per level) from the top"
    )
    decay_per: Literal["block", "level"] = Field(
        "block",
        description="`block`: each block `layer_decay` × the one above; `level`: each level of `levels` × "
        "the one above (needs `levels`)",
    )
    decay_depth: int | None = Field(
        None,
        ge=1,
        description="with per-block decay: the depth `layer_decay` is stated for; any other depth gets the "
        "same decay from its top block to its bottom one",
    )
    levels: int | None = Field(
        None, ge=1, description="split the blocks into this many levels (1..number of blocks), bottom = 0"
    )
    level_lr: list[float] | None = Field(
        None,
        description="one lr per level, bottom to top (neither this nor `level_scale`: each level 1/2.6 of "
        "the one above)",
    )
    level_scale: list[float] | None = Field(
        None, description="one scale of `train.lr` per level, bottom to top"
    )
    groups: list[Group] = Field(
        default_factory=list,
        description="explicit groups (below); they win over `layer_decay` / `levels`",
    )

    @model_validator(mode="after")
    def _consistent(self) -> LrConfig:
        per_level = self.decay_per == "level"
        if per_level and (self.layer_decay is None or self.levels is None):
            raise ValueError("`decay_per: level` needs `layer_decay` and `levels`")
        if self.layer_decay is not None and self.levels is not None and not per_level:
            raise ValueError("`layer_decay` with `levels` decays per level: add `decay_per: level`")
        if self.decay_depth is not None and (self.layer_decay is None or per_level):
            raise ValueError("`decay_depth` goes with `layer_decay` per block (levels are relative already)")
        given = [k for k in ("level_lr", "level_scale") if getattr(self, k) is not None]
        if given and self.levels is None:
            raise ValueError(f"`{given[0]}` needs `levels`")
        if given and self.layer_decay is not None:
            raise ValueError(f"give `{given[0]}` or `layer_decay`, not both")
        if len(given) > 1:
            raise ValueError("give `level_lr` or `level_scale`, not both")
        for key in given:
            values = getattr(self, key)
            if len(values) != self.levels or any(v <= 0 for v in values):
                raise ValueError(f"`{key}` needs {self.levels} positive values (one per level), got {values}")
        return self


def _depth(slot: str, anatomy: Anatomy, config: LrConfig) -> float:
    """The exponent of layer_decay: distance from the top (module docstring)."""
    n = anatomy.num_blocks
    if config.decay_per == "level":
        bottom = config.levels  # the bottom level counts L steps down
        if slot.startswith("block."):
            return config.levels - level_of_block(n, config.levels)[int(slot.split(".")[1])]
    elif config.decay_depth is not None:
        bottom = config.decay_depth
        if slot.startswith("block."):
            if n == 1:
                return 1
            steps = (n - 1 - int(slot.split(".")[1])) * (bottom - 1)
            # whole when the model is as deep as decay_depth: the same floats as plain per-block LLRD
            return 1 + (steps // (n - 1) if steps % (n - 1) == 0 else steps / (n - 1))
    else:
        bottom = n
        if slot.startswith("block."):
            return n - int(slot.split(".")[1])
    return bottom + 1 if slot == "embeddings" else 0


def _level(slot: str, anatomy: Anatomy, levels: int) -> int:
    if slot.startswith("block."):
        return level_of_block(anatomy.num_blocks, levels)[int(slot.split(".")[1])]
    return 0 if slot == "embeddings" else levels - 1


def _check_levels(config: LrConfig, anatomy: Anatomy) -> None:
    n = anatomy.num_blocks
    if config.levels is not None and config.levels > n:
        raise UserError("lr.levels", str(config.levels), f"at most {n} levels (the model has {n} blocks)")


def lr_per_parameter(
    model: nn.Module, config: LrConfig | None, anatomy: Anatomy, base_lr: float
) -> dict[str, tuple[float, str]]:
    """Parameter name -> (lr, group label). Explicit groups must not claim the same parameter twice."""
    out: dict[str, tuple[float, str]] = {}
    claimed: dict[str, int] = {}
    if config is not None:
        _check_levels(config, anatomy)
    for name, _ in model.named_parameters():
        slot = anatomy.slot_of(name)
        lr, label = base_lr, "base"
        if config is not None:
            if config.layer_decay is not None:
                depth = _depth(slot, anatomy, config)
                lr, label = base_lr * config.layer_decay**depth, f"decay^{depth:.4g}"
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
    relative = {
        "top_frac": group.top_frac,
        "bottom_frac": group.bottom_frac,
        "level": None
        if group.level is None
        else [group.level]
        if isinstance(group.level, int)
        else group.level,
    }
    key = next((k for k, v in relative.items() if v is not None), None)
    if key is not None:  # the depth selectors of freeze / stages, the same blocks
        atom = {key: relative[key], **({"levels": group.levels} if key == "level" else {})}
        blocks = atom_blocks(atom, anatomy.num_blocks, where) or set()
        return slot in {f"block.{b}" for b in blocks}
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
