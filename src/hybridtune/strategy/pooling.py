"""pooling: the classification head reads the mean of the backbone's token states, not its first
(or last) token.

    pooling: mean                       # or {mode: mean, normalize: true}

Sentence encoders are trained with mean pooling (sentence-transformers' all-MiniLM-L6-v2: Pooling
(mean) then Normalize), so their [CLS] state and BERT's pooler carry little of what the encoder
learned; SetFit (Tunstall et al. 2022) puts its head on the mean-pooled, L2-normalised embedding.
This part makes any sequence-classification head of transformers do the same, without code per
architecture: a forward hook on the backbone (`model.base_model`) computes

    p = mean of last_hidden_state over the attention mask   (then p / ||p|| with normalize)

and a forward pre-hook on the head's modules hands `p` to the first of them that runs, in the shape
it expects: [batch, hidden] where the head takes a pooled vector (BERT's dropout → classifier,
DistilBERT's pre_classifier), p repeated over the positions where it takes the token states
(RoBERTa's classification head reads position 0, GPT-2's score the last token: both read p). With
BERT, the head is then exactly a linear (logistic-regression) layer on p: `contrastive.head:
logistic` fits it in closed form (strategy/contrastive.py).

No weights: final/ is the model as transformers saves it, and `restore` puts the hooks back when a
run is loaded (predict, eval, serve). Plain `from_pretrained` of final/ would pool the model's own
way, so `hybridtune export` refuses a run with this part by name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from hybridtune.model.anatomy import canonical, live, unwrap
from hybridtune.strategy.base import Part

ATTR = "hybridtune_pooling"


class PoolingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: Literal["mean"] = Field("mean", description="mean of the token states over the attention mask")
    normalize: bool = Field(True, description="L2-normalise the pooled embedding (as all-MiniLM-L6-v2 does)")

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return {"mode": value} if isinstance(value, str) else value


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor | None, normalize: bool) -> torch.Tensor:
    """[batch, hidden]: the masked mean of [batch, tokens, hidden] states (sentence-transformers' mean)."""
    if mask is None:
        pooled = hidden.mean(1)
    else:
        weights = mask[..., : hidden.shape[1]].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
    return F.normalize(pooled, dim=-1) if normalize else pooled


def backbone(model: nn.Module) -> nn.Module:
    """The transformer under the task head (BertModel under BertForSequenceClassification)."""
    return unwrap(model).base_model


def head_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The head's top-level modules (what lies outside the backbone), as they run (peft's trained copy)."""
    base = unwrap(model)
    return [(n, live(m)) for n, m in base.named_children() if m is not base.base_model]


class Pooler:
    """The two hooks and the pooled embedding between them (one forward at a time)."""

    def __init__(self, config: PoolingConfig):
        self.config = config
        self.pooled: torch.Tensor | None = None
        self.handles: list = []

    def after_backbone(self, module, args, kwargs, output):
        hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state
        self.pooled = mean_pool(hidden, kwargs.get("attention_mask"), self.config.normalize)

    def before_head(self, module, args):
        if self.pooled is None or not args or not torch.is_tensor(args[0]):
            return None
        x, p = args[0], self.pooled
        self.pooled = None  # the first head module to run takes it; the rest see their usual input
        p = p.to(x.dtype)
        if x.dim() == 3:
            p = p.unsqueeze(1).expand(-1, x.shape[1], -1)
        return (p, *args[1:])


def pooler_of(model: nn.Module) -> Pooler | None:
    return getattr(unwrap(model), ATTR, None)


def bypassed(model: nn.Module, anatomy) -> list[tuple[str, nn.Parameter]]:
    """Backbone parameters the pooled embedding skips: what comes after the last block and feeds
    the head (BERT's pooler). They get no gradient, so they do not train."""
    prefix = getattr(unwrap(model), "base_model_prefix", "") + "."
    return [
        (n, p)
        for n, p in model.named_parameters()
        if anatomy.slot_of(n) == "head" and canonical(n).startswith(prefix)
    ]


def apply(model: nn.Module, config: PoolingConfig, build=None) -> nn.Module:
    if build is not None:
        for _, p in bypassed(model, build.anatomy):
            p.requires_grad_(False)
            build.keep.pop(id(p), None)  # even where `freeze` selected it (the head)
    if pooler_of(model) is not None:
        return model
    pooler = Pooler(config)
    pooler.handles.append(backbone(model).register_forward_hook(pooler.after_backbone, with_kwargs=True))
    for _, module in head_modules(model):
        pooler.handles.append(module.register_forward_pre_hook(pooler.before_head))
    object.__setattr__(unwrap(model), ATTR, pooler)  # not a submodule: state_dict stays the model's
    return model


def restore(model: nn.Module, config: PoolingConfig, in_dir: Path) -> nn.Module:
    """No weights of its own: the hooks, back on a loaded model."""
    return apply(model, config)


INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def embedding(model: nn.Module, batch: dict, normalize: bool = True) -> torch.Tensor:
    """The mean-pooled embedding of a tokenized batch, straight from the backbone (no head); with
    gradients, for the contrastive stage (wrap in torch.no_grad to only embed)."""
    out = backbone(model)(**{k: v for k, v in batch.items() if k in INPUTS})
    return mean_pool(out[0], batch.get("attention_mask"), normalize)


def check(config: PoolingConfig, recipe) -> None:
    if recipe.task != "classification":
        raise ValueError(f"pooling: found it with task {recipe.task}; expected task: classification")


PART = Part(
    key="pooling",
    config=PoolingConfig,
    apply=apply,
    check=check,
    restore=restore,
    summary="the classification head reads the mean-pooled (L2-normalised) embedding",
)
