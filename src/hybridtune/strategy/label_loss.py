"""label_loss: the training loss of a classifier, replaced by cross-entropy with label smoothing,
class weights and / or a focal term.

    label_loss:
      smoothing: 0.1              # ε: the target is (1 − ε)·one-hot + ε/K (Szegedy et al. 2016, §7)
      class_weights: balanced     # balanced | {label name: weight} (unlisted labels: 1.0)
      focal: {gamma: 2.0}         # Lin et al. 2017: each example's loss times (1 − p_t)^γ

Per scored example i (a text, a window of data.long_texts: chunks, or a labelled sub-token of token
classification: label -100 is not scored), with class weights w (all 1 without `class_weights`):

    ℓ_i = (1 − ε)·w_{y_i}·(−log p_{i,y_i}) + (ε/K)·Σ_c w_c·(−log p_{i,c})     torch's cross_entropy(
                                                                               weight, label_smoothing)
    loss = Σ_i (1 − p_{i,y_i})^γ · ℓ_i / Σ_i w_{y_i}

With ε = 0, no weights and no focal term this is the task's own cross-entropy; with γ = 0 it is
torch's weighted, smoothed cross-entropy (its `mean` reduction, which divides by Σ w_{y_i}); with
weights and γ > 0 it is Lin et al.'s α-balanced focal loss (eq. 5, α_t = w_{y_t}), normalised as
the weighted cross-entropy is, so that the term's scale does not depend on γ = 0 or not.

`balanced` is scikit-learn's compute_class_weight("balanced"): w_c = n / (k · n_c) over the labels
the training loss sees (the encoded training split: one per example, per window with chunks, per
scored sub-token for token classification). A class absent from the training labels (an I- tag of an
entity type seen only in one-word entities) gets the largest weight of the present ones: it only
enters the smoothing term, which then treats it as the rarest class.

The part changes the loss, not the model: `task_weight` is 0 (its term replaces the task's
cross-entropy), the term is logged as `loss_label` next to `loss_task` (the plain cross-entropy, for
comparison); evaluation is the task's plain loss. It needs class logits: classification, token
classification and prompt classification (PET's class scores are log-probabilities of the verbalizer
words, and its loss is already the cross-entropy over their softmax, which this one replaces);
causal_lm is refused (its logits are over the vocabulary, not over classes). With `objective`, the
term takes the task loss's weight 1 − λ. It composes with every other part and with the trunk cache
(it reads the logits only).
"""

from __future__ import annotations

import math
from itertools import chain
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from hybridtune.errors import UserError
from hybridtune.model.anatomy import unwrap
from hybridtune.strategy.base import LossTerm, Part
from hybridtune.strategy.objective import task_weight as mixed_task_weight

ATTR = "hybridtune_label_loss"  # the LabelLoss, a plain attribute of the transformers model
IGNORE = -100  # the label id torch's cross-entropy skips (token classification's unscored sub-tokens)
TASKS = ("classification", "token_classification", "prompt_classification")  # tasks with class logits


class FocalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    gamma: float = Field(
        2.0, ge=0, description="γ: the focusing parameter (0 = cross-entropy; Lin et al. use 2)"
    )


class LabelLossConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    smoothing: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="ε: label smoothing, the target (1 − ε)·one-hot + ε/K (Szegedy et al. 2016)",
    )
    class_weights: Literal["balanced"] | dict[str, float] | None = Field(
        None,
        description="balanced (n / (k · n_c) over the training labels, scikit-learn's) or "
        "{label name: weight > 0}, unlisted labels 1.0",
    )
    focal: FocalConfig | None = Field(None, description="focal loss (Lin et al. 2017): {gamma: 2.0}")

    @field_validator("class_weights", mode="before")
    @classmethod
    def _weights(cls, value):
        """One message naming the bad entry (pydantic's for the union names its branches instead)."""
        where = "label_loss.class_weights"
        if value is None or value == "balanced":
            return value
        if not isinstance(value, dict) or not value:
            raise ValueError(f"{where}: found {value!r}; expected balanced or {{label name: weight > 0}}")
        out = {}
        for name, weight in value.items():  # a YAML key `1:` (an integer label's name is "1") reads as an int
            number = isinstance(weight, (int, float)) and not isinstance(weight, bool)
            if not number or not math.isfinite(weight) or weight <= 0:
                raise ValueError(f"{where}.{name}: found {weight!r}; expected a weight > 0")
            out[str(name)] = float(weight)
        return out


