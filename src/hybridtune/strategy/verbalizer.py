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
are written to final/prompt.json, and `restore` attaches the scorer again.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import string
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from hybridtune.errors import UserError
from hybridtune.model.anatomy import unwrap

ATTR = "hybridtune_prompt"  # the Scorer, a plain attribute of the transformers model
FILE = "prompt.json"
SLOTS = ("text", "text_pair", "mask")
# defaults for sentiment, per kind of model (`template: null`)
DEFAULT_TEMPLATES = {
    "mlm": "{text} It was {mask}.",
    "causal": "Review: {text}\nSentiment: {mask}",
    "chat": "{text}\n\nIs this movie review positive or negative? Answer with one word.{mask}",
}


def slots_of(template: str) -> list[str]:
    return [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]


class PromptConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    template: str | None = Field(
        None, description="text with {text} (+ {text_pair}) and the answer slot {mask}; null = a default"
    )
    verbalizer: dict[str, str | list[str]] | None = Field(
        None, description="label name -> word or list of words; null = the label names themselves"
    )
    chat: bool | None = Field(
        None, description="decoders: use the chat template (null = if the tokenizer has one)"
    )
    word_score: Literal["mean", "sum"] = Field(
        "mean", description="a multi-token word: mean or sum of log-probs"
    )
    label_score: Literal["logsumexp", "mean"] = Field("logsumexp", description="several words per label")

    @field_validator("template")
    @classmethod
    def _template(cls, value: str | None) -> str | None:
        if value is None:
            return value
        try:
            slots = slots_of(value)
        except ValueError as e:
            raise ValueError(
                f"a template with {{slot}} fields ({e}; write {{{{ for a literal brace)"
            ) from None
        unknown = [s for s in slots if s not in SLOTS]
        if unknown:
            raise ValueError(
                f"unknown slot {{{unknown[0]}}}; the slots are {{text}}, {{text_pair}}, {{mask}}"
            )
        for slot in ("text", "mask"):
            if slots.count(slot) != 1:
                raise ValueError(f"exactly one {{{slot}}} in the template, found {slots.count(slot)}")
        if slots.count("text_pair") > 1:
            raise ValueError("at most one {text_pair}")
        return value

    @field_validator("verbalizer")
    @classmethod
    def _words(cls, value: dict | None) -> dict | None:
        if value is None:
            return value
        out = {}
        for label, words in value.items():
            words = [words] if isinstance(words, str) else words
            if not words or not all(w.strip() for w in words):
                raise ValueError(f"label {label!r}: one or more non-empty words")
            out[str(label)] = words
        return out


# --------------------------------------------------------------------------------------------------
# the template, resolved against a tokenizer


@dataclass
class PromptFormat:
    """A template resolved for one tokenizer: token pieces around the text slots, and the words."""

    kind: str  # "mlm" | "causal"
    labels: list[str]
    template: str
    chat: bool
    pieces: list  # token-id lists (literals) and slot names ("text", "text_pair", "mask"), in order
    lead: dict[str, str]  # slot -> whitespace moved onto its text
    words: list[list[list[int]]]  # label -> word -> token ids
    word_texts: list[list[str]]
    mask_id: int | None
    word_score: str = "mean"
    label_score: str = "logsumexp"

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> PromptFormat:
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls)})


