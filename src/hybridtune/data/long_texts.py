"""Texts longer than `data.max_length`: how much the cut loses, and three ways to read such texts.

`data.long_texts` (classification, single texts):

- `truncate` (default): the first max_length tokens, as the tokenizer's own truncation keeps them.
- `head_tail`: the first quarter of the text budget and the last three quarters. Sun et al. 2019,
  "How to Fine-Tune BERT for Text Classification?" (section 5.3.1), found head 128 + tail 382 of
  BERT's 510 text tokens best on IMDb, ahead of head-only and tail-only; a quarter / three quarters
  is that split at any budget.
- `chunks`: windows of max_length over the whole text, neighbours sharing `data.stride` tokens (the
  tokenizer's own `return_overflowing_tokens` + `stride`, as transformers' question-answering
  examples cut long contexts). Each window is a training example with its document's label; the
  encoded split carries a `doc` column (the document's row in its split), and every score a run
  reports - validation metrics, the test report, `eval`, `predict`, `serve` - is per document: the
  mean (or max, `data.pool`) of its windows' logits.

Counting is a by-product of encoding: one tokenizer call per batch, with truncation and overflowing
windows returned, gives both the kept tokens and the full length (the windows of a text partition
it, less their overlaps), so the truncation report costs no second tokenization. Text pairs and
slow (Python) tokenizers, which have no such windows, keep the plain truncating call and count
with one extra call without truncation.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass

import numpy as np

from hybridtune.errors import UserError

DOC = "doc"  # the column of a chunked split: each window's document (its row in the split)
BATCH = 1024  # texts per tokenizer call: the overflowing windows of a batch are dropped after it
# the report warns past these (any split): more than a tenth of the texts lose tokens, or the model
# reads less than nine tenths of the tokens. A few long outliers stay quiet; a data set whose typical
# text passes max_length does not.
WARN_CUT_SHARE = 0.10
WARN_KEPT_SHARE = 0.90


@dataclass
class Counts:
    """What encoding one split kept: texts, tokens (special tokens not counted) and examples."""

    texts: int = 0
    cut: int = 0  # texts the model does not read whole
    tokens: int = 0  # their tokens
    kept: int = 0  # the tokens the model reads (each once; chunks: all)
    windows: int = 0  # the examples the texts became (chunks: more than one per long text)
    longest: int = 0  # tokens of the longest text

    def add(self, full: int, kept: int, windows: int = 1) -> None:
        self.texts += 1
        self.cut += kept < full
        self.tokens += full
        self.kept += kept
        self.windows += windows
        self.longest = max(self.longest, full)

    def to_json(self) -> dict:
        return {
            **asdict(self),
            "cut_share": round(self.cut / self.texts, 4) if self.texts else 0.0,
            "kept_share": round(self.kept / self.tokens, 4) if self.tokens else 1.0,
        }


def head_tail(budget: int) -> tuple[int, int]:
    """(head, tail) tokens of a budget: a quarter and the rest (Sun et al. 2019: 128 + 382 of 510)."""
    head = budget // 4
    return head, budget - head


# --------------------------------------------------------------------------------------------------
# encoding


def encode_texts(tokenizer, texts: list[str], pairs: list[str] | None, data_cfg) -> tuple[dict, Counts]:
    """The tokenized columns of `texts` under `data_cfg.long_texts` (with a `doc` column for chunks)
    and what the encoding kept of them."""
    mode, max_length = data_cfg.long_texts, data_cfg.max_length
    if pairs is not None or not tokenizer.is_fast:
        if mode != "truncate":  # a text pair is refused by the recipe already
            raise UserError(
                "data.long_texts",
                f"{mode} with a slow (Python) tokenizer {type(tokenizer).__name__}, which has no windows",
                "a model with a fast tokenizer (tokenizer.json), or data.long_texts: truncate",
            )
        return _plain(tokenizer, texts, pairs, max_length)
    stride = data_cfg.window_stride() if mode == "chunks" else 0
    specials = tokenizer.num_special_tokens_to_add(pair=False)
    budget = max_length - specials
    if budget < 2 or stride >= budget:
        raise UserError(
            "data.max_length" if budget < 2 else "data.stride",
            f"{max_length} tokens with a window stride of {stride} ({specials} special tokens)",
            "windows that each bring new text: stride below max_length minus the special tokens",
        )
    head, tail = head_tail(budget)
    prefix, _ = _layout(tokenizer)
    columns: dict[str, list] = {}
    counts = Counts()
    # head_tail reads a text's windows in order; the tokenizer's side stays for truncate (same encoding)
    with _truncation_side(tokenizer, tokenizer.truncation_side if mode == "truncate" else "right"):
        for start in range(0, len(texts), BATCH):
            enc = tokenizer(
                texts[start : start + BATCH],
                truncation=True,
                max_length=max_length,
                stride=stride,
                return_overflowing_tokens=True,
            )
            owner = enc.pop("overflow_to_sample_mapping")
            names = list(enc.keys())
            for name in names:
                columns.setdefault(name, [])
            rows_of: dict[int, list[int]] = {}
            for row, text in enumerate(owner):
                rows_of.setdefault(text, []).append(row)
            for text, rows in rows_of.items():
                sizes = [len(enc["input_ids"][r]) - specials for r in rows]
                full = sizes[0] + sum(size - stride for size in sizes[1:])
                if mode == "chunks":
                    counts.add(full, full, len(rows))
                    for name in names:
                        columns[name] += [enc[name][r] for r in rows]
                    columns.setdefault(DOC, []).extend([start + text] * len(rows))
                    continue
                first = rows[0]
                counts.add(full, min(full, sizes[0]))
                for name in names:
                    columns[name].append(enc[name][first])
                if mode == "head_tail" and len(rows) > 1:
                    # the first window, its text replaced: windows of stride 0 partition the text
                    content = [
                        t
                        for r, size in zip(rows, sizes, strict=True)
                        for t in enc["input_ids"][r][prefix:][:size]
                    ]
                    ids = list(enc["input_ids"][first])
                    ids[prefix : prefix + budget] = content[:head] + content[len(content) - tail :]
                    columns["input_ids"][-1] = ids
    return columns, counts


def _plain(tokenizer, texts: list[str], pairs: list[str] | None, max_length: int) -> tuple[dict, Counts]:
    """The plain truncating call (text pairs: longest first), counted with a call without truncation."""
    enc = tokenizer(texts, pairs, truncation=True, max_length=max_length)
    full = tokenizer(texts, pairs, add_special_tokens=False, verbose=False)["input_ids"]
    specials = tokenizer.num_special_tokens_to_add(pair=pairs is not None)
    counts = Counts()
    for ids, whole in zip(enc["input_ids"], full, strict=True):
        counts.add(len(whole), min(len(whole), len(ids) - specials))
    return dict(enc), counts


def _layout(tokenizer) -> tuple[int, int]:
    """Special tokens the tokenizer puts before and after a single text ([CLS] x [SEP]: 1, 1)."""
    mask = tokenizer("a", return_special_tokens_mask=True)["special_tokens_mask"]
    before = next((i for i, m in enumerate(mask) if not m), len(mask))
    after = next((i for i, m in enumerate(reversed(mask)) if not m), 0)
    return before, after


@contextmanager
def _truncation_side(tokenizer, side: str):
    old = tokenizer.truncation_side
    tokenizer.truncation_side = side
    try:
        yield
    finally:
        tokenizer.truncation_side = old


# --------------------------------------------------------------------------------------------------
# pooling: one score per document


def pool(logits: np.ndarray, docs: Sequence[int], how: str = "mean") -> np.ndarray:
    """Per document (in the order of their ids), the mean or max of its windows' logits."""
    logits = np.asarray(logits, dtype=np.float64)
    ids, inverse = np.unique(np.asarray(docs), return_inverse=True)
    if how == "max":
        out = np.full((len(ids), logits.shape[-1]), -np.inf)
        np.maximum.at(out, inverse, logits)
    elif how == "mean":
        out = np.zeros((len(ids), logits.shape[-1]))
        np.add.at(out, inverse, logits)
        out /= np.bincount(inverse)[:, None]
    else:
        raise ValueError(f"pool {how!r}")
    return out.astype(np.float32)


