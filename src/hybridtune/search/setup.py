"""Everything a search checks before it writes anything: the space file and its key=value overrides,
the base recipe, the metric, the data (read once: its size sets each trial's evaluation steps), the
model's facts from its config (its depth: a share of blocks -> a count; its dropout ...), which part
each family can take (whether one trial fits the --budget: search/budget.py). Per trial, `sample_trial` draws
a part only where the trial's recipe passes the checks a run makes before it trains (`refusal`).

Every problem is a `UserError` naming the key path (`space.yaml: families.lora.r`): exit 2, nothing
written.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from hybridtune import strategy, tasks
from hybridtune.errors import UserError, did_you_mean
from hybridtune.model.facts import ModelFacts, facts_of
from hybridtune.model.loading import resolve as resolve_model
from hybridtune.recipe import apply_override, load_recipe, validate_recipe
from hybridtune.search import draws
from hybridtune.search.parts import corners
from hybridtune.search.space import (
    FAMILIES,
    SEARCHED,
    SEARCHED_TRAIN,
    Families,
    LrRangeTest,
    Space,
    TrainSpace,
    VerdictConfig,
    recipe_dict,
    sample,
)
from hybridtune.strategy.plan import eval_interval, planned_steps


@dataclass
class Context:
    """A checked space, ready to run: the base recipe dict, the metric, the data and model facts."""

    space: Space
    origin: str
    base: dict
    task: str
    metric: str
    facts: ModelFacts  # the model's depth, a block's linear layers, its dropout (from its config)
    n_train: int
    seed: int
    explicit_eval_steps: bool
    report_to: list[str] = field(default_factory=list)  # the base's train.report_to: every trial's
    # parts of the default space this base cannot take (key -> why): left out of the search
    left_out: dict[str, str] = field(default_factory=dict)
    # the validation metric of always answering the most frequent label (tasks/baseline.py); a trial
    # no better than it at its second evaluation or later stops (search/trial.py); None: no floor
    floor: float | None = None
    draws: int = 1  # a few-shot base (data.shots, data.draws n): each recipe on n draws (search/draws.py)
    n_validation: int = 0  # the validation split's texts: what a difference in its score can show (report)

    @property
    def blocks(self) -> int:
        return self.facts.blocks

    @property
    def linear(self) -> list[str]:  # a block's linear layers: LoRA's "all-linear"
        return list(self.facts.linear)

    @property
    def max_evaluations(self) -> int:
        """The most validations a trial makes (`finish`): `evaluations` per fewest epochs, over the
        most epochs, + 1 for the rounding of the interval to whole steps (Hyperband's max_resource)."""
        train = self.space.train
        return math.ceil(self.space.evaluations * max(train.epochs.corners()) / train.fewest_epochs) + 1


def load_space(path: str | None, overrides: list[str] | None = None) -> Space:
    """The space of a YAML file (or the default), with `key.path=value` overrides, validated."""
    origin = path or "default space"
    raw: Any = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(str(path), "no such file", "a search space YAML file")
        try:
            raw = yaml.safe_load(p.read_text(encoding="utf-8-sig")) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark else str(path)
            raise UserError(where, f"invalid YAML ({getattr(e, 'problem', e)})", "a YAML mapping") from None
        if not isinstance(raw, dict):
            raise UserError(str(path), f"a YAML {type(raw).__name__}", "a mapping of search space keys")
        if isinstance(raw.get("base"), str):  # a recipe file, relative to the space file
            base = Path(raw["base"])
            raw["base"] = str(base if base.is_absolute() or base.exists() else p.parent / base)
    for item in overrides or []:
        apply_override(raw, item)
    try:
        return Space.model_validate(raw)
    except ValidationError as e:
        raise _space_error(e, origin) from None


# the names users bring from peft's and the papers' vocabulary, for did-you-mean
FAMILIAR = {"rank": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "targets": "target_modules",
            "learning_rate": "lr", "num_train_epochs": "epochs", "warmup_ratio": "warmup",
            "lr_scheduler_type": "schedule", "per_device_train_batch_size": "batch_size"}  # fmt: skip


def _owner(loc: tuple) -> type[BaseModel] | None:
    if len(loc) == 1:
        return Space
    if loc[0] == "families" and len(loc) == 3:
        return FAMILIES.get(str(loc[1]))
    owners = {
        "train": TrainSpace,
        "verdict": VerdictConfig,
        "families": Families,
        "lr_range_test": LrRangeTest,
    }
    return owners.get(str(loc[0])) if len(loc) == 2 else None


def _space_error(e: ValidationError, origin: str) -> UserError:
    err = e.errors()[0]
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    where = f"{origin}: " + (".".join(map(str, loc)) or "(top level)")
    if err["type"] == "extra_forbidden":
        owner = _owner(loc)
        allowed = sorted(owner.model_fields) if owner else []
        key = str(loc[-1])
        hint = (
            f"did you mean '{FAMILIAR[key]}'?" if FAMILIAR.get(key) in allowed else did_you_mean(key, allowed)
        )
        return UserError(where, f"unknown key '{key}'", "one of " + ", ".join(allowed), hint)
    msg = re.sub(r"^(Value error, |Assertion failed, )", "", err["msg"])
    pointed = re.fullmatch(r"([\w.]+): found (.+); expected (.+)", msg, re.S)
    if pointed:
        return UserError(f"{origin}: {pointed[1]}", pointed[2], pointed[3])
    found = re.fullmatch(r"found (.+?); expected (.+)", msg, re.S)
    if found:
        return UserError(where, found[1], found[2])
    ctx = err.get("ctx") or {}
    if err["type"] == "literal_error" and "expected" in ctx:
        value = err.get("input")
        return UserError(
            where,
            repr(value),
            "one of " + ctx["expected"],
            did_you_mean(str(value), re.findall(r"'([^']+)'", ctx["expected"])),
        )
    return UserError(where, repr(err.get("input")), re.sub(r"^Input should be ", "", msg))


def base_recipe(space: Space, origin: str) -> dict:
    """The base as a recipe dict (a recipe file is read), checked: valid, and setting none of the keys
    the search sets (a contradiction: the search would silently override it)."""
    if isinstance(space.base, str):
        p = Path(space.base)
        if not p.is_file():
            raise UserError(f"{origin}: base", f"'{space.base}', no such file", "a recipe file or a mapping")
        raw = yaml.safe_load(p.read_text(encoding="utf-8-sig")) or {}
        load_recipe(p)  # its own errors, by its own file name
    else:
        raw = copy.deepcopy(space.base)
        validate_recipe(raw, f"{origin}: base")
    clash = sorted(SEARCHED & set(raw))
    if clash:
        raise UserError(
            f"{origin}: base.{clash[0]}",
            f"a {clash[0]} section, which the search sets per family",
            "strategy keys only in `families` (the base holds model, data and the rest)",
        )
    clash = sorted(set(space.parts) & set(raw))
    if clash:
        raise UserError(
            f"{origin}: base.{clash[0]}",
            f"a {clash[0]} section, a part the search adds or leaves out per trial",
            f"it in the base (and `parts: {{{clash[0]}: null}}` in the space) or in `parts` only",
        )
    train = raw.get("train") or {}
    clash = sorted({"lr", "max_steps", *(k for k in dict(space.train) if k in SEARCHED_TRAIN)} & set(train))
    if clash:
        key = clash[0]
        raise UserError(
            f"{origin}: base.train.{key}",
            f"{train[key]!r}, a setting the search samples",
            f"it in the space (train.{key}: one value fixes it)"
            if key in dict(space.train)
            else "no train.lr / max_steps in the base (each family has its lr range; epochs set the length)",
        )
    for key, where in (("name", "train.schedule"), ("warmup", "train.warmup")):
        if key in (raw.get("schedule") or {}):
            raise UserError(
                f"{origin}: base.schedule.{key}", "a setting the search samples", f"{where} in the space"
            )
    return raw


def model_facts(model_name: str, task: str = "classification") -> ModelFacts:
    """The facts of the task's model (model/facts.py: its number of blocks, a block's linear layers,
    its dropout, its head's pretrained linear layers): the task's model class (its spec's
    `auto_model`; the LM for one without) loaded on the meta device, its new parameters from
    transformers' loading report, no weights read."""
    from transformers import AutoConfig

    from hybridtune.inference import auto_class
    from hybridtune.model.loading import lm_class, meta_model

    path = resolve_model(model_name)
    if tasks.spec(task).auto_model:
        auto = auto_class(task, "task")
    else:
        auto = lm_class(AutoConfig.from_pretrained(path).model_type)
    return facts_of(*meta_model(auto, path))


def resolve(space: Space, origin: str) -> Context:
    """Every check that needs the base recipe, the data and the model config."""
    raw = base_recipe(space, origin)
    recipe = validate_recipe(raw, f"{origin}: base")
    if "mlflow" in recipe.train.report_to:  # every trial logs to MLflow: it must be there
        from hybridtune.train.tracking import check

        check(recipe.train.report_to, f"{origin}: base.train.report_to")
    metrics = tasks.spec(recipe.task).metrics
    metric = space.metric or metrics[0]
    if metric not in metrics:
        raise UserError(
            f"{origin}: metric",
            f"{metric!r}, not a validation metric of task {recipe.task}",
            "one of " + ", ".join(metrics),
            did_you_mean(metric, metrics),
        )
    if recipe.data.shots and recipe.data.validation_shots == 0:
        raise UserError(
            f"{origin}: base.data.validation_shots",
            "0 (no validation split)",
            "at least 1 per class: a search ranks its trials on the validation split",
        )
    task = tasks.for_recipe(recipe)
    splits = task.load_splits(recipe.data)  # a bad data file stops here, by file:row
    ctx = Context(
        space=space,
        origin=origin,
        base=raw,
        task=recipe.task,
        metric=metric,
        facts=model_facts(recipe.model.name, recipe.task),
        n_train=len(splits.train),
        n_validation=len(splits.validation),
        seed=recipe.train.seed,
        explicit_eval_steps=bool((raw.get("train") or {}).get("eval_steps")),
        report_to=list(recipe.train.report_to),
        floor=_floor(recipe, metric, splits.validation),
        draws=draws.count(raw),
    )
    _check_corners(ctx)
    return ctx


def _floor(recipe, metric: str, validation) -> float | None:
    """The constant answer's validation score, for a task with a label column (tasks/baseline.py)."""
    from hybridtune.tasks import baseline

    column = recipe.data.label_column
    if not tasks.spec(recipe.task).label_space or column not in validation:
        return None
    gold = validation[column].tolist()
    if any(isinstance(g, (list, tuple)) for g in gold[:1]):  # per-word tags: not a constant answer
        return None
    return baseline.constant_answer_score(metric, gold)


def _check_corners(ctx: Context) -> None:
    """Each family's recipe at the ends of its settings validates (e.g. a schedule with stages) and
    passes the parts' model checks (a base's R-Drop on a model without dropout)."""
    shared = {k: p.corners()[0] for k, p in dict(ctx.space.train).items()}
    for family, settings in ctx.space.chosen().items():
        params = dict(settings)
        for end in (0, -1):
            values = {k: p.corners()[end] for k, p in params.items()}
            raw = finish(ctx, recipe_dict(ctx.base, family, values, shared, ctx.blocks, ctx.linear))
            recipe = validate_recipe(raw, f"{ctx.origin}: families.{family}")
            try:
                strategy.model_check(recipe, ctx.facts)
            except UserError as e:
                raise UserError(
                    f"{ctx.origin}: families.{family}: {e.where}", e.found, e.expected, e.hint
                ) from None
    # a part some family can take: a part refused with one family (layer sampling with staged
    # unfreezing) is not drawn in its trials (`refusal`); one refused with every family (R-Drop on a
    # model without dropout) is a space that cannot work when the space file names it, and is left
    # out of the default space's parts (ctx.left_out, said when the search starts)
    for key in list(ctx.space.parts):
        error = _no_family_takes(ctx, key, shared)
        if error is None:
            continue
        if "parts" in ctx.space.model_fields_set:
            raise error
        del ctx.space.parts[key]
        ctx.left_out[key] = error.found


def _no_family_takes(ctx: Context, key: str, shared: dict) -> UserError | None:
    """None when some family of the space, at either end of its settings, takes part `key`; else
    the first refusal."""
    first = None
    for family, settings in ctx.space.chosen().items():
        for end in (0, -1):
            values = {k: p.corners()[end] for k, p in dict(settings).items()}
            error = refusal(ctx, family, values, shared, key)
            if error is None:
                return None
            first = first or error
    return first


def refusal(ctx: Context, family: str, values: dict, shared: dict, key: str) -> UserError | None:
    """Why part `key` cannot go into a trial of `family` with these values (`shared["parts"]`: the
    parts drawn before it), or None: the trial's recipe with the part at each corner of its settings
    (parts.corners) through the recipe's validation (the parts' `check`) and the parts'
    `model_check` on the model's facts, the checks `hybridtune train` makes before it trains."""
    try:
        raw = finish(ctx, recipe_dict(ctx.base, family, values, shared, ctx.blocks, ctx.linear))
        strategy.model_check(validate_recipe(raw), ctx.facts)
    except UserError:
        return None  # the trial's recipe fails without the part: the trial says so, not the part
    where = f"{ctx.origin}: parts.{key}"
    for section in corners(ctx.space.parts[key]):
        candidate = copy.deepcopy(raw)
        candidate[key] = section
        try:
            recipe = validate_recipe(candidate, where)
        except UserError as e:
            return e
        try:
            strategy.model_check(recipe, ctx.facts)
        except UserError as e:  # named as in the space: `parts.layer_sampling.gamma`
            at = f"{ctx.origin}: parts.{e.where}" if e.where.split(".")[0] == key else f"{where}: {e.where}"
            return UserError(at, e.found, e.expected, e.hint)
    return None


def sample_trial(ctx: Context, trial: Any) -> tuple[str, dict, dict]:
    """A trial's family, values and shared values (space.sample) with only the parts its recipe can
    take (`refusal`): the one sampling function of both backends (the local loop and Ray Tune's
    define-by-run), so a trial replayed from its parameters takes the same path."""
    return sample(
        ctx.space,
        trial,
        lambda family, values, shared, key: refusal(ctx, family, values, shared, key) is None,
    )


def finish(ctx: Context, raw: dict) -> dict:
    """A trial's recipe dict completed: the metric, and evaluation steps (unless the base names its
    own `train.eval_steps`): a trial of the space's fewest epochs validates `evaluations` times (4 by
    default), and every trial validates after as much training as that one does, at its own batch
    size, so a 3-epoch trial validates 3 times as often as a 1-epoch one. Evaluation r, the pruners'
    rung r, then comes after the same amount of training in every trial (ASHA's resource is
    training, Li et al. 2020): a 1-epoch trial's rung is no longer met by a 3-epoch one three times
    as far into its training. Early stopping's patience counts validations, so it grows with them:
    it spans the share of the run it would at `evaluations` validations (patience 2 of a 3-epoch
    trial's 12 validations -> 6, still half the run), never less than the recipe's."""
    train = raw.setdefault("train", {})
    stopping = train.setdefault("early_stopping", {})
    stopping["metric"] = ctx.metric
    if not ctx.explicit_eval_steps:
        settings = validate_recipe(raw, ctx.origin).train
        shortest = planned_steps(
            settings.model_copy(update={"epochs": ctx.space.train.fewest_epochs}), ctx.n_train
        )
        every = eval_interval(shortest, ctx.space.evaluations)
        train["eval_steps"] = every
        patience = settings.early_stopping.patience
        if patience is not None:
            validations = math.ceil(planned_steps(settings, ctx.n_train) / every)
            stopping["patience"] = max(patience, math.ceil(patience * validations / ctx.space.evaluations))
    return raw


LENGTH = "validations_planned"  # the trial user attribute study.py's SameLength groups by


def planned_validations(recipe, n_train: int) -> int:
    """How many times a trial's recipe validates (every `eval_steps`, else once an epoch): its length,
    by which study.py's `SameLength` groups the trials a pruner compares."""
    steps = planned_steps(recipe.train, n_train)
    every = recipe.train.eval_steps
    return math.ceil(steps / every) if every else max(1, math.ceil(recipe.train.epochs))
