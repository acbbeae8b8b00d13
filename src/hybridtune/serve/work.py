"""What the classification and the generation routes share: request text types, the logger, and
`answer` (a request's results from the bounded batcher, a model failure as its own error)."""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import HTTPException
from pydantic import AfterValidator, StringConstraints

from hybridtune.batching import Batcher, Overloaded
from hybridtune.errors import UserError, one_line

log = logging.getLogger("hybridtune.serve")


def _utf8(text: str) -> str:
    # JSON may carry a lone surrogate ("\ud800"), which Python accepts and no tokenizer can encode
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text that is not valid Unicode (a lone surrogate escape)") from None
    return text


Utf8 = Annotated[str, AfterValidator(_utf8)]
Text = Annotated[Utf8, StringConstraints(min_length=1, pattern=r"\S")]


class ModelFailed(Exception):
    """The model call of one request failed (the request alone: its batch was retried without it)."""


async def answer(batcher: Batcher, items: list, key: Any = None) -> list:
    """The batcher's results; a model error becomes ModelFailed (500, one line), while the bounds
    (Overloaded, TimeoutError: 503) and bad input (UserError: 422) keep their own answers."""
    try:
        return await batcher.submit(items, key)
    except (Overloaded, TimeoutError, UserError, HTTPException):
        raise
    except Exception as e:
        raise ModelFailed(f"the model failed on this request: {one_line(e)}") from e
