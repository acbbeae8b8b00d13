"""The recipe: one pydantic schema, the single source of truth of the YAML.

Defaults, allowed values and help text live here (and in the strategy parts' own config classes,
which this module imports); error messages are derived from the schema, never written twice.
A recipe with no keys at all is the default recipe: MiniLM, fully fine-tuned on Rotten Tomatoes.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from hybridtune.ensemble import EnsembleConfig
from hybridtune.errors import UserError, did_you_mean
from hybridtune.strategy.adapters import AdaptersConfig
from hybridtune.strategy.freeze import FreezeConfig
from hybridtune.strategy.fusion import FusionConfig
from hybridtune.strategy.lr import LrConfig
from hybridtune.strategy.objective import ObjectiveConfig
from hybridtune.strategy.peft import PeftConfig
from hybridtune.strategy.prompt import SoftPromptConfig
from hybridtune.strategy.schedule import ScheduleConfig
from hybridtune.strategy.stages import StagesConfig
from hybridtune.strategy.verbalizer import PromptConfig
from hybridtune.tasks.causal_lm import GenerationConfig


class Section(BaseModel):
    """Base of every recipe section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    name: str = Field("bundled:minilm", description="bundled:minilm, a local model dir, or a hub id")
    revision: str | None = Field(None, description="hub revision (only for hub ids)")
    tokenizer: str | None = Field(
        None,
        description="the tokenizer: a dir with tokenizer files, a bundled name or a hub id; default: "
        "the model's own files (a model dir without them is refused)",
    )

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value


class SplitConfig(Section):
    """How a single source is split into train / validation / test (stratified, seeded, de-duplicated)."""

    validation: float = Field(0.1, gt=0, lt=0.5)
    test: float = Field(0.1, gt=0, lt=0.5)
    seed: int = 42


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
    max_length: int = Field(128, ge=8, le=32768, description="tokens per example (longer ones are truncated)")
    max_train_samples: int | None = Field(None, ge=1, description="use only the first N training examples")
    max_eval_samples: int | None = Field(
        None, ge=1, description="use only the first N validation/test examples"
    )

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"source": value}
        if isinstance(value, dict) and value.get("train") and "source" not in value:
            value = {**value, "source": None}  # explicit files replace the default source
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


class EarlyStoppingConfig(Section):
    metric: Literal["accuracy", "f1_macro", "f1", "precision", "recall", "loss"] | None = Field(
        None,
        description="validation metric for early stopping and the best checkpoint; default: the task's "
        "main metric (classification: accuracy; token_classification: entity f1, which alone has "
        "f1 / precision / recall)",
    )
    patience: int | None = Field(
        2, ge=1, description="evaluations without improvement before stopping; null = off"
    )


