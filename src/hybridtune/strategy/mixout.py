"""mixout: in training, each element of a trained pretrained linear weight is its pretrained value with
probability p (Mixout: Lee, Cho & Kang 2020, "Mixout: Effective Regularization to Finetune
Large-scale Pretrained Language Models", ICLR, https://arxiv.org/abs/1909.11299, §3).

    mixout:
      p: 0.7        # in [0, 1): the share of each trained pretrained Linear weight reset to w⁰ per forward

In a training forward the layer computes with

    W̃ = (M ⊙ W + (1 − M) ⊙ W⁰ − p·W⁰) / (1 − p) = W⁰ + M ⊙ (W − W⁰) / (1 − p),   M ~ Bernoulli(1 − p)

a fresh mask M per forward; E[W̃] = W, so evaluation uses W itself (the plain forward). DropConnect
(dropout on the weights) is the case W⁰ = 0; mixout drops the *update* instead of the weight, which
Lee et al. show keeps the model near w⁰ (an adaptive L2 penalty toward w⁰, their §3) and stabilises
fine-tuning on small data. The model's own dropout stays as its config sets it: mixout comes on top of it.

Which layers: every nn.Linear (and GPT-2's Conv1D, the same map transposed) whose weight was loaded
from the checkpoint and trains at some point of the run: full fine-tuning mixes all of them, a
`freeze` selection the ones it keeps, a stage the ones it unfreezes (from when it does), peft /
adapters / a soft prompt the base modules `freeze` keeps trainable beside them (peft's
`modules_to_save` copies, mixed toward the frozen original's value). Not mixed: the new head, which
has no pretrained value, and the embeddings with an LM head tied to them (the same matrix). With
nothing pretrained training (LoRA, adapters or a soft prompt alone) there is nothing to mix and the
run is refused before it starts: mixing a LoRA delta with 0 would be dropout on it, not mixout.

How: the forward of each such module is replaced on the instance (as the trunk cache and
soft_prompt do), never the module or a parametrization, so the module tree, the state-dict keys,
checkpoints and final/ are those of plain transformers / peft; W⁰ is a plain attribute of the
module. A layer mixes only while its weight requires grad, so the frozen blocks the trunk cache
computes once are never mixed: the cache and mixout compose (a cached run ends like an uncached one).
The masks come from the global torch RNG, whose state Trainer checkpoints: a resumed run draws the
masks the uninterrupted one drew.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from transformers.pytorch_utils import Conv1D

from hybridtune.errors import UserError
from hybridtune.model.facts import ModelFacts
from hybridtune.strategy.base import Part
from hybridtune.strategy.freeze import may_pick_linear
from hybridtune.strategy.l2sp import trained_pretrained

ATTR = "hybridtune_mixout"  # the Mixing on each mixed module (a plain attribute: no state-dict entry)
KINDS = (nn.Linear, Conv1D)  # exact types: a subclass (a quantized or peft layer) has its own forward
NOTHING = (
    "no Linear layer whose pretrained weight trains (peft, adapters and a soft prompt freeze the base; "
    "a frozen base has nothing to mix)"
)
EXPECTED = (
    "full fine-tuning, or base layers kept trainable with `freeze` (e.g. freeze.trainable: "
    "[{top_k: 2}, head] beside LoRA)"
)


class MixoutConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    p: float = Field(
        0.7,
        ge=0,
        lt=1,
        description="probability that an element of a trained pretrained Linear weight is its "
        "pretrained value in a training forward (0: plain fine-tuning)",
    )


class Mixing:
    """What a mixed module carries: p and W⁰ (moved to the weight's device and dtype on first use)."""

    def __init__(self, target: torch.Tensor, p: float):
        self.target, self.p = target, p

    def weight(self, w: torch.Tensor) -> torch.Tensor:
        if self.target.device != w.device or self.target.dtype != w.dtype:
            self.target = self.target.to(device=w.device, dtype=w.dtype)
        return mix(w, self.target, self.p)


def mix(weight: torch.Tensor, target: torch.Tensor, p: float) -> torch.Tensor:
    """W⁰ + M ⊙ (W − W⁰) / (1 − p), M ~ Bernoulli(1 − p) from the global torch RNG: Lee et al.'s
    (M ⊙ W + (1 − M) ⊙ W⁰ − p·W⁰) / (1 − p), rearranged; the gradient to W is M / (1 − p)."""
    if p == 0:
        return weight
    keep = torch.empty_like(weight, memory_format=torch.contiguous_format).bernoulli_(1 - p)
    return target + keep * (weight - target) / (1 - p)


def _weight(module: nn.Module) -> torch.Tensor:
    w = module.weight
    if module.training and w.requires_grad:
        return module.__dict__[ATTR].weight(w)
    return w


def _linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, _weight(self), self.bias)


