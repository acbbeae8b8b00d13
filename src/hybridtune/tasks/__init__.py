"""The task registry: one `register(TaskSpec(...))` per task, in the order `task` lists them.

The recipe's `task` choices, its per-task defaults, the early-stopping metric choices, every
task -> model-class table (inference, export), the trunk cache's eligibility, the progress line and
which metrics are better lower all come from here; docs/ARCHITECTURE.md "Adding a task" walks
through a new one. This module and `base.py` import nothing heavy: the schema reads them; a task's
module is imported on first use (`load`) and checked against its spec then.

Adding a task = its module (satisfying `base.Task`) + one `register(...)` here (or, for a task
that lives outside hybridtune, one call of `hybridtune.tasks.register` before the recipe is read).
"""

from __future__ import annotations

import importlib
from typing import Any

from hybridtune.errors import UserError, did_you_mean
from hybridtune.tasks.base import CAPABILITY_MEMBERS, REQUIRED, Capability, Task, TaskSpec, missing_members

__all__ = [
    "CAPABILITY_MEMBERS",
    "REQUIRED",
    "Capability",
    "Task",
    "TaskSpec",
    "all_metrics",
    "for_recipe",
    "has",
    "higher_is_better",
    "load",
    "names",
    "register",
    "spec",
    "unregister",
]

_SPECS: dict[str, TaskSpec] = {}
_LOADED: dict[str, Any] = {}
_BOUND: set[type] = set()  # the types `bind` returned that passed the contract check


def register(task: TaskSpec) -> TaskSpec:
    """Add a task. Its name must be new, and a metric name it shares with a registered task must
    point the same way (better higher or lower) there: report/stats.py and the search read the
    direction by name."""
    if task.name in _SPECS:
        raise ValueError(f"task {task.name!r} is registered already")
    for other in _SPECS.values():
        for metric in {*task.metrics, *task.headline} & {*other.metrics, *other.headline}:
            if task.higher_is_better(metric) != other.higher_is_better(metric):
                raise ValueError(
                    f"task {task.name}: metric {metric!r} points the other way in task {other.name}"
                )
    _SPECS[task.name] = task
    return task


def unregister(name: str) -> None:
    """Remove a task registered at run time (a test's own task)."""
    _SPECS.pop(name, None)
    _LOADED.pop(name, None)


def names() -> tuple[str, ...]:
    return tuple(_SPECS)


def spec(name: str, where: str | None = None) -> TaskSpec:
    """The spec of a registered task. An unknown name: a UserError at `where` (a run.json, the
    recipe's `task`) when given, else a KeyError (a bug: the recipe was validated)."""
    if name not in _SPECS:
        if where is None:
            raise KeyError(name)
        raise UserError(
            where, f"task {name[:40]!r}", "one of " + ", ".join(_SPECS), did_you_mean(name, _SPECS)
        )
    return _SPECS[name]


def load(name: str, where: str | None = None) -> Any:
    """The task's module, imported on first use and checked against its spec (`base.Task`)."""
    task = spec(name, where)
    if name not in _LOADED:
        module = importlib.import_module(task.module)
        missing = missing_members(module, task)
        if missing:
            raise TypeError(f"task {name} ({task.module}) lacks {', '.join(missing)} (tasks/base.py)")
        if module.NAME != name:
            raise TypeError(f"task {name}: {task.module} says NAME = {module.NAME!r}")
        _LOADED[name] = module
    return _LOADED[name]


def for_recipe(recipe: Any) -> Any:
    """The recipe's task: its module, or what the module's `bind` makes of the recipe (checked
    against the contract once per bound type)."""
    module = load(recipe.task)
    if not has(recipe.task, "bind"):
        return module
    task = module.bind(recipe)
    if type(task) not in _BOUND:
        missing = missing_members(task, spec(recipe.task), bound=True)
        if missing:
            raise TypeError(f"task {recipe.task}: bind() returns a task that lacks {', '.join(missing)}")
        _BOUND.add(type(task))
    return task


def has(name: str, capability: Capability) -> bool:
    return capability in spec(name).capabilities


def all_metrics() -> tuple[str, ...]:
    """Every registered task's validation metrics, first seen first, `loss` (every task's) last."""
    seen = dict.fromkeys(m for t in _SPECS.values() for m in t.metrics if m != "loss")
    return (*seen, "loss")


def higher_is_better(metric: str) -> bool:
    """Better higher, unless a registered task declares `metric` better lower (loss, perplexity)."""
    return not any(metric in t.lower_is_better for t in _SPECS.values())


# --------------------------------------------------------------------------------------------------
# the tasks (tasks/<name>.py each)

CLASSIFIER = ("accuracy", "f1_macro", "loss")  # what classification's compute_metrics reports
register(
    TaskSpec(
        name="classification",
        module="hybridtune.tasks.classification",
        auto_model="AutoModelForSequenceClassification",
        data="bundled:rotten_tomatoes",
        metrics=CLASSIFIER,
        headline=("accuracy", "f1_macro", "n"),
        progress=("accuracy", "f1_macro"),
        trunk_cacheable=True,
        capabilities=frozenset({"long_texts", "few_shot"}),
    )
)
register(
    TaskSpec(
        name="token_classification",
        module="hybridtune.tasks.token_classification",
        auto_model="AutoModelForTokenClassification",
        data="bundled:wnut16",
        metrics=("f1", "precision", "recall", "accuracy", "f1_macro", "loss"),
        headline=("f1", "precision", "recall", "n"),
        progress=("accuracy", "f1_macro", "f1"),
        trunk_cacheable=True,
        truncate_reason="a label per word: windows would need word alignment across them",
    )
)
register(
    TaskSpec(
        name="causal_lm",
        module="hybridtune.tasks.causal_lm",
        auto_model="AutoModelForCausalLM",
        data="bundled:chatterbot",
        model="bundled:smollm2",
        metrics=("loss",),
        headline=("loss", "perplexity", "exact_match", "n"),
        lower_is_better=frozenset({"loss", "perplexity"}),
        label_space=False,
        loss_over_tokens=True,
        capabilities=frozenset({"run_info", "generate"}),
        truncate_reason="an example is a prompt and its response, cut by its own rule",
    )
)
register(
    TaskSpec(
        name="prompt_classification",
        module="hybridtune.tasks.prompt_classification",
        auto_model=None,  # a masked LM for encoders, a causal LM for decoders
        data="bundled:rotten_tomatoes",
        metrics=CLASSIFIER,
        headline=("accuracy", "f1_macro", "n"),
        progress=("accuracy", "f1_macro"),
        capabilities=frozenset({"bind", "zero_shot", "few_shot"}),
        truncate_reason="the template keeps the end of a text, next to the answer slot",
    )
)
