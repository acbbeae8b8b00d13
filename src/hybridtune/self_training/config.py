"""`self_training:` in a recipe (SelfTrainingConfig). No torch here: `recipe/schema.py` imports this
module; the rounds are trained by `self_training/rounds.py`."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

SUMMARY = "self_training.json"  # in the run dir: every round's record


class SelfTrainingConfig(BaseModel):
    """Self-training on `data.unlabeled`: a teacher pseudo-labels the texts, the confident ones join
    the training set, a student trains from the pretrained weights; the student teaches the next round."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    rounds: int = Field(
        2, ge=1, le=100, description="student rounds, each trained on labelled + pseudo-labelled rows"
    )
    threshold: float = Field(
        0.9, gt=0, le=1, description="a text joins when the teacher's top class probability is >= this"
    )
    per_class: Literal["balanced", "none"] = Field(
        "balanced",
        description="balanced: every class gets as many as the class with the fewest confident texts "
        "(highest confidence first); none: every confident text",
    )
    max_per_round: int | None = Field(
        None,
        ge=1,
        description="at most this many pseudo-labelled texts per round (balanced: max_per_round // "
        "classes per class), highest confidence first",
    )
    teacher: str | None = Field(
        None,
        description="the first round's teacher: a finished run or ensemble dir of this task and label "
        "set; default: round 0 trains the recipe on the labelled rows",
    )
    min_added: int = Field(
        1,
        ge=1,
        description="a round whose pseudo-labelling adds fewer texts stops the rounds before its student "
        "trains (1: only a round that adds nothing)",
    )
    keep: Literal["best", "last"] = Field(
        "best",
        description="the round whose model is the run's final/ and test result: best = the best "
        "validation score (train.early_stopping.metric; ties: the earlier round), last = the last round "
        "trained",
    )
    student_overrides: list[str] = Field(
        [],
        description="train.<key>=value overrides of the rounds that train on pseudo-labels (e.g. "
        "train.epochs=2: they have many more rows than round 0)",
    )

    @field_validator("student_overrides")
    @classmethod
    def _train_keys(cls, value: list[str]) -> list[str]:
        # only the training budget: the strategy and data stay the recipe's, so the run's final/
        # (the kept round's) loads with the run's own recipe.yaml
        for item in value:
            key, sep, _ = item.partition("=")
            if not sep or not key.startswith("train.") or key == "train.":
                raise ValueError(
                    f"found {item!r}; expected train.<key>=<value> (the students' training budget: the "
                    "strategy and data stay the recipe's)"
                )
        return value
