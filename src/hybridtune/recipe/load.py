"""A recipe from YAML: reading the file, `key.path=value` overrides, validation into a Recipe with
the errors of recipe/errors.py (no inf / nan anywhere), and the YAML a run dir keeps."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from hybridtune import safe_yaml
from hybridtune.errors import UserError
from hybridtune.recipe.errors import non_finite, user_error
from hybridtune.recipe.schema import Recipe, recipe_model


def load_recipe(path: str | Path | None = None, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe (or the default when `path` is None), apply `key.path=value` overrides, validate."""
    raw = read_recipe(path) if path is not None else {}
    for item in overrides or []:
        apply_override(raw, item)
    return validate_recipe(raw, str(path) if path else "default recipe")


def read_recipe(path: str | Path) -> dict:
    """A recipe file's mapping as written, not yet validated (for a caller that completes it first, as
    `hybridtune distill` names the teacher); a UserError naming the file (and line) if it is none."""
    p = Path(path)
    if not p.is_file():
        raise UserError(str(path), "no such file", "a recipe YAML file")
    try:
        text = p.read_text(encoding="utf-8-sig")
        raw: Any = safe_yaml.load(text) or {}
    except UnicodeDecodeError as e:
        raise UserError(str(path), f"bytes that are not UTF-8 ({e.reason})", "a UTF-8 text file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        if isinstance(e, yaml.reader.ReaderError):  # a character YAML does not allow
            where = f"{path}:{text.count(chr(10), 0, e.position) + 1}"
        raise UserError(where, f"invalid YAML ({getattr(e, 'problem', e)})", "a YAML mapping") from None
    if not isinstance(raw, dict):
        raise UserError(str(path), f"a YAML {type(raw).__name__}", "a mapping of recipe keys")
    return raw


def apply_override(raw: dict, item: str) -> None:
    """Set `a.b.c=value` in the nested dict; the value is parsed as YAML (so 3 is an int, [1,2] a list)."""
    key, sep, text = item.partition("=")
    if not sep or not key or not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", key):
        raise UserError(f"override '{item}'", "no key=value", "key.path=value, e.g. train.epochs=1")
    try:
        value = safe_yaml.load(text) if text else None
    except yaml.YAMLError:
        value = text
    if text in ("|", ">"):  # YAML reads a lone block-scalar indicator as '': meant is the character
        value = text
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if isinstance(child, str):  # shorthand such as `model: bundled:minilm`
            child = {"name" if part == "model" else "source": child}
        if not isinstance(child, dict):
            child = {}
        node[part] = child
        node = child
    node[parts[-1]] = value
    if parts[:2] == ["data", "train"]:
        node.pop(
            "source", None
        )  # explicit files replace the recipe's source (a later data.source= sets it again)


def validate_recipe(raw: dict, origin: str = "recipe") -> Recipe:
    """A recipe dict as a Recipe (with the sections of registered parts too), or a UserError."""
    model = recipe_model()
    try:
        recipe = model.model_validate(raw)
    except ValidationError as e:
        raise user_error(e, origin, model) from None
    # the strategy parts' own config classes too: no inf / nan anywhere (a string "nan" included,
    # which pydantic reads as a float)
    bad = non_finite(recipe.model_dump(mode="python"))
    if bad is not None:
        key, value = bad
        raise UserError(f"{origin}: {key}", repr(value), "a finite number")
    return recipe


def recipe_to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
