"""prompt: a template and a verbalizer turn a masked or causal language model into a classifier
(PET, Schick & Schütze 2021, https://arxiv.org/abs/2001.07676; LM-BFF, Gao et al. 2021).

    task: prompt_classification
    prompt:
      template: "{text} It was {mask}."       # {text}, optional {text_pair}, and the answer slot {mask}
      verbalizer: {negative: terrible, positive: [great, good]}   # label -> word(s)
      chat: null            # decoders: wrap the prompt in the tokenizer's chat template (null = if it has one)
      word_score: mean      # a word of several tokens: mean (length-normalised) or sum of their log-probs
      label_score: logsumexp  # several words per label: logsumexp (P(any of them)) or mean

The class score of a label is the log-probability the LM gives its verbalizer word in the answer slot;
the loss is the cross entropy over these scores (PET's L_CE). Nothing is added to the model: the scores
come from the pretrained LM head, which is why the untrained model already classifies (zero-shot).

- Masked LMs: {mask} becomes the mask token (anywhere in the template); a word scores the log-prob of
  its *first* sub-token there (one mask per example, as PET's single-token verbalizers; words sharing a
  first sub-token across labels are refused).
- Causal LMs: {mask} must end the template; the prompt is left-padded and a word scores the chain-rule
  log-prob of all its tokens after the prompt (one extra forward per word of more than one token). With
  `chat`, the template's text before {mask} is the user message and the answer starts the assistant
  turn (SmolLM2-Instruct answers far better that way).
- Space before {mask} is moved onto the verbalizer words (" great"), and space before {text} onto the
  text, so that BPE tokenizers see the tokens they saw in pre-training. The text is truncated from the
  left (never the template) to fit `data.max_length`; the end of a review is nearest the answer.

How: like `soft_prompt`, this part replaces the transformers model's `forward` on the instance (after
freeze / peft / adapters / soft_prompt, so it wraps them all): called with class labels it returns
class logits and their loss; called with token-level labels (the mixed objective's LM batches) it is
the plain LM. final/ stays a plain LM (or a peft adapter on one); the resolved template and verbalizer
are written to final/prompt.json, and `restore` attaches the scorer again. The template side (the
config, its resolution against a tokenizer, the encoding) is strategy/template.py.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from hybridtune.errors import UserError
from hybridtune.model.anatomy import unwrap
from hybridtune.strategy.base import Part, patch_forward
from hybridtune.strategy.template import PromptConfig, PromptFormat, encode, resolve

__all__ = [
    "PromptConfig",
    "PromptFormat",
    "encode",
    "resolve",
    "attach",
    "format_of",
    "load_scorer",
    "patch_forward",
]

ATTR = "hybridtune_prompt"  # the Scorer, a plain attribute of the transformers model
FILE = "prompt.json"

# --------------------------------------------------------------------------------------------------
# the scorer: LM logits -> class logits


class Scorer:
    """What the replaced forward needs (no parameters: nothing here trains)."""

    def __init__(self, fmt: PromptFormat, position_ids: bool):
        self.fmt = fmt
        self.position_ids = position_ids  # the causal LM takes position_ids (left padding needs them)

    def class_logits(self, lm, inputs: dict) -> torch.Tensor:
        word_logp = self._mlm(lm, inputs) if self.fmt.kind == "mlm" else self._causal(lm, inputs)
        out, k = [], 0
        for ws in self.fmt.words:  # per label: its words' log-probs, combined
            scores = word_logp[:, k : k + len(ws)]
            k += len(ws)
            if self.fmt.label_score == "logsumexp":
                out.append(torch.logsumexp(scores, -1))
            else:
                out.append(scores.mean(-1))
        return torch.stack(out, -1)

    def _mlm(self, lm, inputs: dict) -> torch.Tensor:
        ids = inputs["input_ids"]
        where = ids == self.fmt.mask_id
        if not bool((where.sum(-1) == 1).all()):
            raise ValueError("each example must hold exactly one mask token (the template's {mask})")
        logits = lm(**inputs).logits
        # a soft prompt in front makes the logits longer than the ids: the mask is counted from the end
        position = where.float().argmax(-1) + (logits.shape[1] - ids.shape[1])
        logp = logits[torch.arange(len(ids), device=ids.device), position].float().log_softmax(-1)
        first = torch.tensor([w[0] for ws in self.fmt.words for w in ws], device=ids.device)
        return logp[:, first]

    def _causal(self, lm, inputs: dict) -> torch.Tensor:
        ids, mask = inputs["input_ids"], inputs.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(ids)
        if self.position_ids and inputs.get("position_ids") is None:
            inputs = {**inputs, "position_ids": (mask.long().cumsum(-1) - 1).clamp(min=0)}
        columns = []
        first = None
        for ws in self.fmt.words:
            for word in ws:
                if len(word) == 1:
                    if first is None:
                        first = self._run(lm, inputs, [], 1)[:, 0]
                    columns.append(first[:, word[0]])
                    continue
                logp = self._run(lm, inputs, word[:-1], len(word))  # (B, k, V): each token after the last
                tokens = torch.tensor(word, device=ids.device)
                picked = logp[:, torch.arange(len(word), device=ids.device), tokens]
                columns.append(picked.mean(-1) if self.fmt.word_score == "mean" else picked.sum(-1))
        return torch.stack(columns, -1)

    def _run(self, lm, inputs: dict, extra: list[int], keep: int) -> torch.Tensor:
        """Log-probs of the next token at the last `keep` positions of the prompt + `extra` tokens."""
        ids = inputs["input_ids"]
        if extra:
            n, b = len(extra), ids.shape[0]
            add = torch.tensor(extra, device=ids.device).expand(b, n)
            inputs = dict(inputs, input_ids=torch.cat([ids, add], 1))
            if inputs.get("attention_mask") is not None:
                am = inputs["attention_mask"]
                inputs["attention_mask"] = torch.cat([am, am.new_ones(b, n)], 1)
            if inputs.get("position_ids") is not None:
                pos = inputs["position_ids"]
                inputs["position_ids"] = torch.cat(
                    [pos, pos[:, -1:] + torch.arange(1, n + 1, device=ids.device)], 1
                )
            for key in ("token_type_ids",):
                if inputs.get(key) is not None:
                    inputs[key] = torch.cat([inputs[key], inputs[key][:, -1:].expand(b, n)], 1)
        if "logits_to_keep" in _parameters(lm):
            inputs = {**inputs, "logits_to_keep": keep}
        logits = lm(**inputs, use_cache=False).logits[:, -keep:]
        return logits.float().log_softmax(-1)


def _parameters(fn) -> set[str]:
    return set(inspect.signature(fn).parameters)


def class_forward(self, inner, inputs: dict):
    """The scorer's forward: class logits (+ cross-entropy loss) from the LM; the plain LM for
    token-level labels."""
    scorer: Scorer = getattr(self, ATTR)
    labels = inputs.pop("labels", None)
    if labels is not None and labels.dim() == inputs["input_ids"].dim():  # an LM batch (mixed objective)
        if (
            scorer.position_ids
            and inputs.get("attention_mask") is not None
            and inputs.get("position_ids") is None
        ):
            inputs["position_ids"] = (inputs["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)
        return inner(**inputs, labels=labels)
    inputs = {
        k: v for k, v in inputs.items() if v is not None and k not in ("return_dict", "num_items_in_batch")
    }
    logits = scorer.class_logits(inner, inputs)
    loss = F.cross_entropy(logits, labels) if labels is not None else None
    return SequenceClassifierOutput(loss=loss, logits=logits)


def kind_of(model: nn.Module) -> str:
    """'mlm' or 'causal', from the transformers class (AutoModelForMaskedLM / AutoModelForCausalLM)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = type(unwrap(model)).__name__
    return "causal" if name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() else "mlm"


