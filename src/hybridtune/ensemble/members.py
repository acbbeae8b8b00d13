"""The members of an `ensemble:` recipe: its recipe without `ensemble`, once per seed or override
list, validated before anything trains (above the recipe schema, which config.py is part of)."""

from __future__ import annotations

import copy

from hybridtune.ensemble.config import check_weights
from hybridtune.errors import UserError
from hybridtune.recipe import apply_override, validate_recipe


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
