"""adversarial: adversarial training on the input embeddings, FGM (Miyato et al. 2017,
https://arxiv.org/abs/1605.07725) or K-step PGD (Madry et al. 2018, https://arxiv.org/abs/1706.06083,
on the word embeddings as in FreeLB, Zhu et al. 2020, https://arxiv.org/abs/1909.11764).

    adversarial:
      method: fgm        # fgm | pgd
      epsilon: 0.1       # radius of the perturbation (L2 norm per example, over the whole sequence)
      alpha: 0.3         # pgd: step size of each ascent step
      steps: 3           # pgd: K ascent steps (>= 1)
      weight: 1.0        # loss = task loss + weight * task loss at the perturbed embeddings

What is perturbed: the output of the model's input-embedding layer (`get_input_embeddings()`, the
word embeddings, before position / token-type embeddings and the embeddings' norm), as FreeLB does
and as Miyato et al. perturb the word-embedding sequence. Through peft the layer is the wrapped
model's own (a LoRA-on-embeddings or modules_to_save wrapper included). With `soft_prompt` only
the word embeddings are perturbed: the hook runs before the soft prompt's (prepend), which then
overwrites the virtual positions, so their gradient is zero and no perturbation reaches them; peft's
prompt learning embeds the real tokens only, so the same holds there.

The norm: per example, over the whole sequence (dims 1 and 2 of [batch, length, d]), as Miyato et
al.'s code (tensorflow/models research/adversarial_text, adversarial_losses.py `_scale_l2`) and
FreeLB's (`delta_grad.view(batch, -1).norm(dim=1)`) do. Padding needs no mask: its positions are
masked out of attention and unlabelled, so the loss's gradient there is exactly zero.

FGM: g = d task loss / d embeddings (the training forward's own graph, kept for the task loss's
backward: `torch.autograd.grad(..., retain_graph=True)`), r = epsilon * g / ||g||, and the term is
the task loss at embeddings + r, r a constant (no gradient through it): Miyato et al. eq. 2-3.

PGD (Madry et al.'s, not FreeLB's average): from delta_0 = 0, K ascent steps
delta_t = Proj_{||delta|| <= epsilon}(delta_{t-1} + alpha * g_t / ||g_t||), g_t the gradient at
delta_{t-1} (g_1 is the training forward's, so the K steps cost K - 1 forward + backward passes on
top of the final adversarial forward); the term is the task loss at delta_K only (the min-max
objective: train on the worst point found). FreeLB instead averages the K losses' parameter
gradients; this part does not. The start is 0, not random, so there is nothing random here besides
the model's dropout (Trainer's RNG state: a resumed run draws the same).

How: `apply` registers a forward pre-hook on the model Trainer calls (it notes a training forward
of a new batch and its `num_items_in_batch`, so the adversarial loss is normalised as the task loss
is) and a forward hook on the input embeddings, which keeps that forward's embedding output and, in
the part's own forwards, adds the perturbation. `loss_terms` finds the task forward's output by the
batch's `input_ids` tensor, so other training-mode forwards (another part's, the contrastive
stage's) are never taken for it; no callback is needed, so a Trainer built without the parts'
callbacks trains the same. Refused: the frozen-trunk cache (`trunk_cache`), a shared-trunk
ensemble, a model whose input embeddings transformers cannot reach.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from hybridtune.errors import UserError
from hybridtune.model.anatomy import unwrap
from hybridtune.strategy.base import LossTerm, Part

ATTR = "hybridtune_adversary"
PGD_ONLY = ("alpha", "steps")


class AdversarialConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: Literal["fgm", "pgd"] = Field(
        "fgm", description="fgm: one step of size epsilon | pgd: K projected ascent steps"
    )
    epsilon: float = Field(
        0.1, gt=0, description="L2 radius of the perturbation, per example (1.0 did not learn on MiniLM)"
    )
    alpha: float = Field(0.03, gt=0, description="pgd: step size of each ascent step")
    steps: int = Field(3, ge=1, description="pgd: K, the number of ascent steps")
    weight: float = Field(1.0, gt=0, description="weight of the adversarial loss next to the task loss")

    @model_validator(mode="after")
    def _pgd_keys(self) -> AdversarialConfig:
        # a key at its default is not a choice: a run dir's recipe.yaml writes every default, and
        # must run again as is
        fields = type(self).model_fields
        given = [k for k in PGD_ONLY if k in self.model_fields_set and getattr(self, k) != fields[k].default]
        if self.method == "fgm" and given:
            raise ValueError(
                f"adversarial.{given[0]}: found it with method fgm, which takes one step of size "
                "epsilon; expected method: pgd, or no such key"
            )
        return self


class Adversary:
    """The hooks' shared state. A plain object (not an nn.Module): nothing in the module tree or the
    state dict. The embedding outputs of the training forwards are kept by the batch's `input_ids`
    tensor (the very object Trainer passes to the forward and then to `loss_terms`), so the task
    forward's is found whatever other training forwards ran (another part's, the contrastive
    stage's): at most KEEP, all dropped when a step takes its own."""

    KEEP = 4

    def __init__(self) -> None:
        self.pending: tuple | None = None  # (input_ids, extra kwargs) of the forward now running
        self.kept: list[tuple[torch.Tensor, torch.Tensor, dict]] = []  # (input_ids, embeds, extra)
        self.delta: torch.Tensor | None = None  # added to the next embedding output, then dropped

    def enter(self, module: nn.Module, args, kwargs):
        """Forward pre-hook on the model Trainer calls: a training forward of a batch not seen yet."""
        ids = kwargs.get("input_ids")
        if self.delta is None and module.training and torch.is_grad_enabled() and ids is not None:
            if not any(seen is ids for seen, _, _ in self.kept):
                extra = {k: kwargs[k] for k in ("num_items_in_batch",) if kwargs.get(k) is not None}
                self.pending = (ids, extra)
        return None

    def hook(self, module: nn.Module, args, output: torch.Tensor) -> torch.Tensor | None:
        """Forward hook on the input embeddings."""
        if self.delta is not None:  # one of the part's own forwards
            delta, self.delta = self.delta, None
            return output + delta.to(output.dtype)
        if self.pending is None:
            return None
        (ids, extra), self.pending = self.pending, None
        if not output.requires_grad:  # frozen embeddings (LoRA, freeze): g is still wanted
            output = output.detach().requires_grad_()
        self.kept = [*self.kept[1 - self.KEEP :], (ids, output, extra)]
        return output

    def take(self, inputs: dict) -> tuple[torch.Tensor, dict]:
        """The embedding output and extra kwargs of the training forward of `inputs`; forgets all."""
        ids = inputs.get("input_ids")
        found = [(embeds, extra) for seen, embeds, extra in self.kept if seen is ids]
        self.kept, self.pending = [], None
        if not found:
            raise RuntimeError(
                "adversarial: the training forward did not pass through the model's input embeddings "
                "(get_input_embeddings) with input_ids; nothing to perturb"
            )
        return found[-1]

    def loss_at(self, model: nn.Module, inputs: dict, extra: dict, delta: torch.Tensor) -> torch.Tensor:
        """The task loss of `inputs` with `delta` added to the embedding output (Trainer's reading of
        the output: `loss`, or the first element of a tuple)."""
        self.delta = delta
        try:
            out = model(**inputs, **extra)
        finally:
            missed, self.delta = self.delta is not None, None
        if missed:
            raise RuntimeError("adversarial: the perturbed forward did not reach the input embeddings")
        return out["loss"] if isinstance(out, dict) else out[0]