def per_document(values: Sequence, docs: Sequence[int]) -> np.ndarray:
    """A per-window column read once per document (its first window's): the labels."""
    _, first = np.unique(np.asarray(docs), return_index=True)
    return np.asarray(values)[first]


# --------------------------------------------------------------------------------------------------
# the report


def report(counts: dict[str, dict | None], data_cfg) -> dict | None:
    """report.json's `truncation`: the counts of each split and the warning, if any (None: the task
    does not count)."""
    splits = {name: c for name, c in counts.items() if c is not None}
    if not splits:
        return None
    out = {"max_length": data_cfg.max_length, "long_texts": data_cfg.long_texts, "splits": splits}
    if data_cfg.long_texts == "chunks":
        out["stride"] = data_cfg.window_stride()
    out["warning"] = _warning(splits, data_cfg)
    return out


def _warning(splits: dict[str, dict], data_cfg) -> str | None:
    over = {
        name: c
        for name, c in splits.items()
        if c["cut_share"] > WARN_CUT_SHARE or c["kept_share"] < WARN_KEPT_SHARE
    }
    if not over:
        return None
    name, c = min(over.items(), key=lambda item: item[1]["kept_share"])
    instead = "head_tail | chunks" if data_cfg.long_texts == "truncate" else "chunks"
    return (
        f"data.max_length {data_cfg.max_length} ({data_cfg.long_texts}) cuts {_pct(c['cut_share'])} of the "
        f"{name} texts and the model reads {_pct(c['kept_share'])} of their tokens (longest "
        f"{c['longest']}); raise data.max_length, or set data.long_texts: {instead} (docs/data.md)"
    )


