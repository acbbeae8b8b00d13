"""The members of an ensemble: before training, an `ensemble:` recipe's members (its recipe without
`ensemble`, once per seed or override list, validated before anything trains; above the recipe
schema, which config.py is part of); after, a finished run loaded as a member (`Member`)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hybridtune.ensemble.config import check_weights, is_ensemble
from hybridtune.errors import UserError
from hybridtune.inference import load_run
from hybridtune.recipe import apply_override, validate_recipe
from hybridtune.tasks.classification import encode, logits_of


def member_recipes(recipe) -> list:
    """The members' recipes: this recipe without `ensemble`, one seed or override list each; all
    validated (and checked against the combine method) before anything trains."""
    cfg = recipe.ensemble
    base = recipe.model_dump(mode="json")
    base["ensemble"] = None
    out = []
    for i in range(cfg.count):
        raw = copy.deepcopy(base)
        raw["name"] = f"{recipe.name}-m{i}"
        if cfg.vary == "seed":
            raw["train"]["seed"] = recipe.train.seed + i
        else:
            for item in cfg.vary[i]:
                apply_override(raw, item)
        out.append(validate_recipe(raw, f"ensemble.vary[{i}]" if cfg.vary != "seed" else "ensemble"))
    if recipe.task != "classification":
        raise UserError(
            "ensemble", f"task {recipe.task}", "task classification (ensembles combine class scores)"
        )
    if cfg.combine in ("uniform_soup", "greedy_soup", "merge_adapters"):
        names = {r.model.name for r in out}
        if len(names) > 1:
            raise UserError(
                "ensemble.vary",
                f"members of different base models {sorted(names)}",
                f"one base for {cfg.combine}",
            )
    if cfg.combine == "merge_adapters":
        for i, r in enumerate(out):
            if r.peft is None or r.peft.method not in ("lora", "dora"):
                raise UserError(
                    f"ensemble.vary[{i}]" if cfg.vary != "seed" else "peft.method",
                    f"a member without LoRA ({r.peft.method if r.peft else 'no peft'})",
                    "LoRA members for combine: merge_adapters",
                )
    check_weights(cfg.weights, cfg.count, "ensemble.weights")
    return out


@dataclass
class Member:
    """A finished classification run, loaded."""

    path: Path
    loaded: Any  # inference.LoadedRun

    @property
    def labels(self):
        return self.loaded.labels

    def logits(self, frame, model: torch.nn.Module | None = None) -> np.ndarray:
        """Logits of the member (or of `model`, another set of weights read with the member's
        tokenizer and data settings) on the rows of `frame`."""
        dataset = encode(frame, self.loaded.tokenizer, None, self.loaded.recipe.data)
        # a chunks member: one row per document, its windows pooled as the member was evaluated
        return logits_of(model or self.loaded.model, self.loaded.tokenizer, dataset, pool_by=self.labels.pool)


def load_member(path: str | Path) -> Member:
    """A finished run dir as a member; an ensemble dir or a run of another task is refused (exit 2)."""
    if is_ensemble(path):
        raise UserError(str(path), "an ensemble dir", "a run dir (ensembles of ensembles are not supported)")
    loaded = load_run(str(path))
    if loaded.recipe.task != "classification":
        raise UserError(
            str(path), f"a {loaded.recipe.task} run", "classification runs (ensembles combine class scores)"
        )
    return Member(Path(path), loaded)
