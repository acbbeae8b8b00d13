"""The part contract: what a strategy part declares, and the hooks it may fill in.

A part is one module, `strategy/<key>.py`, named as its recipe key. It ends with one declaration,

    PART = Part(key="adapters", config=AdaptersConfig, apply=apply, summary="...",
                save=save, restore=restore)

and `strategy.PARTS` (or `strategy.register` for a part of one's own) lists it in the order of
application. `key`, `config`, `apply` and `summary` are required; every hook is optional and
declared, not discovered: a field left None is a capability the part does not have, and the
callers (strategy/__init__.py, the engine, the trunk cache, the recipe) ask the fields, never
`hasattr`. The recipe field `<key>: <config> | None` is made from the declaration
(hybridtune/recipe/schema.py), so the recipe key exists once.

Hooks, each called only for a part the recipe configures, with its config:

- `apply(model, config, build) -> model`: change the model (required);
- `train_rows(config, build) -> TrainRows | None`: training rows the part adds to the training
  split (distill: the unlabelled texts of `data.unlabeled`, label -100, which learn its soft term
  alone). Called by `strategy.add_train_rows` in run.prepare after the splits are encoded and
  before any part applies, before the plan counts the steps and before the trunk cache numbers the
  rows, so the added rows are training rows like the others: in the Trainer's dataset (its sampler,
  `group_by_length`'s lengths), the planned steps, the trunk cache. Their texts follow the training
  split's in `build.train_frame` (a chunked dataset's `doc` column indexes it); `build.added_rows`
  counts them per part (report.json's `added_train_rows`). `splits.train` stays the labelled rows
  (contrastive's pairs, the few-shot draw's count);
- `reshape(model, config) -> model`: change the loaded base model's architecture before anything
  maps it (its anatomy, the parts' `apply`): distill's `student_blocks` keeps the bottom k blocks.
  Called by the run pipeline right after loading, and by `inference.load_run` on the base a peft
  run's adapter is loaded onto (a whole saved model has the new shape already); a model it cannot
  change is a UserError naming the key;
- `check(config, recipe)`: refuse a combination with the rest of the recipe, by name, while the
  recipe validates (nothing is loaded yet); raise ValueError("key.path: found X; expected Y");
- `model_check(config, recipe, facts)`: refuse what the model cannot take, judged on its
  `ModelFacts` (model/facts.py: depth, a block's linear layers, dropout) and the recipe alone; raise
  UserError naming the key. Called by run.prepare right after the model loads, before any part
  applies, and by `hybridtune search` before a trial draws the part (the facts read from the
  model's config), so a search never draws what the run would refuse. What shows only once the
  parts have combined on the real model stays in `apply`; a refusal both can see is written once
  and called by both (layer sampling's draw of γ on the blocks that can train);
- `loss_terms(config, model, inputs, task_loss, outputs) -> [LossTerm]`: addends of the training
  loss; `outputs` is the training forward's output (logits: R-Drop's KL, a focal loss). A term may
  run forwards of its own (a second dropout pass, an adversarial pass). The engine sums `task_weight * task loss + Σ term.weight * term.value` over every part and logs
  each term's mean (and the task loss's) as `loss_<name>` next to `loss`; evaluation is the task
  loss alone. `task_weight(config) -> float` scales the task loss (a mixing objective, 1 - λ; 0 for
  a part that replaces it, e.g. a focal loss, whose term is then the training loss);
- `trunk_cache(config, recipe) -> str | None`: why the part rules the frozen-trunk cache out (None:
  it does not). Parameters and forward hooks a part adds need no declaration: the cache sees them
  on the model (train/trunk_cache.py);
- `training_args(config) -> dict`: TrainingArguments it must override;
- `callbacks(model, config, build) -> [TrainerCallback]`: work during training;
- `params(model, config, build) -> dict`: what the part says about what trains, beyond the
  requires_grad table (layer sampling: what trains on average); `params.json`'s `parts.<key>`, its
  `line` printed under `hybridtune params`' table. It runs after every part has applied; what only
  `apply` can know goes into `build.report` instead (freeze.spectrum: its scores, taken on the model
  before a later part such as peft wraps it, and whether the cache served them), a top-level key of
  params.json;
- `save(model, config, dir) -> [state-dict keys]` / `restore(model, config, dir) -> model`: files of
  its own in final/ (and in each checkpoint), for what neither the base model's save nor peft's
  adapter save holds; `save` returns the state-dict keys it wrote, which the base save leaves out.

And one optional declaration: `search`, the settings `hybridtune search` tries when it adds the
part to a trial (search/parts.py).

A part reads its own config, the `Build` and the recipe. Where it builds on another part it calls
that part's public functions (fusion's zero-shot scorer is `prompt.load_scorer`; contrastive embeds
with `pooling.embedding`), never another part's attributes on the model.
"""

