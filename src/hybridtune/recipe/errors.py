"""The recipe's error messages, derived from pydantic's errors: the key path, what was found
(a bounded repr: a message is never the size of the bad input) and what the schema expects, with
did-you-mean for unknown keys and the names users bring from transformers."""

from __future__ import annotations

import math
import re
import reprlib
from typing import Any

from pydantic import BaseModel, ValidationError

from hybridtune.errors import UserError, did_you_mean


def non_finite(value: Any, path: str = "") -> tuple[str, float] | None:
    if isinstance(value, float) and not math.isfinite(value):
        return path or "(top level)", value
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        where = f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}" if path else str(key)
        found = non_finite(child, where)
        if found is not None:
            return found
    return None


def _key_path(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _model_at(loc: tuple, root: type[BaseModel]) -> type[BaseModel] | None:
    """The pydantic model that owns the last key of `loc` (for did-you-mean on unknown keys)."""
    model: Any = root
    for part in loc[:-1]:
        if isinstance(part, int) or not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
        field = model.model_fields.get(part)
        if field is None:
            return None
        ann = field.annotation
        candidates = [
            a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)
        ]
        model = candidates[0] if candidates else None
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


# the names users bring from transformers.TrainingArguments, for did-you-mean
FAMILIAR_NAMES = {
    "learning_rate": "lr",
    "num_train_epochs": "epochs",
    "num_epochs": "epochs",
    "epoch": "epochs",
    "per_device_train_batch_size": "batch_size",
    "per_device_eval_batch_size": "eval_batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "warmup_ratio": "schedule.warmup",
    "warmup_steps": "schedule.warmup",
    "warmup": "schedule.warmup",
    "lr_scheduler_type": "schedule.name",
    "scheduler": "schedule.name",
    "bf16": "precision",
    "fp16": "precision",
    "output_dir": "dir",
}


def user_error(e: ValidationError, origin: str, root: type[BaseModel]) -> UserError:
    """The first error of a recipe's validation as one UserError: key path, found, expected."""
    err = e.errors()[0]
    loc = tuple(
        p for p in err["loc"] if not (isinstance(p, str) and p.startswith(("function-", "tagged-union")))
    )
    where = f"{origin}: {_key_path(loc)}"
    if err["type"] == "extra_forbidden":
        owner = _model_at(loc, root)
        allowed = sorted(owner.model_fields) if owner else []
        key = str(loc[-1])
        familiar = FAMILIAR_NAMES.get(key)
        if familiar and (familiar in allowed or "." in familiar):
            hint = f"did you mean '{familiar}'?"
        else:
            hint = did_you_mean(key, allowed)
        return UserError(
            where, f"unknown key '{key}'", "one of " + ", ".join(allowed) if allowed else "no such key", hint
        )
    # a check across sections names its own key: "key.path: found X; expected Y"
    pointed = re.fullmatch(r"Value error, ([\w.\[\]]+): found (.+); expected (.+)", err["msg"], re.S)
    if pointed:
        return UserError(f"{origin}: {pointed[1]}", pointed[2], pointed[3])
    found = err.get("input")
    found_text = "nothing" if found is None else f"{_short_repr(found)} ({type(found).__name__})"
    if err["type"] == "missing":
        found_text = "nothing"
    expected = err["msg"]
    ctx = err.get("ctx") or {}
    if err["type"] == "literal_error" and "expected" in ctx:
        expected = "one of " + ctx["expected"]
        hint = did_you_mean(str(found), re.findall(r"'([^']+)'", ctx["expected"]))
        return UserError(where, found_text, expected, hint)
    expected = re.sub(r"^(Value error, |Input should be )", "", expected)
    more = len(e.errors()) - 1
    return UserError(where, found_text, expected, f"and {more} more problem(s)" if more else None)


# a value in a message is cut short: the value of an alias bomb, a 10 MB string, a list of a million
# items would make the message itself the problem (its repr alone ran out of memory)
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 3, 80, 80
_REPR.maxlist = _REPR.maxdict = _REPR.maxtuple = _REPR.maxset = 6


def _short_repr(value: Any, limit: int = 200) -> str:
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"
