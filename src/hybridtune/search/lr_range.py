"""The learning-rate range test before a search (Smith 2017, "Cyclical Learning Rates for Training
Neural Networks", sec. 3.3, the "LR range test"; fastai's `lr_find`): each family's recipe trains a
few steps with the lr growing exponentially from `low` to `high`, the smoothed training loss is
recorded per step, the test stops once the loss diverges, and the family's lr range for the search
becomes a log range around the suggested lr.

    lr_range_test: {steps: 100, low: 1.0e-7, high: 10, factor: 3, suggest: minimum, within: family}

- The schedule: step i (0-based) of `steps` trains at lr_i = low * (high / low) ** (i / (steps - 1)),
  a LambdaLR on the recipe's own optimizer (its param groups: head lr, layer decay), read back
  from the optimizer as each step begins.
- The loss: Trainer's training loss of each step, smoothed as fastai's Recorder does (an exponential
  moving average with beta 0.98, debiased); the test stops (Trainer's own `should_training_stop`)
  when the smoothed loss exceeds 4x its minimum so far (fastai's LRFinder), or at a NaN / inf loss.
- The suggestion: `minimum` (default): the lr of the lowest smoothed loss / 10 (fastai's
  `SuggestionMethod.Minimum`: where the loss is lowest the lr is already at the edge of divergence,
  so a decade lower); `steepest`: the lr where the smoothed loss falls fastest against log lr, before
  its lowest point (fastai's `SuggestionMethod.Steep`). Both are clipped to [low, high].
- The range: suggestion / factor ... suggestion x factor (log), clipped to [low, high] and below 1
  (a family's lr is < 1: 0.99 at most). factor 3: about a decade (9x) around the suggestion, a little
  wider on each side than Smith's cyclical bounds (sec. 3.3: base lr 1/3 or 1/4 of max lr), so
  the search has room on both sides of a one-seed estimate.
- The bounds (`within`): `family` (default): the window is cut to the family's lr range, the space
  file's or the default one, and where the two do not meet that range stays as it was — the test
  narrows a range, never leaves it: a few steps at a growing lr favour lrs that move the loss at
  once, higher than a run of epochs takes (measured: adapters at 3.8e-3 ... 9.5e-3, above their
  default 1e-4 ... 3e-3, sat at chance; docs/search.md). `test`: the window replaces the default
  range (a range the space file sets still cuts it), for a model whose lrs lie outside the defaults.
  A family whose lr the space file fixes (a value or a list) is not tested.

The family's recipe at its typical settings (`Param.typical`: a fixed value or the first choice, the
middle of a range), the shared batch size and weight decay, no added parts; through the one-run
machinery (`run.prepare`, the engine's Trainer), without evaluation, checkpoints or a run dir.
Results go to `<search>/lr_range.json` (written after each family) and `lr_range.png`; a resumed
search reads them back, so it neither reruns a test nor changes a range its trials sampled from.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

from hybridtune import rundir
from hybridtune.search.params import Param
from hybridtune.search.space import LrRangeTest, recipe_dict, typical

if TYPE_CHECKING:
    from hybridtune.search.setup import Context

RESULTS = "lr_range.json"
PLOT = "lr_range.png"
BETA = 0.98  # fastai's Recorder: smooth_loss, an EMA with beta 0.98, debiased
DIVERGE = 4.0  # fastai's LRFinder: stop once the smoothed loss is above 4x its best
CEILING = 0.99  # the highest lr a searched range may reach: a family's lr is < 1 (space.LR)


def lr_at(step: int, test: LrRangeTest) -> float:
    """The lr of step `step` (0-based): low at the first step, high at the last, exponential between."""
    return test.low * (test.high / test.low) ** (min(step, test.steps - 1) / (test.steps - 1))


def tested(space) -> dict[str, Any]:
    """The families the test runs for (name -> settings): all but those whose lr the space file fixes."""
    return {
        name: settings
        for name, settings in space.chosen().items()
        if not ("lr" in settings.model_fields_set and settings.lr.choices is not None)
    }


def check(ctx: Context) -> None:
    """The recipe each family's test trains, validated before anything is written (exit 2 by key)."""
    if ctx.space.lr_range_test is None:
        return
    from hybridtune.recipe import validate_recipe

    for family in tested(ctx.space):
        validate_recipe(range_recipe(ctx, family), f"{ctx.origin}: lr_range_test ({family})")