def resolve(config: PromptConfig, tokenizer, kind: str, labels: list[str], pair: bool) -> PromptFormat:
    """Check the template and verbalizer against the data and tokenizer, and tokenize their pieces."""
    chat = kind == "causal" and (config.chat if config.chat is not None else bool(tokenizer.chat_template))
    if chat and not tokenizer.chat_template:
        raise UserError("prompt.chat", "true, with a tokenizer that has no chat template", "false or null")
    template = config.template or DEFAULT_TEMPLATES["chat" if chat else kind]
    slots = slots_of(template)
    if pair != ("text_pair" in slots):
        raise UserError(
            "prompt.template",
            f"{template!r}" + (" without {text_pair}" if pair else " with {text_pair}"),
            "{text_pair} exactly when data.text_pair_column is set",
        )
    before, _, after = template.partition("{mask}")
    if kind == "causal" and after.strip():
        raise UserError(
            "prompt.template",
            f"{template!r}, text after {{mask}}",
            "{mask} at the end: a decoder answers last",
        )
    if kind == "mlm" and tokenizer.mask_token_id is None:
        raise UserError("model.name", "a masked LM whose tokenizer has no mask token", "a tokenizer with one")
    space = before[len(before.rstrip()) :]
    before = before.rstrip()
    if chat:
        marked = before.replace("{text}", "\x00text\x00").replace("{text_pair}", "\x00text_pair\x00")
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": marked}], add_generation_prompt=True, tokenize=False
        )
        before, space = (
            rendered.replace("\x00text\x00", "{text}").replace("\x00text_pair\x00", "{text_pair}"),
            "",
        )
    pieces, lead = _pieces(tokenizer, before, kind, chat)
    pieces.append("mask")
    if kind == "mlm":
        more, lead_after = _pieces(tokenizer, after, kind, chat, first=False)
        pieces += more
        lead.update(lead_after)
        pieces += [suffix] if (suffix := _specials(tokenizer)[1]) else []
    words = _verbalizer(config, tokenizer, labels, " " if space and not chat else "", kind)
    mask_id = tokenizer.mask_token_id if kind == "mlm" else None
    texts = _word_texts(config, labels)
    return PromptFormat(
        kind,
        labels,
        template,
        chat,
        pieces,
        lead,
        words,
        texts,
        mask_id,
        config.word_score,
        config.label_score,
    )


