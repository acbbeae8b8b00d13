"""neftune: NEFTune (Jain et al. 2023, https://arxiv.org/abs/2310.05914): uniform noise on the input
embeddings in training, of magnitude alpha / sqrt(L * d).

    neftune:
      alpha: 5           # the paper's alphas: 5, 10, 15

Each training forward adds noise ~ U(-m, m), m = alpha / sqrt(L * d), to the output of the model's
input-embedding layer (the word embeddings; L the batch's padded length, d the embedding width, as
the paper's code and transformers compute it). Evaluation, prediction and generation run in eval
mode and see no noise.

The noise is transformers' own (`integrations.neftune.neftune_post_forward_hook`, what
`TrainingArguments(neftune_noise_alpha=...)` installs), but the hook is registered here, by `apply`,
not through TrainingArguments: Trainer looks the embeddings up as `base_model.model` under any peft
model, which peft's prompt learning (prompt_tuning, p_tuning, prefix_tuning) does not have on an
encoder classifier (AttributeError); Trainer adds its hook when training starts, after the
frozen-trunk cache has looked at the model; and it appends it after `soft_prompt`'s hook, so the
trained prompt would get noise too. Registered here, first on the layer (prepend), only the word
embeddings get noise: with `soft_prompt` the prompt then overwrites its n virtual positions (L counts
them), and peft's prompt learning embeds the real tokens alone.

The noise is drawn from the global torch RNG inside the training step, whose state Trainer saves in
every checkpoint: a run resumed after a kill draws the same noise. Every training-mode forward gets
noise: the task's, and any a part runs in training (the adversarial part's, the mixed objective's,
the contrastive stage's).

The paper measures instruction fine-tuning (causal-LM SFT, `task: causal_lm`). The part also runs on
classification tasks: noise on the embeddings is the same regulariser there (FreeLB's random start
and R3F, Aghajanyan et al. 2021, add noise of this kind to classifiers), nothing in the formula
depends on the head, and `hybridtune search` can then say whether it helps; docs/strategies.md says
that the paper's gains are for SFT. Refused: the frozen-trunk cache, a shared-trunk ensemble.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from transformers.integrations.neftune import neftune_post_forward_hook

from hybridtune.strategy.adversarial import input_embeddings
from hybridtune.strategy.base import Part


class NeftuneConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    alpha: float = Field(5.0, gt=0, description="noise scale: U(-m, m), m = alpha / sqrt(L * d)")


def apply(model: nn.Module, config: NeftuneConfig, build) -> nn.Module:
    layer = input_embeddings(model, "neftune")
    layer.neftune_noise_alpha = config.alpha  # read by transformers' hook
    layer.register_forward_hook(neftune_post_forward_hook, prepend=True)
    return model


def check(config: NeftuneConfig, recipe) -> None:
    if recipe.ensemble is not None and recipe.ensemble.shared_trunk:
        raise ValueError(
            "neftune: found it with ensemble.shared_trunk, whose members share one trunk forward; "
            "expected no shared trunk (each member's embeddings get noise of their own)"
        )


def trunk_cache(config: NeftuneConfig, recipe) -> str:
    return "neftune (noise on the input embeddings in every training forward)"


PART = Part(
    key="neftune",
    config=NeftuneConfig,
    apply=apply,
    check=check,
    trunk_cache=trunk_cache,
    summary="NEFTune: uniform noise alpha / sqrt(L·d) on the input embeddings in training (Jain et al. 2023)",
)