class TrainConfig(Section):
    epochs: float = Field(3, gt=0)
    max_steps: int | None = Field(None, ge=1, description="overrides epochs when set")
    batch_size: int = Field(32, ge=1)
    eval_batch_size: int = Field(128, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(5e-5, gt=0, lt=1)
    weight_decay: float = Field(0.01, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto = bf16 autocast where the CPU/GPU has native bf16, else fp32"
    )
    seed: int = 42
    eval_steps: int | None = Field(None, ge=1, description="evaluate every N steps (default: every epoch)")
    early_stopping: EarlyStoppingConfig = EarlyStoppingConfig()
    group_by_length: bool = Field(True, description="batch examples of similar length (less padding)")
    compile: bool = Field(
        False, description="torch.compile the model (off by default: see docs/BENCHMARKS.md for when it pays)"
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

    @field_validator("trunk_cache", mode="before")
    @classmethod
    def _yaml_switch(cls, value: Any) -> Any:
        # YAML 1.1 reads a bare on / off as a boolean
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value


class OutputConfig(Section):
    dir: str = "runs"
    name: str | None = Field(None, description="run dir name (default: <recipe name>-<timestamp>)")
    keep_checkpoints: int = Field(2, ge=1, description="checkpoints kept (the best is always kept)")


# per task: the bundled data a recipe without `data` trains on, the metrics its validation reports
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "classification": {
        "source": "bundled:rotten_tomatoes",
        "metric": "accuracy",
        "metrics": ("accuracy", "f1_macro", "loss"),
    },
    "prompt_classification": {
        "source": "bundled:rotten_tomatoes",
        "metric": "accuracy",
        "metrics": ("accuracy", "f1_macro", "loss"),
    },
    "token_classification": {
        "source": "bundled:wnut16",
        "metric": "f1",
        "metrics": ("f1", "precision", "recall", "accuracy", "f1_macro", "loss"),
    },
    "causal_lm": {
        "source": "bundled:chatterbot",
        "model": "bundled:smollm2",
        "metric": "loss",
        "metrics": ("loss",),
    },
}


class Recipe(Section):
    name: str = "default"
    task: Literal["classification", "token_classification", "causal_lm", "prompt_classification"] = (
        "classification"
    )
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    # strategy parts, applied in the fixed order of hybridtune.strategy.PARTS
    freeze: FreezeConfig | None = None
    peft: PeftConfig | None = None
    adapters: AdaptersConfig | None = None
    soft_prompt: SoftPromptConfig | None = None
    prompt: PromptConfig | None = None  # task: prompt_classification (template + verbalizer)
    fusion: FusionConfig | None = None
    objective: ObjectiveConfig | None = None
    # the training plan
    lr: LrConfig | None = None
    schedule: ScheduleConfig = ScheduleConfig()
    stages: StagesConfig | None = None
    train: TrainConfig = TrainConfig()
    generation: GenerationConfig = GenerationConfig()  # causal_lm: evaluation's generations
    output: OutputConfig = OutputConfig()
    # K members of this recipe, trained and combined in one run (hybridtune.ensemble)
    ensemble: EnsembleConfig | None = None

    @model_validator(mode="after")
    def _task_defaults(self) -> Recipe:
        defaults = TASK_DEFAULTS[self.task]
        if "source" not in self.data.model_fields_set and not self.data.train:
            self.data.source = defaults["source"]
        if "name" not in self.model.model_fields_set and "model" in defaults:
            self.model.name = defaults["model"]  # a decoder for causal_lm, not the default encoder
        stopping = self.train.early_stopping
        if stopping.metric is None:
            stopping.metric = defaults["metric"]
        elif stopping.metric not in defaults["metrics"]:
            raise ValueError(
                f"train.early_stopping.metric: found {stopping.metric!r}, not a {self.task} metric; "
                f"expected one of {', '.join(defaults['metrics'])}"
            )
        return self

    @model_validator(mode="after")
    def _combinations(self) -> Recipe:
        if self.freeze is not None and self.stages is not None:
            raise ValueError(
                "stages: found `freeze` and `stages` together; expected one of them: give `freeze` or "
                "`stages`, not both (stages decide what trains in each stage)"
            )
        if self.train.trunk_cache == "on":
            from hybridtune.train.trunk_cache import EXPECTED, static_reason

            reason = static_reason(self)
            if reason is not None:
                raise ValueError(f"train.trunk_cache: found on, with {reason}; expected {EXPECTED}")
        return self

    @model_validator(mode="before")
    @classmethod
    def _prompt_default(cls, value: Any) -> Any:
        # a prompt task always has a prompt (its defaults: the template and verbalizer of the model kind)
        if (
            isinstance(value, dict)
            and value.get("task") == "prompt_classification"
            and not value.get("prompt")
        ):
            value = {**value, "prompt": {}}
        return value

    @model_validator(mode="after")
    def _prompt_parts(self) -> Recipe:
        prompt_task = self.task == "prompt_classification"
        if self.prompt is not None and not prompt_task:
            raise ValueError(
                f"prompt: found a prompt with task {self.task}; expected task: prompt_classification"
            )
        if self.objective is not None and not prompt_task:
            raise ValueError(
                f"objective: found a mixed LM objective with task {self.task}, whose model has no LM head; "
                "expected task: prompt_classification"
            )
        if self.fusion is not None and self.task == "token_classification":
            raise ValueError(
                "fusion: found fusion with task token_classification; expected a classification task"
            )
        if self.fusion is not None and self.fusion.frozen == "zero_shot" and not prompt_task:
            raise ValueError(
                f"fusion.frozen: found zero_shot with task {self.task}; expected task: prompt_classification "
                "(a zero-shot scorer needs a prompt), or a run dir"
            )
        return self

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", value):
            raise ValueError("a name of letters, digits, '.', '_' or '-'")
        return value


# --------------------------------------------------------------------------------------------------
# loading


def load_recipe(path: str | Path | None = None, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe (or the default when `path` is None), apply `key.path=value` overrides, validate."""
    origin = str(path) if path else "default recipe"
    raw: Any = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(str(path), "no such file", "a recipe YAML file")
        try:
            text = p.read_text(encoding="utf-8-sig")
            raw = yaml.safe_load(text) or {}
        except UnicodeDecodeError as e:
            raise UserError(
                str(path), f"bytes that are not UTF-8 ({e.reason})", "a UTF-8 text file"
            ) from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark else str(path)
            if isinstance(e, yaml.reader.ReaderError):  # a character YAML does not allow
                where = f"{path}:{text.count(chr(10), 0, e.position) + 1}"
            raise UserError(where, f"invalid YAML ({getattr(e, 'problem', e)})", "a YAML mapping") from None
        if not isinstance(raw, dict):
            raise UserError(str(path), f"a YAML {type(raw).__name__}", "a mapping of recipe keys")
    for item in overrides or []:
        apply_override(raw, item)
    return validate_recipe(raw, origin)


def apply_override(raw: dict, item: str) -> None:
    """Set `a.b.c=value` in the nested dict; the value is parsed as YAML (so 3 is an int, [1,2] a list)."""
    key, sep, text = item.partition("=")
    if not sep or not key or not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", key):
        raise UserError(f"override '{item}'", "no key=value", "key.path=value, e.g. train.epochs=1")
    try:
        value = yaml.safe_load(text) if text else None
    except yaml.YAMLError:
        value = text
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if isinstance(child, str):  # shorthand such as `model: bundled:minilm`
            child = {"name" if part == "model" else "source": child}
        if not isinstance(child, dict):
            child = {}
        node[part] = child
        node = child
    node[parts[-1]] = value
    if parts[:2] == ["data", "train"]:
        node.pop(
            "source", None
        )  # explicit files replace the recipe's source (a later data.source= sets it again)


def validate_recipe(raw: dict, origin: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        raise _user_error(e, origin) from None


def _key_path(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The pydantic model that owns the last key of `loc` (for did-you-mean on unknown keys)."""
    model: Any = Recipe
    for part in loc[:-1]:
        if isinstance(part, int) or not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
        field = model.model_fields.get(part)
        if field is None:
            return None
        ann = field.annotation
        candidates = [
            a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)
        ]
        model = candidates[0] if candidates else None
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


# the names users bring from transformers.TrainingArguments, for did-you-mean
FAMILIAR_NAMES = {
    "learning_rate": "lr",
    "num_train_epochs": "epochs",
    "num_epochs": "epochs",
    "epoch": "epochs",
    "per_device_train_batch_size": "batch_size",
    "per_device_eval_batch_size": "eval_batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "warmup_ratio": "schedule.warmup",
    "warmup_steps": "schedule.warmup",
    "warmup": "schedule.warmup",
    "lr_scheduler_type": "schedule.name",
    "scheduler": "schedule.name",
    "bf16": "precision",
    "fp16": "precision",
    "output_dir": "dir",
}


def _user_error(e: ValidationError, origin: str) -> UserError:
    err = e.errors()[0]
    loc = tuple(
        p for p in err["loc"] if not (isinstance(p, str) and p.startswith(("function-", "tagged-union")))
    )
    where = f"{origin}: {_key_path(loc)}"
    if err["type"] == "extra_forbidden":
        owner = _model_at(loc)
        allowed = sorted(owner.model_fields) if owner else []
        key = str(loc[-1])
        familiar = FAMILIAR_NAMES.get(key)
        if familiar and (familiar in allowed or "." in familiar):
            hint = f"did you mean '{familiar}'?"
        else:
            hint = did_you_mean(key, allowed)
        return UserError(
            where, f"unknown key '{key}'", "one of " + ", ".join(allowed) if allowed else "no such key", hint
        )
    # a check across sections names its own key: "key.path: found X; expected Y"
    pointed = re.fullmatch(r"Value error, ([\w.\[\]]+): found (.+); expected (.+)", err["msg"], re.S)
    if pointed:
        return UserError(f"{origin}: {pointed[1]}", pointed[2], pointed[3])
    found = err.get("input")
    found_text = "nothing" if found is None else f"{found!r} ({type(found).__name__})"
    if err["type"] == "missing":
        found_text = "nothing"
    expected = err["msg"]
    ctx = err.get("ctx") or {}
    if err["type"] == "literal_error" and "expected" in ctx:
        expected = "one of " + ctx["expected"]
        hint = did_you_mean(str(found), re.findall(r"'([^']+)'", ctx["expected"]))
        return UserError(where, found_text, expected, hint)
    expected = re.sub(r"^(Value error, |Input should be )", "", expected)
    more = len(e.errors()) - 1
    return UserError(where, found_text, expected, f"and {more} more problem(s)" if more else None)


def recipe_to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