def _specials(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer adds around one text ([CLS] ... [SEP], a BOS): found by tokenizing a probe."""
    with_special = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    for i in range(len(with_special) - len(plain) + 1):
        if with_special[i : i + len(plain)] == plain:
            return with_special[:i], with_special[i + len(plain) :]
    return [], []


def _pieces(tokenizer, text: str, kind: str, chat: bool, first: bool = True) -> tuple[list, dict]:
    """Literal token ids and slot names; the space before a slot goes onto the slot's text (BPE)."""
    pieces: list = []
    lead: dict[str, str] = {}
    if first:
        prefix = _specials(tokenizer)[0]
        bos = getattr(tokenizer, "bos_token", None)
        if not (chat and bos and text.startswith(bos)):  # a chat template may hold the BOS itself
            pieces.append(prefix)
    for literal, field, _, _ in string.Formatter().parse(text):
        if field is not None:
            lead[field] = literal[len(literal.rstrip(" ")) :]
            literal = literal.rstrip(" ")
        if literal:
            pieces.append(tokenizer(literal, add_special_tokens=False)["input_ids"])
        if field is not None:
            pieces.append(field)
    return [p for p in pieces if not (isinstance(p, list) and not p)], lead


def _word_texts(config: PromptConfig, labels: list[str]) -> list[list[str]]:
    verbalizer = config.verbalizer or {name: [name] for name in labels}
    unknown = [k for k in verbalizer if k not in labels]
    if unknown:
        raise UserError(
            f"prompt.verbalizer.{unknown[0]}", "a label not in the data", "one of " + ", ".join(labels)
        )
    missing = [name for name in labels if name not in verbalizer]
    if missing:
        raise UserError("prompt.verbalizer", f"no word for label {missing[0]!r}", "a word for every label")
    return [list(verbalizer[name]) for name in labels]


def _verbalizer(config, tokenizer, labels: list[str], space: str, kind: str) -> list[list[list[int]]]:
    texts = _word_texts(config, labels)
    words = [
        [tokenizer(space + w.strip(), add_special_tokens=False)["input_ids"] for w in ws] for ws in texts
    ]
    seen: dict[tuple, tuple[str, str]] = {}
    for label, ws, ids in zip(labels, texts, words, strict=True):
        for word, tokens in zip(ws, ids, strict=True):
            if not tokens:
                raise UserError(
                    f"prompt.verbalizer.{label}", f"{word!r}, no token", "a word the tokenizer reads"
                )
            key = tuple(tokens[:1] if kind == "mlm" else tokens)
            other = seen.get(key)
            if other and other[0] != label:
                what = "first sub-token" if kind == "mlm" else "tokens"
                raise UserError(
                    f"prompt.verbalizer.{label}",
                    f"{word!r}, with the same {what} as {other[1]!r} of label {other[0]!r}",
                    "words the model can tell apart",
                )
            seen[key] = (label, word)
    return words


def encode(fmt: PromptFormat, tokenizer, texts: list[str], pairs: list[str] | None, max_length: int) -> list:
    """input_ids per example: the template's pieces with the text(s) in their slots, texts cut from the
    left when the whole would pass `max_length` (a decoder keeps room for its longest answer)."""
    slot_ids = {}
    for slot, values in (("text", texts), ("text_pair", pairs)):
        if values is not None and slot in fmt.pieces:
            lead = fmt.lead.get(slot, "")
            strings = [lead + v.lstrip() if lead else v for v in values]
            slot_ids[slot] = tokenizer(strings, add_special_tokens=False)["input_ids"]
    fixed = sum(len(p) if isinstance(p, list) else (p == "mask") for p in fmt.pieces)
    reserve = max(len(w) for ws in fmt.words for w in ws) - 1 if fmt.kind == "causal" else 0
    budget = max_length - fixed - reserve
    if budget < len(slot_ids):
        raise UserError(
            "data.max_length",
            f"{max_length} tokens",
            f"more than {fixed + reserve}: the template and answer alone take that many",
        )
    out = []
    for i in range(len(texts)):
        parts = {slot: ids[i] for slot, ids in slot_ids.items()}
        while sum(map(len, parts.values())) > budget:
            longest = max(parts, key=lambda s: len(parts[s]))
            over = sum(map(len, parts.values())) - budget
            parts[longest] = parts[longest][min(over, len(parts[longest]) - 1) :]
        ids: list[int] = []
        for piece in fmt.pieces:
            if isinstance(piece, list):
                ids += piece
            elif piece == "mask":
                ids += [fmt.mask_id] if fmt.kind == "mlm" else []
            else:
                ids += parts[piece]
        out.append(ids)
    return out


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


def patch_forward(base: nn.Module, around) -> None:
    """Replace `base.forward` (on the instance) by `around(self, inner, inputs)`, where `inner` is the
    forward it had (the class's, or an earlier part's) and `inputs` its arguments as a dict. As
    soft_prompt's: the unbound function is held, so a deep copy of the model runs its own copy, and
    Trainer still reads the model's own signature (through `__wrapped__`) to pick its columns."""
    inner = getattr(base.forward, "__func__", type(base).forward)
    signature = inspect.signature(base.forward)

    def forward(self, *args, **kwargs):
        bound = signature.bind_partial(*args, **kwargs)
        inputs = dict(bound.arguments)
        for name, param in signature.parameters.items():
            if param.kind is inspect.Parameter.VAR_KEYWORD:
                inputs.update(inputs.pop(name, {}))
        return around(self, types.MethodType(inner, self), inputs)

    forward.__wrapped__ = getattr(inner, "__wrapped__", inner)
    base.forward = types.MethodType(forward, base)
    # Trainer passes num_items_in_batch to a forward that takes **kwargs and then skips its division by
    # the accumulation steps; the class loss here is a plain per-batch mean
    base.accepts_loss_kwargs = False


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


def apply(model: nn.Module, config: PromptConfig, build) -> nn.Module:
    return attach(model, build.task.prompt_format)


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


def load_scorer(path: str, fmt: PromptFormat) -> nn.Module:
    """A pretrained LM from `path` with the prompt attached, in eval mode (the zero-shot classifier)."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    from hybridtune.model.loading import load_model, load_tokenizer

    auto = AutoModelForCausalLM if fmt.kind == "causal" else AutoModelForMaskedLM
    model, _ = load_model(auto, path, load_tokenizer(path))
    return attach(model, fmt).eval()
