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

from hybridtune.search.params import Param, param, share_to_blocks
from hybridtune.search.parts import default_parts, parse_parts, sample_parts, to_yaml
from hybridtune.tasks import higher_is_better

LR = param(float, gt=0, lt=1)
SHARE = param(float, gt=0, le=1)


class Family(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True, arbitrary_types_allowed=True)


# ---- the families: each one's settings and what a trial's values make of a recipe ----------------
# lrs per family: where the example recipes of recipes/ (and the papers they cite) put them


class Full(Family):
    """Full fine-tuning: every parameter trains."""

    lr: LR = {"low": 1e-5, "high": 1e-4, "log": True}


class FreezeTop(Family):
    """Only the top share of the blocks (and the head) train."""

    lr: LR = {"low": 3e-5, "high": 1e-3, "log": True}
    share: SHARE = {"low": 0.15, "high": 0.5}


class FreezeBottom(Family):
    """The embeddings and the bottom share of the blocks are frozen; the rest trains."""

    lr: LR = {"low": 2e-5, "high": 3e-4, "log": True}
    share: SHARE = {"low": 0.3, "high": 0.85}


class BitFit(Family):
    """Only the biases and the head train (Ben Zaken et al. 2022)."""

    lr: LR = {"low": 3e-4, "high": 1e-2, "log": True}


class Spectrum(Family):
    """Spectrum (Hartford et al. 2024): the top share of each weight-matrix type by the SNR of its
    singular values trains (data-free), with the head."""

    lr: LR = {"low": 3e-5, "high": 3e-4, "log": True}
    share: SHARE = [0.125, 0.25, 0.5]


class Lora(Family):
    """LoRA (Hu et al. 2021); `dora` the same settings with DoRA's magnitude (Liu et al. 2024).
    `layer_share`: LoRA only in the top share of the blocks (peft's layers_to_transform)."""

    lr: LR = {"low": 1e-4, "high": 3e-3, "log": True}
    r: param(int, ge=1) = [4, 8, 16]
    lora_alpha: param(int, ge=1) = [8, 16, 32]
    lora_dropout: param(float, ge=0, lt=1) = 0.1
    target_modules: param(str, allowed=("auto", "all-linear")) = ["auto", "all-linear"]
    layer_share: SHARE = [0.5, 1.0]


class IA3(Family):
    """IA3 (Liu et al. 2022): learned rescaling vectors; a larger lr than LoRA."""

    lr: LR = {"low": 1e-3, "high": 3e-2, "log": True}


class Adapters(Family):
    """Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020: after the FFN only)."""

    lr: LR = {"low": 1e-4, "high": 3e-3, "log": True}
    method: param(str, allowed=("houlsby", "pfeiffer")) = ["houlsby", "pfeiffer"]
    reduction_factor: param(int, ge=1) = [8, 16, 32]


class SoftPromptLora(Family):
    """A soft prompt (Lester et al. 2021) and LoRA in one model."""

    lr: LR = {"low": 1e-4, "high": 3e-3, "log": True}
    num_virtual_tokens: param(int, ge=1) = [5, 10, 20]
    r: param(int, ge=1) = [4, 8]
    lora_alpha: param(int, ge=1) = 16


class Llrd(Family):
    """Layer-wise lr decay (Clark et al. 2020; Sun et al. 2019): each block below at decay x the lr."""

    lr: LR = {"low": 3e-5, "high": 3e-4, "log": True}
    layer_decay: param(float, gt=0, le=1) = {"low": 0.6, "high": 0.95}


class Staged(Family):
    """Gradual unfreezing from the top (ULMFiT, Howard & Ruder 2018): the head for a share of the run,
    then the top half of the blocks, then everything; discriminative lrs by layer decay."""

    lr: LR = {"low": 5e-5, "high": 5e-4, "log": True}
    stage_fraction: param(float, gt=0, lt=0.5) = [0.1, 0.2]
    layer_decay: param(float, gt=0, le=1) = [0.385, 0.8, 1.0]


FAMILIES: dict[str, type[Family]] = {
    "full": Full,
    "freeze_top": FreezeTop,
    "freeze_bottom": FreezeBottom,
    "bitfit": BitFit,
    "spectrum": Spectrum,
    "lora": Lora,
    "dora": Lora,
    "ia3": IA3,
    "adapters": Adapters,
    "soft_prompt_lora": SoftPromptLora,
    "llrd": Llrd,
    "staged": Staged,
}


