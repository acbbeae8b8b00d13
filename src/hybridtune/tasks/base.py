"""The task contract: what a task declares (`TaskSpec`) and what its module provides (`Task`).

A task is two things, kept apart on purpose:

- a `TaskSpec`, plain data registered in `hybridtune.tasks` (one `register(...)` per task): its
  name, its model class, its metrics and their direction, its defaults, its capabilities. The
  recipe schema, the engine, export, inference and the trunk cache read the spec; none of them
  names a task. The spec imports nothing: the schema (the lowest layer) validates `task`,
  `train.early_stopping.metric` and fills in the defaults from it without importing the task's
  code (which imports torch, scikit-learn and the inference helpers, which import the schema).
- a module (or what its `bind` returns) that satisfies `Task`, imported on first use by
  `hybridtune.tasks.load` and checked once against the spec: every required member, and every
  member of each declared capability. Code that needs an optional member asks the spec
  (`"zero_shot" in spec.capabilities`), never the module (`hasattr`): a capability is declared.

Why a frozen dataclass *and* a Protocol rather than one of them: the spec must be readable before
the module is importable (see above), and the members are functions of a module, which a Protocol
describes as it is (PEP 544: a module can satisfy a protocol) without a class hierarchy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol, get_args

# what a task may do beyond the required members; each one names the members it brings
Capability = Literal["bind", "run_info", "zero_shot", "generate", "long_texts", "few_shot"]
CAPABILITY_MEMBERS: dict[str, tuple[str, ...]] = {
    # the task needs recipe sections to encode (prompt_classification: the template): api uses
    # what `bind(recipe)` returns wherever it would use the module
    "bind": ("bind",),
    # more lines for run.json, for readers of final/ without hybridtune (causal_lm: the prompt format)
    "run_info": ("run_info",),
    # the untrained model already answers: `zero_shot` is scored before training (report.json's lift)
    "zero_shot": ("zero_shot",),
    # a language model: `hybridtune generate` and serve's generation go through generation.py with
    # the run's prompt format; its Labels carry the recipe's `generation` settings (and the run's
    # `prompt_format`), which its evaluation generates with
    "generate": ("Labels",),
    # data.long_texts head_tail / chunks: `encode_counted` returns what max_length cut (the
    # truncation report, data/long_texts.py) and its Labels carry `pool` (a document's windows)
    "long_texts": ("encode_counted",),
    # one label per text: few-shot draws k per class (data.shots) and EDA copies (data.augment)
    "few_shot": (),
}
REQUIRED: tuple[str, ...] = (
    "NAME",
    "peft_task_type",
    "Labels",
    "load_splits",
    "label_space",
    "encode",
    "collator",
    "load_model",
    "make_compute_metrics",
    "report",
    "eval_frame",
    "predict",
    "format_prediction",
    "eval_tables",
)


@dataclass(frozen=True)
class TaskSpec:
    """What a task is, as data; `hybridtune.tasks.register` takes one per task."""

    name: str  # the recipe's `task`, run.json's "task"
    module: str  # the import path of the module that satisfies `Task`
    # transformers' auto class of its model, as export.json's load line and the int8 reload name it;
    # None: the model decides (prompt_classification: a masked or a causal LM), and export refuses
    auto_model: str | None
    data: str  # the data source a recipe without `data` trains on
    # validation metrics (compute_metrics' keys, and Trainer's `loss`): the choices of
    # train.early_stopping.metric and of a search's metric; the first is their default
    metrics: tuple[str, ...]
    # the test report's keys in report.json's summary; the first is the run's main test metric
    headline: tuple[str, ...]
    model: str | None = None  # the model a recipe without `model` trains (None: the schema's default)
    # which of the metric names above are better lower; every other one is better higher
    lower_is_better: frozenset[str] = frozenset({"loss"})
    # the validation metrics the progress bar prints on its line per evaluation (with the loss)
    progress: tuple[str, ...] = ()
    # its targets are named labels (run.json's labels: a non-empty list); False: text or numbers
    label_space: bool = True
    # the frozen bottom blocks may be computed once (train/trunk_cache.py): a head over the
    # token states, nothing the task does between the blocks
    trunk_cacheable: bool = False
    capabilities: frozenset[Capability] = frozenset()
    # the model's training loss is a token sum over all micro-batches of an optimizer step divided by
    # their count (transformers' num_items_in_batch: its causal-LM losses); False: a per-batch mean
    # (BERT's classification heads take **kwargs and ignore it), which Trainer must then divide by
    # the accumulation steps itself
    loss_over_tokens: bool = False
    # without the `long_texts` capability: why data.long_texts stays truncate (the refusal says it)
    truncate_reason: str | None = None

    def __post_init__(self) -> None:
        unknown = set(self.capabilities) - set(get_args(Capability))
        if unknown:
            raise ValueError(f"task {self.name}: unknown capabilities {sorted(unknown)}")
        if not self.metrics or not self.headline:
            raise ValueError(f"task {self.name}: metrics and headline need at least one name each")
        stray = set(self.lower_is_better) - {*self.metrics, *self.headline}
        if stray:
            raise ValueError(f"task {self.name}: lower_is_better names no metric of it: {sorted(stray)}")
        if not set(self.progress) <= set(self.metrics):
            raise ValueError(f"task {self.name}: progress names metrics validation does not report")

    def higher_is_better(self, metric: str) -> bool:
        return metric not in self.lower_is_better


# a `bind` task's module itself needs only what reads a finished run's files without its recipe
# (the CLI's lines and tables); what `bind` returns satisfies the whole contract
UNBOUND = ("NAME", "bind", "format_prediction", "eval_tables")


def missing_members(task: Any, spec: TaskSpec, bound: bool = False) -> list[str]:
    """The members `task` lacks: required ones, and those of the capabilities `spec` declares (of a
    `bind` task's module, those of `UNBOUND`; `bound`: what its `bind` returned)."""
    if "bind" in spec.capabilities and not bound:
        return [name for name in UNBOUND if not hasattr(task, name)]
    caps = sorted(set(spec.capabilities) - {"bind"})
    wanted = [*REQUIRED, *(m for c in caps for m in CAPABILITY_MEMBERS[c])]
    return [name for name in wanted if not hasattr(task, name)]


class Task(Protocol):
    """The members every task module provides (a bound task, too). `frame`: a pandas DataFrame of
    checked rows, with a `_where` column (file:row) for messages; `data_cfg`: the recipe's `data`."""

    NAME: str  # its registered name (checked by `hybridtune.tasks.load`)
    # peft's task_type for a peft method (SEQ_CLS, TOKEN_CLS, CAUSAL_LM) or None; an attribute, not
    # spec data, because a bound task may decide it from the model it loaded (prompt_classification)
    peft_task_type: str | None
    # the label space's type: Labels(values=..., names=...) rebuilds it from run.json / export.json
    Labels: type

    def load_splits(self, data_cfg: Any) -> Any:
        """train / validation / test frames (hybridtune.data.Splits), every row checked."""

    def label_space(self, splits: Any, data_cfg: Any) -> Any:
        """The Labels of the data (an instance of `Labels`); bad labels are a UserError."""

    def encode(self, frame: Any, tokenizer: Any, labels: Any, data_cfg: Any) -> Any:
        """A datasets.Dataset of model inputs (and `labels`, when `labels` is given and the frame has them)."""

    def collator(self, tokenizer: Any) -> Callable:
        """The data collator that pads a batch of `encode`'s rows."""

    def load_model(self, path: str, tokenizer: Any, labels: Any) -> tuple[Any, list[str]]:
        """(the model with the task's head, the names of parameters the checkpoint did not have)."""

    def make_compute_metrics(self, labels: Any) -> Callable | None:
        """Trainer's compute_metrics, returning the spec's `metrics` but loss; None: loss only."""

    def report(self, model: Any, tokenizer: Any, dataset: Any, labels: Any) -> dict:
        """The test report (eval.json): the spec's `headline` keys, `n`, and whatever else it shows."""

    def eval_frame(self, data: str | None, data_cfg: Any, labels: Any) -> Any:
        """The rows to evaluate: the recipe's test split (data None) or every row of `data`."""

    def predict(
        self, model: Any, tokenizer: Any, labels: Any, data_cfg: Any, texts: list[str], text_pairs: Any = None
    ) -> list[dict]:
        """One JSON-able row per text (`hybridtune predict`, serve)."""

    def format_prediction(self, row: dict) -> str:
        """One line of `hybridtune predict` for one of `predict`'s rows."""

    def eval_tables(self, report: dict, title: str = "test") -> list:
        """rich renderables of a report (`hybridtune eval`)."""
