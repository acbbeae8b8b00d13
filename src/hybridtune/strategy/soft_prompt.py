"""soft_prompt: n trainable virtual tokens prepended to the input (prompt tuning, Lester et al. 2021,
https://arxiv.org/abs/2104.08691), composable with LoRA or adapters in the same model.

    soft_prompt:
      num_virtual_tokens: 20
      init: vocab        # vocab: embeddings of tokens sampled from the vocabulary | text | random
      init_text: "Is this movie review positive or negative?"   # init: text (repeated / cut to n)

peft's own prompt tuning cannot share a model with LoRA (one peft method per model); this part can:
the "continuous prompt + PEFT" hybrid. What trains: the prompt and a new head; the pretrained base
is frozen except what `freeze` keeps.

How: the transformers model's `forward` (on the instance) prepends n placeholder ids to `input_ids`
and extends `attention_mask` (ones), `token_type_ids` (zeros), `position_ids` and token-level
`labels` (-100) to match; a forward hook on the input-embedding layer then swaps the placeholders'
embeddings for the prompt. Everything downstream sees one consistent, longer sequence of real ids:
position embeddings, padding masks, and a decoder's classification head, which finds the last
non-padding token from `input_ids` (peft's prompt tuning passes `inputs_embeds` instead, and GPT-2
then reads a pad token). `forward` rather than a forward pre-hook because AdaLoRA's peft wrapper calls
`model.forward(...)` directly, which skips module hooks; placeholders are not the pad id, so padding
detection ignores them. With a cache that already holds the prompt (generation), nothing is added.
The placement is the prompt's first n positions: on BERT the pooler then reads a virtual token, as
with peft's prompt tuning.

Init (Lester et al. §3.2: sampled vocabulary and class-label init beat random): `vocab` copies the
embeddings of n tokens drawn uniformly from the non-special vocabulary; `text` those of `init_text`'s
tokens; `random` draws N(0, std of the embedding matrix), the scale of real tokens.
Saved as final/soft_prompt.safetensors + final/soft_prompt.json next to the base save.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from safetensors.torch import load_file, save_file
from torch import nn

from hybridtune.errors import UserError
from hybridtune.model.anatomy import unwrap
from hybridtune.strategy.base import Part, patch_forward

ATTR = "soft_prompt"
WEIGHTS, CONFIG = "soft_prompt.safetensors", "soft_prompt.json"


class SoftPromptConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_virtual_tokens: int = Field(20, ge=1, description="prompt length n")
    init: Literal["vocab", "text", "random"] = Field(
        "vocab", description="vocab: sampled vocabulary embeddings | text: init_text's | random"
    )
    init_text: str | None = Field(None, description="init: text — tokenized, repeated or cut to n tokens")

    @model_validator(mode="after")
    def _text(self) -> SoftPromptConfig:
        if (self.init == "text") != bool(self.init_text):
            raise ValueError("init: text goes with a non-empty `init_text`, and `init_text` with init: text")
        return self


class SoftPrompt(nn.Module):
    def __init__(self, weight: torch.Tensor, placeholder_id: int):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.placeholder_id = placeholder_id
        self._expect: tuple | None = None  # the ids shape the next embedding call must have

    @property
    def n(self) -> int:
        return self.weight.shape[0]

    def extend(self, inputs: dict) -> dict:
        """The model's inputs with n placeholder positions in front."""
        ids = inputs.get("input_ids")
        past = inputs.get("past_key_values")
        self._expect = None
        if ids is None:
            raise ValueError("the soft prompt needs input_ids; this call passed inputs_embeds")
        if past is not None and _cached(past):  # generation: the cache already holds the prompt
            return inputs
        out = dict(inputs)
        b, n = ids.shape[0], self.n
        out["input_ids"] = torch.cat([ids.new_full((b, n), self.placeholder_id), ids], 1)
        for key, fill in (("attention_mask", 1), ("token_type_ids", 0)):
            if inputs.get(key) is not None:
                out[key] = torch.cat([inputs[key].new_full((b, n), fill), inputs[key]], 1)
        if inputs.get("position_ids") is not None:
            pos = inputs["position_ids"]
            out["position_ids"] = torch.cat(
                [torch.arange(n, device=pos.device).expand(pos.shape[0], n), pos + n], 1
            )
        labels = inputs.get("labels")
        if labels is not None and labels.shape == ids.shape:  # token-level labels: virtual tokens ignored
            out["labels"] = torch.cat([labels.new_full((b, n), -100), labels], 1)
        self._expect = tuple(out["input_ids"].shape)
        return out

    def hook(self, module: nn.Module, args, output: torch.Tensor) -> torch.Tensor | None:
        """Forward hook on the input embeddings: the first n positions become the prompt."""
        if self._expect is None or tuple(args[0].shape) != self._expect:
            return None
        self._expect = None
        prompt = self.weight.to(output.dtype).unsqueeze(0).expand(output.shape[0], -1, -1)
        return torch.cat([prompt, output[:, self.n :]], 1)


