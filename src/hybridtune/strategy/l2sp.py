"""l2sp: a penalty toward the pretrained weights (L2-SP: Li, Grandvalet & Davoine 2018, "Explicit
Inductive Bias for Transfer Learning with Convolutional Networks", https://arxiv.org/abs/1802.01483).

    l2sp:
      alpha: 0.1     # α · ½‖w − w⁰‖² over the trained parameters loaded from the checkpoint (w⁰: their values there)
      beta: 0.01     # β · ½‖w‖²      over the trained parameters the checkpoint lacked (head, LoRA, adapters, ...)

Plain weight decay pulls every weight toward 0, forgetting what pretraining found; L2-SP pulls the
pretrained ones toward their starting point instead, and keeps an ordinary L2 for the new ones. The
two addends are logged unweighted as `loss_l2sp` (½‖w − w⁰‖²: how far the base has moved) and
`loss_l2sp_new` (½‖w‖² of the new parameters). It replaces weight decay, as in the paper: with
`l2sp` the optimizer's `train.weight_decay` is 0 (`training_args`), else the base would be pulled
toward 0 and toward w⁰ at once.

Which parameters: "pretrained" are those `strategy.apply` found loaded from the checkpoint
(`build.pretrained`) and peft's `modules_to_save` copies of them (the base modules `freeze` keeps
trainable next to LoRA: a trained copy, the original frozen at w⁰); "trained" is trainable now, kept
by `freeze`, or unfrozen by any stage of `stages` (the term is 0 for a parameter while it has not
moved, and it has no gradient while frozen). New parameters are the trainable rest: a new head,
LoRA's A / B, adapters, a soft prompt.

w⁰ is a detached copy taken when the part is applied, before any step: a plain list on the model,
never a parameter or buffer, so neither the state dict, nor a checkpoint, nor final/ holds it (final/
loads with plain transformers / peft). A resumed run rebuilds the model from the pretrained
checkpoint and applies the parts before Trainer loads the checkpoint it goes on from, so w⁰ is again
the pretrained value, never the resumed one. Not with `contrastive`: its stage tunes the body with a
loss of its own before the Trainer, outside this term.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from hybridtune.model.anatomy import unwrap
from hybridtune.strategy.base import LossTerm, Part

ATTR = "hybridtune_l2sp"  # the Anchor, a plain attribute of the transformers model (no state-dict entry)


class L2SPConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    alpha: float = Field(
        0.1,
        ge=0,
        description="α: weight of ½‖w − w⁰‖² over the trained pretrained parameters (w⁰: pretrained)",
    )
    beta: float = Field(
        0.01, ge=0, description="β: weight of ½‖w‖² over the trained new parameters (head, LoRA, adapters)"
    )


@dataclass
class Anchor:
    """The parameters under each addend, and w⁰: copies of the pretrained values, moved to each
    parameter's device on first use."""

    names: list[str] = field(default_factory=list)  # of `pretrained`, for tests and messages
    pretrained: list[nn.Parameter] = field(default_factory=list)
    targets: list[torch.Tensor] = field(default_factory=list)
    new_names: list[str] = field(default_factory=list)
    new: list[nn.Parameter] = field(default_factory=list)

    def target(self, i: int) -> torch.Tensor:
        w, t = self.pretrained[i], self.targets[i]
        if t.device != w.device or t.dtype != w.dtype:  # Trainer moved the model (a GPU, bf16)
            t = self.targets[i] = t.to(device=w.device, dtype=w.dtype)
        return t


# --------------------------------------------------------------------------------------------------
# which parameters are pretrained, and which train (mixout asks the same)


def pretrained_ids(model: nn.Module, build) -> set[int]:
    """id() of the parameters whose value now is the checkpoint's: those loaded from it, and peft's
    `modules_to_save` copies of them (made from the untouched originals, which then stay frozen)."""
    from peft.utils import ModulesToSaveWrapper

    ids = {id(p) for p in model.parameters() if id(p) in build.pretrained}
    for module in model.modules():
        if not isinstance(module, ModulesToSaveWrapper):
            continue
        originals = dict(module.original_module.named_parameters())
        for copy in module.modules_to_save.values():
            for name, p in copy.named_parameters():
                if name in originals and id(originals[name]) in build.pretrained:
                    ids.add(id(p))
    return ids


