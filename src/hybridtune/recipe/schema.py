"""The Recipe: the whole YAML as one pydantic model, the single source of truth of its keys.

A section per strategy part, made from the parts' list (hybridtune.strategy.PARTS: each part's
config class, `<key>: <config> | None`), between the run's head (name, task, model, data) and the
training plan, train, generation, output and ensemble sections (recipe/sections.py and the plan
parts' config classes). A recipe with no keys at all is the default recipe: MiniLM, fully
fine-tuned on Rotten Tomatoes.

Why `pydantic.create_model` for the parts' sections: the list of parts is the one place a part is
named, so the sections cannot be a second, hand-kept list. pydantic builds them at import (and
`recipe_model` adds the sections of parts registered later, strategy.register). For editors and
type checkers, which cannot see fields made at run time, `Recipe` repeats their types under
`TYPE_CHECKING` (never executed); tests/test_part_contract.py fails when that list and PARTS differ.

Checks across sections: a part's refusals of the rest of the recipe are its own `check` hook
(strategy/base.py), run here; what is left here concerns the task and the data.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import Field, create_model, field_validator, model_validator

from hybridtune import strategy, tasks
from hybridtune.ensemble.config import EnsembleConfig
from hybridtune.paths import NAME_RULE, is_safe_name
from hybridtune.recipe.sections import DataConfig, ModelConfig, OutputConfig, Section, TrainConfig, one_of
from hybridtune.recipe.trunk import expected, static_reason
from hybridtune.self_training.config import SelfTrainingConfig
from hybridtune.strategy.lr import LrConfig
from hybridtune.strategy.schedule import ScheduleConfig
from hybridtune.strategy.stages import StagesConfig
from hybridtune.tasks.causal_lm import GenerationConfig

if TYPE_CHECKING:
    from hybridtune.strategy.adapters import AdaptersConfig
    from hybridtune.strategy.adversarial import AdversarialConfig
    from hybridtune.strategy.contrastive import ContrastiveConfig
    from hybridtune.strategy.distill import DistillConfig
    from hybridtune.strategy.freeze import FreezeConfig
    from hybridtune.strategy.fusion import FusionConfig
    from hybridtune.strategy.l2sp import L2SPConfig
    from hybridtune.strategy.label_loss import LabelLossConfig
    from hybridtune.strategy.layer_sampling import LayerSamplingConfig
    from hybridtune.strategy.mixout import MixoutConfig
    from hybridtune.strategy.neftune import NeftuneConfig
    from hybridtune.strategy.objective import ObjectiveConfig
    from hybridtune.strategy.peft import PeftConfig
    from hybridtune.strategy.pooling import PoolingConfig
    from hybridtune.strategy.prompt import PromptConfig
    from hybridtune.strategy.rdrop import RDropConfig
    from hybridtune.strategy.soft_prompt import SoftPromptConfig


class RecipeHead(Section):
    """The sections before the parts: what the run is called, its task, model and data."""

    name: str = "default"
    task: str = Field("classification", description="a registered task (hybridtune/tasks/__init__.py)")
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()

    @field_validator("task")
    @classmethod
    def _registered(cls, value: str) -> str:
        return one_of(value, tasks.names())  # registered when the recipe is read, not when imported

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        if not is_safe_name(value):
            raise ValueError(NAME_RULE)
        return value


def part_fields(parts: dict[str, strategy.Part]) -> dict[str, Any]:
    """A section per part, `<key>: <config> | None` (unset: the part is off), in the parts' order."""
    return {key: (part.config | None, Field(None, description=part.summary)) for key, part in parts.items()}


if TYPE_CHECKING:
    RecipeParts = RecipeHead
else:
    RecipeParts = create_model("RecipeParts", __base__=RecipeHead, **part_fields(strategy.PARTS))


