"""The search space: whole strategies (families) and their settings, conditional on the family.

    name: rt-search
    base:                      # recipe keys every trial shares (model, data, ...); or a recipe file
      data: {source: bundled:rotten_tomatoes, max_train_samples: 2000}
    metric: accuracy           # the validation metric (default: the task's main one)
    objectives: [metric, params]   # + params | time | memory: a multi-objective (Pareto) search
    parts:                     # parts a trial may add (default: every part declaring `search`)
      rdrop: {alpha: {low: 0.1, high: 5.0, log: true}}
    families:                  # searched families (default: all) and their settings
      lora: {r: [4, 8, 16], lr: {low: 1.0e-4, high: 3.0e-3, log: true}}
      full: {}
    train: {epochs: [1, 2], batch_size: [16, 32]}
    lr_range_test: true        # an lr range test per family narrows its lr range (search/lr_range.py)
    start: families            # first one cheap trial per family (`start_trials`); none: TPE's draws

A family's settings exist only in its own trials (Optuna parameters named `lora.r`, `lora.lr`): TPE
models them conditionally (`group=True`). A space file restricts the default space (only the
families it names are searched) and changes or extends each family's settings (its keys replace
the defaults, the rest keep them). Every trial is an ordinary recipe: `recipe_for` turns a trial's
values into the recipe dict that `recipe.validate_recipe` checks and `hybridtune train` runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from hybridtune.search.families import FAMILIES, Families, Family, strategy_keys
from hybridtune.search.params import Param, param
from hybridtune.search.parts import default_parts, parse_parts, parts_off, sample_parts, to_yaml
from hybridtune.tasks import higher_is_better

# ---- the space --------------------------------------------------------------------------------------


class TrainSpace(BaseModel):
    """Settings every family shares."""

    model_config = ConfigDict(extra="forbid", validate_default=True, arbitrary_types_allowed=True)

    epochs: param(float, gt=0) = [1.0, 2.0, 3.0]
    batch_size: param(int, ge=1) = [16, 32]
    warmup: param(float, ge=0, lt=1) = {"low": 0.0, "high": 0.1}
    weight_decay: param(float, ge=0) = [0.0, 0.01, 0.1]
    schedule: param(str, allowed=("linear", "cosine", "constant_with_warmup", "stlr")) = ["linear", "cosine"]

    @property
    def fewest_epochs(self) -> float:
        """The shortest trial's epochs: the start trials' length, and the training after which every
        trial validates `evaluations` times over (search/setup.py `finish`)."""
        return min(self.epochs.corners())


class VerdictConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    top: int = Field(3, ge=0, description="the best recipes retrained (0: no verdict)")
    seeds: int = Field(3, ge=1, description="seeds per recipe (the search's seed + 1, + 2, ...)")
    light: float | None = Field(
        None,
        gt=0,
        le=100,
        description="also retrain the best complete trial with at most this % of trainable parameters, "
        "when the top ones hold none (e.g. 2.0: the best parameter-efficient recipe)",
    )
    reference: dict = Field(
        default_factory=dict,
        description="recipe keys of the reference on top of `base` (default: the default recipe, "
        "full fine-tuning)",
    )
    confirm: int = Field(
        3,
        ge=0,
        description="before the verdict, retrain this many best trials (and with `light` the as many "
        "best light ones) with `confirm_seeds` more seeds, on validation only, and pick the verdict's "
        "recipes by the mean over seeds (search/confirm.py; 0: pick on the search's seed alone)",
    )
    confirm_seeds: int = Field(
        1, ge=1, description="seeds per confirmed trial (the search's seed + 1000, + 1001, ...)"
    )


class LrRangeTest(BaseModel):
    """The lr range test per family before the first trial (search/lr_range.py): `steps` steps, the lr
    growing exponentially from `low` to `high`; the family then searches suggestion / factor ... x factor."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(100, ge=5, le=10_000, description="training steps of the test (fastai: 100)")
    low: float = Field(1e-7, gt=0, lt=1, description="the lr of the first step (fastai: 1e-7)")
    high: float = Field(10.0, gt=0, le=10, description="the lr of the last step (fastai: 10)")
    factor: float = Field(3.0, gt=1, le=100, description="searched lr: suggestion / factor ... x factor")
    suggest: Literal["minimum", "steepest"] = Field(
        "minimum", description="the lowest smoothed loss's lr / 10, or where the loss falls fastest"
    )
    within: Literal["family", "test"] = Field(
        "family",
        description="family: the window is cut to the family's lr range (the space file's or the "
        "default); test: it replaces the default range (a space file's range still cuts it)",
    )

    @model_validator(mode="after")
    def _order(self) -> LrRangeTest:
        if not self.low < self.high:
            raise ValueError(f"found low {self.low} >= high {self.high}; expected low < high")
        return self


def _lr_range_test(value: Any) -> Any:
    """`lr_range_test: true` = the defaults; false / null = off; or a mapping of its settings."""
    if value is True or value is False or value is None:
        return {} if value else None
    if not isinstance(value, dict | LrRangeTest):
        fields = ", ".join(LrRangeTest.model_fields)
        raise ValueError(
            f"found {value!r} ({type(value).__name__}); expected true, false or a mapping of {fields}"
        )
    return value


