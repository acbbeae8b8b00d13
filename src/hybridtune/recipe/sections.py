"""The recipe's sections other than the strategy parts: model, data (and its split), train (and
early stopping), output; and `Section`, the base of every section.

Defaults, allowed values and help text live here, in the fields (the parts' sections are the parts'
own config classes, strategy/<key>.py); error messages are derived from the schema, never written
twice (recipe/errors.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from hybridtune import tasks
from hybridtune.data.augment import AugmentConfig
from hybridtune.paths import NAME_RULE, is_safe_name


class Section(BaseModel):
    """Base of every recipe section: unknown keys are errors, values are validated on assignment."""

    # inf / nan are no setting of any key (a NaN epoch count trained; an inf weight decay diverged)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelConfig(Section):
    name: str = Field(
        "bundled:minilm",
        description="bundled:minilm | bundled:smollm2, a local model dir, a .gguf file (de-quantized once "
        "into a cached plain copy), or a hub id",
    )
    gguf_file: str | None = Field(
        None, description="a .gguf file in the dir `name` (read as name: DIR/FILE.gguf, which it becomes)"
    )
    revision: str | None = Field(None, description="hub revision (only for hub ids)")
    tokenizer: str | None = Field(
        None,
        description="the tokenizer: a dir with tokenizer files, a bundled name or a hub id; default: "
        "the model's own files (a model dir without them is refused)",
    )

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        value = {"name": value} if isinstance(value, str) else value
        if isinstance(value, dict) and value.get("gguf_file"):
            # one spelling downstream: every loader sees a .gguf path in `name`
            file, folder = str(value["gguf_file"]), str(value.get("name") or "")
            if not file.lower().endswith(".gguf"):
                raise ValueError(f"model.gguf_file: found {file!r}; expected a file name ending in .gguf")
            if not folder or folder.startswith("bundled:"):
                raise ValueError(
                    f"model.gguf_file: found {file!r} with model.name {folder!r}; expected the dir that holds it"
                )
            value = {**value, "name": str(Path(folder) / file), "gguf_file": None}
        return value


# numpy's and torch's seeds: 0 .. 2**32 - 1 (numpy refuses anything else, with a traceback)
SEED_MAX = 2**32 - 1


class SplitConfig(Section):
    """How a single source is split into train / validation / test (stratified, seeded, de-duplicated)."""

    validation: float = Field(0.1, gt=0, lt=0.5)
    test: float = Field(0.1, gt=0, lt=0.5)
    seed: int = Field(42, ge=0, le=SEED_MAX, description="the split's seed (numpy's range)")


class DataConfig(Section):
    source: str | None = Field(
        "bundled:rotten_tomatoes",
        description="bundled:rotten_tomatoes | bundled:imdb | bundled:wnut16 | bundled:chatterbot | a csv/tsv/jsonl/parquet file | "
        "a CoNLL token file (.conll/.txt/.bio) | a saved HF dataset dir; split into train/validation/test by "
        "`split`; default: the task's bundled data set",
    )
    train: str | None = Field(None, description="explicit train file (instead of `source`)")
    validation: str | None = None
    test: str | None = None
    delimiter: str | None = Field(
        None,
        description="of CSV files: one character (`tab` or \\t for a tab); default: sniffed among , ; tab | "
        "(a .tsv file: tab)",
    )
    text_column: str = "text"
    text_pair_column: str | None = Field(None, description="second text for sentence-pair tasks")
    label_column: str = "label"
    tokens_column: str = Field("tokens", description="token_classification: the list of words of a row")
    tags_column: str = Field("tags", description="token_classification: the list of BIO tags of a row")
    prompt_column: str = Field("prompt", description="causal_lm: the instruction / question of a row")
    response_column: str = Field("response", description="causal_lm: the answer the model learns")
    messages_column: str | None = Field(
        None,
        description="causal_lm: a column of chat turns [{role, content}] (instead of prompt/response); "
        "the last turn, the assistant's, is the response",
    )
    split: SplitConfig = SplitConfig()
    max_length: int = Field(
        128, ge=8, le=32768, description="tokens per example (longer texts: see `long_texts`)"
    )
    long_texts: Literal["truncate", "head_tail", "chunks"] = Field(
        "truncate",
        description="texts longer than max_length (classification; docs/data.md): truncate = keep the "
        "start; head_tail = keep the first quarter and the last three quarters of the budget (Sun et al. "
        "2019); chunks = windows of max_length over the whole text, each a training example, scores "
        "pooled per document",
    )
    stride: int | None = Field(
        None, ge=0, description="chunks: tokens two neighbouring windows share; default max_length // 4"
    )
    pool: Literal["mean", "max"] = Field(
        "mean", description="chunks: a document's logits from its windows' logits (validation, test, predict)"
    )
    max_train_samples: int | None = Field(None, ge=1, description="use only the first N training examples")
    max_eval_samples: int | None = Field(
        None, ge=1, description="use only the first N validation/test examples"
    )
    # few-shot (data/shots.py, docs/few_shot.md): k per class drawn from the train split, seeded
    shots: int | None = Field(
        None, ge=1, description="few-shot: k labelled examples per class from the train split"
    )
    draws: int = Field(
        1, ge=1, description="few-shot: seeded draws; compare runs each strategy on every draw"
    )
    draw: int = Field(
        0, ge=0, description="few-shot: the draw this run trains on, 0 .. draws-1 (compare sets it)"
    )
    validation_shots: int | None = Field(
        None,
        ge=0,
        description="few-shot: per class from the validation split (default: = shots); 0 = no validation: "
        "train.epochs / max_steps, the last model kept",
    )
    augment: AugmentConfig | None = Field(
        None, description="EDA copies of the training texts (data/augment.py)"
    )
    # self-training (hybridtune/self_training/, docs/few_shot.md) and distill (docs/distill.md): texts
    # without labels, and a self-training round's pseudo-labels
    unlabeled: str | None = Field(
        None,
        description="texts without labels, read by self_training and distill (data/unlabeled.py): a "
        "csv/tsv/jsonl/json/parquet file or saved "
        "dataset dir (its text_column; a label column must agree with the label set), a .txt file (one "
        "text per line), bundled:<name>, or train_rest (the train split's rows the few-shot draw left out, "
        "labels dropped); texts of the labelled splits are left out",
    )
    pseudo_labels: str | None = Field(
        None,
        description="labelled rows appended to the train split after the few-shot draw (before augment): "
        "a self-training round's pseudo-labels, which `self_training` writes",
    )

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"source": value}
        if isinstance(value, dict) and value.get("train") and "source" not in value:
            value = {**value, "source": None}  # explicit files replace the default source
        return value

    @field_validator("delimiter", mode="before")
    @classmethod
    def _delimiter(cls, value: Any) -> Any:
        # a tab is hard to write on a command line or in YAML without quotes: `tab` and `\t` say it
        value = {"tab": "\t", "\\t": "\t"}.get(value, value) if isinstance(value, str) else value
        if isinstance(value, str) and (len(value) != 1 or value in '"\r\n'):
            raise ValueError("one character other than a quote or a line break (`tab` for a tab)")
        return value

    @model_validator(mode="after")
    def _one_origin(self) -> DataConfig:
        if self.source and self.train:
            raise ValueError(
                f"data.train: found '{self.train}' and data.source '{self.source}' both; expected either "
                "`source` (split automatically) or `train` (+ validation/test)"
            )
        if not self.source and not self.train:
            raise ValueError("data.source: found neither `source` nor `train`; expected one of them")
        return self

    @model_validator(mode="after")
    def _long_texts(self) -> DataConfig:
        # a windowing key without windows would be silently ignored: say so instead
        for key in ("stride", "pool"):
            if getattr(self, key) != DataConfig.model_fields[key].default and self.long_texts != "chunks":
                raise ValueError(
                    f"data.{key}: found {getattr(self, key)!r} with data.long_texts {self.long_texts}; "
                    f"expected data.long_texts: chunks (`{key}` shapes the windows of chunks only)"
                )
        if self.stride is not None and self.stride >= self.max_length // 2:
            raise ValueError(
                f"data.stride: found {self.stride}; expected fewer than {self.max_length // 2} tokens "
                f"(half of data.max_length {self.max_length}), so each window brings new text"
            )
        return self

    def window_stride(self) -> int:
        """The overlap of chunks' windows: `stride`, or a quarter of max_length (a window sees a
        quarter of its neighbour's context, as the HF question-answering examples' doc_stride does)."""
        return self.stride if self.stride is not None else self.max_length // 4

    @model_validator(mode="after")
    def _few_shot(self) -> DataConfig:
        if self.draw >= self.draws:
            raise ValueError(
                f"data.draw: found {self.draw} with data.draws {self.draws}; expected 0 .. {self.draws - 1}"
            )
        if self.shots is None and (self.validation_shots is not None or self.draws > 1):
            key = "validation_shots" if self.validation_shots is not None else "draws"
            raise ValueError(
                f"data.{key}: found it without data.shots; expected data.shots (k per class) too"
            )
        return self


def one_of(value: str, choices: tuple[str, ...]) -> str:
    """`value` if it is one of `choices` (known at validation time: registered tasks, their metrics),
    else the error a Literal gives (recipe/errors.py adds the did-you-mean)."""
    if value not in choices:
        quoted = [f"'{c}'" for c in choices]
        expected = quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]
        raise PydanticCustomError("literal_error", "Input should be {expected}", {"expected": expected})
    return value


class EarlyStoppingConfig(Section):
    metric: str | None = Field(
        None,
        description="validation metric for early stopping and the best checkpoint, one of the task's "
        "`metrics` (hybridtune/tasks/__init__.py); default: its first (classification: accuracy; "
        "token_classification: entity f1, which alone has f1 / precision / recall)",
    )
    patience: int | None = Field(
        2, ge=1, description="evaluations without improvement before stopping; null = off"
    )

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, value: str | None) -> str | None:
        return None if value is None else one_of(value, tasks.all_metrics())


class TrainConfig(Section):
    # the upper bounds are far above any real run and stop a typo (1e300 epochs planned 1.2e16 steps)
    epochs: float = Field(3, gt=0, le=10_000)
    max_steps: int | None = Field(None, ge=1, le=10**9, description="overrides epochs when set")
    batch_size: int = Field(32, ge=1, le=2**20)
    eval_batch_size: int = Field(128, ge=1, le=2**20)
    grad_accum: int = Field(1, ge=1, le=2**20)
    lr: float = Field(5e-5, gt=0, lt=1)
    weight_decay: float = Field(0.01, ge=0, le=100)
    max_grad_norm: float = Field(1.0, gt=0, le=1e12)  # a huge value turns clipping off
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto = bf16 autocast where the CPU/GPU has native bf16, else fp32"
    )
    seed: int = Field(42, ge=0, le=SEED_MAX)
    eval_steps: int | None = Field(None, ge=1, description="evaluate every N steps (default: every epoch)")
    early_stopping: EarlyStoppingConfig = EarlyStoppingConfig()
    group_by_length: bool = Field(True, description="batch examples of similar length (less padding)")
    compile: bool = Field(
        False, description="torch.compile the model (off by default: see docs/BENCHMARKS.md for when it pays)"
    )
    gradient_checkpointing: bool = Field(
        False,
        description="keep only each block's input in training and recompute the rest in the backward pass: "
        "less memory for long inputs and bigger models, about one more forward of compute (docs/speed.md)",
    )
    logging_steps: int = Field(20, ge=1)
    on_nan: Literal["stop", "skip"] = Field(
        "stop",
        description="a NaN / inf training loss: stop (exit code 3, checkpoints kept) or skip that batch",
    )
    trunk_cache: Literal["auto", "off", "on"] = Field(
        "auto",
        description="compute the frozen bottom blocks once per example instead of every epoch (head-only, "
        "top-k; docs/speed.md): auto = where the run allows it, on = required, off = never",
    )

    report_to: list[Literal["tensorboard", "mlflow"]] = Field(
        [],
        description="trackers the run's params and log lines also go to: mlflow = an MLflow run "
        "(MLFLOW_TRACKING_URI, else a SQLite store in <output.dir>/mlruns; pip install "
        "'hybridtune[mlflow]'); tensorboard is always written into the run dir",
    )

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_tracker(cls, value: Any) -> Any:
        # `report_to: mlflow` (transformers' TrainingArguments take a string too) is a list of one
        return [value] if isinstance(value, str) else value

    @field_validator("trunk_cache", mode="before")
    @classmethod
    def _yaml_switch(cls, value: Any) -> Any:
        # YAML 1.1 reads a bare on / off as a boolean
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value


class OutputConfig(Section):
    dir: str = "runs"
    name: str | None = Field(
        None,
        description="run dir name, inside `dir` (default: <recipe name>-<timestamp>, then -2, -3, ... "
        "for later runs of the same second)",
    )
    keep_checkpoints: int = Field(2, ge=1, description="checkpoints kept (the best is always kept)")

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str | None) -> str | None:
        # a path component: '../x', 'a/b' or '/abs' would put the run outside `dir`
        if value is not None and not is_safe_name(value):
            raise ValueError(NAME_RULE)
        return value