def _cached(past) -> bool:
    length = getattr(past, "get_seq_length", None)
    return bool(length() if callable(length) else len(past))


def _initial(config: SoftPromptConfig, embeddings: nn.Embedding, tokenizer) -> torch.Tensor:
    n, table = config.num_virtual_tokens, embeddings.weight.detach()
    if config.init == "random":
        return torch.randn(n, table.shape[1], device=table.device, dtype=table.dtype) * table.float().std()
    if config.init == "text":
        ids = tokenizer(config.init_text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise UserError("soft_prompt.init_text", repr(config.init_text), "a text with at least one token")
        ids = (ids * (n // len(ids) + 1))[:n]
    else:
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        pool = torch.tensor([i for i in range(table.shape[0]) if i not in special])
        ids = pool[torch.randint(len(pool), (n,))].tolist()
    return table[torch.tensor(ids, device=table.device)].clone()


def _placeholder(tokenizer, base: nn.Module) -> int:
    pad = base.config.pad_token_id
    for candidate in (
        getattr(tokenizer, "unk_token_id", None),
        getattr(tokenizer, "eos_token_id", None),
        1,
        2,
    ):
        if candidate is not None and candidate != pad:
            return int(candidate)
    return 0


def _attach(model: nn.Module, weight: torch.Tensor, placeholder_id: int) -> SoftPrompt:
    base = unwrap(model)
    prompt = SoftPrompt(weight, placeholder_id)
    base.add_module(ATTR, prompt)
    base.get_input_embeddings().register_forward_hook(prompt.hook)
    # the model's own forward on the extended inputs (patch_forward holds the unbound function, so a
    # deep copy of the model runs its own copy, and keeps the signature Trainer picks columns by)
    patch_forward(base, lambda self, inner, inputs: inner(**getattr(self, ATTR).extend(inputs)))
    return prompt


def apply(model: nn.Module, config: SoftPromptConfig, build) -> nn.Module:
    base = unwrap(model)
    peft_config = next(iter(getattr(model, "peft_config", {}).values()), None)
    if peft_config is not None and peft_config.is_prompt_learning:
        raise UserError(
            "soft_prompt",
            f"a soft prompt together with peft.method {peft_config.peft_type.value.lower()}",
            "one prompt: the soft prompt with a non-prompt peft method (lora, ia3, ...), or peft alone",
        )
    limit = getattr(base.config, "max_position_embeddings", None) or getattr(base.config, "n_positions", None)
    n = config.num_virtual_tokens
    if limit and build.max_length and n + build.max_length > limit:
        raise UserError(
            "soft_prompt.num_virtual_tokens",
            f"{n} virtual tokens + data.max_length {build.max_length} = {n + build.max_length} positions",
            f"at most {limit}, the positions {type(base).__name__} has (lower one of them)",
        )
    for p in model.parameters():  # the pretrained base is frozen; `freeze` may keep some of it
        if id(p) in build.pretrained:
            p.requires_grad_(False)
    weight = _initial(config, base.get_input_embeddings(), build.tokenizer)
    _attach(model, weight, _placeholder(build.tokenizer, base))
    return model


def save(model: nn.Module, config: SoftPromptConfig, out_dir: Path) -> list[str]:
    prompt = getattr(unwrap(model), ATTR)
    save_file({"weight": prompt.weight.detach().contiguous()}, out_dir / WEIGHTS)
    info = {**config.model_dump(), "placeholder_id": prompt.placeholder_id}
    (out_dir / CONFIG).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return [k for k in model.state_dict() if k.split(".")[-2:] == [ATTR, "weight"]]


def restore(model: nn.Module, config: SoftPromptConfig, in_dir: Path) -> nn.Module:
    if not (in_dir / WEIGHTS).is_file() or not (in_dir / CONFIG).is_file():
        raise UserError(str(in_dir), f"no {WEIGHTS} / {CONFIG}", "the soft prompt saved with the run")
    weight = load_file(in_dir / WEIGHTS)["weight"]
    prompt = getattr(unwrap(model), ATTR, None)
    if prompt is None:
        info = json.loads((in_dir / CONFIG).read_text(encoding="utf-8"))
        device = unwrap(model).get_input_embeddings().weight.device
        _attach(model, weight.to(device), int(info["placeholder_id"]))
    else:
        with torch.no_grad():
            prompt.weight.copy_(weight)
    return model


PART = Part(
    key="soft_prompt",
    config=SoftPromptConfig,
    apply=apply,
    save=save,
    restore=restore,
    summary="trainable virtual tokens before the input (prompt tuning), composable with LoRA / adapters",
)