from __future__ import annotations

import inspect
import types
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from pydantic import BaseModel
from torch import nn

from hybridtune.model.anatomy import Anatomy
from hybridtune.model.facts import ModelFacts

# --------------------------------------------------------------------------------------------------
# what a part may read


@dataclass
class Build:
    """What parts may read while they change the model."""

    anatomy: Anatomy
    task: Any  # the task module (hybridtune.tasks.*)
    new_params: set[str] = field(default_factory=set)  # names the checkpoint lacked (a new head)
    tokenizer: Any = None
    max_length: int | None = None  # tokens per example (data.max_length): virtual tokens must fit too
    total_steps: int | None = None  # planned optimizer steps of the run (AdaLoRA's budget schedule)
    recipe: Any = None  # the whole recipe (objective: batch size, seed; fusion: checks on a frozen run)
    labels: Any = None  # the task's Labels
    load_run: Any = None  # a finished run's loader (inference.load_run), for parts with loads_runs
    splits: Any = None  # the run's data, read and checked (data.Splits): distill scores the training texts
    datasets: Any = None  # the splits encoded for the model ({"train": datasets.Dataset, ...})
    # the texts of every training row (a frame): splits.train, then the rows parts added with
    # `train_rows`, in the order of datasets["train"]; its index is what a chunked row's `doc` names
    train_frame: Any = None
    added_rows: dict[str, dict] = field(default_factory=dict)  # part key -> what it added (report.json)
    # filled by `apply`: id() of the parameters loaded from the checkpoint, and the base parameters
    # `freeze` keeps trainable (id -> parameter)
    pretrained: set[int] = field(default_factory=set)
    keep: dict[int, nn.Parameter] = field(default_factory=dict)
    # what a part's `apply` tells `hybridtune params` (and the run's params.json) beside the per-layer
    # table, under its own top-level key: freeze's Spectrum scores and choice (see `params` above)
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def train_labels(self) -> Any:
        """The encoded training split's `labels` column, the rows parts added included (datasets'
        lazy Column: read only by a part that asks), or None for a task without: what the training
        loss sees, a label id per example (per window with data.long_texts: chunks) or per sub-token
        (-100: not scored); label_loss counts its classes."""
        train = (self.datasets or {}).get("train")
        return train["labels"] if train is not None and "labels" in train.column_names else None


@dataclass
class TrainRows:
    """Training rows a part adds (its `train_rows` hook): their texts and their encoded rows."""

    frame: Any  # a pandas frame with the recipe's text column (and `_where`), one row per text
    # encoded as the task encodes the training split (task.encode with the recipe's data settings):
    # the training dataset's columns; `labels` -100 where a row has no hard label; with
    # data.long_texts: chunks, `doc` numbers the rows of `frame` (run.prepare offsets it)
    dataset: Any
    about: dict = field(default_factory=dict)  # what report.json says of them (their source, counts)


@dataclass
class LossTerm:
    """One addend of the training loss: `weight * value`; logged unweighted as `loss_<name>`."""

    name: str
    value: torch.Tensor
    weight: float = 1.0


# --------------------------------------------------------------------------------------------------
# the hooks' signatures (typing.Protocol: a plain function of this shape fits)


class Apply(Protocol):
    def __call__(self, model: nn.Module, config: Any, build: Build) -> nn.Module: ...


class Reshape(Protocol):
    def __call__(self, model: nn.Module, config: Any) -> nn.Module: ...


class TrainRowsHook(Protocol):
    def __call__(self, config: Any, build: Build) -> TrainRows | None: ...


