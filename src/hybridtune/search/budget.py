"""The budget (`--budget`): its text as seconds, and whether one trial can fit in it at all, measured
before anything is written (`cheapest_trial_seconds`: a lower bound, one forward pass of the base
model times the fewest planned steps)."""

from __future__ import annotations

import copy
import re
import time

from hybridtune import tasks
from hybridtune.errors import UserError
from hybridtune.model.loading import load_tokenizer
from hybridtune.model.loading import resolve as resolve_model
from hybridtune.recipe import validate_recipe
from hybridtune.search.setup import Context
from hybridtune.strategy.plan import planned_steps


def parse_budget(text: str | None) -> float | None:
    """'90s', '60m', '1.5h' or plain seconds -> seconds."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text)
    if not m or float(m[1]) <= 0:
        raise UserError("--budget", repr(text), "a time such as 90s, 60m or 1.5h")
    return float(m[1]) * {"": 1, "s": 1, "m": 60, "h": 3600}[m[2]]


def stop_line(left: float, durations: list[float], then: str) -> str | None:
    """The rule both backends start trials by: none once the budget left (`left` seconds) cannot hold
    the shortest finished trial (`durations`; with none finished, until the budget is spent). Returns
    what the search says then, or None to go on. `left` < 0 when the last trial ran past the budget
    (a trial is never cut short)."""
    if left >= min(durations, default=0.0):
        return None
    if left < 0:
        return f"budget: spent, the last trial ran {-left:.0f} s past it; {then}"
    return f"budget: {left:.0f} s left, less than the shortest trial; {then}"


def cheapest_trial_seconds(ctx: Context) -> float:
    """A lower bound on one trial's time, measured here: the smallest planned number of steps times
    one forward pass of the base model on a training batch (every trial's step does at least that),
    without the evaluations. Nothing is written."""
    import torch

    train = ctx.space.train
    epochs, batch = train.fewest_epochs, max(train.batch_size.corners())
    raw = copy.deepcopy(ctx.base)
    raw.setdefault("train", {}).update({"epochs": epochs, "batch_size": batch})
    recipe = validate_recipe(raw)
    steps = planned_steps(recipe.train, ctx.n_train)
    task = tasks.for_recipe(recipe)
    splits = task.load_splits(recipe.data)
    labels = task.label_space(splits, recipe.data)
    path = resolve_model(recipe.model.name)
    tokenizer = load_tokenizer(path)
    model, _ = task.load_model(path, tokenizer, labels)
    model.eval()
    texts = splits.train.iloc[:batch]
    data = task.encode(texts, tokenizer, labels, recipe.data)
    batch_inputs = task.collator(tokenizer)(
        [
            {k: data[i][k] for k in ("input_ids", "attention_mask") if k in data.column_names}
            for i in range(len(data))
        ]
    )
    with torch.no_grad():
        model(**batch_inputs)  # warm-up
        started = time.perf_counter()
        model(**batch_inputs)
    return steps * (time.perf_counter() - started)