def input_embeddings(model: nn.Module, where: str) -> nn.Module:
    """The input-embedding layer of a (peft-wrapped) model, or a UserError naming the model and the
    part (`where`) that needs it."""
    base = unwrap(model)
    try:
        layer = base.get_input_embeddings()
    except (NotImplementedError, AttributeError):
        layer = None
    if not isinstance(layer, nn.Module):
        raise UserError(
            where,
            f"{type(base).__name__}, whose input embeddings transformers cannot reach (get_input_embeddings)",
            "a model with an input-embedding layer",
        )
    return layer


def adversary_of(model: nn.Module) -> Adversary | None:
    return getattr(unwrap(getattr(model, "module", model)), ATTR, None)


def apply(model: nn.Module, config: AdversarialConfig, build) -> nn.Module:
    adversary = Adversary()
    # prepend: before soft_prompt's hook on the same layer, which then overwrites the virtual positions
    input_embeddings(model, "adversarial").register_forward_hook(adversary.hook, prepend=True)
    model.register_forward_pre_hook(adversary.enter, with_kwargs=True)
    setattr(unwrap(model), ATTR, adversary)
    return model


def unit(g: torch.Tensor) -> torch.Tensor:
    """g / ||g||_2 per example over the whole sequence (Miyato et al.'s `_scale_l2`, FreeLB's norm);
    an example whose gradient is 0 (nothing labelled) gets 0."""
    g = g.float()
    norm = g.flatten(1).norm(dim=1).clamp_min(1e-12)
    return g / norm.view(-1, *([1] * (g.ndim - 1)))