class Recipe(RecipeParts):
    if TYPE_CHECKING:  # the sections made from strategy.PARTS, for editors only (see the module doc)
        freeze: FreezeConfig | None
        peft: PeftConfig | None
        adapters: AdaptersConfig | None
        soft_prompt: SoftPromptConfig | None
        pooling: PoolingConfig | None
        prompt: PromptConfig | None
        fusion: FusionConfig | None
        objective: ObjectiveConfig | None
        distill: DistillConfig | None
        contrastive: ContrastiveConfig | None
        layer_sampling: LayerSamplingConfig | None
        l2sp: L2SPConfig | None
        mixout: MixoutConfig | None
        label_loss: LabelLossConfig | None
        rdrop: RDropConfig | None
        adversarial: AdversarialConfig | None
        neftune: NeftuneConfig | None
    # the training plan
    lr: LrConfig | None = None
    schedule: ScheduleConfig = ScheduleConfig()
    stages: StagesConfig | None = None
    train: TrainConfig = TrainConfig()
    generation: GenerationConfig = GenerationConfig()  # causal_lm: evaluation's generations
    output: OutputConfig = OutputConfig()
    # K members of this recipe, trained and combined in one run (hybridtune.ensemble)
    ensemble: EnsembleConfig | None = None
    # rounds of pseudo-labelling data.unlabeled, each a run of this recipe (hybridtune.self_training)
    self_training: SelfTrainingConfig | None = None

    @model_validator(mode="after")
    def _task_defaults(self) -> Recipe:
        spec = tasks.spec(self.task)  # the bundled data and model of a recipe without them, its metrics
        if "source" not in self.data.model_fields_set and not self.data.train:
            self.data.source = spec.data
        if "name" not in self.model.model_fields_set and spec.model is not None:
            self.model.name = spec.model  # a decoder for causal_lm, not the default encoder
        stopping = self.train.early_stopping
        if stopping.metric is None:
            stopping.metric = spec.metrics[0]
        elif stopping.metric not in spec.metrics:
            raise ValueError(
                f"train.early_stopping.metric: found {stopping.metric!r}, not a {self.task} metric; "
                f"expected one of {', '.join(spec.metrics)}"
            )
        return self

    @model_validator(mode="after")
    def _parts(self) -> Recipe:
        strategy.check(self)  # each configured part's refusals, by name (its `check` hook)
        return self

    @model_validator(mode="after")
    def _trunk_cache_on(self) -> Recipe:
        if self.train.trunk_cache == "on":
            reason = static_reason(self)
            if reason is not None:
                raise ValueError(f"train.trunk_cache: found on, with {reason}; expected {expected()}")
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
    def _data_for_task(self) -> Recipe:
        spec = tasks.spec(self.task)
        if self.data.long_texts != "truncate":
            # a task without the `long_texts` capability keeps the start of a text (tasks/base.py)
            refused = "long_texts" not in spec.capabilities
            reason = f" ({spec.truncate_reason})" if spec.truncate_reason else ""
            why = (
                f"task {self.task}{reason}"
                if refused
                else "a text pair"
                if self.data.text_pair_column
                else None
            )
            if why:
                raise ValueError(
                    f"data.long_texts: found {self.data.long_texts} with {why}; expected truncate "
                    "(head_tail and chunks read single texts of task classification)"
                )
        labelled = "few_shot" in spec.capabilities
        for key in ("shots", "augment", "pseudo_labels"):
            if getattr(self.data, key) is not None and not labelled:
                raise ValueError(
                    f"data.{key}: found it with task {self.task}; expected a classification task (one label per text)"
                )
        if self.ensemble is not None and self.data.validation_shots == 0:
            raise ValueError(
                "data.validation_shots: found 0 with `ensemble`; expected a validation split (members "
                "are weighed, souped and reported on it)"
            )
        return self

    @model_validator(mode="after")
    def _self_training(self) -> Recipe:
        if self.self_training is None:
            if self.data.unlabeled is not None and not any(getattr(self, k, None) for k in UNLABELED_READERS):
                raise ValueError(
                    "data.unlabeled: found it without a section that reads it; expected "
                    + " or ".join(UNLABELED_READERS)
                )
            return self
        spec = tasks.spec(self.task)
        why = (
            f"task {self.task} (a pseudo-label is one label per text)"
            if "few_shot" not in spec.capabilities
            else "data.text_pair_column (unlabelled texts are single texts)"
            if self.data.text_pair_column
            else "`ensemble` (train the ensemble as the teacher: self_training.teacher)"
            if self.ensemble is not None
            else "data.pseudo_labels (self_training writes each round's)"
            if self.data.pseudo_labels
            else "no data.unlabeled (the texts to pseudo-label)"
            if not self.data.unlabeled
            else None
        )
        if why:
            raise ValueError(
                f"self_training: found it with {why}; expected a classification recipe with data.unlabeled"
            )
        if self.self_training.keep == "best" and self.data.validation_shots == 0:
            given = "" if "keep" in self.self_training.model_fields_set else " (the default)"
            raise ValueError(
                f"self_training.keep: found best{given} with data.validation_shots: 0; expected keep: "
                "last (no validation split to choose a round on) or a validation split"
            )
        return self


# the sections that read data.unlabeled (data/unlabeled.py): without one of them it would be ignored
UNLABELED_READERS = ("self_training", "distill")


# the Recipe with the sections of parts registered after import (strategy.register), per set of parts
_REGISTERED: dict[tuple, type[Recipe]] = {}
_BUILT_IN = tuple(strategy.PARTS)


def recipe_model() -> type[Recipe]:
    """The Recipe with a section for every part in strategy.PARTS: `Recipe`, or once parts were
    registered, a subclass of it with their sections too (so a recipe of it is still a Recipe)."""
    extra = {key: part for key, part in strategy.PARTS.items() if key not in _BUILT_IN}
    if not extra:
        return Recipe
    taken = [key for key in extra if key in Recipe.model_fields]
    if taken:
        raise ValueError(f"strategy.register: found part key {taken[0]!r}; expected a key no section has")
    signature = tuple((key, part.config) for key, part in extra.items())
    if signature not in _REGISTERED:
        _REGISTERED[signature] = create_model("Recipe", __base__=Recipe, **part_fields(extra))
    return _REGISTERED[signature]