def _conv1d_forward(self: Conv1D, x: torch.Tensor) -> torch.Tensor:
    # transformers' Conv1D.forward, with the mixed weight
    size_out = x.size()[:-1] + (self.nf,)
    x = torch.addmm(self.bias, x.view(-1, x.size(-1)), _weight(self))
    return x.view(size_out)


def mixed_modules(model: nn.Module) -> list[str]:
    """Names of the modules mixout mixes on this model."""
    return [name for name, m in model.named_modules() if ATTR in m.__dict__]


def apply(model: nn.Module, config: MixoutConfig, build) -> nn.Module:
    trained = {id(p) for _, p in trained_pretrained(model, build)}
    # an LM head tied to the token embeddings is the embedding matrix, which is not mixed (Lee et al.
    # mix the linear layers); mixing it in the output only would also cost a vocabulary-sized mask
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    mixed = 0
    for module in model.modules():
        if type(module) not in KINDS or id(module.weight) not in trained or id(module.weight) in embeddings:
            continue
        module.__dict__[ATTR] = Mixing(module.weight.detach().clone(), config.p)  # W⁰, before any step
        forward = _linear_forward if type(module) is nn.Linear else _conv1d_forward
        module.forward = types.MethodType(forward, module)
        mixed += 1
    if not mixed:  # what the recipe alone cannot show (`check`): a `freeze` that keeps no Linear weight
        raise UserError("mixout", NOTHING, EXPECTED)
    return model


def check(config: MixoutConfig, recipe) -> None:
    """Refused from the recipe alone: a part that adds weights freezes the pretrained base, so with
    nothing keeping base layers training (`freeze`, `stages`, peft's `modules_to_save`) nothing is mixed."""
    peft = recipe.peft
    adds = [key for key in ("peft", "adapters", "soft_prompt") if getattr(recipe, key, None) is not None]
    kept = recipe.freeze is not None or recipe.stages is not None
    if peft is not None and peft.kwargs().get("modules_to_save"):
        kept = True
    if adds and not kept:
        raise ValueError(f"mixout: found {NOTHING}; expected {EXPECTED}")


def model_check(config: MixoutConfig, recipe, facts: ModelFacts) -> None:
    """Refused on the model's facts: a `freeze.trainable` of only selectors without Linear weights
    (BitFit's [bias, head]) on a model whose head has no pretrained Linear layer (a token
    classifier's new classifier; a sequence classifier has BERT's pooler) mixes nothing."""
    freeze = recipe.freeze
    if freeze is None or freeze.trainable is None or freeze.spectrum is not None or recipe.stages is not None:
        return
    if recipe.peft is not None and recipe.peft.kwargs().get("modules_to_save"):
        return
    atoms = freeze.trainable
    if may_pick_linear(atoms, bool(facts.head_linear)):
        return
    raise UserError(
        "mixout",
        f"freeze.trainable {atoms} on model {recipe.model.name!r}, whose head has no pretrained Linear "
        "layer: no Linear weight that trains was pretrained",
        EXPECTED,
    )


PART = Part(
    key="mixout",
    config=MixoutConfig,
    apply=apply,
    check=check,
    model_check=model_check,
    # the paper's grid (0.1 ... 0.9; 0.7-0.9 best on small GLUE tasks)
    search={"p": [0.1, 0.3, 0.5, 0.7, 0.9]},
    summary="Mixout: in training, trained pretrained Linear weights take their pretrained value with "
    "probability p (Lee et al. 2020)",
)