def project(delta: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Onto the L2 ball of radius epsilon, per example."""
    norm = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
    return delta * (epsilon / norm).clamp(max=1.0).view(-1, *([1] * (delta.ndim - 1)))


def perturbation(
    config: AdversarialConfig, model: nn.Module, inputs: dict, task_loss: torch.Tensor
) -> tuple[torch.Tensor, dict]:
    """r (FGM) or delta_K (PGD), detached, from the training forward's embedding output; and the
    extra kwargs that forward had (num_items_in_batch)."""
    adversary = adversary_of(model)
    embeds, extra = adversary.take(inputs)
    (g,) = torch.autograd.grad(task_loss, embeds, retain_graph=True)  # the engine's backward needs it
    if config.method == "fgm":
        return (config.epsilon * unit(g)).detach(), extra
    delta = project(config.alpha * unit(g), config.epsilon)
    for _ in range(config.steps - 1):
        point = delta.detach().requires_grad_()
        (g,) = torch.autograd.grad(adversary.loss_at(model, inputs, extra, point), point)
        delta = project(delta + config.alpha * unit(g), config.epsilon)
    return delta.detach(), extra


def loss_terms(
    config: AdversarialConfig, model: nn.Module, inputs: dict, task_loss: torch.Tensor, outputs
) -> list[LossTerm]:
    """weight × the task loss at the adversarially perturbed embeddings."""
    adversary = adversary_of(model)
    if adversary is None:  # a model this part was not applied to
        return []
    delta, extra = perturbation(config, model, inputs, task_loss)
    return [LossTerm("adv", adversary.loss_at(model, inputs, extra, delta), config.weight)]


def check(config: AdversarialConfig, recipe) -> None:
    if recipe.ensemble is not None and recipe.ensemble.shared_trunk:
        raise ValueError(
            "adversarial: found it with ensemble.shared_trunk, whose members share one frozen trunk "
            "forward; expected no shared trunk (the perturbation needs each member's own forward and "
            "backward through the embeddings)"
        )


def trunk_cache(config: AdversarialConfig, recipe) -> str:
    return "adversarial training (its perturbed forwards and gradient run through the whole trunk)"


PART = Part(
    key="adversarial",
    config=AdversarialConfig,
    apply=apply,
    check=check,
    loss_terms=loss_terms,
    trunk_cache=trunk_cache,
    # FGM's ε around the measured one (0.1 learned on Rotten Tomatoes, 1.0 did not learn at all:
    # docs/strategies.md); PGD costs K + 1 forwards, so the search tries FGM
    search={"method": "fgm", "epsilon": {"low": 0.02, "high": 0.5, "log": True}},
    summary="adversarial training on the input embeddings: FGM or K-step PGD (Miyato et al. 2017; Madry et al. 2018)",
)
