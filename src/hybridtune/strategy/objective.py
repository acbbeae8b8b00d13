"""objective: a mixed loss, lm_weight * LM loss + (1 - lm_weight) * task loss (PET's auxiliary language
modelling, Schick & Schütze 2021 §3.1, which keeps the LM head a language model while it learns the
task; they weight the LM term 1e-4 of the sum, we expose the weight).

    task: prompt_classification
    objective:
      lm_weight: 0.1          # λ in [0, 1]; 0 trains on the task alone but still logs the LM loss
      corpus: unlabeled.txt   # optional: one text per line; default: the task's own (templated) inputs
      mlm_probability: 0.15   # masked LMs: BERT's 15 % (80 % [MASK], 10 % random, 10 % kept)

The LM loss is the model's own: masked-LM loss on tokens masked by transformers'
DataCollatorForLanguageModeling for encoders, next-token loss for decoders. On the task's texts it is
computed on the very batch the task loss sees (the template included, as PET does); with `corpus`, on
the next batch of the corpus (train.batch_size texts, cut to data.max_length, reshuffled each pass).
Only the task loss is evaluated; `loss_lm` and `loss_task` (means over the logging window) are logged
next to `loss` in metrics.jsonl and TensorBoard.

It needs an LM head, so it comes with `task: prompt_classification` (a sequence classifier has none;
the recipe refuses the combination: `check`). It changes the loss, not the model: the part declares
`loss_terms` (λ·LM loss) and `task_weight` (1 − λ), which HybridTrainer.compute_loss sums as it does
any part's (strategy/base.py); `apply` leaves the LM batches' maker (`LmObjective`) on the model.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from hybridtune.data.lines import text_lines
from hybridtune.errors import UserError
from hybridtune.model.anatomy import unwrap
from hybridtune.strategy.base import LossTerm, Part

ATTR = "hybridtune_objective"


class ObjectiveConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lm_weight: float = Field(..., ge=0, le=1, description="λ: total = λ·LM loss + (1−λ)·task loss")
    corpus: str | None = Field(
        None, description="unlabeled text file, one text per line (default: task texts)"
    )
    mlm_probability: float = Field(0.15, gt=0, lt=1, description="masked LMs: share of tokens masked")


class LmObjective:
    """What makes the LM batches: the masking collator, and the corpus with its shuffled order."""

    def __init__(
        self,
        config: ObjectiveConfig,
        tokenizer,
        mlm: bool,
        corpus: list[list[int]] | None,
        batch_size: int,
        seed: int,
    ):
        from transformers import DataCollatorForLanguageModeling

        self.mlm = mlm
        self.collator = DataCollatorForLanguageModeling(
            tokenizer, mlm=mlm, mlm_probability=config.mlm_probability, return_tensors="pt"
        )
        self.special = torch.tensor(sorted(set(tokenizer.all_special_ids)))
        self.corpus, self.batch_size = corpus, batch_size
        self.rng = random.Random(seed)
        self.order: list[int] = []

    def lm_inputs(self, inputs: dict) -> dict:
        """An LM batch with token-level labels: from the corpus, or the task batch itself."""
        device = inputs["input_ids"].device
        if self.corpus is not None:
            if len(self.order) < self.batch_size:
                more = list(range(len(self.corpus)))
                self.rng.shuffle(more)
                self.order += more
            rows, self.order = self.order[: self.batch_size], self.order[self.batch_size :]
            batch = self.collator([{"input_ids": self.corpus[i]} for i in rows])
            return {k: v.to(device) for k, v in batch.items()}
        ids, mask = inputs["input_ids"], inputs.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask
        out = {k: inputs[k] for k in ("attention_mask", "token_type_ids") if inputs.get(k) is not None}
        if self.mlm:
            never = torch.isin(ids.cpu(), self.special) | (mask.cpu() == 0)
            masked, labels = self.collator.torch_mask_tokens(
                ids.detach().cpu().clone(), special_tokens_mask=never
            )
            return {**out, "input_ids": masked.to(device), "labels": labels.to(device)}
        return {**out, "input_ids": ids, "labels": ids.masked_fill(mask == 0, -100)}


def objective_of(model: nn.Module) -> LmObjective | None:
    """The objective on a (possibly peft- or accelerate-wrapped) model, or None."""
    return getattr(unwrap(getattr(model, "module", model)), ATTR, None)


def read_corpus(path: str, tokenizer, max_length: int) -> list[list[int]]:
    where = "objective.corpus"
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(where, f"'{path}' (no such file)", "a text file with one text per line")
    try:
        lines = [line for line in text_lines(file.read_text(encoding="utf-8-sig")) if line.strip()]
    except UnicodeDecodeError:
        raise UserError(where, f"'{path}' with bytes that are not UTF-8", "a UTF-8 text file") from None
    if not lines:
        raise UserError(where, f"'{path}' without a non-empty line", "one text per line")
    return tokenizer(lines, truncation=True, max_length=max_length)["input_ids"]


def apply(model: nn.Module, config: ObjectiveConfig, build) -> nn.Module:
    fmt = getattr(build.task, "prompt_format", None)
    if fmt is None:
        raise UserError(
            "objective", f"with task {build.task.NAME}", "task: prompt_classification (an LM head)"
        )
    recipe = build.recipe
    corpus = read_corpus(config.corpus, build.tokenizer, recipe.data.max_length) if config.corpus else None
    objective = LmObjective(
        config, build.tokenizer, fmt.kind == "mlm", corpus, recipe.train.batch_size, recipe.train.seed
    )
    setattr(unwrap(model), ATTR, objective)
    return model


def loss_terms(
    config: ObjectiveConfig, model: nn.Module, inputs: dict, task_loss: torch.Tensor, outputs
) -> list[LossTerm]:
    """λ·LM loss, on the batch the task loss saw (or the corpus's next batch)."""
    objective = objective_of(model)
    if objective is None:  # a model this part was not applied to
        return []
    with torch.set_grad_enabled(config.lm_weight > 0 and torch.is_grad_enabled()):  # λ = 0: logged only
        lm_loss = model(**objective.lm_inputs(inputs)).loss
    return [LossTerm("lm", lm_loss, config.lm_weight)]


def task_weight(config: ObjectiveConfig) -> float:
    return 1 - config.lm_weight


def check(config: ObjectiveConfig, recipe) -> None:
    if recipe.task != "prompt_classification":
        raise ValueError(
            f"objective: found a mixed LM objective with task {recipe.task}, whose model has no LM head; "
            "expected task: prompt_classification"
        )


def trunk_cache(config: ObjectiveConfig, recipe) -> str:
    return "a mixed objective"  # its LM batches run the whole model


PART = Part(
    key="objective",
    config=ObjectiveConfig,
    apply=apply,
    check=check,
    loss_terms=loss_terms,
    task_weight=task_weight,
    trunk_cache=trunk_cache,
    summary="a mixed loss: λ·LM loss + (1 − λ)·task loss (PET's auxiliary language modelling)",
)
