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
the recipe refuses the combination). It changes the loss, not the model: HybridTrainer.compute_loss
asks `objective_of(model)` for the objective this part leaves on the model.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from hybridtune.errors import UserError
from hybridtune.model.anatomy import unwrap

ATTR = "hybridtune_objective"


class ObjectiveConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lm_weight: float = Field(..., ge=0, le=1, description="λ: total = λ·LM loss + (1−λ)·task loss")
    corpus: str | None = Field(
        None, description="unlabeled text file, one text per line (default: task texts)"
    )
    mlm_probability: float = Field(0.15, gt=0, lt=1, description="masked LMs: share of tokens masked")


class LmObjective:
    """The mixed loss, and the running sums of its two parts for the logs."""

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

        self.weight = config.lm_weight
        self.mlm = mlm
        self.collator = DataCollatorForLanguageModeling(
            tokenizer, mlm=mlm, mlm_probability=config.mlm_probability, return_tensors="pt"
        )
        self.special = torch.tensor(sorted(set(tokenizer.all_special_ids)))
        self.corpus, self.batch_size = corpus, batch_size
        self.rng = random.Random(seed)
        self.order: list[int] = []
        self.sums, self.count = {"loss_lm": 0.0, "loss_task": 0.0}, 0

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

    def compute_loss(self, task_compute_loss, model, inputs, return_outputs=False, num_items_in_batch=None):
        task_loss, outputs = task_compute_loss(
            model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        with torch.set_grad_enabled(self.weight > 0 and torch.is_grad_enabled()):  # λ = 0: logged only
            lm_loss = model(**self.lm_inputs(inputs)).loss
        loss = self.weight * lm_loss + (1 - self.weight) * task_loss
        self.sums["loss_lm"] += float(lm_loss.detach())
        self.sums["loss_task"] += float(task_loss.detach())
        self.count += 1
        return (loss, outputs) if return_outputs else loss

    def pop_means(self) -> dict[str, float]:
        """The parts' means since the last call (Trainer's `loss` is a mean over the same window)."""
        if not self.count:
            return {}
        out = {k: round(v / self.count, 4) for k, v in self.sums.items()}
        self.sums, self.count = dict.fromkeys(self.sums, 0.0), 0
        return out


def objective_of(model: nn.Module) -> LmObjective | None:
    """The objective on a (possibly peft- or accelerate-wrapped) model, or None."""
    return getattr(unwrap(getattr(model, "module", model)), ATTR, None)


def read_corpus(path: str, tokenizer, max_length: int) -> list[list[int]]:
    where = "objective.corpus"
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(where, f"'{path}' (no such file)", "a text file with one text per line")
    try:
        lines = [line for line in file.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
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