def report_lines(truncation: dict | None) -> list[str]:
    """The report as printed when a run starts: one line, and the warning line if any."""
    if not truncation:
        return []
    mode, parts = truncation["long_texts"], []
    for name, c in truncation["splits"].items():
        part = (
            f"{name} {_pct(c['cut_share'])} of {c['texts']} texts cut, {_pct(c['kept_share'])} of tokens read"
        )
        if mode == "chunks":
            part += f", {c['windows']} windows ({c['windows'] / max(c['texts'], 1):.1f} per text)"
        parts.append(part)
    lines = [f"long texts (data.max_length {truncation['max_length']}, {mode}): " + "; ".join(parts)]
    if truncation["warning"]:
        lines.append(f"warning: {truncation['warning']}")
    return lines


_SAID: ContextVar[set[tuple[str, ...]] | None] = ContextVar("long_texts_said", default=None)


@contextmanager
def said_once() -> Iterator[None]:
    """Within it, `announce` prints each distinct report once: a search's trials read the same data,
    so its first trial says what max_length cuts and the others do not repeat it (a trial whose
    data differs, another max_length or few-shot draw, still says its own)."""
    token = _SAID.set(set())
    try:
        yield
    finally:
        _SAID.reset(token)


def announce(truncation: dict | None) -> None:
    """Print the report on stderr (stdout stays for a command's --json output)."""
    lines = tuple(report_lines(truncation))
    said = _SAID.get()
    if said is not None:
        if lines in said:
            return
        said.add(lines)
    for line in lines:
        print(line, file=sys.stderr, flush=True)


def _pct(share: float) -> str:
    return f"{100 * share:.1f} %"