def range_recipe(ctx: Context, family: str) -> dict:
    """The recipe dict the test trains: the family at its typical settings, `steps` steps from `low`,
    logged every step; a constant schedule (the test's growth multiplies it), no trunk cache (its
    pass over the whole train split would not pay back in a few steps), no tracker."""
    test = ctx.space.lr_range_test
    values = typical(ctx.space.chosen()[family])
    shared = typical(ctx.space.train) | {"parts": {}}
    raw = recipe_dict(ctx.base, family, values, shared, ctx.blocks, ctx.linear)
    raw["name"] = f"lr-range-{family}"
    raw["schedule"] = {"name": "constant"}
    raw["train"].update(
        lr=test.low, max_steps=test.steps, logging_steps=1, on_nan="stop", trunk_cache="off", report_to=[]
    )
    return raw


class RangeTestCallback(TrainerCallback):
    """Records each step's lr (low x the multiplier the optimizer holds) and training loss, and stops
    training once the smoothed loss diverges."""

    def __init__(self, low: float):
        self.low, self.lrs, self.losses, self.smoothed = low, [], [], []
        self.average, self.best, self.diverged, self.pending = 0.0, math.inf, False, None

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        group = optimizer.param_groups[0]
        self.pending = self.low * group["lr"] / group["initial_lr"]

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs or self.pending is None:
            return
        loss = float(logs["loss"])
        self.lrs.append(self.pending)
        self.losses.append(loss)
        self.pending = None
        self.average = BETA * self.average + (1 - BETA) * loss
        smooth = self.average / (1 - BETA ** len(self.losses))
        self.smoothed.append(smooth)
        self.best = min(self.best, smooth)
        if not math.isfinite(smooth) or smooth > DIVERGE * self.best:
            self.diverged = True
            control.should_training_stop = True


def suggestions(lrs: list[float], smoothed: list[float], test: LrRangeTest) -> dict[str, float]:
    """Both rules' lrs, clipped to the tested range (see the module's docstring)."""
    lowest = min(range(len(smoothed)), key=smoothed.__getitem__)
    slopes = [
        (smoothed[i + 1] - smoothed[i]) / math.log(lrs[i + 1] / lrs[i]) for i in range(lowest)
    ]  # before the lowest loss: the descent (fastai's steep: the left lr of the steepest segment)
    steep = lrs[min(range(len(slopes)), key=slopes.__getitem__)] if slopes else lrs[0]

    def clip(lr: float) -> float:
        return min(max(lr, test.low), test.high)

    return {"minimum": clip(lrs[lowest] / 10), "steepest": clip(steep), "lowest_loss_lr": lrs[lowest]}


def bounds(settings, test: LrRangeTest) -> Param | None:
    """The range a family's window is cut to: the space file's lr range, or with `within: family` the
    family's default one; None: the window alone."""
    return settings.lr if "lr" in settings.model_fields_set or test.within == "family" else None


def narrowed(suggestion: float, test: LrRangeTest, own: Param | None) -> tuple[Param, str | None]:
    """The searched lr range around `suggestion`, cut to the family's range `own` if any (`bounds`);
    with a note when that range is kept (the two do not meet)."""
    low = min(max(suggestion / test.factor, test.low), CEILING / test.factor)
    high = min(suggestion * test.factor, test.high, CEILING)
    if own is not None:
        if max(low, own.low) >= min(high, own.high):
            return own, (
                f"the window {low:.3g} ... {high:.3g} lies outside the family's lr range "
                f"{own.low:.3g} ... {own.high:.3g}, which is kept"
            )
        low, high = max(low, own.low), min(high, own.high)
    return Param(low=low, high=high, log=True), None


def run_test(ctx: Context, family: str) -> dict:
    """One family's test, in this process; returns its record for lr_range.json."""
    import torch

    from hybridtune import strategy
    from hybridtune.errors import TrainingStopped, UserError
    from hybridtune.recipe import validate_recipe
    from hybridtune.run import prepare
    from hybridtune.train.engine import make_trainer, training_arguments, without_validation

    test = ctx.space.lr_range_test
    started = time.perf_counter()
    recipe = validate_recipe(range_recipe(ctx, family), f"{ctx.origin}: lr_range_test ({family})")
    try:
        prep = prepare(recipe)
    except UserError as e:  # what the model cannot take fails that family's trials too: say it, go on
        return {"error": str(e), "seconds": round(time.perf_counter() - started, 2)}
    callback = RangeTestCallback(test.low)
    with tempfile.TemporaryDirectory(prefix="hybridtune-lr-range-") as scratch:  # the Trainer's log files
        args = training_arguments(recipe.train, recipe.output, Path(scratch) / "checkpoints")
        for key, value in strategy.training_args(recipe).items():
            setattr(args, key, value)
        without_validation(args)  # no evaluation, no early stopping
        args.save_strategy = "no"
        trainer = make_trainer(
            prep.model,
            prep.tokenizer,
            prep.datasets,
            recipe,
            args,
            Path(scratch),
            prep.task.make_compute_metrics(prep.labels),
            plan=prep.plan,
            callbacks=[*strategy.callbacks(prep.model, recipe, prep.build), callback],
            collator=prep.task.collator(prep.tokenizer),
            progress=False,
        )
        # the test's schedule in place of the recipe's (Trainer keeps a scheduler it is given): the
        # exponential growth times the plan's multiplier (1 with the constant schedule; a stage's scale)
        optimizer, plan = trainer.create_optimizer(), prep.plan.lr_lambda()
        trainer.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, [lambda step: lr_at(step, test) / test.low * plan(step)] * len(optimizer.param_groups)
        )
        try:
            trainer.train()
        except TrainingStopped:  # a NaN / inf loss (train.on_nan: stop) is divergence
            callback.diverged = True
    record: dict[str, Any] = {
        "lrs": callback.lrs,
        "losses": callback.losses,
        "smoothed": callback.smoothed,
        "steps_run": len(callback.lrs),
        "diverged": callback.diverged,
    }
    if callback.lrs:
        record["suggestions"] = suggestions(callback.lrs, callback.smoothed, test)
        record["suggestion"] = record["suggestions"][test.suggest]
        record["rule"] = test.suggest
    else:
        record["error"] = "no step finished (the first loss was not finite)"
    return record | {"seconds": round(time.perf_counter() - started, 2)}


