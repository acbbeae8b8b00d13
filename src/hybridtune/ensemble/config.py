"""`ensemble:` in a recipe (EnsembleConfig) and its members' recipes; the names every part of the
package shares. No torch here: `recipe/schema.py` imports this module."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from hybridtune.errors import UserError

MANIFEST = "ensemble.json"


COMBINES = ("mean_logits", "mean_probs", "vote", "weighted")


MERGE_METHODS = ("cat", "linear", "svd", "ties", "ties_svd", "dare_ties", "dare_linear", "magnitude_prune")


class EnsembleConfig(BaseModel):
    """`ensemble:` in a recipe: train K members of the recipe and combine them in one run."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    members: int | None = Field(
        None, ge=2, le=32, description="number of members (default 3; with a `vary` list: its length)"
    )
    vary: Literal["seed"] | list[list[str]] = Field(
        "seed",
        description="seed: member i trains with train.seed + i; or one list of key=value overrides per member",
    )
    combine: Literal[
        "mean_logits", "mean_probs", "vote", "weighted", "uniform_soup", "greedy_soup", "merge_adapters"
    ] = "mean_logits"
    weights: list[float] | None = Field(
        None, description="combine: weighted / merge_adapters; finite, non-negative, positive sum"
    )
    merge_method: Literal[MERGE_METHODS] = Field("cat", description="combine: merge_adapters (peft)")  # type: ignore[valid-type]
    shared_trunk: bool = Field(
        False,
        description="train the members together above their frozen trunk (head-only / top-k members): "
        "one trunk forward per batch for all of them",
    )

    @model_validator(mode="after")
    def _count(self) -> EnsembleConfig:
        if isinstance(self.vary, list):
            if self.members is not None and self.members != len(self.vary):
                raise ValueError(
                    f"ensemble.members: found {self.members}; expected {len(self.vary)}, "
                    "the number of override lists in ensemble.vary (or leave it out)"
                )
            if len(self.vary) < 2:
                raise ValueError("ensemble.vary: found 1 member; expected at least 2 override lists")
        return self

    @property
    def count(self) -> int:
        return len(self.vary) if isinstance(self.vary, list) else (self.members or 3)


def is_ensemble(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def check_weights(weights: list[float] | None, k: int, where: str) -> None:
    if weights is None:
        return
    if len(weights) != k:
        raise UserError(where, f"{len(weights)} weights", f"one weight per member ({k})")
    if not all(math.isfinite(w) for w in weights):
        raise UserError(where, f"weights {weights}", "finite numbers (no nan / inf)")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise UserError(where, f"weights {weights}", "non-negative weights with a positive sum")