def attach(model: nn.Module, fmt: PromptFormat) -> nn.Module:
    """Make `model` (an LM, possibly peft-wrapped) return class logits."""
    base = unwrap(model)
    if getattr(base, ATTR, None) is not None:
        return model
    positions = fmt.kind == "causal" and "position_ids" in _parameters(base.forward)
    setattr(base, ATTR, Scorer(fmt, positions))
    patch_forward(base, class_forward)
    return model


def format_of(model: nn.Module) -> PromptFormat | None:
    """The template and verbalizer a model scores with (None: no prompt attached)."""
    scorer = getattr(unwrap(model), ATTR, None)
    return scorer.fmt if scorer is not None else None


def apply(model: nn.Module, config: PromptConfig, build) -> nn.Module:
    return attach(model, build.task.prompt_format)


def check(config: PromptConfig, recipe) -> None:
    if recipe.task != "prompt_classification":
        raise ValueError(
            f"prompt: found a prompt with task {recipe.task}; expected task: prompt_classification"
        )


def save(model: nn.Module, config: PromptConfig, out_dir: Path) -> list[str]:
    """final/prompt.json: the resolved template pieces and verbalizer token ids (what `restore` reads)."""
    scorer: Scorer = getattr(unwrap(model), ATTR)
    (out_dir / FILE).write_text(json.dumps(scorer.fmt.to_json(), indent=2) + "\n", encoding="utf-8")
    return []


def restore(model: nn.Module, config: PromptConfig, in_dir: Path) -> nn.Module:
    if getattr(unwrap(model), ATTR, None) is not None:
        return model
    if not (in_dir / FILE).is_file():
        raise UserError(str(in_dir), f"no {FILE}", "the prompt (template and verbalizer) saved with the run")
    fmt = PromptFormat.from_json(json.loads((in_dir / FILE).read_text(encoding="utf-8")))
    return attach(model, fmt)


def load_scorer(path: str, fmt: PromptFormat, tokenizer_path: str | None = None) -> nn.Module:
    """A pretrained LM from `path` with the prompt attached, in eval mode (the zero-shot classifier);
    its tokenizer from `tokenizer_path` (default: `path`)."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    from hybridtune.model.loading import load_model, load_tokenizer

    auto = AutoModelForCausalLM if fmt.kind == "causal" else AutoModelForMaskedLM
    model, _ = load_model(auto, path, load_tokenizer(tokenizer_path or path))
    return attach(model, fmt).eval()


PART = Part(
    key="prompt",
    config=PromptConfig,
    apply=apply,
    check=check,
    save=save,
    restore=restore,
    summary="a template and a verbalizer make the LM a classifier (PET); task prompt_classification",
)