def _layers(share: float, blocks: int) -> list[int] | None:
    """The top share of the blocks (None = all)."""
    k = share_to_blocks(share, blocks)
    return None if k >= blocks else list(range(blocks - k, blocks))


def strategy_keys(
    family: str, v: dict[str, Any], blocks: int, linear: list[str] | None = None
) -> dict[str, Any]:
    """The recipe sections of one family's trial, from its sampled values `v`; `linear`: the linear
    layers of a block, LoRA's `all-linear` (QLoRA, Dettmers et al. 2023: adapting every linear layer
    of the blocks), named explicitly because peft's `all-linear` cannot take layers_to_transform."""
    if family == "full":
        return {}
    if family == "freeze_top":
        return {"freeze": {"trainable": [{"top_k": share_to_blocks(v["share"], blocks)}, "head"]}}
    if family == "freeze_bottom":
        return {"freeze": {"frozen": ["embeddings", {"bottom_k": share_to_blocks(v["share"], blocks)}]}}
    if family == "bitfit":
        return {"freeze": {"trainable": ["bias", "head"]}}
    if family == "spectrum":
        return {"freeze": {"spectrum": {"share": v["share"]}}}
    if family == "ia3":  # peft's IA3Config has no layers_to_transform
        return {"peft": {"method": "ia3"}}
    if family in ("lora", "dora"):
        peft: dict[str, Any] = {"method": family}
        peft |= {k: v[k] for k in ("r", "lora_alpha", "lora_dropout", "target_modules")}
        if v["target_modules"] == "all-linear" and linear:
            peft["target_modules"] = list(linear)
        layers = _layers(v["layer_share"], blocks)
        return {"peft": peft | ({"layers_to_transform": layers} if layers else {})}
    if family == "adapters":
        return {"adapters": {"method": v["method"], "reduction_factor": v["reduction_factor"]}}
    if family == "soft_prompt_lora":
        return {
            "soft_prompt": {"num_virtual_tokens": v["num_virtual_tokens"], "init": "vocab"},
            "peft": {"method": "lora", "r": v["r"], "lora_alpha": v["lora_alpha"]},
        }
    if family == "llrd":
        return {"lr": {"layer_decay": v["layer_decay"]}}
    if family == "staged":
        f = v["stage_fraction"]
        stages = [
            {"fraction": f, "train": ["head"]},
            {"fraction": f, "train": [{"top_k": max(1, blocks // 2)}]},
            {"train": ["all"]},
        ]
        return {"stages": stages} | (
            {"lr": {"layer_decay": v["layer_decay"]}} if v["layer_decay"] < 1 else {}
        )
    raise KeyError(family)


class Families(BaseModel):
    """The families searched: those named (a space file restricts the default, which has all)."""

    model_config = ConfigDict(extra="forbid")

    full: Full | None = None
    freeze_top: FreezeTop | None = None
    freeze_bottom: FreezeBottom | None = None
    bitfit: BitFit | None = None
    spectrum: Spectrum | None = None
    lora: Lora | None = None
    dora: Lora | None = None
    ia3: IA3 | None = None
    adapters: Adapters | None = None
    soft_prompt_lora: SoftPromptLora | None = None
    llrd: Llrd | None = None
    staged: Staged | None = None


# ---- the space --------------------------------------------------------------------------------------


class TrainSpace(BaseModel):
    """Settings every family shares."""

    model_config = ConfigDict(extra="forbid", validate_default=True, arbitrary_types_allowed=True)

    epochs: param(float, gt=0) = [1.0, 2.0, 3.0]
    batch_size: param(int, ge=1) = [16, 32]
    warmup: param(float, ge=0, lt=1) = {"low": 0.0, "high": 0.1}
    weight_decay: param(float, ge=0) = [0.0, 0.01, 0.1]
    schedule: param(str, allowed=("linear", "cosine", "constant_with_warmup", "stlr")) = ["linear", "cosine"]


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
    evaluations: int = Field(4, ge=1, description="validations per trial (the rungs the pruner compares)")
    sampler: Literal["auto", "tpe", "nsga2", "random"] = "auto"
    pruner: Literal["hyperband", "successive_halving", "median", "none"] = "successive_halving"
    seed: int = 42
    enqueue: list[dict[str, Any]] = Field(default_factory=list, description="trials to run first (params)")
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