class LabelLoss:
    """What the loss needs (no parameters): the class weights, ε, γ, and the term's weight."""

    def __init__(self, weight: torch.Tensor | None, smoothing: float, gamma: float, scale: float):
        self.weight, self.smoothing, self.gamma, self.scale = weight, smoothing, gamma, scale

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The loss of the module doc over (…, K) logits and (…) label ids (-100: not scored)."""
        logits = align(logits, labels)
        logits = logits.reshape(-1, logits.shape[-1]).float()  # fp32: log-probs under bf16 autocast
        labels = labels.reshape(-1).to(logits.device)
        weight = self.weight.to(logits.device) if self.weight is not None else None
        per = F.cross_entropy(
            logits,
            labels,
            weight=weight,
            ignore_index=IGNORE,
            label_smoothing=self.smoothing,
            reduction="none",
        )  # 0 where not scored
        if self.gamma > 0:
            logp_true = logits.log_softmax(-1).gather(-1, labels.clamp(min=0)[:, None])[:, 0]
            # 1 − p_t, exact near p_t = 1; floored so that γ < 1 has a finite gradient at p_t = 1
            # (γ·(1 − p_t)^(γ − 1) is infinite there), where the factor is ~0 anyway
            per = per * (-torch.expm1(logp_true)).clamp(min=1e-12).pow(self.gamma)  # Lin et al., eq. 4
        scored = labels != IGNORE
        total = weight[labels[scored]].sum() if weight is not None else scored.sum()
        return per.sum() / torch.where(total > 0, total, torch.ones_like(total))  # no scored label: 0


def align(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The logits of the labelled positions: a soft prompt's virtual tokens come first in the logits
    of a token-level task and have no label (soft_prompt extends the model's own labels with -100)."""
    if labels.dim() >= 2 and logits.dim() == labels.dim() + 1 and logits.shape[1] > labels.shape[1]:
        return logits[:, logits.shape[1] - labels.shape[1] :]
    return logits


def loss_of(model: nn.Module, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
    """The part's loss on these logits, for a model it was applied to (None: it was not). R-Drop
    scores its second pass with it, so both passes are trained on the same loss."""
    criterion = criterion_of(model)
    return criterion(logits, labels) if criterion is not None else None


def criterion_of(model: nn.Module) -> LabelLoss | None:
    """The LabelLoss on a (possibly peft- or accelerate-wrapped) model, or None."""
    return getattr(unwrap(getattr(model, "module", model)), ATTR, None)


def label_ids(train_labels) -> np.ndarray:
    """The scored label ids of the training split: one per row, or the flattened sub-token labels."""
    rows = list(train_labels)
    flat = chain.from_iterable(rows) if rows and isinstance(rows[0], list) else rows
    ids = np.fromiter(flat, dtype=np.int64)
    return ids[ids != IGNORE]


def class_weights(config: LabelLossConfig, names: list[str], train_labels) -> torch.Tensor | None:
    """The per-class weights of `class_weights`, in label-id order (None: unweighted)."""
    spec = config.class_weights
    if spec is None:
        return None
    if spec == "balanced":
        from sklearn.utils.class_weight import compute_class_weight

        if train_labels is None:
            raise UserError(
                "label_loss.class_weights", "balanced with a task without training labels", "explicit weights"
            )
        ids = label_ids(train_labels)
        present = np.unique(ids)
        weights = np.zeros(len(names))
        weights[present] = compute_class_weight("balanced", classes=present, y=ids)
        weights[np.setdiff1d(np.arange(len(names)), present)] = weights[present].max()
        return torch.tensor(weights, dtype=torch.float32)
    index = {name: i for i, name in enumerate(names)}
    weights = np.ones(len(names))
    for name, weight in spec.items():
        if name not in index:
            raise UserError(
                f"label_loss.class_weights.{name}",
                f"{name!r}, not a label of the task",
                "one of " + ", ".join(map(repr, names)),
            )
        weights[index[name]] = weight
    return torch.tensor(weights, dtype=torch.float32)


def apply(model: nn.Module, config: LabelLossConfig, build) -> nn.Module:
    recipe = build.recipe
    weight = class_weights(config, list(build.labels.names), build.train_labels)
    gamma = config.focal.gamma if config.focal is not None else 0.0
    # the mixed objective weights the task loss by 1 − λ: this term stands in for it
    scale = mixed_task_weight(recipe.objective) if recipe.objective is not None else 1.0
    setattr(unwrap(model), ATTR, LabelLoss(weight, config.smoothing, gamma, scale))
    return model


def loss_terms(
    config: LabelLossConfig, model: nn.Module, inputs: dict, task_loss: torch.Tensor, outputs
) -> list[LossTerm]:
    criterion = criterion_of(model)
    if criterion is None:  # a model this part was not applied to
        return []
    return [LossTerm("label", criterion(outputs["logits"], inputs["labels"]), criterion.scale)]


def task_weight(config: LabelLossConfig) -> float:
    return 0.0  # the term replaces the task's cross-entropy


def check(config: LabelLossConfig, recipe) -> None:
    if recipe.task not in TASKS:
        raise ValueError(
            f"label_loss: found it with task {recipe.task}, whose logits are not class logits; "
            f"expected task: {', '.join(TASKS)}"
        )
    if recipe.contrastive is not None and recipe.contrastive.then == "none":
        raise ValueError(
            "label_loss: found it with contrastive.then: none (no Trainer step uses the loss); "
            "expected contrastive.then: head or all"
        )


PART = Part(
    key="label_loss",
    config=LabelLossConfig,
    apply=apply,
    check=check,
    loss_terms=loss_terms,
    task_weight=task_weight,
    # label smoothing as commonly used (Szegedy et al. 2016: 0.1; Müller et al. 2019 sweep to 0.2)
    search={"smoothing": [0.05, 0.1, 0.2]},
    summary="the classification loss replaced: label smoothing, class weights (balanced or per label), focal loss",
)