def ever_trained(model: nn.Module, build) -> set[int]:
    """id() of the parameters that train at some point of the run: trainable now or kept by `freeze`
    (made trainable again after the parts that freeze the base); with `stages`, the checkpoint's
    parameters train where a stage selects them (the plan enters stage 0 after the parts)."""
    stages = getattr(build.recipe, "stages", None)
    if stages is None:
        return {id(p) for p in model.parameters() if p.requires_grad} | set(build.keep)
    from hybridtune.strategy.freeze import select

    ids = {id(p) for p in model.parameters() if p.requires_grad and id(p) not in build.pretrained}
    params = dict(model.named_parameters())
    for i, stage in enumerate(stages.plan):
        picked = select(model, build.anatomy, stage.train, f"stages.plan[{i}].train")
        ids |= {id(params[n]) for n in picked}
    return ids


def trained_pretrained(model: nn.Module, build) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of the pretrained parameters that train at some point, in model order."""
    pretrained, trained = pretrained_ids(model, build), ever_trained(model, build)
    return [(n, p) for n, p in model.named_parameters() if id(p) in pretrained and id(p) in trained]


# --------------------------------------------------------------------------------------------------
# the hooks


def apply(model: nn.Module, config: L2SPConfig, build) -> nn.Module:
    anchor = Anchor()
    for name, p in trained_pretrained(model, build):
        anchor.names.append(name)
        anchor.pretrained.append(p)
        anchor.targets.append(p.detach().clone())  # w⁰: before any step (a resumed run too)
    anchored, trained = {id(p) for p in anchor.pretrained}, ever_trained(model, build)
    pretrained = pretrained_ids(model, build)
    for name, p in model.named_parameters():
        if id(p) in trained and id(p) not in pretrained and id(p) not in anchored:
            anchor.new_names.append(name)
            anchor.new.append(p)
    setattr(unwrap(model), ATTR, anchor)
    return model


def anchor_of(model: nn.Module) -> Anchor | None:
    """The Anchor on a (possibly peft-, DDP- or accelerate-wrapped) model, or None."""
    return getattr(unwrap(getattr(model, "module", model)), ATTR, None)


def _half_squares(tensors) -> torch.Tensor:
    return 0.5 * sum((t.float() ** 2).sum() for t in tensors)


def loss_terms(
    config: L2SPConfig, model: nn.Module, inputs: dict, task_loss: torch.Tensor, outputs
) -> list[LossTerm]:
    """α·½Σ‖w − w⁰‖² and β·½Σ‖w‖² (an addend with weight 0 is still logged, without a graph)."""
    anchor = anchor_of(model)
    if anchor is None:  # a model this part was not applied to
        return []
    terms = []
    if anchor.pretrained:
        with torch.set_grad_enabled(config.alpha > 0 and torch.is_grad_enabled()):
            drift = _half_squares(w - anchor.target(i) for i, w in enumerate(anchor.pretrained))
        terms.append(LossTerm("l2sp", drift, config.alpha))
    if anchor.new:
        with torch.set_grad_enabled(config.beta > 0 and torch.is_grad_enabled()):
            terms.append(LossTerm("l2sp_new", _half_squares(anchor.new), config.beta))
    return terms


def training_args(config: L2SPConfig) -> dict:
    """L2-SP replaces weight decay (in Li et al. 2018 Ω(w) takes the place of the usual L2): AdamW's
    decay would pull the base toward 0 while α pulls it toward w⁰, and the new ones twice."""
    return {"weight_decay": 0.0}


def check(config: L2SPConfig, recipe) -> None:
    if recipe.contrastive is not None:
        raise ValueError(
            "l2sp: found it with `contrastive`; expected one of them (contrastive's stage tunes the "
            "body with a loss of its own before the Trainer, outside the L2-SP term, which would then "
            "pull the tuned body back toward the pretrained one)"
        )


PART = Part(
    key="l2sp",
    config=L2SPConfig,
    apply=apply,
    check=check,
    loss_terms=loss_terms,
    training_args=training_args,
    # α over three decades (the paper tunes it on a log grid); β as weight decay would be
    search={"alpha": {"low": 0.001, "high": 1.0, "log": True}, "beta": [0.0, 0.01]},
    summary="L2-SP: α·½‖w − w⁰‖² toward the pretrained weights + β·½‖w‖² on new parameters (Li et al. 2018)",
)