class Check(Protocol):
    def __call__(self, config: Any, recipe: Any) -> None: ...


class ModelCheck(Protocol):
    def __call__(self, config: Any, recipe: Any, facts: ModelFacts) -> None: ...


class LossTerms(Protocol):
    def __call__(
        self, config: Any, model: nn.Module, inputs: dict, task_loss: torch.Tensor, outputs: Any
    ) -> list[LossTerm]: ...


class TaskWeight(Protocol):
    def __call__(self, config: Any) -> float: ...


class TrunkCacheReason(Protocol):
    def __call__(self, config: Any, recipe: Any) -> str | None: ...


class TrainingArgs(Protocol):
    def __call__(self, config: Any) -> dict: ...


class Callbacks(Protocol):
    def __call__(self, model: nn.Module, config: Any, build: Build) -> list: ...


class Params(Protocol):
    def __call__(self, model: nn.Module, config: Any, build: Build) -> dict: ...


class Save(Protocol):
    def __call__(self, model: nn.Module, config: Any, out_dir: Any) -> list[str]: ...


class Restore(Protocol):
    def __call__(self, model: nn.Module, config: Any, in_dir: Any) -> nn.Module: ...


@dataclass(frozen=True)
class Part:
    """A strategy part: its recipe key, config class, `apply`, and the hooks it declares."""

    key: str  # the recipe key, and the file name strategy/<key>.py
    config: type[BaseModel]  # the recipe section's schema (pydantic, extra keys forbidden)
    apply: Apply
    summary: str  # one line: the recipe field's description and docs/strategies.md's list of parts
    reshape: Reshape | None = None
    train_rows: TrainRowsHook | None = None
    check: Check | None = None
    model_check: ModelCheck | None = None
    loss_terms: LossTerms | None = None
    task_weight: TaskWeight | None = None
    trunk_cache: TrunkCacheReason | None = None
    training_args: TrainingArgs | None = None
    callbacks: Callbacks | None = None
    params: Params | None = None
    save: Save | None = None
    restore: Restore | None = None
    # its apply / restore load a finished run (fusion's frozen model): they get the loader from the
    # run pipeline (Build.load_run / restore's `load_run=`), never by importing what sits above them
    loads_runs: bool = False
    # the settings `hybridtune search` tries when it adds this part to a trial, in the space's YAML
    # form ({"alpha": {"low": 0.1, "high": 5.0, "log": True}}; search/parts.py); None: the default
    # space leaves the part out (a space file may still name it under `parts:`)
    search: dict | None = None

    def hooks(self) -> list[str]:
        """The optional hooks this part declares (for docs and tests)."""
        optional = (
            "reshape",
            "train_rows",
            "check",
            "model_check",
            "loss_terms",
            "task_weight",
            "trunk_cache",
            "training_args",
            "callbacks",
            "params",
            "save",
            "restore",
        )
        return [name for name in optional if getattr(self, name) is not None]


# --------------------------------------------------------------------------------------------------
# for parts that replace the model's forward (prompt, fusion)


def patch_forward(base: nn.Module, around) -> None:
    """Replace `base.forward` (on the instance) by `around(self, inner, inputs)`, where `inner` is the
    forward it had (the class's, or an earlier part's) and `inputs` its arguments as a dict. As
    soft_prompt's: the unbound function is held, so a deep copy of the model runs its own copy, and
    Trainer still reads the model's own signature (through `__wrapped__`) to pick its columns."""
    inner = getattr(base.forward, "__func__", type(base).forward)
    signature = inspect.signature(base.forward)

    def forward(self, *args, **kwargs):
        bound = signature.bind_partial(*args, **kwargs)
        inputs = dict(bound.arguments)
        for name, param in signature.parameters.items():
            if param.kind is inspect.Parameter.VAR_KEYWORD:
                inputs.update(inputs.pop(name, {}))
        return around(self, types.MethodType(inner, self), inputs)

    forward.__wrapped__ = getattr(inner, "__wrapped__", inner)
    base.forward = types.MethodType(forward, base)
    # Trainer passes num_items_in_batch to a forward that takes **kwargs and then skips its division by
    # the accumulation steps; the class loss here is a plain per-batch mean
    base.accepts_loss_kwargs = False