OBJECTIVES = ("metric", "params", "time", "memory")
PRUNERS = ("hyperband", "successive_halving", "median", "none")
# the pruners study.py's SameLength can wrap (Hyperband's brackets are Optuna's own)
BY_LENGTH = ("successive_halving", "median")
WITH_RUNGS = ("successive_halving", "hyperband")  # the pruners whose rungs reduction_factor spaces
# the keys a trial sets: a base that sets them contradicts the space
SEARCHED = {"freeze", "peft", "adapters", "soft_prompt", "stages", "lr", "prompt", "fusion", "ensemble"}
SEARCHED_TRAIN = {"lr", "epochs", "batch_size", "weight_decay", "max_steps"}


class Space(BaseModel):
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, validate_default=True)

    name: str = Field("search", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    base: dict | str = Field(
        default_factory=dict, description="recipe keys every trial shares, or a recipe file"
    )
    metric: str | None = Field(None, description="validation metric (default: the task's main metric)")
    objectives: list[Literal["metric", "params", "time", "memory"]] = Field(
        default_factory=lambda: ["metric"]
    )
    families: Families = Field(default_factory=lambda: {name: {} for name in FAMILIES})
    train: TrainSpace = Field(default_factory=TrainSpace)
    # parts a trial may add to its family (search/parts.py); default: those declaring `search`
    parts: Annotated[dict[str, dict[str, Param]], BeforeValidator(parse_parts)] = Field(
        default_factory=default_parts
    )
    evaluations: int = Field(
        4,
        ge=1,
        description="validations of a trial of the fewest epochs; every trial validates after as much "
        "training, so a longer one more often (the rungs the pruner compares)",
    )
    sampler: Literal["auto", "tpe", "nsga2", "random"] = "auto"
    pruner: Literal["hyperband", "successive_halving", "median", "none"] = "successive_halving"
    reduction_factor: int = Field(
        2,
        ge=2,
        description="successive halving, Hyperband and Ray's ASHA: rungs at evaluations 1, f, f², ... "
        "and a rung keeps the best 1/f of the trials that reached it (Optuna's and Ray's own default "
        "is 4; 2 prunes least)",
    )
    draw_rungs: bool = Field(
        False,
        description="a few-shot base (data.draws n): rungs between draws too -- after 1, f, f², ... "
        "draws (before the last) a trial goes on only if its mean over them is among the best 1/f of "
        "the trials' means after as many draws (successive halving with draws as the resource)",
    )
    prune_among: Literal["same_length", "all"] | None = Field(
        None,
        description="which trials a trial's rung is compared with: those planned to validate as often "
        "(the same length: a 1-epoch trial has annealed its lr by the rung a 3-epoch one meets at full "
        "lr) or all; default same_length for successive_halving and median, all for hyperband",
    )
    seed: int = 42
    enqueue: list[dict[str, Any]] = Field(default_factory=list, description="trials to run first (params)")
    start: Literal["families", "none"] = Field(
        "families",
        description="after `enqueue`, before the sampler's own draws: one trial per family at its "
        "typical settings, the fewest epochs and no added part (`start_trials`); none: the sampler "
        "from the first trial",
    )
    lr_range_test: Annotated[LrRangeTest | None, BeforeValidator(_lr_range_test)] = Field(
        None, description="an lr range test per family before the first trial narrows its lr range"
    )
    verdict: VerdictConfig = Field(default_factory=VerdictConfig)

    @field_validator("families", mode="before")
    @classmethod
    def _names(cls, value: Any) -> Any:
        if isinstance(value, list):  # families: [lora, full] = those, with their default settings
            if not all(isinstance(v, str) for v in value):
                raise ValueError("found a list with non-names; expected family names or a mapping")
            return {name: {} for name in value}
        if isinstance(value, dict):  # `lora:` with nothing under it = lora with its defaults
            return {k: ({} if v is None else v) for k, v in value.items()}
        return value

    @model_validator(mode="after")
    def _objectives(self) -> Space:
        if not self.chosen():
            raise ValueError("families: found no family; expected at least one of " + ", ".join(FAMILIES))
        if "metric" not in self.objectives:
            raise ValueError("objectives: found no 'metric'; expected the validation metric among them")
        if len(set(self.objectives)) < len(self.objectives):
            raise ValueError(f"objectives: found {self.objectives}, one twice; expected distinct objectives")
        if self.prune_among == "same_length" and self.pruner not in BY_LENGTH:
            raise ValueError(
                f"prune_among: found same_length with pruner {self.pruner}; expected pruner "
                "successive_halving or median (Hyperband's brackets are Optuna's own), or prune_among: all"
            )
        if "reduction_factor" in self.model_fields_set and self.pruner not in WITH_RUNGS:
            raise ValueError(
                f"reduction_factor: found {self.reduction_factor} with pruner {self.pruner}; expected "
                "pruner successive_halving or hyperband (the median pruner has no rungs), or no reduction_factor"
            )
        if self.draw_rungs and self.pruner not in WITH_RUNGS:
            raise ValueError(
                f"draw_rungs: found true with pruner {self.pruner}; expected pruner successive_halving "
                "or hyperband (the rungs keep the best 1/reduction_factor), or draw_rungs: false"
            )
        if self.objectives[0] != "metric":
            self.objectives = ["metric", *[o for o in self.objectives if o != "metric"]]
        return self

    def chosen(self) -> dict[str, Family]:
        """The searched families and their settings, in the order of FAMILIES."""
        return {
            name: getattr(self.families, name)
            for name in FAMILIES
            if getattr(self.families, name) is not None
        }

    def pruned_among(self) -> str:
        """`prune_among` resolved: same_length where the pruner can compare so, else all."""
        if self.prune_among is not None:
            return self.prune_among
        return "same_length" if self.pruner in BY_LENGTH else "all"

    def directions(self, metric: str) -> list[str]:
        first = "maximize" if higher_is_better(metric) else "minimize"
        return [first] + ["minimize"] * (len(self.objectives) - 1)

    def identity(self) -> dict:
        """What makes two searches the same study (resume): everything but the verdict's settings."""
        dump = self.model_dump(mode="python", exclude={"verdict"})
        dump["families"] = {k: _yaml(v) for k, v in self.chosen().items()}
        dump["train"] = _yaml(self.train)
        dump["parts"] = to_yaml(self.parts)
        if dump["lr_range_test"] is None:  # off: a search dir made before the key existed resumes
            del dump["lr_range_test"]
        if dump["start"] == "families":  # the default: likewise
            del dump["start"]
        if dump["prune_among"] is None:  # the default: likewise
            del dump["prune_among"]
        if dump["reduction_factor"] == 2:  # the default: likewise
            del dump["reduction_factor"]
        if not dump["draw_rungs"]:  # the default: likewise
            del dump["draw_rungs"]
        if dump.get("lr_range_test", {}).get("within") == "family":  # the default: likewise
            del dump["lr_range_test"]["within"]
        return dump


def _yaml(model: BaseModel) -> dict:
    return {k: (v.to_yaml() if isinstance(v, Param) else v) for k, v in dict(model).items()}


def sample(
    space: Space, trial: Any, fits: Callable[[str, dict, dict, str], bool] | None = None
) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """A trial's family, its family values and the shared training values (Optuna suggest calls);
    the shared values' `parts`: the recipe sections of the parts the trial adds (search/parts.py).
    `fits(family, values, shared, key)`: whether part `key` can go into the trial drawn so far
    (`shared["parts"]`: the parts drawn before it); search/setup.py's `sample_trial` gives it."""
    chosen = space.chosen()
    names = list(chosen)
    family = names[0] if len(names) == 1 else trial.suggest_categorical("family", names)
    settings = chosen[family]
    values = {k: p.sample(trial, f"{family}.{k}") for k, p in dict(settings).items()}
    shared = {k: p.sample(trial, k) for k, p in dict(space.train).items()}
    parts_fit = None
    if fits is not None:

        def parts_fit(drawn: dict, key: str) -> bool:
            return fits(family, values, shared | {"parts": drawn}, key)

    shared["parts"] = sample_parts(space.parts, trial, parts_fit)
    return family, values, shared


def start_trials(space: Space) -> list[dict[str, Any]]:
    """The Optuna parameters of the start trials (`start: families`): one per family, in the order of
    FAMILIES (full fine-tuning, the reference, first), each setting at its typical value
    (`Param.typical`; a family's lr in the middle of its range, after an lr range test its
    narrowed one), the fewest epochs, every part off where the space lets it be off. A cheap first
    look at every family: the sampler's first draws would otherwise often be the costliest kind
    (3 epochs with two loss-adding parts) and leave families unseen on a small budget."""
    if space.start == "none":
        return []
    shared = typical(space.train) | {"epochs": space.train.fewest_epochs}
    off = parts_off(space.parts)
    return [
        {"family": family} | {f"{family}.{k}": v for k, v in typical(settings).items()} | shared | off
        for family, settings in space.chosen().items()
    ]


def typical(settings: BaseModel) -> dict[str, Any]:
    """Each setting of a family (or of the shared training settings) at its typical value
    (`Param.typical`): what the start trials and the lr range test train with."""
    return {k: p.typical() for k, p in dict(settings).items()}


def recipe_dict(
    base: dict, family: str, v: dict, t: dict, blocks: int, linear: list[str] | None = None
) -> dict:
    """The recipe (a dict for `validate_recipe`) of one trial: the base, the family's sections, the
    shared training values."""
    import copy

    raw = copy.deepcopy(base)
    raw.update(strategy_keys(family, v, blocks, linear))
    raw.update(t.get("parts", {}))
    train = raw.setdefault("train", {})
    train.update({"lr": v["lr"], "epochs": t["epochs"], "batch_size": t["batch_size"]})
    train["weight_decay"] = t["weight_decay"]
    schedule = raw.setdefault("schedule", {})
    schedule["name"] = t["schedule"]
    if t["schedule"] != "stlr" and t["schedule"] != "constant":
        schedule["warmup"] = t["warmup"]
    return raw
