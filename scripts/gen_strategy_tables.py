"""Write the docs' key tables from the schema (the parts' and other sections' pydantic fields): those
of docs/strategies.md, and of the feature pages in DOCS (docs/few_shot.md: `self_training`;
docs/search.md: what each part's `search` tries).

Each table sits between two marker comments, which name what it shows:

    <!-- generated: keys lr.groups[] -->      a section's keys: key | default | meaning (the field's
    ...                                       description); a key path from the Recipe, `[]` = an item
    <!-- end generated -->                    of a list section
    <!-- generated: parts -->                 the parts in their order of application, with their hooks
    <!-- generated: search parts -->          the parts that declare `search`, with its settings

    python scripts/gen_strategy_tables.py           # rewrite the DOCS
    python scripts/gen_strategy_tables.py --check   # exit 1 when a file differs (tests/test_doc_tables.py)
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import types
import typing
from pathlib import Path

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "strategies.md"
DOCS = (DOC, ROOT / "docs" / "few_shot.md", ROOT / "docs" / "search.md")  # every page with a generated block
BLOCK = re.compile(r"(<!-- generated: (?P<what>[^>]*?) -->\n)(?P<body>.*?)(<!-- end generated -->)", re.S)


def _models(annotation) -> list[type[BaseModel]]:
    """The pydantic models inside a field's annotation (X | None, list[X])."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType, list):
        return [m for arg in typing.get_args(annotation) for m in _models(arg)]
    return []


def section(path: str) -> type[BaseModel]:
    """The pydantic model at a key path of the Recipe (`stages.plan[]`: an item of the plan)."""
    from hybridtune.recipe import Recipe

    model: type[BaseModel] = Recipe
    for key in path.replace("[]", "").split("."):
        (model,) = _models(model.model_fields[key].annotation)
    return model


def _default(field) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if value is None:
        return "—"
    return f"`{json.dumps(value) if not isinstance(value, str) else value}`"


def keys_table(path: str) -> str:
    model = section(path)
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for key, field in model.model_fields.items():
        meaning = (field.description or "").replace("|", "\\|")
        rows.append(f"| `{key}` | {_default(field)} | {meaning} |")
    return "\n".join(rows) + "\n"


def parts_table() -> str:
    from hybridtune.strategy import PARTS

    rows = ["| # | key | file | what | hooks |", "|---|---|---|---|---|"]
    for i, (key, part) in enumerate(PARTS.items(), 1):
        hooks = ", ".join(f"`{h}`" for h in part.hooks()) or "—"
        rows.append(f"| {i} | `{key}` | `strategy/{key}.py` | {part.summary} | {hooks} |")
    return "\n".join(rows) + "\n"


def _setting(value) -> str:
    """A space setting as docs/search.md writes it: a value, [choices], or low … high (log)."""
    if isinstance(value, dict):
        return f"{value['low']:g} … {value['high']:g}" + (" (log)" if value.get("log") else "")
    if isinstance(value, list):
        return "[" + ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value) + "]"
    return str(value)


def search_parts_table() -> str:
    from hybridtune.strategy import PARTS

    rows = ["| part | what `search` tries (on or off per trial) |", "|---|---|"]
    for key, part in PARTS.items():
        if part.search is not None:
            settings = ", ".join(f"`{name}` {_setting(v)}" for name, v in part.search.items())
            rows.append(f"| `{key}` | {settings} |")
    return "\n".join(rows) + "\n"


def render(text: str) -> str:
    """`text` with every generated block rewritten from the schema."""

    def block(match: re.Match) -> str:
        what = match["what"].strip()
        if what == "parts":
            body = parts_table()
        elif what == "search parts":
            body = search_parts_table()
        elif what.startswith("keys "):
            body = keys_table(what[5:].strip())
        else:
            raise ValueError(f"unknown generated block {what!r}")
        return match.group(1) + body + match.group(4)

    return BLOCK.sub(block, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when the doc differs, write nothing")
    args = parser.parse_args(argv)
    drifted = 0
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        new = render(text)
        if new == text:
            continue
        if args.check:
            print(f"{doc.relative_to(ROOT)} differs from the schema: run scripts/gen_strategy_tables.py")
            drifted = 1
        else:
            doc.write_text(new, encoding="utf-8")
            print(f"wrote {doc.relative_to(ROOT)}")
    return drifted


if __name__ == "__main__":
    sys.exit(main())
