"""Splitting a text file into lines the way files mean them."""

from __future__ import annotations

import re


def text_lines(text: str) -> list[str]:
    """A text file's lines, split at "\n", "\r\n" and "\r" only. `str.splitlines` also splits at
    U+0085, U+2028, U+2029, \v, \f and \x1c-\x1e, which occur inside real texts (Rotten Tomatoes has
    U+0085) and are written unescaped in JSON: they would cut a JSON line or a text in two."""
    lines = re.split(r"\r\n|\n|\r", text)
    return lines[:-1] if lines and lines[-1] == "" else lines
