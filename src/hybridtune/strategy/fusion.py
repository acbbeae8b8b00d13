"""fusion: the tuned model learns a residual on top of a frozen one: class logits = weight * frozen(x) +
tuned(x), the residual form softmax(f_frozen(x) + f_tuned(x)), trained end to end with the frozen part
fixed: the cross entropy is taken on the sum, so the tuned model learns only what the frozen one lacks,
and the frozen model's knowledge is kept by construction.

    fusion:
      frozen: zero_shot      # the base model with the recipe's prompt (task: prompt_classification)
      weight: 1.0            #   or a finished run dir: its model, as `hybridtune predict` would load it

The frozen model is kept *outside* the module tree (a plain attribute holder), so it has no parameter
in the optimizer, in the state dict, in checkpoints or in final/, and Trainer's `model.train()` never
reaches it: it stays in eval mode (no dropout) and bit-identical. `zero_shot` loads the base weights
afresh rather than copying the model this part is given, which by now may hold LoRA matrices, a soft
prompt or adapters. final/fusion.json records the reference; `restore` loads it again.

A frozen run must classify the same inputs into the same labels: same task, same tokenizer vocabulary,
same labels, and for prompt runs the same template pieces.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from hybridtune.errors import UserError
from hybridtune.model.anatomy import unwrap
from hybridtune.strategy.base import Part, patch_forward
from hybridtune.strategy.prompt import PromptFormat, format_of, load_scorer

ATTR = "hybridtune_fusion"
FILE = "fusion.json"
INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class FusionConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    frozen: str = Field("zero_shot", description="zero_shot (the base model's prompt scorer) | a run dir")
    weight: float = Field(1.0, ge=0, description="scale of the frozen logits in the sum")


class Frozen:
    """A plain holder, not an nn.Module: what it holds is invisible to parameters() and state_dict()."""

    def __init__(self, model: nn.Module, weight: float, reference: dict):
        self.model = model.eval().requires_grad_(False)
        self.weight = weight
        self.reference = reference

    @torch.no_grad()
    def logits(self, inputs: dict) -> torch.Tensor:
        device = inputs["input_ids"].device
        if next(self.model.parameters()).device != device:  # Trainer moves the tuned model only
            self.model.to(device)
        return self.model(**{k: inputs[k] for k in INPUTS if inputs.get(k) is not None}).logits


def fused_forward(self, inner, inputs: dict):
    """Class logits of the tuned model plus the frozen ones; the plain LM for token-level labels."""
    frozen: Frozen = getattr(self, ATTR)
    labels = inputs.pop("labels", None)
    if labels is not None and labels.dim() == inputs["input_ids"].dim():  # the mixed objective's LM batch
        return inner(**inputs, labels=labels)
    out = inner(**inputs)
    logits = out.logits + frozen.weight * frozen.logits(inputs).to(out.logits.dtype)
    loss = F.cross_entropy(logits.float(), labels) if labels is not None else None
    return SequenceClassifierOutput(loss=loss, logits=logits)


def _frozen_run(path: str, build) -> nn.Module:
    loaded = build.load_run(path)  # inference.load_run, handed down by the run pipeline
    where = "fusion.frozen"
    ours = list(build.labels.names) if build.labels is not None else None
    if loaded.task.NAME != build.task.NAME:
        raise UserError(where, f"a {loaded.task.NAME} run", f"a run of this recipe's task, {build.task.NAME}")
    if ours is not None and list(loaded.labels.names) != ours:
        raise UserError(where, f"a run with labels {loaded.labels.names}", f"a run with labels {ours}")
    if build.tokenizer is not None and loaded.tokenizer.get_vocab() != build.tokenizer.get_vocab():
        raise UserError(where, "a run with another tokenizer", "a run of the same base model")
    mine = getattr(build.task, "prompt_format", None)
    theirs = format_of(loaded.model)
    if mine is not None and (theirs is None or theirs.pieces != mine.pieces):
        raise UserError(where, "a run with another prompt template", "a run with this recipe's template")
    return loaded.model


def _attach(model: nn.Module, frozen: Frozen) -> nn.Module:
    base = unwrap(model)
    setattr(base, ATTR, frozen)
    patch_forward(base, fused_forward)
    return model


def apply(model: nn.Module, config: FusionConfig, build) -> nn.Module:
    if config.frozen == "zero_shot":
        fmt = getattr(build.task, "prompt_format", None)
        if fmt is None:
            raise UserError(
                "fusion.frozen", "zero_shot without a prompt", "task: prompt_classification, or a run dir"
            )
        base_path = unwrap(model).name_or_path
        frozen = load_scorer(base_path, fmt)
        reference = {"frozen": "zero_shot", "base_model": base_path}
    else:
        path = Path(config.frozen).expanduser()
        frozen = _frozen_run(str(path), build)
        reference = {"frozen": str(path.resolve())}
    return _attach(model, Frozen(frozen, config.weight, {**reference, "weight": config.weight}))


def check(config: FusionConfig, recipe) -> None:
    if recipe.task == "token_classification":
        raise ValueError(
            "fusion: found fusion with task token_classification; expected a classification task"
        )
    if config.frozen == "zero_shot" and recipe.task != "prompt_classification":
        raise ValueError(
            f"fusion.frozen: found zero_shot with task {recipe.task}; expected task: prompt_classification "
            "(a zero-shot scorer needs a prompt), or a run dir"
        )


def trunk_cache(config: FusionConfig, recipe) -> str:
    return "fusion (frozen + tuned logits)"  # the frozen model runs the whole forward every step


def save(model: nn.Module, config: FusionConfig, out_dir: Path) -> list[str]:
    frozen: Frozen = getattr(unwrap(model), ATTR)
    (out_dir / FILE).write_text(json.dumps(frozen.reference, indent=2) + "\n", encoding="utf-8")
    return []  # nothing of it is in the state dict


def restore(model: nn.Module, config: FusionConfig, in_dir: Path, load_run=None) -> nn.Module:
    if getattr(unwrap(model), ATTR, None) is not None:
        return model
    if not (in_dir / FILE).is_file():
        raise UserError(str(in_dir), f"no {FILE}", "the fusion reference saved with the run")
    reference = json.loads((in_dir / FILE).read_text(encoding="utf-8"))
    if reference["frozen"] == "zero_shot":
        fmt = PromptFormat.from_json(json.loads((in_dir / "prompt.json").read_text(encoding="utf-8")))
        frozen = load_scorer(reference["base_model"], fmt)
    else:
        frozen = load_run(reference["frozen"]).model  # inference.load_run, from strategy.restore
    return _attach(model, Frozen(frozen, reference["weight"], reference))


PART = Part(
    key="fusion",
    config=FusionConfig,
    apply=apply,
    check=check,
    trunk_cache=trunk_cache,
    save=save,
    restore=restore,
    loads_runs=True,
    summary="class logits = weight × a frozen model's + the tuned model's (a residual on a frozen scorer)",
)
