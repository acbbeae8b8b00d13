"""rdrop: R-Drop (Liang et al. 2021, "R-Drop: Regularized Dropout for Neural Networks", NeurIPS,
https://arxiv.org/abs/2106.14448): every training batch runs through the model twice, each pass with
its own dropout masks, and the two predictive distributions are pulled together.

    rdrop:
      alpha: 1.0       # α: weight of the symmetric KL between the two passes

    loss = ½·(L(P1) + L(P2)) + α · ½·(KL(P1 ‖ P2) + KL(P2 ‖ P1))

L is the task's training loss (the model's cross-entropy, or label_loss's when the recipe has one),
P1 the training forward's distribution and P2 the second pass's. The KL is summed over the classes
and averaged over the scored positions (a text; a sub-token whose label is not -100; a causal LM's
next-token positions with a label), as the paper's code (github.com/dropreg/R-Drop, compute_kl_loss:
kl_div of log_softmax against softmax, both directions, halved; pad positions masked). Two
deliberate differences in scale, both for an α that does not change with the batch: the paper's
eq. (3) sums the two NLLs (here their mean: its α is 2 × ours), and its code sums the KL over the
batch where we average (its GLUE code: CE1 + CE2 + 0.5 · batch-summed symmetric KL).

How, with no engine edit (strategy/base.py): the engine already holds L(P1) (the task loss, or
label_loss's term) with its weight; this part's `loss_terms` runs the second forward and adds
`rdrop_gap` = L(P2) − L(P1) with weight ½ (so L(P1) + ½(L(P2) − L(P1)) = ½(L(P1) + L(P2)); logged:
how far apart the two passes' losses are) and `rdrop_kl` with weight α. With `objective` both take
the task loss's weight 1 − λ. Gradients flow through both passes, as in the paper.

The second pass draws its dropout masks from the global torch RNG, which Trainer checkpoints
(rng_state.pth): a run killed and resumed draws the same masks. A model without dropout is refused
(both passes would compute the same: the KL is 0 at twice the cost), and so is the frozen-trunk
cache (the cached blocks run once, without dropout). A causal LM's task loss is made a per-batch
token mean (transformers' sum over the accumulated batch cannot be split between two passes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from hybridtune.errors import UserError
from hybridtune.model.anatomy import unwrap
from hybridtune.model.facts import ModelFacts
from hybridtune.strategy.base import LossTerm, Part
from hybridtune.strategy.label_loss import IGNORE, align, loss_of
from hybridtune.strategy.objective import task_weight as mixed_task_weight
from hybridtune.strategy.peft import dropout as peft_dropout

ATTR = "hybridtune_rdrop"  # the RDrop, a plain attribute of the transformers model


class RDropConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    alpha: float = Field(
        1.0, ge=0, description="α: weight of the symmetric KL between the two dropout passes' predictions"
    )


class RDrop:
    """What the term needs: whether the labels are next-token labels (shifted), and the term's scale."""

    def __init__(self, shift: bool, scale: float):
        self.shift, self.scale = shift, scale


def symmetric_kl(
    first: torch.Tensor, second: torch.Tensor, labels: torch.Tensor | None, shift: bool = False
) -> torch.Tensor:
    """½(KL(P1‖P2) + KL(P2‖P1)) of softmax(first), softmax(second), summed over the classes and
    averaged over the scored positions (label ≠ -100; `shift`: position t predicts label t + 1)."""
    if labels is not None:
        first, second = align(first, labels), align(second, labels)
    if shift:
        first, second = first[:, :-1], second[:, :-1]
        labels = labels[:, 1:] if labels is not None else None
    p, q = first.float().log_softmax(-1), second.float().log_softmax(-1)
    # kl_div(input, target, log_target) = Σ exp(target)·(target − input) = KL(target ‖ input)
    kl = 0.5 * (
        F.kl_div(q, p, reduction="none", log_target=True) + F.kl_div(p, q, reduction="none", log_target=True)
    ).sum(-1)
    if labels is None:
        return kl.mean()
    scored = (labels != IGNORE).to(kl.device)
    return (kl * scored).sum() / scored.sum().clamp(min=1)


def state_of(model: nn.Module) -> RDrop | None:
    return getattr(unwrap(getattr(model, "module", model)), ATTR, None)


def model_check(config: RDropConfig, recipe, facts: ModelFacts) -> None:
    """A model without dropout is refused, unless peft's layers add theirs (LoRA's lora_dropout)."""
    if facts.dropout == 0 and not (recipe.peft is not None and peft_dropout(recipe.peft) > 0):
        raise UserError(
            "rdrop",
            f"model {recipe.model.name!r} whose dropout probabilities are all 0",
            "a model with dropout > 0, or peft.lora_dropout > 0 (R-Drop's two passes differ only by "
            "their dropout masks)",
        )


def apply(model: nn.Module, config: RDropConfig, build) -> nn.Module:
    recipe = build.recipe
    shift = recipe.task == "causal_lm"
    if shift:  # both passes' losses per-batch means: Trainer then divides by the accumulation steps
        unwrap(model).accepts_loss_kwargs = False
    scale = mixed_task_weight(recipe.objective) if recipe.objective is not None else 1.0
    setattr(unwrap(model), ATTR, RDrop(shift, scale))
    return model


def loss_terms(
    config: RDropConfig, model: nn.Module, inputs: dict, task_loss: torch.Tensor, outputs
) -> list[LossTerm]:
    state = state_of(model)
    if state is None:  # a model this part was not applied to
        return []
    second = model(**inputs)  # new dropout masks from the global RNG (checkpointed by Trainer)
    labels = inputs.get("labels")
    first_loss = loss_of(model, outputs["logits"], labels)  # label_loss's, when the recipe has one
    if first_loss is None:
        first_loss, second_loss = task_loss, second["loss"]
    else:
        second_loss = loss_of(model, second["logits"], labels)
    kl = symmetric_kl(outputs["logits"], second["logits"], labels, state.shift)
    return [
        LossTerm("rdrop_gap", second_loss - first_loss, 0.5 * state.scale),
        LossTerm("rdrop_kl", kl, config.alpha * state.scale),
    ]


def check(config: RDropConfig, recipe) -> None:
    if recipe.contrastive is not None and recipe.contrastive.then == "none":
        raise ValueError(
            "rdrop: found it with contrastive.then: none (no Trainer step uses the loss); "
            "expected contrastive.then: head or all"
        )


def trunk_cache(config: RDropConfig, recipe) -> str:
    return "R-Drop (the trunk must run twice, with different dropout masks)"


PART = Part(
    key="rdrop",
    config=RDropConfig,
    apply=apply,
    check=check,
    model_check=model_check,
    loss_terms=loss_terms,
    trunk_cache=trunk_cache,
    # the paper tunes α per task (about 0.1 on GLUE up to 5 for translation; ours is half theirs)
    search={"alpha": {"low": 0.1, "high": 5.0, "log": True}},
    summary="R-Drop: a second forward with new dropout masks, α · symmetric KL between the two predictions",
)