def apply(ctx: Context, root: Path, echo=print) -> float:
    """Run the test for every tested family without a result in `<root>/lr_range.json` yet, and set
    each family's lr range in `ctx.space` from the results (stored ones as they are: resume). Returns
    the tests' seconds, earlier invocations' included (they count against --budget)."""
    test = ctx.space.lr_range_test
    if test is None:
        return 0.0
    path = root / RESULTS
    held = rundir.read_json(path) if path.is_file() else {"settings": test.model_dump(), "families": {}}
    results = held["families"]
    seconds, to_test = 0.0, tested(ctx.space)  # before any family's lr is set below
    for family in ctx.space.chosen():
        if family not in to_test:
            echo(f"lr range test: {family}: its lr is fixed in the space file; not tested")
            continue
        settings = to_test[family]
        if family in results:
            echo(f"lr range test: {family}: done earlier, kept")
        else:
            echo(f"lr range test: {family}: {test.steps} steps, lr {test.low:.1e} ... {test.high:.1e}")
            record = run_test(ctx, family)
            if "suggestion" in record:
                param, note = narrowed(record["suggestion"], test, bounds(settings, test))
                record |= {"range": param.to_yaml() | {"log": param.log}, "before": settings.lr.to_yaml()}
                record |= {"note": note} if note else {}
            results[family] = record
            rundir.write_json(path, held)  # a killed search keeps the families already tested
            (root / PLOT).write_bytes(plot(results))
            echo(summary_line(family, record))
        record = results[family]
        seconds += record.get("seconds", 0.0)
        if "range" in record:
            r = record["range"]
            settings.lr = Param(low=r["low"], high=r["high"], log=r.get("log", False), step=r.get("step"))
    return seconds


def summary_line(family: str, record: dict) -> str:
    if "suggestion" not in record:
        return f"lr range test: {family}: {record.get('error')}; its lr range is kept"
    r, s = record["range"], record["suggestions"]
    stop = f"diverged at step {record['steps_run']}" if record["diverged"] else "did not diverge"
    return (
        f"lr range test: {family}: lowest loss at lr {s['lowest_loss_lr']:.2g} ({stop}); suggestion "
        f"{record['suggestion']:.2g} ({record['rule']}); searching lr {r['low']:.2g} ... {r['high']:.2g}"
        + (f" ({record['note']})" if record.get("note") else "")
    )


def plot(results: dict) -> bytes:
    """Smoothed training loss vs lr (log axis), one line per family, its suggestion marked and the
    lr range it searches shaded."""
    import numpy as np

    from hybridtune.report.compare import _png, plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    top = 0.0
    for k, (family, record) in enumerate(results.items()):
        if "suggestion" not in record:
            continue
        color = f"C{k % 10}"
        lrs, smoothed = record["lrs"], record["smoothed"]
        ax.plot(lrs, smoothed, color=color, label=family)
        s = record["suggestion"]
        ax.scatter([s], [np.interp(np.log(s), np.log(lrs), smoothed)], color=color, s=36, zorder=3)
        ax.axvspan(record["range"]["low"], record["range"]["high"], color=color, alpha=0.08)
        top = max(top, smoothed[0], min(max(smoothed), DIVERGE * min(smoothed)))
    ax.set_xscale("log")
    if top:
        ax.set_ylim(top=1.05 * top)
    ax.set(xlabel="learning rate (log scale)", ylabel="training loss (smoothed)", title="LR range test")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", title="dot: suggestion; band: searched", title_fontsize=7)
    fig.tight_layout()
    return _png(fig)
