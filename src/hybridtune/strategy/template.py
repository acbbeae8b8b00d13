"""The template side of `prompt` (strategy/prompt.py has the module doc): the recipe's
`prompt` section, resolved against a tokenizer into token pieces around the text slots and the
verbalizer's token ids, and the encoding of texts into prompts (cut from the left to fit)."""

from __future__ import annotations

import dataclasses
import string
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from hybridtune.errors import UserError

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
