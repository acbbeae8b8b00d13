"""schedule: the learning-rate multiplier over the run, or restarted at every stage.

    schedule:
      name: stlr        # linear | cosine | constant | constant_with_warmup | stlr
      warmup: 0.06      # fraction of the steps spent warming up (linear, cosine, constant_with_warmup)
      cut_frac: 0.1     # stlr: fraction of the steps spent increasing
      ratio: 32         # stlr: how much smaller the lowest lr is than the highest
      per_stage: false  # true: restart the schedule at every stage boundary

Slanted triangular learning rates (STLR): Howard & Ruder 2018, "Universal Language Model Fine-tuning
for Text Classification", eq. 3, with their defaults cut_frac = 0.1, ratio = 32. The others match
transformers' schedulers of the same name (warmup from 0, then decay to 0).
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ScheduleConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Literal["linear", "cosine", "constant", "constant_with_warmup", "stlr"] = Field(
        "linear",
        description="`linear`, `cosine`, `constant`, `constant_with_warmup` (as in transformers), `stlr`",
    )
    warmup: float = Field(
        0.06, ge=0, lt=1, description="fraction of the steps spent warming up (not for `constant`, `stlr`)"
    )
    cut_frac: float = Field(
        0.1,
        gt=0,
        lt=1,
        description="stlr (slanted triangular lr, Howard & Ruder 2018, eq. 3): rise for this fraction of "
        "the steps, then decay",
    )
    ratio: float = Field(32, ge=1, description="stlr: the highest lr / the lowest")
    per_stage: bool = Field(False, description="restart the schedule at every stage")


def multiplier(config: ScheduleConfig, step: int, total: int) -> float:
    """lr multiplier at `step` (0-based) of `total` steps."""
    total = max(total, 1)
    if config.name == "stlr":
        cut = max(math.floor(total * config.cut_frac), 1)
        p = step / cut if step < cut else 1 - (step - cut) / max(cut * (1 / config.cut_frac - 1), 1)
        return (1 + max(p, 0.0) * (config.ratio - 1)) / config.ratio
    warmup = math.ceil(config.warmup * total) if config.name != "constant" else 0
    if step < warmup:
        return step / max(warmup, 1)
    if config.name in ("constant", "constant_with_warmup"):
        return 1.0
    progress = (step - warmup) / max(total - warmup, 1)
    if config.name == "linear":
        return max(0.0, 1.0 - progress)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def lr_lambda(config: ScheduleConfig, total: int, bounds: list[int], scales: list[float]):
    """A LambdaLR function: the schedule (over the run or per stage) times the current stage's lr_scale.
    `bounds` are the stage start steps (first is 0), `scales` their lr scales."""
    ends = [*bounds[1:], total]

    def fn(step: int) -> float:
        k = max(i for i, b in enumerate(bounds) if b <= step) if bounds else 0
        scale = scales[k] if scales else 1.0
        if config.per_stage and bounds:
            return scale * multiplier(config, step - bounds[k], ends[k] - bounds[k])
        return scale * multiplier(config, step, total)

    return fn
