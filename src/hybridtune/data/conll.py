"""CoNLL-style token files for token classification, and the BIO (IOB2) tag rules.

    @paulwalk<TAB>O
    Empire<TAB>B-facility
    State<TAB>I-facility
    <blank line>
    next<TAB>O ...

One token per line, its tag in the last column (so CoNLL-2003's `word POS chunk NER` lines work too),
a blank line between sentences. Blank lines may hold spaces or tabs, and Windows line ends are read
as plain ones: WNUT-16 as distributed has a tab on every blank line. `-DOCSTART-` lines (CoNLL-2003)
are document separators, not tokens. Every sentence keeps the line of its first token (`_where`), and
a bad line is reported by its own line number.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd

from hybridtune.data.lines import text_lines
from hybridtune.errors import UserError

SUFFIXES = (".conll", ".txt", ".bio")
TAG = re.compile(r"[BI]-\S+")
EXPECTED_TAG = "O, B-<type> or I-<type> (BIO/IOB2 tags)"


def bio_problem(tags: Sequence[str], previous: str | None = None) -> tuple[int, str, str] | None:
    """(index, found, expected) of the first tag that breaks IOB2, or None when all are fine.
    `previous`: the tag before `tags[0]` in the same sentence (None: `tags` starts the sentence).

    IOB2 (Tjong Kim Sang & Veenstra 1999): every entity starts with B-; I-x only continues a B-x or I-x.
    The looser IOB1 (an entity may start with I-) is refused rather than guessed at."""
    for i, tag in enumerate(tags):
        if not isinstance(tag, str):
            return i, f"tag {tag!r} ({type(tag).__name__})", "a tag name such as B-person"
        if tag != "O" and not TAG.fullmatch(tag):
            return i, f"tag {tag!r}", EXPECTED_TAG
        if tag.startswith("I-") and (previous or "O")[2:] != tag[2:]:
            after = "the start of the sentence" if previous is None else f"{previous!r}"
            return i, f"{tag!r} after {after}", f"B-{tag[2:]} before the first I-{tag[2:]} of an entity"
        previous = tag
    return None


def read_conll(path: Path) -> pd.DataFrame:
    """A frame with columns tokens, tags (lists) and `_where` (file:line of each sentence's first token)."""
    text = path.read_text(encoding="utf-8-sig")
    sentences: list[tuple[list[str], list[str], int]] = []
    tokens: list[str] = []
    tags: list[str] = []
    first = 0
    for lineno, line in enumerate(text_lines(text) + [""], start=1):  # "" closes the last sentence
        if not line.strip():
            if tokens:
                sentences.append((tokens, tags, first))
                tokens, tags = [], []
            continue
        fields = line.split("\t") if "\t" in line else line.split()
        fields = [f.strip() for f in fields]
        where = f"{path}:line {lineno}"
        if len(fields) < 2 or not fields[0] or not fields[-1]:
            raise UserError(
                where, f"{line.strip()!r}", "a token and its tag separated by a tab (token<TAB>tag)"
            )
        token, tag = fields[0], fields[-1]
        if token == "-DOCSTART-":
            continue
        if not tokens:
            first = lineno
        problem = bio_problem([tag], tags[-1] if tags else None)
        if problem:
            raise UserError(where, f"{problem[1]} (token {token!r})", problem[2])
        tokens.append(token)
        tags.append(tag)
    if not sentences:
        raise UserError(str(path), "no sentences", "token<TAB>tag lines, a blank line between sentences")
    frame = pd.DataFrame(
        {
            "tokens": [s[0] for s in sentences],
            "tags": [s[1] for s in sentences],
            "_where": [f"{path}:line {s[2]}" for s in sentences],
        }
    )
    return frame


def check_sentence(tokens, tags, where: str, token_where: Callable[[int], str] | None = None) -> None:
    """The checks of one example from a table (JSON Lines, parquet, dataset dir): two lists of equal,
    non-zero length, tokens non-empty strings, tags valid IOB2."""
    token_where = token_where or (lambda i: f"{where}, token {i + 1}")
    for name, value in (("tokens", tokens), ("tags", tags)):
        if isinstance(value, str) or not hasattr(value, "__len__"):
            raise UserError(where, f"{name} {value!r} ({type(value).__name__})", f"a list of {name}")
    if len(tokens) == 0:
        raise UserError(where, "an empty sentence (no tokens)", "at least one token")
    if len(tokens) != len(tags):
        raise UserError(where, f"{len(tokens)} tokens and {len(tags)} tags", "one tag per token")
    for i, token in enumerate(tokens):
        if not isinstance(token, str) or not token.strip():
            raise UserError(token_where(i), f"token {token!r}", "a non-empty text")
    problem = bio_problem(list(tags))
    if problem:
        raise UserError(token_where(problem[0]), problem[1], problem[2])
